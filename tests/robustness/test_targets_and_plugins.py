"""Bad targets (API and CLI), and plugins: only entry points and listed modules load, a broken
plugin is reported by name while the others load (`camrt plugins`), a bad method result is
caught at the boundary naming its plugin, in the library and in a `camrt explain` run."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from camrt import plugins
from camrt.errors import ExitCode, InputError
from camrt.plugins import create_plugin_manager
from tests.helpers import write_plugin_modules

from .tally import record, refused


def _x(n: int) -> np.ndarray:
    return np.zeros((n, 3, 12, 16), np.float32)


@pytest.fixture(scope="module")
def explainer(tiny):
    from camrt.explainer import Explainer

    return Explainer(tiny.path, device="cpu")


@pytest.mark.parametrize(("targets", "fragment"), [
    (5, "target(s) [5, 5] out of range: use -1 (top-1) or a class index in 0..4"),
    (-2, "target(s) [-2, -2] out of range"),
    ([0, -7], "target(s) [-7] out of range"),
    ([0], "got 1 target(s) for a batch of 2"),
    ([0, 1, 2], "got 3 target(s) for a batch of 2"),
    ([[0, 1]], "for a batch of 2"),
    ([0.0, 1.0], "targets must be integers"),
    (1.5, "targets must be None, an integer or one integer per input"),
    ("1", "targets must be None, an integer or one integer per input"),
    (True, "targets must be None, an integer or one integer per input"),
    ([True, False], "targets must be integers"),
    ([2**70, 0], "targets must be integers"),
    (object(), "targets must be None, an integer or one integer per input"),
])
def test_bad_targets_in_the_library(explainer, targets, fragment):
    refused(lambda: explainer.explain(_x(2), targets=targets), InputError, fragment)


@pytest.mark.parametrize(("target", "fragment"), [
    ("5", "--target 5 is out of range"),
    ("-2", "--target must be a class index >= 0, top1 or topk:K"),
    ("cat", "--target must be a class index, a list of them (3,7), top1, topk:K, above:T, seg:CLASS, "
            "similar:FILE.npy or box:x1,y1,x2,y2[:label]"),
    ("box:1,2", "--target box:x1,y1,x2,y2[:label] needs 4 numbers"),
])
def test_bad_targets_on_the_command_line(tiny, tmp_path, target, fragment):
    from camrt.cli import build_cli
    from tests.helpers import random_image, write_image

    image = write_image(str(tmp_path / "a.png"), random_image(np.random.default_rng(0), 12, 16))
    result = CliRunner().invoke(build_cli(), ["explain", tiny.path, image, "-o", str(tmp_path / "o"),
                                              "--target", target], catch_exceptions=False)
    assert result.exit_code == ExitCode.USAGE_ERROR and fragment in result.stderr
    assert result.stdout == ""
    record(tried=1, clear=1)


# --- plugins --------------------------------------------------------------------------------------

MODULES = {
    "camrt_robust_good": """
        import camrt

        class Doubled(camrt.ActivationWeightingMethod):
            name = "robust-doubled"

            def weights(self, activations, gradients):
                return 2 * gradients.mean(axis=(2, 3))

        @camrt.hookimpl
        def register_methods(register):
            register(Doubled)
    """,
    "camrt_robust_import_fails": """
        raise ImportError("a dependency is missing, on purpose")
    """,
    "camrt_robust_unknown_hook": """
        import camrt

        @camrt.hookimpl
        def register_colours(register):
            pass
    """,
    "camrt_robust_register_fails": """
        import camrt

        @camrt.hookimpl
        def register_renderers(register):
            raise KeyError("renderer table")
    """,
    "camrt_robust_never_listed": """
        raise SystemExit("this module must never be imported")
    """,
    "camrt_robust_wrong_shape": """
        import numpy as np
        import camrt

        class WrongShape(camrt.Method):
            name = "robust-wrong-shape"

            def explain(self, outputs, *, layer):
                return np.zeros((outputs.inputs.shape[0], 3), np.float32)

        @camrt.hookimpl
        def register_methods(register):
            register(WrongShape)
    """,
}


@pytest.fixture
def plugin_modules(tmp_path, monkeypatch):
    write_plugin_modules(tmp_path / "site", MODULES, monkeypatch)
    monkeypatch.setattr(plugins, "origins", {})
    monkeypatch.setattr(plugins, "_manager", None)
    yield
    for module in MODULES:
        sys.modules.pop(module, None)


def test_only_listed_modules_load_and_failures_are_named(plugin_modules, tiny, monkeypatch):
    """Modules on sys.path that nobody listed are never imported (a model file cannot ask for
    one either); listed ones that fail are recorded by name and the rest still load."""
    from camrt.explainer import Explainer
    from camrt.plugins.registry import build_method_registry, build_renderer_registry

    monkeypatch.setenv("CAMRT_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv(plugins.PLUGINS_ENV, "camrt_robust_import_fails, camrt_robust_good,camrt_robust_unknown_hook,"
                                            "camrt_robust_register_fails")
    pm = plugins.get_plugin_manager()
    Explainer(tiny.path, method="robust-doubled", device="cpu").explain(_x(1))
    renderers = build_renderer_registry(pm)
    assert "camrt_robust_never_listed" not in sys.modules
    assert pm.get_plugin("camrt_robust_good") is not None and plugins.origins["camrt_robust_good"] == plugins.ORIGIN_LISTED
    assert build_method_registry(pm).plugin_of("robust-doubled") == "camrt_robust_good"
    assert "png" in renderers.names()  # the built-in renderers survive a failing renderer plugin
    failures = plugins.load_failures
    assert set(failures) == {"camrt_robust_import_fails", "camrt_robust_unknown_hook", "camrt_robust_register_fails"}
    assert "a dependency is missing, on purpose" in failures["camrt_robust_import_fails"]
    assert "register_colours" in failures["camrt_robust_unknown_hook"]
    assert failures["camrt_robust_register_fails"] == ("plugin 'camrt_robust_register_fails' failed in "
                                                       "register_renderers: KeyError('renderer table')")
    assert pm.get_plugin("camrt_robust_unknown_hook") is None  # rolled back: its hooks are not called
    record(tried=3, clear=3)


def test_camrt_plugins_command_lists_loaded_and_failed(plugin_modules, monkeypatch):
    from camrt.cli import build_cli

    monkeypatch.setenv("CAMRT_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv(plugins.PLUGINS_ENV, "camrt_robust_good,camrt_robust_import_fails")
    result = CliRunner().invoke(build_cli(), ["plugins", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    by_name = {p["name"]: p for p in listed["plugins"]}
    assert by_name["camrt_robust_good"] == {"name": "camrt_robust_good", "origin": plugins.ORIGIN_LISTED,
                                            "module": "camrt_robust_good", "hooks": ["register_methods"]}
    assert by_name["camrt.methods.gradcam"]["origin"] == plugins.ORIGIN_BUILTIN
    assert not [p["module"] for p in listed["plugins"] if p["module"].startswith("camrt.cli")]  # the CLI is no plugin
    assert list(listed["failures"]) == ["camrt_robust_import_fails"]
    table = CliRunner().invoke(build_cli(), ["plugins"], catch_exceptions=False).stdout
    assert "camrt_robust_good" in table and "failed to load:" in table and "on purpose" in table


def test_wrong_shape_in_a_cli_run_names_the_plugin(plugin_modules, tiny, tmp_path, monkeypatch):
    from camrt.cli import build_cli
    from tests.helpers import random_image, write_image

    monkeypatch.setenv("CAMRT_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv(plugins.PLUGINS_ENV, "camrt_robust_wrong_shape")
    image = write_image(str(tmp_path / "a.png"), random_image(np.random.default_rng(0), 12, 16))
    result = CliRunner().invoke(build_cli(), ["explain", tiny.path, image, "-o", str(tmp_path / "o"),
                                              "-m", "robust-wrong-shape"], catch_exceptions=False)
    assert result.exit_code == ExitCode.USAGE_ERROR
    assert ("method 'robust-wrong-shape' (plugin 'camrt_robust_wrong_shape') returned (1, 3) for the input; "
            "expected raw maps [B, h, w]") in result.stderr
    assert not (tmp_path / "o" / "a.heatmap.npy").exists()
    record(tried=1, clear=1)


def test_blocked_listed_module_is_never_imported(plugin_modules, monkeypatch):
    monkeypatch.setenv(plugins.PLUGINS_ENV, "camrt_robust_never_listed")
    monkeypatch.setenv("CAMRT_BLOCK_PLUGINS", "camrt_robust_never_listed")
    pm = create_plugin_manager(load_entrypoints=False)
    assert "camrt_robust_never_listed" not in sys.modules and pm.get_plugin("camrt_robust_never_listed") is None
    assert plugins.load_failures == {}
