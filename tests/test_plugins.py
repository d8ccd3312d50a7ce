"""The plugin path: the packaged example plugin, entry-point loading, blocking, and the checks at
the method boundary, each failure named after its plugin.

In-process tests use real `importlib.metadata.EntryPoint` objects whose modules are written into
a temporary folder, so `ep.load()` really imports them; only the `entry_points()` listing is
replaced. One slow test installs camrt and plugins/camrt-example into a fresh virtual environment.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from camrt import plugins, postprocess
from camrt.errors import PluginError
from camrt.hookspecs import hookimpl
from camrt.methods.base import Method
from camrt.plugins import create_plugin_manager
from camrt.plugins.registry import build_method_registry
from tests.helpers import write_plugin_modules

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "plugins" / "camrt-example"


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def example(monkeypatch):
    """The example plugin's module, imported from its source folder (not installed in .venv)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.delitem(sys.modules, "camrt_example", raising=False)
    module = importlib.import_module("camrt_example")
    yield module
    sys.modules.pop("camrt_example", None)


MODULES = {
    "camrt_test_good": """
        import camrt

        class Good(camrt.ActivationWeightingMethod):
            name = "test-good"

            def weights(self, activations, gradients):
                return gradients.mean(axis=(2, 3))

        @camrt.hookimpl
        def register_methods(register):
            register(Good)
    """,
    "camrt_test_broken_import": """
        raise RuntimeError("broken on purpose at import")
    """,
    "camrt_test_broken_register": """
        import camrt

        @camrt.hookimpl
        def register_methods(register):
            raise ValueError("bad registration on purpose")
    """,
    # A plugin package with a hook of its own (as camrt-exporters has register_gradient_rules)...
    "camrt_test_palette_hookspecs": """
        from camrt.hookspecs import hookspec

        @hookspec
        def register_palettes(register):
            \"\"\"register(name, colours)\"\"\"
    """,
    "camrt_test_palettes": """
        import camrt
        import camrt_test_palette_hookspecs

        @camrt.hookimpl
        def declare_hooks(declare):
            declare(camrt_test_palette_hookspecs)

        @camrt.hookimpl
        def register_palettes(register):
            register("gray", ["#000000", "#ffffff"])
    """,
    # ...and another plugin implementing that hook.
    "camrt_test_palette_user": """
        import camrt

        @camrt.hookimpl
        def register_palettes(register):
            register("sunset", ["#ff0000", "#ffff00"])
    """,
    "camrt_test_misspelt": """
        import camrt

        @camrt.hookimpl
        def register_method(register):
            raise AssertionError("an undeclared hook is never called")
    """,
    "camrt_test_rule_set": """
        import camrt
        from camrt_exporters import RuleSet
        from camrt_exporters.autodiff.rules import VANILLA

        # vanilla's rules under this plugin's own name
        MIRROR = RuleSet("mirror", {}, base=VANILLA)

        @camrt.hookimpl
        def register_gradient_rules(register):
            register(MIRROR)
    """,
}


@pytest.fixture
def entry_points(tmp_path, monkeypatch):
    """`entry_points(name=module, ...)`: makes these the only entry points of group camrt.

    The modules of MODULES are written to a temporary folder on sys.path and imported for real
    by `EntryPoint.load()`. Returns the list of group names the fake listing was asked for.
    """
    write_plugin_modules(tmp_path / "site", MODULES, monkeypatch)
    asked: list[str] = []

    def install(**named: str) -> list[str]:
        eps = [importlib.metadata.EntryPoint(name, value, plugins.ENTRY_POINT_GROUP) for name, value in named.items()]

        def fake_entry_points(*, group: str):
            asked.append(group)
            return [ep for ep in eps if ep.group == group]

        monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
        return asked

    yield install
    for module in MODULES:
        sys.modules.pop(module, None)


# --- the example plugin -------------------------------------------------------------------------


def test_example_registers_max_gradcam_under_its_plugin_name(example):
    pm = create_plugin_manager(load_entrypoints=False, blocked=set())
    pm.register(example, name="example")
    registry = build_method_registry(pm)
    assert registry.get("max-gradcam") is example.MaxGradCAM
    assert registry.get("MaxGradCAM") is example.MaxGradCAM  # alias, case-insensitive
    assert registry.plugin_of("max-gradcam") == "example"
    assert registry.plugin_of("gradcam") == "camrt.methods.gradcam"  # the built-ins still there
    described = example.MaxGradCAM.describe()
    assert described["requires"] == {"activations": True, "gradients": True, "input_gradient": None}
    assert "toy" in described["description"].lower()  # `camrt methods` says it is a toy


def test_max_gradcam_closed_form_on_the_tiny_model(example, plugin, tiny):
    """On `conv` (pre-ReLU) the gradient of logit c is W[c, k]/(hw) masked by conv > 0: the
    weight is its spatial max, which differs from Grad-CAM's mean."""
    from camrt.explainer import Explainer
    from tests.helpers import HEIGHT, WIDTH, numpy_forward

    plugin(example, "example")
    explainer = Explainer(tiny.path, method="max-gradcam", device="cpu", layer="conv")
    assert explainer.method_plugin == "example"
    x = np.random.default_rng(5).normal(size=(3, 3, HEIGHT, WIDTH)).astype(np.float32)
    results = explainer.explain(x, targets=[0, 2, 4])
    conv = numpy_forward(tiny, x)["conv"]
    hw = conv.shape[2] * conv.shape[3]
    for i, (result, target) in enumerate(zip(results, [0, 2, 4])):
        grad = (tiny.w2[target][:, None, None] / hw) * (conv[i] > 0)
        weights = grad.max(axis=(1, 2))
        expected = postprocess.finalize([np.einsum("k,khw->hw", weights, conv[i])], (HEIGHT, WIDTH))
        np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)
        assert result.method == "max-gradcam" and result.layer == "conv" and result.target == target
        mean_weights = grad.mean(axis=(1, 2))
        assert not np.allclose(weights, mean_weights)  # the toy really is a different method here


def test_readme_testing_examples_run(example):
    """The snippets under "Testing a plugin" in the example's README are run, so they cannot rot."""
    text = (EXAMPLE / "README.md").read_text()
    section = text[text.index("## Testing a plugin"):text.index("## Disabling and blocking")]
    blocks = section.split("```python\n")[1:]
    assert len(blocks) == 3
    for block in blocks:
        exec(compile(block.split("```")[0], "README.md", "exec"), {})  # noqa: S102 - our own docs


# --- entry-point loading ------------------------------------------------------------------------


def test_plugin_failing_at_import_is_recorded_and_the_others_load(entry_points):
    entry_points(broken="camrt_test_broken_import", good="camrt_test_good")
    pm = create_plugin_manager(load_entrypoints=True, blocked=set())
    assert set(plugins.load_failures) == {"broken"}
    message = plugins.load_failures["broken"]
    assert "'broken'" in message and "camrt_test_broken_import" in message and "broken on purpose at import" in message
    assert pm.get_plugin("broken") is None and pm.get_plugin("good") is not None
    registry = build_method_registry(pm)
    assert registry.plugin_of("test-good") == "good" and registry.plugin_of("gradcam") == "camrt.methods.gradcam"


def test_register_methods_raising_names_the_plugin_and_the_others_still_register(entry_points):
    entry_points(good="camrt_test_good", badreg="camrt_test_broken_register")
    pm = create_plugin_manager(load_entrypoints=True, blocked=set())
    assert plugins.load_failures == {}  # it imports fine; it fails when asked to register
    registry = build_method_registry(pm)
    expected = "plugin 'badreg' failed in register_methods: ValueError('bad registration on purpose')"
    assert registry.failures == {"badreg": expected} and plugins.load_failures == {"badreg": expected}
    assert registry.plugin_of("test-good") == "good" and registry.plugin_of("gradcam") == "camrt.methods.gradcam"


@pytest.mark.parametrize("block", ["broken", "camrt_test_broken_import", " other , broken "])
def test_blocked_plugin_is_never_imported(entry_points, monkeypatch, block):
    """By entry-point name or module name, from CAMRT_BLOCK_PLUGINS (spaces and other names allowed)."""
    entry_points(broken="camrt_test_broken_import", good="camrt_test_good")
    monkeypatch.setenv("CAMRT_BLOCK_PLUGINS", block)
    pm = create_plugin_manager(load_entrypoints=True)
    assert plugins.load_failures == {}
    assert "camrt_test_broken_import" not in sys.modules
    assert pm.get_plugin("good") is not None


def test_blocking_a_builtin_method(entry_points, monkeypatch):
    entry_points()
    monkeypatch.setenv("CAMRT_BLOCK_PLUGINS", "camrt.methods.saliency")
    registry = build_method_registry(create_plugin_manager(load_entrypoints=True))
    assert "saliency" not in registry.names() and "gradcam" in registry.names()
    with pytest.raises(PluginError, match="unknown method 'saliency'"):
        registry.get("saliency")


@pytest.mark.parametrize(("value", "loads"), [("1", False), ("yes", False), ("0", True), ("", True)])
def test_disable_autoload_env(entry_points, monkeypatch, value, loads):
    asked = entry_points(good="camrt_test_good")
    monkeypatch.setenv("CAMRT_DISABLE_PLUGIN_AUTOLOAD", value)
    pm = create_plugin_manager(blocked=set())
    assert (pm.get_plugin("good") is not None) is loads
    assert asked == (["camrt"] if loads else [])  # disabled: the installed entry points are not even listed
    assert pm.get_plugin("camrt.methods.gradcam") is not None  # built-ins load either way


# --- hooks declared by plugins -----------------------------------------------------------------


def _palettes(pm) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    pm.hook.register_palettes(register=found.__setitem__)
    return found


@pytest.mark.parametrize("user_first", [True, False], ids=["implementer-loads-first", "declarer-loads-first"])
def test_a_plugin_declares_a_hook_that_another_implements(entry_points, user_first):
    """Entry points load in no set order: the hook counts as declared whichever comes first."""
    order = [("user", "camrt_test_palette_user"), ("palettes", "camrt_test_palettes")]
    entry_points(**dict(order if user_first else order[::-1]))
    pm = create_plugin_manager(load_entrypoints=True, blocked=set())
    assert plugins.load_failures == {}
    assert _palettes(pm) == {"gray": ["#000000", "#ffffff"], "sunset": ["#ff0000", "#ffff00"]}
    declarer = pm.get_plugin("palettes")
    pm.unregister(declarer)
    pm.register(declarer, name="palettes")  # declaring the same module again is a no-op
    assert set(_palettes(pm)) == {"gray", "sunset"}


def test_a_hook_no_plugin_declares_leaves_its_implementer_out(entry_points):
    entry_points(typo="camrt_test_misspelt", user="camrt_test_palette_user", good="camrt_test_good")
    pm = create_plugin_manager(load_entrypoints=True, blocked=set())
    assert pm.get_plugin("typo") is None and pm.get_plugin("user") is None
    assert plugins.load_failures["typo"] == (
        "plugin 'typo' (camrt_test_misspelt) failed to load: it implements register_method, which no loaded plugin "
        "declares (a misspelt hook name, or the plugin declaring it is not installed or is blocked)")
    assert "it implements register_palettes, which no loaded plugin declares" in plugins.load_failures["user"]
    assert set(plugins.load_failures) == {"typo", "user"}
    assert build_method_registry(pm).plugin_of("test-good") == "good"


def test_gradient_rule_plugin_loaded_before_the_exporter_registers_its_rule_set(entry_points, exporter):
    """register_gradient_rules is declared by camrt-exporters, not the runtime: a rule-set plugin
    whose entry point comes first still loads, and the exporter sees its rule set."""
    from camrt_exporters import rule_sets
    from camrt_exporters.autodiff.rules import BUILTIN_RULE_SETS

    entry_points(rules="camrt_test_rule_set", exporters="camrt_exporters.plugin")
    pm = create_plugin_manager(load_entrypoints=True, blocked=set())
    assert plugins.load_failures == {}
    found = rule_sets(pm)
    assert found["mirror"] is sys.modules["camrt_test_rule_set"].MIRROR
    assert {name: found[name] for name in ("vanilla", "guided", "deconvnet")} == {r.name: r for r in BUILTIN_RULE_SETS}


def test_gradient_rule_plugin_without_the_exporter_is_left_out_naming_the_hook(entry_points, exporter):
    entry_points(rules="camrt_test_rule_set")
    pm = create_plugin_manager(load_entrypoints=True, blocked=set())
    assert pm.get_plugin("rules") is None
    assert "it implements register_gradient_rules, which no loaded plugin declares" in plugins.load_failures["rules"]


# --- the method boundary in the Explainer -------------------------------------------------------


def _method_returning(make):
    class BadMaps(Method):
        """Returns whatever the test asks for."""

        name = "bad-maps"

        def explain(self, outputs, *, layer):
            return make(outputs.inputs.shape[0])

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(BadMaps)

    return Plugin()


@pytest.mark.parametrize(("make", "complaint"), [
    (lambda b: np.zeros((b, 4), np.float32), r"\(2, 4\) for the input; expected raw maps \[B, h, w\] with B = 2"),
    (lambda b: np.zeros((b + 1, 3, 3), np.float32), r"\(3, 3, 3\) for the input; expected .* B = 2"),
    (lambda b: np.zeros((b, 0, 3), np.float32), r"\(2, 0, 3\)"),
    (lambda b: [[[0.0]]] * b, r"list for the input"),
    (lambda b: np.zeros((b, 3, 3), np.complex64), r"raw maps of dtype complex64 for the input; expected real numbers"),
    (lambda b: np.full((b, 3, 3), np.nan, np.float32), r"18 non-finite value\(s\) \(NaN or inf\) in raw maps \(2, 3, 3\) for the input; its inputs were finite"),
    (lambda b: np.where(np.eye(3, dtype=bool), np.inf, 0).astype(np.float32)[None].repeat(b, 0),
     r"6 non-finite value\(s\)"),
], ids=["2d", "batch", "empty", "list", "complex", "nan", "inf"])
def test_bad_raw_maps_are_caught_naming_method_and_plugin(tiny, plugin, make, complaint):
    from camrt.explainer import Explainer

    plugin(_method_returning(make), "test-bad-maps")
    explainer = Explainer(tiny.path, method="bad-maps", device="cpu")
    x = np.zeros((2, 3, 12, 16), np.float32)
    with pytest.raises(PluginError, match=r"^method 'bad-maps' \(plugin 'test-bad-maps'\) returned " + complaint):
        explainer.explain(x)


def test_non_finite_inputs_are_refused_before_any_method_runs(tiny):
    """A NaN pixel is the input's fault, not the method's: refused naming the row, no method called
    (the session refuses non-finite model outputs the same way; see tests/robustness)."""
    from camrt.errors import NonFiniteError
    from camrt.explainer import Explainer

    x = np.zeros((2, 3, 12, 16), np.float32)
    x[1, 0, 3, 3] = np.nan
    with pytest.raises(NonFiniteError, match=r"^model input row\(s\) \[1\] hold NaN or inf") as info:
        Explainer(tiny.path, method="gradcam", device="cpu", layer="feat").explain(x, targets=0)
    assert info.value.rows == [1]


class _Direct(Method):
    """A method passed as an instance, never registered."""

    name = "direct"

    def explain(self, outputs, *, layer):
        return np.zeros(3, np.float32)


def test_method_instance_is_named_by_its_module(tiny):
    from camrt.explainer import Explainer

    with pytest.raises(PluginError, match=rf"^method 'direct' \(plugin '{__name__}'\) returned \(3,\) for the input"):
        Explainer(tiny.path, method=_Direct(), device="cpu").explain(np.zeros((1, 3, 12, 16), np.float32))


# --- a real install -----------------------------------------------------------------------------


def _copy_sources(dest: Path) -> tuple[Path, Path]:
    """camrt's and the plugin's sources, copied so that pip's in-tree build leaves the checkout alone."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    core = dest / "camrt-src"
    shutil.copytree(REPO / "camrt", core / "camrt", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, core / name)
    plugin = shutil.copytree(EXAMPLE, dest / "camrt-example-src", ignore=ignore)
    return core, plugin


def _camrt_methods(venv_bin: Path, cwd: Path, **env: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("CAMRT_DISABLE_PLUGIN_AUTOLOAD", "CAMRT_BLOCK_PLUGINS", "PYTHONPATH", "VIRTUAL_ENV")}
    environment.update(env)
    done = subprocess.run([str(venv_bin / "camrt"), "methods", "--json"], capture_output=True, text=True,
                          env=environment, cwd=cwd, timeout=120)
    assert done.returncode == 0, done.stderr
    return {m["name"]: m["plugin"] for m in json.loads(done.stdout)}


@pytest.mark.slow
def test_installed_plugin_is_listed_and_can_be_blocked(tmp_path):
    """pip-installs camrt and plugins/camrt-example into a fresh virtual environment and asks
    `camrt methods --json` there, with the environment's plugin switches on and off.

    The venv is created WITHOUT --system-site-packages and pip resolves every dependency (numpy,
    onnx, onnxruntime, opencv-python-headless, pluggy, click) from the configured index: this
    proves the plugin's pyproject, entry point and dependency on camrt as a user would meet them.
    It takes 15-30 s on the 2-core dev machine (wheels come from the local mirror), well under
    the 90 s at which a --system-site-packages venv would have been the cheaper honest choice.
    Sources are copied first so the in-tree build writes nothing into the checkout.
    """
    core, plugin = _copy_sources(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bin_dir = venv / "bin"
    started = time.monotonic()
    install = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", str(core), str(plugin)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    print(f"pip install into a fresh venv: {time.monotonic() - started:.1f} s")

    where = subprocess.run([str(bin_dir / "python"), "-c", "import camrt, camrt_example; print(camrt.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path)
    assert where.stdout.strip().startswith(str(venv))  # the installed copy, not the checkout

    listed = _camrt_methods(bin_dir, tmp_path)
    assert listed["max-gradcam"] == "example"
    assert listed["gradcam"] == "camrt.methods.gradcam"
    for env in ({"CAMRT_BLOCK_PLUGINS": "example"}, {"CAMRT_BLOCK_PLUGINS": "camrt_example"},
                {"CAMRT_DISABLE_PLUGIN_AUTOLOAD": "1"}):
        listed = _camrt_methods(bin_dir, tmp_path, **env)
        assert "max-gradcam" not in listed, env
        assert listed["gradcam"] == "camrt.methods.gradcam", env
