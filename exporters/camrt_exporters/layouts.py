"""Layouts of an ONNX source: its image input (NCHW, or NHWC as Keras/tf2onnx files have it) and
the layers it may explain (nchw, nhwc or tokens: the rule is camrt.modelfile.token_layout).

camrt's runtime hands every method NCHW batches and [B, C, h, w] feature maps: an NHWC file
records `layout: nhwc` in its preprocessing metadata and the runtime transposes at the model's
input (camrt.execution.session); each layer's layout is recorded in META_LAYER_LAYOUTS and the
runtime brings the layer's activations and gradients to [B, C, h, w]
(camrt.execution.feature_layout). `camrt export --layout LAYER=SPEC` overrides the inferred
layout of a layer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from camrt import contract
from camrt.contract import LayerLayout
from camrt.modelfile import token_layout
from camrt.modelfile.layers import Shape, guess_image_layout, nearest_nchw_layer

from .autodiff.graph import GraphIndex
from .autodiff.reverse import active_tensors
from .errors import ExportError

#: The one syntax of a layout: a layer's (`--layout LAYER=SPEC`) and the attention maps' token
#: sequence (`--attention-tokens SPEC`, a tokens SPEC).
TOKENS_SYNTAX = "tokens[:HxW[:P,P...]]"
LAYOUT_SPEC = f"nchw|nhwc|{TOKENS_SYNTAX}"
LAYOUT_SYNTAX = f"LAYER={LAYOUT_SPEC}"


def image_layout(name: str, shape: Shape, given: str | None = None) -> str:
    """`given` (--input-layout) when set, else the layout the shape shows; ExportError when ambiguous."""
    if given is not None:
        if given not in contract.LAYOUTS:
            raise ExportError(f"--input-layout {given!r}: choose {' or '.join(contract.LAYOUTS)}")
        return given
    layout = guess_image_layout(shape)
    if layout is None:
        raise ExportError(f"image input {name!r} has shape {list(shape)}: cannot tell NCHW from NHWC "
                          "(channels are 1, 3 or 4 in dim 1 or dim 3); give --input-layout nchw or nhwc")
    return layout


@dataclass(frozen=True)
class LayoutOverride:
    """A `--layout` value: the layout of a layer, its token grid and extra tokens when given."""

    layout: str
    grid: tuple[int, int] | None = None
    extra_tokens: tuple[int, ...] | None = None


_SPEC = re.compile(r"^(?P<layout>nchw|nhwc|tokens)(?::(?P<h>\d+)x(?P<w>\d+)(?::(?P<extra>\d+(?:,\d+)*)?)?)?$")


def parse_layout_spec(spec: str) -> LayoutOverride | None:
    """A SPEC (nchw, nhwc, tokens, tokens:HxW, tokens:HxW:P,P; `tokens:HxW:` has no extra tokens)
    as a LayoutOverride; None when it does not follow LAYOUT_SPEC."""
    match = _SPEC.match(spec.strip().lower())
    if match is None or (match["layout"] != contract.LAYOUT_TOKENS and match["h"]):
        return None
    grid = (int(match["h"]), int(match["w"])) if match["h"] else None
    extra = tuple(int(p) for p in match["extra"].split(",")) if match["extra"] else (() if spec.endswith(":") else None)
    return LayoutOverride(match["layout"], grid, extra)


def parse_layout_overrides(values: Sequence[str]) -> dict[str, LayoutOverride]:
    """`--layout LAYER=SPEC` values by layer."""
    overrides = {}
    for value in values:
        layer, sep, spec = value.rpartition("=")
        given = parse_layout_spec(spec) if sep and layer else None
        if given is None:
            raise ExportError(f"--layout {value!r}: expected {LAYOUT_SYNTAX} (e.g. blocks.11.norm1=tokens:14x14:0)")
        overrides[layer] = given
    return overrides


def parse_attention_tokens(spec: str | None) -> LayoutOverride | None:
    """`--attention-tokens SPEC`: the token sequence of the attention maps, a tokens SPEC."""
    if spec is None:
        return None
    given = parse_layout_spec(spec)
    if given is None or given.layout != contract.LAYOUT_TOKENS:
        raise ExportError(f"--attention-tokens {spec!r}: expected {TOKENS_SYNTAX} (e.g. tokens:14x14:0)")
    return given


def layout_candidates(index: GraphIndex, image_input: str, score: str,
                      layouts: Mapping[str, LayerLayout]) -> list[str]:
    """`token_layout.layout_candidates` on a path from the input to the score; float tensors only
    (not a QDQ model's quantized ones)."""
    on_path = {t for t in active_tensors(index, score, [image_input]) if index.is_float(t)}
    return token_layout.layout_candidates(index.nodes, index.shape, on_path, layouts)


def resolve_layer_layouts(index: GraphIndex, tensors: Mapping[str, str], layouts: Mapping[str, LayerLayout],
                          overrides: Mapping[str, LayoutOverride], candidates: Sequence[str]) -> dict[str, LayerLayout]:
    """The layout of each layer (name -> its tensor): the `--layout` override checked against the
    tensor's shape, else the inferred one; ExportError naming `--layout` when neither exists."""
    unknown = sorted(set(overrides) - set(tensors))
    if unknown:
        raise ExportError(f"--layout names {unknown}, which are not exported layers {sorted(tensors)}")
    resolved = {}
    for layer, tensor in tensors.items():
        shape = index.shape(tensor)
        if layer in overrides:
            resolved[layer] = _apply_override(layer, shape, overrides[layer])
        elif tensor in layouts:
            resolved[layer] = layouts[tensor]
        elif shape is not None and len(shape) == 2:
            # A vector [B, C] (a classifier's hidden layer) is no map: it gets no layout, its
            # gradients are exported and checked, and a map method refuses it at explain time.
            continue
        else:
            nearest = nearest_nchw_layer(tensor, index.nodes, candidates)
            raise ExportError(
                f"layer {layer!r} {list(shape) if shape else '(shape unknown)'}: cannot establish how it maps onto "
                f"the image (nchw, nhwc or tokens); give it with --layout {layer}=nchw|nhwc|tokens:HxW:P,..."
                f"{f' or choose a layer such as {nearest!r}' if nearest else ''}")
    return resolved


def _apply_override(layer: str, shape: Shape | None, given: LayoutOverride) -> LayerLayout:
    """The LayerLayout `given` means for a tensor of `shape`; ExportError when it cannot hold it."""
    if shape is None:
        raise ExportError(f"--layout {layer}=...: the tensor's shape is unknown")
    dims = list(shape)
    if given.layout != contract.LAYOUT_TOKENS:
        spatial = dims[1:3] if given.layout == contract.LAYOUT_NHWC else dims[2:4]
        if len(dims) != 4 or not all(isinstance(d, int) and d > 1 for d in spatial):
            raise ExportError(f"--layout {layer}={given.layout}: the tensor has shape {dims}, not a rank-4 map "
                              "with static height and width > 1")
        return LayerLayout(given.layout)
    tokens = dims[1] if len(dims) == 3 else None
    if not isinstance(tokens, int):
        raise ExportError(f"--layout {layer}=tokens: the tensor has shape {dims}, not [B, T, C] with a static T")
    return resolve_tokens(given, tokens, f"--layout {layer}=tokens")


def resolve_tokens(given: LayoutOverride, tokens: int, flag: str) -> LayerLayout:
    """The tokens LayerLayout `given` means for a sequence of `tokens` tokens (no grid: a square one;
    no extra tokens: the leading ones); ExportError naming `flag` when the sequence cannot hold it."""
    grid = given.grid or _square_grid(flag, tokens)
    extra = given.extra_tokens if given.extra_tokens is not None else tuple(range(tokens - grid[0] * grid[1]))
    if tokens != grid[0] * grid[1] + len(extra) or any(p >= tokens for p in extra) or len(set(extra)) != len(extra):
        raise ExportError(f"{flag}: {tokens} tokens do not hold a {grid[0]}x{grid[1]} grid and the "
                          f"extra tokens at {list(extra)}")
    return LayerLayout(contract.LAYOUT_TOKENS, grid, tuple(extra))


def _square_grid(flag: str, tokens: int) -> tuple[int, int]:
    side = round(tokens ** 0.5)
    if side * side != tokens:
        raise ExportError(f"{flag}: {tokens} tokens are not a square grid; give it as "
                          f"tokens:HxW[:P,...] (the extra tokens' positions, e.g. 0 for a leading class token)")
    return side, side
