"""Reading a camrt file's contract: its `metadata_props`, checked and parsed into a ContractInfo.

The metadata is read straight from the file's top-level protobuf fields, so the contract version
is checked before onnxruntime sees the graph and without importing `onnx`.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import contract
from ..errors import ContractError, ModelError, require_regular_file
from .wire import (
    GRAPH_OUTPUT,
    LEN,
    MAX_MODEL_FIELD,
    MODEL_GRAPH,
    MODEL_IR_VERSION,
    MODEL_METADATA,
    VALUE_INFO_NAME,
    NotProtobuf,
    fields,
)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `metadata_props` of an ONNX file. Raises ModelError when the file is not ONNX."""
    path = require_regular_file(path, ModelError)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                raise ModelError(f"{path}: not an ONNX file (the file is empty)")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _scan_model(buf, size, path)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc


def _scan_model(buf, size: int, path: str) -> dict[str, str]:
    metadata: dict[str, str] = {}
    seen: set[int] = set()
    try:
        for number, wire, value in fields(buf, 0, size):
            if number > MAX_MODEL_FIELD:
                raise NotProtobuf(f"unknown field {number}")
            seen.add(number)
            if number == MODEL_METADATA and wire == 2:
                key = val = ""
                for sub, sub_wire, span in fields(buf, *value):
                    if sub_wire == 2 and sub in (1, 2):
                        text = bytes(buf[span[0]:span[1]]).decode("utf-8")
                        key, val = (text, val) if sub == 1 else (key, text)
                metadata[key] = val
    except (NotProtobuf, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not an ONNX file (it does not parse as an ONNX model: {exc})") from None
    if MODEL_IR_VERSION not in seen or MODEL_GRAPH not in seen:
        raise ModelError(f"{path}: not an ONNX file (no ir_version or graph field)")
    return metadata


def _json(meta: Mapping[str, str], key: str, path: str, default: Any = None, required: bool = False) -> Any:
    if key not in meta:
        if required:
            raise ContractError(f"{path}: the camrt metadata lacks {key!r}; re-export the model with `camrt export`")
        return default
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise ContractError(f"{path}: metadata {key!r} is not valid JSON ({exc}); re-export the model with `camrt export`") from None


#: Largest model input side the runtime accepts from metadata (a bound on what a file can make it allocate).
MAX_INPUT_SIDE = 16384


def _preprocessing_problem(p: contract.Preprocessing) -> str | None:
    """What is wrong with preprocessing read from a file, or None."""
    for name in ("height", "width"):
        value = getattr(p, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INPUT_SIDE:
            return f"{name} {value!r} is not an integer in 1..{MAX_INPUT_SIDE}"
    for name in ("mean", "std"):
        values = getattr(p, name)
        if len(values) not in (1, 3) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                and np.isfinite(v) for v in values):
            return f"{name} {list(values)!r} is not 3 finite numbers (or 1, for a grayscale model)"
    if len(p.mean) != len(p.std):
        return f"mean {list(p.mean)!r} and std {list(p.std)!r} have different lengths"
    if not all(p.std):
        return f"std {list(p.std)!r} has a zero"
    if isinstance(p.scale, bool) or not isinstance(p.scale, (int, float)) or not np.isfinite(p.scale):
        return f"scale {p.scale!r} is not a finite number"
    if not isinstance(p.channel_order, str) or p.channel_order.lower() not in ("rgb", "bgr"):
        return f"channel order {p.channel_order!r} is not rgb or bgr"
    if p.layout not in contract.LAYOUTS:
        return f"layout {p.layout!r} is not {' or '.join(contract.LAYOUTS)}"
    return None


def parse_contract(meta: Mapping[str, str], path: str = "<model>") -> contract.ContractInfo:
    """Turn `metadata_props` into a ContractInfo; refuse unknown contract versions."""
    from .. import __version__

    if contract.META_CONTRACT_VERSION not in meta:
        raise ModelError(f"{path}: valid ONNX but not a camrt file (no camrt metadata): run `camrt export` to make one")
    raw_version = meta[contract.META_CONTRACT_VERSION]
    try:
        version = int(raw_version)
    except ValueError:
        version = None
    if version not in contract.SUPPORTED_CONTRACT_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(contract.SUPPORTED_CONTRACT_VERSIONS))
        raise ContractError(
            f"{path}: camrt contract version {raw_version!r} is not supported by camrt {__version__} "
            f"(it reads version {supported}); re-export the model with this camrt version's `camrt export`"
        )
    input_name = meta.get(contract.META_INPUT)
    if not input_name:
        raise ContractError(f"{path}: the camrt metadata lacks {contract.META_INPUT!r}; re-export the model with `camrt export`")
    pre_text = meta.get(contract.META_PREPROCESSING)
    if pre_text is None:
        raise ContractError(f"{path}: the camrt metadata lacks {contract.META_PREPROCESSING!r}; re-export the model with `camrt export`")
    try:
        preprocessing = contract.Preprocessing.from_json(pre_text)
        problem = _preprocessing_problem(preprocessing)
    except KeyError as exc:
        problem = f"no {exc.args[0]!r} field"
    except (ValueError, TypeError, AttributeError) as exc:
        problem = str(exc)
    if problem:
        raise ContractError(f"{path}: metadata {contract.META_PREPROCESSING!r} is malformed ({problem}); re-export the model with `camrt export`")
    layers = _json(meta, contract.META_LAYERS, path, default=[])
    labels = _json(meta, contract.META_LABELS, path)
    return contract.ContractInfo(
        version=version,
        input_name=input_name,
        layers=[str(layer) for layer in layers],
        default_layer=meta.get(contract.META_DEFAULT_LAYER) or None,
        preprocessing=preprocessing,
        rule_sets=[str(r) for r in _json(meta, contract.META_RULE_SETS, path, default=[])],
        labels=[str(label) for label in labels] if labels else None,
        source=_json(meta, contract.META_SOURCE, path, default={}) or {},
        score=_json(meta, contract.META_SCORE, path, default={}) or {},
        exporter_version=meta.get(contract.META_EXPORTER_VERSION, ""),
        cam_layers=_names(meta, contract.META_CAM_LAYERS, path),
        bias_terms=_names(meta, contract.META_BIAS_TERMS, path),
        attention=_attention(meta, path),
        seed=_seed(meta, path),
    )


def _attention(meta: Mapping[str, str], path: str) -> contract.Attention | None:
    """META_ATTENTION parsed (None when the key is absent); ContractError when malformed."""
    if contract.META_ATTENTION not in meta:
        return None
    try:
        attention = contract.Attention.from_json(meta[contract.META_ATTENTION])
        grid = attention.tokens.grid
        if attention.tokens.layout != contract.LAYOUT_TOKENS or grid is None or len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"tokens {attention.tokens.to_dict()} is not a token layout with a grid")
    except (ValueError, KeyError, TypeError) as exc:
        raise ContractError(f"{path}: metadata {contract.META_ATTENTION!r} is malformed ({exc}); "
                            "re-export the model with `camrt export --attention`") from None
    return attention


def _seed(meta: Mapping[str, str], path: str) -> dict | None:
    """The seed entry (META_SEED), checked; None when the file has none."""
    seed = _json(meta, contract.META_SEED, path)
    if seed is None:
        return None
    shape = seed.get("shape") if isinstance(seed, dict) else None
    if not isinstance(shape, list) or len(shape) < 2 or seed.get("tensor") != contract.SEED_TENSOR:
        raise ContractError(f"{path}: metadata {contract.META_SEED!r} must be {{'tensor': {contract.SEED_TENSOR!r}, "
                            "'shape': [batch, ...]}; re-export the model with `camrt export --seed`")
    return seed


def _names(meta: Mapping[str, str], key: str, path: str) -> list[str] | None:
    """An optional JSON list of names (None when the key is absent)."""
    names = _json(meta, key, path)
    if names is None:
        return None
    if not isinstance(names, list):
        raise ContractError(f"{path}: metadata {key!r} must be a JSON list; re-export the model with `camrt export`")
    return [str(name) for name in names]


def read_contract(path: str | os.PathLike) -> contract.ContractInfo:
    """Check that `path` is a camrt file this runtime understands and return its contract."""
    return parse_contract(read_metadata(path), os.fspath(path))


def read_output_names(path: str | os.PathLike) -> tuple[str, ...]:
    """The names of the graph's outputs, in order, read from the file's bytes (no graph parsing,
    no weights): what `camrt inspect` checks a method's outputs against without a session."""
    path = require_regular_file(path, ModelError)
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            names = []
            for number, wire, graph in fields(buf, 0, len(buf)):
                if number != MODEL_GRAPH or wire != LEN:
                    continue
                for sub, sub_wire, value_info in fields(buf, *graph):
                    if sub == GRAPH_OUTPUT and sub_wire == LEN:
                        names += [bytes(buf[span[0]:span[1]]).decode("utf-8")
                                  for field, field_wire, span in fields(buf, *value_info)
                                  if field == VALUE_INFO_NAME and field_wire == LEN]
            return tuple(names)
    except (NotProtobuf, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{path}: not an ONNX file (it does not parse as an ONNX model: {exc})") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
