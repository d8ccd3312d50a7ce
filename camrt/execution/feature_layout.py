"""Layer tensors as the methods read them: feature maps [B, C, h, w], whatever the file's layout.

A camrt file records the layout of each exposed layer (contract.META_LAYER_LAYOUTS, a
contract.LayerLayout per layer, parsed and checked by `camrt.modelfile.metadata`; a layer it does
not list is NCHW):

- nchw: [B, C, h, w], as is;
- nhwc: [B, h, w, C] (Swin stages, ConvNeXt's channels-last blocks, Keras files): transposed;
- tokens: [B, T, C] (ViT, DeiT): the extra tokens (class, distillation, registers) dropped and
  the h * w grid tokens, row-major, folded into [B, C, h, w] (pytorch-grad-cam's
  ``reshape_transform``).

`ExplainSession.run` brings every fetched activation and gradient to [B, C, h, w] with
`outputs_as_nchw`, so every method sees feature maps; `from_nchw` is the inverse for the
methods that feed edited activations back into the model (Ablation-CAM's tail graph), taking the
extra tokens from the unedited tensor; `nchw_graph` is the same transform as ONNX nodes, for the
heatmaps made inside the session (`camrt.execution.heatmap_graph`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import contract
from ..contract import LayerLayout
from ..errors import ModelError


def grid_positions(layout: LayerLayout, tokens: int) -> np.ndarray:
    """Indices of the h * w grid tokens (row-major) in a sequence of `tokens`; ModelError when the
    sequence does not hold the grid and the extra tokens exactly."""
    h, w = layout.grid
    extra = set(layout.extra_tokens)
    if tokens != h * w + len(extra) or any(p >= tokens for p in extra):
        raise ModelError(f"a token tensor of {tokens} tokens cannot hold a {h}x{w} grid and the extra tokens at "
                         f"{sorted(extra)} its file records; re-export it with `camrt export --layout`")
    return np.array([p for p in range(tokens) if p not in extra], dtype=np.int64)


def to_nchw(value: np.ndarray, layout: LayerLayout, name: str = "layer") -> np.ndarray:
    """A layer tensor in `layout` as [B, C, h, w]."""
    kind = layout.layout
    if kind == contract.LAYOUT_NCHW:
        return value
    if kind == contract.LAYOUT_NHWC:
        _require_rank(value, 4, name, "[B, h, w, C]")
        return np.ascontiguousarray(value.transpose(contract.NHWC_TO_NCHW))
    _require_rank(value, 3, name, "[B, T, C]")
    h, w = layout.grid
    grid = value[:, grid_positions(layout, value.shape[1]), :]
    return np.ascontiguousarray(grid.reshape(value.shape[0], h, w, value.shape[2]).transpose(contract.NHWC_TO_NCHW))


def from_nchw(maps: np.ndarray, layout: LayerLayout, like: np.ndarray) -> np.ndarray:
    """The inverse of `to_nchw`: [N, C, h, w] in `layout`; the extra tokens are those of `like`
    (the unedited tensor in `layout`, one row per row of `maps`)."""
    kind = layout.layout
    if kind == contract.LAYOUT_NCHW:
        return maps
    channels_last = maps.transpose(contract.NCHW_TO_NHWC)
    if kind == contract.LAYOUT_NHWC:
        return np.ascontiguousarray(channels_last)
    tokens = np.array(like, dtype=maps.dtype, copy=True)
    n, h, w, c = channels_last.shape
    tokens[:, grid_positions(layout, tokens.shape[1]), :] = channels_last.reshape(n, h * w, c)
    return tokens


def outputs_as_nchw(values: Mapping[str, np.ndarray], layouts: Mapping[str, LayerLayout]) -> dict[str, np.ndarray]:
    """The activation and gradient outputs of non-NCHW layers as [B, C, h, w]; others as they are."""
    converted = dict(values)
    for layer, layout in layouts.items():
        if layout.layout == contract.LAYOUT_NCHW:
            continue
        for name in (contract.activation_output(layer), contract.gradient_output(layer)):
            if name in converted:
                converted[name] = to_nchw(converted[name], layout, name)
    return converted


def nchw_graph(builder: Any, tensor: str, layout: LayerLayout) -> str:
    """`to_nchw` as ONNX nodes appended by `builder` (a heatmap_graph.GraphBuilder); returns the
    name of the [B, C, h, w] tensor (`tensor` itself when it is NCHW)."""
    kind = layout.layout
    if kind == contract.LAYOUT_NCHW:
        return tensor
    if kind == contract.LAYOUT_NHWC:
        return builder.op("Transpose", [tensor], perm=list(contract.NHWC_TO_NCHW))
    h, w = layout.grid
    positions = builder.const(grid_positions(layout, h * w + len(layout.extra_tokens)))
    grid = builder.op("Gather", [tensor, positions], axis=1)  # [B, h*w, C]
    channels_first = builder.op("Transpose", [grid], perm=[0, 2, 1])
    return builder.op("Reshape", [channels_first, builder.const([0, -1, h, w])])


def _require_rank(value: np.ndarray, rank: int, name: str, shape: str) -> None:
    if value.ndim != rank:
        raise ModelError(f"output {name!r} has shape {value.shape}; its file records a layout of {shape}")
