"""The checked-in golden camrt files are up to date (tests/fixtures/make_golden.py): rebuilt by
today's exporter they are the same contract (graph, metadata, opsets), and the torch numbers
stored next to them are what torch autograd computes now. Fix: `python -m tests.fixtures.make_golden`."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.fixtures.make_golden import build_golden, build_toy, golden_references
from tests.helpers import GOLDEN, GOLDEN_VARIANTS, GoldenVariant, toy_sources

REGENERATE = "stale: run `python -m tests.fixtures.make_golden` and commit the files"


def _variant_id(variant: GoldenVariant) -> str:
    return f"{variant.folder.name}/{variant.name}"


def assert_same_contract(built: onnx.ModelProto, path) -> None:
    stored = onnx.load(str(path))
    assert {p.key: p.value for p in built.metadata_props} == {p.key: p.value for p in stored.metadata_props}, \
        f"{path}: metadata {REGENERATE}"
    assert list(built.opset_import) == list(stored.opset_import), f"{path}: opsets {REGENERATE}"
    assert built.graph.SerializeToString(deterministic=True) == stored.graph.SerializeToString(deterministic=True), \
        f"{path}: graph {REGENERATE}"


@pytest.mark.parametrize("variant", GOLDEN_VARIANTS, ids=_variant_id)
def test_golden_tiny_file_is_what_the_exporter_builds(variant):
    assert_same_contract(build_golden(variant), variant.path)


@pytest.mark.parametrize("variant", [v for v in GOLDEN_VARIANTS if v.references], ids=_variant_id)
def test_stored_references_are_torch_autograds_numbers(variant):
    with np.load(variant.reference_path) as stored:
        stored = dict(stored)
    fresh = golden_references(onnx.load(str(variant.path)))
    assert sorted(stored) == sorted(fresh), f"{variant.reference_path}: outputs {REGENERATE}"
    for name, value in fresh.items():
        np.testing.assert_allclose(stored[name], value, rtol=1e-12, atol=0, err_msg=f"{name}: {REGENERATE}")


@pytest.mark.parametrize("name", sorted(toy_sources()))
def test_golden_toy_file_is_what_camrt_export_builds(name, tmp_path):
    source, layers = toy_sources()[name]
    assert_same_contract(build_toy(source, layers, tmp_path), GOLDEN / f"{name}.camrt.onnx")


def test_every_golden_file_is_made_by_the_script():
    made = {v.path for v in GOLDEN_VARIANTS} | {v.reference_path for v in GOLDEN_VARIANTS if v.references}
    made |= {GOLDEN / f"{name}.camrt.onnx" for name in toy_sources()}
    assert {p for p in GOLDEN.iterdir()} <= made, "files in tests/fixtures/golden/ that make_golden.py does not write"
    sizes = sum(p.stat().st_size for p in made)
    assert sizes < 1_000_000, f"golden files: {sizes} bytes"
