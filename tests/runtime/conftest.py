"""Fixtures of the runtime tests (helpers live in tiny.py)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from .tiny import TinyModel, build_tiny_model


@pytest.fixture(scope="session")
def exporter():
    """Marks a test as needing camrt-exporters (the runtime itself never imports it)."""
    return pytest.importorskip("camrt_exporters")


@pytest.fixture(scope="session")
def tiny(exporter, tmp_path_factory) -> TinyModel:
    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny.camrt.onnx"))


@pytest.fixture(scope="session")
def make_model(exporter, tmp_path_factory) -> Callable[..., TinyModel]:
    folder = tmp_path_factory.mktemp("variants")
    counter = iter(range(10**6))

    def make(**kwargs) -> TinyModel:
        return build_tiny_model(str(folder / f"variant{next(counter)}.onnx"), **kwargs)

    return make


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
