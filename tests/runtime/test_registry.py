"""Method and renderer registries built from the hooks: names, aliases, duplicates, unknowns, options."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pytest

from camrt.errors import PluginError, UsageError
from camrt.hookspecs import hookimpl
from camrt.methods.base import ActivationWeightingMethod, EigenSmoothOptions, ElementwiseWeightingMethod, Method
from camrt.methods.gradcam import GradCAM
from camrt.plugins.registry import MethodRegistry, build_method_registry, build_renderer_registry


def test_builtins_registered_through_the_hook():
    registry = build_method_registry()
    assert registry.get("gradcam") is GradCAM and registry.get("Grad-CAM") is GradCAM
    assert registry.plugin_of("gradcam") == "camrt.methods.gradcam"
    renderers = build_renderer_registry()
    assert renderers.names() == ["npy", "png"]
    assert renderers.get("png").suffix == ".overlay.png" and renderers.get("npy").suffix == ".heatmap.npy"


def test_unknown_method_lists_registered():
    with pytest.raises(PluginError, match=r"unknown method 'nope'.*gradcam \(aliases: grad-cam\)"):
        build_method_registry().get("nope")


class _Clash(ActivationWeightingMethod):
    name = "clash"
    aliases = ("grad-cam",)

    def weights(self, activations, gradients):
        return gradients.max(axis=(2, 3))


def test_duplicate_alias_names_both_plugins(plugin):
    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(_Clash)

    plugin(Plugin(), "test-clash")
    registry = build_method_registry()  # the clashing plugin is left out, the others stay
    assert re.search(r"'test-clash'.*'grad-cam'.*'camrt.methods.gradcam'.*registered methods",
                     registry.failures["test-clash"])
    assert registry.plugin_of("grad-cam") == "camrt.methods.gradcam"
    with pytest.raises(PluginError, match=r"unknown method 'clash'.*failed to register: plugin 'test-clash'"):
        registry.get("clash")


def test_rejects_non_methods_and_abstract_classes():
    registry = MethodRegistry()
    with pytest.raises(PluginError, match="not a subclass"):
        registry.register(object, "p")
    with pytest.raises(PluginError, match="does not implement weights"):
        registry.register(ActivationWeightingMethod, "p")


def test_plugin_exception_is_named(plugin):
    class Broken:
        @hookimpl
        def register_methods(self, register):
            raise RuntimeError("boom")

    plugin(Broken(), "test-broken")
    registry = build_method_registry()
    assert re.match(r"plugin 'test-broken' failed in register_methods: RuntimeError\('boom'\)",
                    registry.failures["test-broken"])
    assert "gradcam" in registry.names()


def test_options_typed_and_unknown_rejected():
    class WithOptions(ActivationWeightingMethod):
        name = "with-options"

        @dataclass(frozen=True)
        class Options(EigenSmoothOptions):
            power: float = 1.0
            absolute: bool = False

        def weights(self, activations, gradients):
            g = np.abs(gradients) if self.options.absolute else gradients
            return (g ** self.options.power).mean(axis=(2, 3))

    method = WithOptions(power="2", absolute="yes")
    assert method.options == WithOptions.Options(power=2.0, absolute=True)
    with pytest.raises(UsageError, match=r"no option\(s\) powr; valid options: absolute, eigen_smooth, power"):
        WithOptions(powr=2)
    with pytest.raises(UsageError, match="must be float"):
        WithOptions(power="high")
    described = WithOptions.describe()
    assert described["options"] == [{"name": "eigen_smooth", "type": "bool", "default": False},
                                     {"name": "power", "type": "float", "default": 1.0},
                                     {"name": "absolute", "type": "bool", "default": False},
                                     {"name": "aug_smooth", "type": "bool", "default": False}]  # the explainer's
    assert described["requires"] == {"activations": True, "gradients": True, "input_gradient": None}


@pytest.mark.parametrize("method, noise", [("smoothgrad", "stdev_spread"), ("smooth-gradcam++", "std"),
                                           ("sscam", "std"), ("iscam", None)])
def test_sampling_options_checked(method, noise):
    """Every sampling method refuses n_samples < 1 and a negative or NaN noise scale, naming the option."""
    cls = build_method_registry().get(method)
    with pytest.raises(UsageError, match=f"{re.escape(method)}'.*n_samples must be >= 1, got 0"):
        cls(n_samples=0)
    for bad in (-0.5, float("nan")):
        if noise is not None:
            with pytest.raises(UsageError, match=f"{noise} must be >= 0, got {bad}"):
                cls(**{noise: bad})
    assert cls(n_samples="2").options.n_samples == 2


@pytest.mark.parametrize("base", [ActivationWeightingMethod, ElementwiseWeightingMethod])
def test_cam_family_options_must_keep_eigen_smooth(base):
    """The CAM family's map reads options.eigen_smooth: an Options without it is refused when the
    class is defined, naming the class and the base to use (channel and element-wise weighting)."""
    with pytest.raises(PluginError, match=r"Bare.Options must subclass camrt.EigenSmoothOptions"):
        class Bare(base):
            name = "bare"

            @dataclass(frozen=True)
            class Options:
                power: float = 1.0


def test_channel_weighting_plugin_gets_eigen_smooth_and_shape_check():
    """A plugin on ChannelWeightingMethod implements only layer_weights; the map, eigen_smooth and
    the weights' shape check come from the base (against numpy's own sum and SVD)."""
    from camrt import contract
    from camrt.methods.base import ChannelWeightingMethod, GraphOutputs

    class Uniform(ChannelWeightingMethod):
        name = "uniform"

        def layer_weights(self, outputs, layer):
            return np.ones(outputs.activation(layer).shape[:2])

    acts = np.random.default_rng(1).standard_normal((2, 5, 3, 4)).astype(np.float32)
    outputs = GraphOutputs({contract.activation_output("L"): acts}, np.empty(0))
    np.testing.assert_allclose(Uniform().explain(outputs, layer="L"), acts.sum(axis=1), rtol=1e-5, atol=1e-6)
    smooth = Uniform(eigen_smooth=True).explain(outputs, layer="L")
    for i in range(2):
        matrix = acts[i].reshape(5, -1).T
        matrix = matrix - matrix.mean(axis=0)
        v1 = np.linalg.svd(matrix.astype(np.float64))[2][0]
        expected = (matrix @ v1).reshape(3, 4)
        sign = np.sign((smooth[i] * expected).sum())  # the principal direction's sign is LAPACK's
        np.testing.assert_allclose(smooth[i], sign * expected, rtol=1e-4, atol=1e-5)

    class Wrong(Uniform):
        name = "wrong"

        def layer_weights(self, outputs, layer):
            return np.ones(3)

    with pytest.raises(PluginError, match=r"method 'wrong' returned weights of shape \(3,\), expected \(2, 5\)"):
        Wrong().explain(outputs, layer="L")


def test_duplicate_renderer(plugin):
    class Plugin:
        @hookimpl
        def register_renderers(self, register):
            register("png", lambda *a: None)

    plugin(Plugin(), "test-png")
    registry = build_renderer_registry()
    assert "renderer 'png' is already registered by plugin 'camrt.imaging.render'" in registry.failures["test-png"]
    assert registry.get("png").plugin == "camrt.imaging.render"


def test_method_is_abstract():
    with pytest.raises(TypeError):
        Method()  # type: ignore[abstract]
