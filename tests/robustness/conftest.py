"""Fixtures of the robustness suite: tiny camrt files (tests/runtime/tiny.py) and the tally."""

from __future__ import annotations

import numpy as np
import pytest

from .tally import TALLY


@pytest.fixture(scope="session")
def exporter():
    return pytest.importorskip("camrt_exporters")


@pytest.fixture(scope="session")
def tiny(exporter, tmp_path_factory):
    from tests.runtime.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("robust-models") / "tiny.camrt.onnx"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261126)


def pytest_terminal_summary(terminalreporter):
    if TALLY["tried"] or TALLY["fuzz_examples"]:
        terminalreporter.write_line(
            f"robustness: {TALLY['tried']} bad inputs tried, {TALLY['clear']} refused with a clear camrt error; "
            f"fuzzing: {TALLY['fuzz_examples']} generated inputs, {TALLY['fuzz_refused']} refused with camrt errors, "
            "the rest accepted and checked"
        )
