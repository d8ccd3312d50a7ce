"""The metadata keys are the file format (contract version 1): files already written carry them, so a
key never changes without a new contract version. The reorganisation of the runtime once renamed
`camrt.layers` by accident, and every older file lost its layer list; this list is the guard."""

from __future__ import annotations

import onnx

from camrt import contract
from camrt.testing import TINY_MODEL

VERSION_1_KEYS = {
    "camrt.contract_version", "camrt.source", "camrt.layers", "camrt.default_layer", "camrt.preprocessing",
    "camrt.labels", "camrt.rule_sets", "camrt.score", "camrt.seed", "camrt.exporter_version", "camrt.input",
    "camrt.cam_layers", "camrt.bias_terms", "camrt.layer_layouts", "camrt.attention",
}


def test_metadata_keys_are_those_of_contract_version_1():
    keys = {value for name, value in vars(contract).items() if name.startswith("META_")}
    assert contract.CONTRACT_VERSION == 1
    assert keys == VERSION_1_KEYS, "a metadata key changed: old files would be misread; bump the contract version"


def test_the_shipped_tiny_file_lists_its_layers_under_the_version_1_key():
    written = {p.key: p.value for p in onnx.load(TINY_MODEL).metadata_props}
    assert contract.META_LAYERS == "camrt.layers" and '"feat"' in written["camrt.layers"]
