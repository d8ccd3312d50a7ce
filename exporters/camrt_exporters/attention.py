"""Attention maps for `camrt export --attention`: which Softmax outputs are a transformer's attention
probabilities, in torch models and in ONNX graphs.

An attention map is a Softmax over the last axis whose output is [B, heads, T, T], T the length of
the token sequence; the file exposes each map and d score / d map (camrt.contract.Attention).

torch sources: the maps are recorded while the model runs, as the layers are (`torch_frontend`):
every softmax call (``torch.softmax``, ``Tensor.softmax``, ``F.softmax``, hence ``nn.Softmax``) whose
output has that shape becomes an extra output of the exported graph, named after the module that
computed it (``blocks.3.attn``; ``name@K`` for the K-th of several in one module). Fused attention
(``F.scaled_dot_product_attention``: timm's ``fused_attn``, torch's ``nn.MultiheadAttention``) has no
softmax to record, so while exporting with --attention, and in the validation run, it is replaced by
its own definition, softmax(Q K^T * scale + mask) V, written out (`explicit_attention`): the same
function, with the probabilities as a tensor. The export's validation compares every map and its
gradient with torch autograd of the model under the same replacement.

ONNX sources: the Softmax nodes with that output shape on the path from the image to the score, in
graph order, named by their output tensor. A fused attention op (ONNX ``Attention``, onnxruntime's
``com.microsoft`` ``Attention``/``MultiHeadAttention``) keeps its probabilities inside; it is refused
with the fix (export the model with the attention written out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from .autodiff.graph import GraphIndex, attribute
from .autodiff.reverse import active_tensors
from .errors import ExportError

#: Ops that compute attention probabilities inside themselves (no Softmax tensor to expose).
FUSED_ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                                 "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention"})
FUSED_ATTENTION_FIX = ("export the model with the attention written out as MatMul/Softmax/MatMul (torch: "
                       "torch.onnx.export with opset_version <= 22, or timm's attention modules with fused_attn=False; "
                       "not through onnxruntime's transformer optimizer, which fuses it), or export the torch model "
                       "with camrt directly")


def is_attention_shape(shape: Sequence) -> bool:
    """[B, heads, T, T] with static heads and T."""
    return (shape is not None and len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[1:])
            and shape[2] == shape[3])


# --- ONNX graphs -------------------------------------------------------------------------------


def onnx_attention_maps(index: GraphIndex, image_input: str, score: str, names: Sequence[str] = ()) -> dict[str, str]:
    """{map name: tensor}: the tensors `names`, or (empty) every attention Softmax output on the path
    from the image to the score, in graph order. ExportError naming the fused op or the tensor when
    there is none or a named one is not an attention map."""
    on_path = active_tensors(index, score, [image_input])
    fused = [n for n in index.nodes if n.op_type in FUSED_ATTENTION_OPS and any(o in on_path for o in n.output)]
    if names:
        for name in names:
            problem = _attention_problem(index, name, on_path)
            if problem:
                raise ExportError(f"--attention {name!r}: {problem}")
        return {name: name for name in names}
    found = {n.output[0]: n.output[0] for n in index.nodes
             if n.op_type == "Softmax" and _attention_problem(index, n.output[0], on_path) is None}
    if fused:
        node = fused[0]
        raise ExportError(f"--attention: node {node.name!r} ({node.op_type}) computes attention probabilities inside "
                          f"one fused op, so they cannot be exposed (nor differentiated); {FUSED_ATTENTION_FIX}")
    if not found:
        raise ExportError("--attention: no Softmax over the last axis with an output [batch, heads, T, T] feeds the "
                          "score; name the attention tensors with --attention NAME")
    return found


def _attention_problem(index: GraphIndex, tensor: str, on_path: set[str]) -> str | None:
    node = index.producer.get(tensor)
    if node is None:
        return "no node produces it"
    if node.op_type != "Softmax":
        return f"it is the output of {node.op_type} node {node.name!r}, not of a Softmax"
    shape = index.shape(tensor)
    if not is_attention_shape(shape):
        return f"its shape {list(shape) if shape else shape} is not [batch, heads, T, T]"
    if attribute(node, "axis", -1) % 4 != 3:
        return f"Softmax node {node.name!r} normalises axis {attribute(node, 'axis', -1)}, not the last one"
    if tensor not in on_path:
        return "the score does not depend on it"
    return None


# --- torch models ------------------------------------------------------------------------------


def _scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                  enable_gqa=False):
    """torch's F.scaled_dot_product_attention by its definition (the documented reference code)."""
    import torch

    if dropout_p:
        raise ExportError("attention dropout is active (dropout_p > 0): put the model in eval mode")
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa:
        repeat = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if is_causal:
        causal = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1), value)


@contextmanager
def explicit_attention():
    """F.scaled_dot_product_attention replaced by its definition while the block runs."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _scaled_dot_product_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass
class RecordedMap:
    owner: str  # the innermost module running when the softmax was called ("" for the model itself)
    tensor: object


@dataclass
class SoftmaxRecorder:
    """Records the attention-shaped softmax outputs of a torch model's forward, with the module that
    computed each. Use as a context manager around the forward pass (it patches torch's softmax
    functions and F.scaled_dot_product_attention, see `explicit_attention`)."""

    model: object
    maps: list[RecordedMap] = field(default_factory=list)

    def __post_init__(self):
        self._stack: list[str] = []
        self._handles = []
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._entering(name)))
            self._handles.append(module.register_forward_hook(self._leaving))

    def _entering(self, name: str):
        def hook(module, args) -> None:
            self._stack.append(name)

        return hook

    def _leaving(self, module, args, output) -> None:
        self._stack.pop()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _recording(self, original):
        def softmax(input, *args, **kwargs):
            output = original(input, *args, **kwargs)
            dim = kwargs.get("dim", args[0] if args else None)
            if dim is not None and dim % max(output.dim(), 1) == 3 and is_attention_shape(tuple(output.shape)):
                self.maps.append(RecordedMap(self._stack[-1] if self._stack else "", output))
            return output

        return softmax

    @contextmanager
    def recording(self):
        import torch
        import torch.nn.functional as F

        self.maps.clear()
        self._stack.clear()
        originals = (torch.softmax, torch.Tensor.softmax, F.softmax)
        torch.softmax, torch.Tensor.softmax, F.softmax = (self._recording(f) for f in originals)
        try:
            with explicit_attention():
                yield self
        finally:
            torch.softmax, torch.Tensor.softmax, F.softmax = originals

    def named(self) -> dict[str, object]:
        """{map name: tensor} of the last forward: the owner module's name, ``owner@K`` when one module
        computed several."""
        counts: dict[str, int] = {}
        for recorded in self.maps:
            counts[recorded.owner] = counts.get(recorded.owner, 0) + 1
        seen: dict[str, int] = {}
        named = {}
        for recorded in self.maps:
            k = seen.get(recorded.owner, 0)
            seen[recorded.owner] = k + 1
            owner = recorded.owner or "model"
            named[owner if counts[recorded.owner] == 1 else f"{owner}@{k}"] = recorded.tensor
        return named


def select_maps(available: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """The map names among `available` that `wanted` (module names, or map names) selects, in forward
    order: all of them when `wanted` is empty. ExportError naming the candidates when one selects none."""
    if not available:
        raise ExportError("--attention: the model computes no softmax over the last axis with an output "
                          "[batch, heads, T, T]; it has no attention maps to expose")
    if not wanted:
        return list(available)
    chosen = []
    for name in wanted:
        matched = [m for m in available if m == name or m.startswith(name + ".") or m.startswith(name + "@")]
        if not matched:
            raise ExportError(f"--attention {name!r} selects no attention map; the model's maps are: "
                              f"{', '.join(available)}")
        chosen += matched
    return [m for m in available if m in set(chosen)]


# --- LeGrad's layer scores (torch sources) -----------------------------------------------------


def map_block(map_name: str) -> str:
    """The block that holds an attention map: the parent of the module that computed it
    (``blocks.3.attn`` -> ``blocks.3``; torchvision's ``encoder.layers.encoder_layer_3.self_attention``
    -> ``encoder.layers.encoder_layer_3``)."""
    return map_name.partition("@")[0].rpartition(".")[0]


def layer_score_projection(model):
    """LeGrad's projection of a block's tokens [B, T, C] to class scores [B, classes]: the mean over
    all tokens, the model's final norm and its head (Bousselham et al. 2024 sec. 3.2; the authors' code
    ``ln_post(feat.mean(dim=0)) @ proj``, torchcam 0.5's ``heads(norm(tokens.mean(dim=1)))``).

    torchvision's VisionTransformer: ``heads(encoder.ln(mean))``. timm's vision transformers: every
    token replaced by the mean, then ``forward_head(norm(.))`` (so the head's own pooling, class token
    or average, and a distillation head's average, see the mean). Other models: ExportError."""
    encoder, heads = getattr(model, "encoder", None), getattr(model, "heads", None)
    if encoder is not None and heads is not None and hasattr(encoder, "ln"):
        return lambda tokens: heads(encoder.ln(tokens.mean(dim=1)))
    norm, forward_head = getattr(model, "norm", None), getattr(model, "forward_head", None)
    if norm is not None and callable(forward_head):
        return lambda tokens: forward_head(norm(tokens.mean(dim=1, keepdim=True).expand_as(tokens)))
    raise ExportError(f"--attention-layer-scores: camrt knows the final norm and head of timm's and torchvision's "
                      f"vision transformers only, not of {type(model).__name__}; export without it (LeGrad then "
                      "cannot run on the file)")
