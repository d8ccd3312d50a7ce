"""The fixtures of the whole suite (helpers live in tests/helpers.py).

Tests that need camrt-exporters (and so torch) carry the `exporters` marker: every test in
EXPORTER_ONLY (modules that import the exporters at the top) and every test that asks for the
`exporter` fixture or is marked by hand. `--runtime-only` (scripts/test-runtime) runs the rest with
the runtime alone: it refuses to start where torch or camrt-exporters is importable, does not
collect EXPORTER_ONLY and deselects the marked tests (counted as deselected in the summary).
Everywhere else a missing exporter package is an error, never a silent skip; and any skip at all (a
missing test dependency behind `pytest.importorskip`, a `skipif`) fails the session, listed in the
summary: known gaps are `xfail(reason=...)`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import LABELS, TinyModel, copy_golden, golden_variant

# Hermetic: third-party plugins installed in the environment must not change test results.
os.environ.setdefault("CAMRT_DISABLE_PLUGIN_AUTOLOAD", "1")

TESTS = Path(__file__).parent
EXPORTER_ONLY = (TESTS / "exporters", TESTS / "robustness" / "test_exports.py")


def _exporter_only(path: Path) -> bool:
    return any(path == folder or folder in path.parents for folder in EXPORTER_ONLY)


def pytest_addoption(parser):
    parser.addoption("--runtime-only", action="store_true",
                     help="run the tests that need neither torch nor camrt-exporters, in an environment "
                          "without them (scripts/test-runtime)")


def pytest_configure(config):
    if config.getoption("--runtime-only"):
        present = [name for name in ("torch", "camrt_exporters") if importlib.util.find_spec(name)]
        if present:
            raise pytest.UsageError(f"--runtime-only: {', '.join(present)} importable here; run it in an "
                                    "environment with the runtime alone (scripts/test-runtime)")


def pytest_ignore_collect(collection_path: Path, config):
    if config.getoption("--runtime-only") and _exporter_only(collection_path):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if {"exporter", "exporters_plugin"} & set(getattr(item, "fixturenames", ())) or _exporter_only(Path(item.path)):
            item.add_marker(pytest.mark.exporters)
    if config.getoption("--runtime-only"):
        deselected = [item for item in items if item.get_closest_marker("exporters")]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if not item.get_closest_marker("exporters")]


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if exitstatus == pytest.ExitCode.OK and reporter is not None and reporter.stats.get("skipped"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def exporter():
    """camrt-exporters, for a test that needs it (the runtime itself never imports it)."""
    import camrt_exporters

    return camrt_exporters


@pytest.fixture
def exporters_plugin():
    """The CLI as installed with camrt-exporters: `camrt export` listed. Registered for the test
    unless something (an export in this process) already registered it."""
    import camrt_exporters.plugin as module
    from camrt.plugins import get_plugin_manager

    pm = get_plugin_manager()
    added = not pm.is_registered(module)
    if added:
        pm.register(module, name="exporters")
    yield module
    if added:
        pm.unregister(module)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModel:
    """The golden tiny camrt file (layers feat and conv, vanilla and guided input gradients)."""
    return copy_golden(golden_variant(), tmp_path_factory.mktemp("models") / "tiny.camrt.onnx")


@pytest.fixture(scope="session")
def make_model(tmp_path_factory) -> Callable[..., TinyModel]:
    """`make_model(batch=..., layers=..., rule_sets=..., fullgrad=..., labels=..., preprocessing=...,
    metadata_overrides=...)`: a copy of the golden file with those exporter options, its metadata edited."""
    folder = tmp_path_factory.mktemp("variants")
    counter = iter(range(10**6))

    def make(*, batch: int | str = "N", layers: tuple[str, ...] = ("feat", "conv"),
             rule_sets: tuple[str, ...] = ("vanilla", "guided"), fullgrad: bool = False,
             labels: list[str] | None = LABELS, **metadata) -> TinyModel:
        variant = golden_variant(batch=batch, layers=layers, rule_sets=rule_sets, fullgrad=fullgrad)
        return copy_golden(variant, folder / f"variant{next(counter)}.onnx", labels=labels, **metadata)

    return make


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def plugin():
    """Register a plugin object on the process-wide manager for one test only."""
    from camrt.plugins import get_plugin_manager

    pm = get_plugin_manager()
    registered = []

    def register(obj, name: str):
        pm.register(obj, name=name)
        registered.append(obj)
        return obj

    yield register
    for obj in registered:
        pm.unregister(obj)


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped:
        terminalreporter.section("skipped tests fail the suite", red=True)
        for report in skipped:
            reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
            terminalreporter.line(f"{report.nodeid}: {reason}")
        terminalreporter.line("install what they need (scripts/install test), or mark a known gap xfail(reason=...)")
    from tests.robustness.tally import TALLY

    if TALLY["tried"] or TALLY["fuzz_examples"]:
        terminalreporter.write_line(
            f"robustness: {TALLY['tried']} bad inputs tried, {TALLY['clear']} refused with a clear camrt error; "
            f"fuzzing: {TALLY['fuzz_examples']} generated inputs, {TALLY['fuzz_refused']} refused with camrt errors, "
            "the rest accepted and checked"
        )
