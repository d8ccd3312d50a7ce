"""Chefer, Gur & Wolf's transformer attribution (CVPR 2021) in torch, as their code computes it, on timm's
VisionTransformer: the oracle of the lrp-chefer rule set and the transformer-attribution method.

Their repository (hila-chefer/Transformer-Explainability) is not a package and its ViT is its own class
(baselines/ViT/ViT_LRP.py on the relevance modules of modules/layers_ours.py), so its relevance rules are
restated below, one function per module's `relprop`, and applied to the tensors of timm's vit_tiny forward,
written out here (`forward` checks its logits against timm's):

- safe_divide(a, b) = a / (b + 1e-9) where b != 0, else 0 (their clamp sum is b + 1e-9 for every b);
- Linear: alpha 1, beta 0 on x+ and x- with the bias left out; Conv2d of 3 channels: z^B with the sample's
  minimum and maximum as bounds;
- einsum (Q K^T, A V): x_i * grad(R / Z), then halved in Attention.relprop; the attention relevance is the
  halved share of A (`save_attn_cam`);
- Add: the two shares rescaled to |sum a| : |sum b| of sum R, sums over the whole tensor (one image here);
- Clone: x * sum_i (R_i / x); IndexSelect: x * grad(R / Z);
- LayerNorm, GELU, Softmax, Dropout: the relevance passes.

The map (`relprop(method="transformer_attribution")`): per block grad * cam of the first sample, clamped at 0,
the mean over heads; `compute_rollout_attention` adds the identity and multiplies later blocks from the left,
without normalising; the class token's row over the patches. `method="full"`: the relevance below the position
embedding's Add, without the class token, through the patch embedding, summed over the channels.
Their code explains one image: call these per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    return a / den * b.ne(0).type(b.type())


def _gradients(z, inputs, s):
    return torch.autograd.grad(z, inputs, s)


def linear_relprop(x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    pw, nw, px, nx = weight.clamp(min=0), weight.clamp(max=0), x.clamp(min=0), x.clamp(max=0)
    px, nx = px.detach().requires_grad_(True), nx.detach().requires_grad_(True)
    z1, z2 = F.linear(px, pw), F.linear(nx, nw)
    s = safe_divide(relevance, z1 + z2)
    return (px * _gradients(z1, px, s)[0] + nx * _gradients(z2, nx, s)[0]).detach()


def first_conv_relprop(conv: torch.nn.Conv2d, x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    pw, nw = conv.weight.clamp(min=0), conv.weight.clamp(max=0)
    low = x * 0 + x.amin(dim=(1, 2, 3), keepdim=True)
    high = x * 0 + x.amax(dim=(1, 2, 3), keepdim=True)

    def conv_with(t, w):
        return F.conv2d(t, w, stride=conv.stride, padding=conv.padding)

    def transposed(s, w):
        return F.conv_transpose2d(s, w, stride=conv.stride, padding=conv.padding)

    z = conv_with(x, conv.weight) - conv_with(low, pw) - conv_with(high, nw) + 1e-9
    s = relevance / z
    return x * transposed(s, conv.weight) - low * transposed(s, pw) - high * transposed(s, nw)


def simple_relprop(fn, inputs: list[torch.Tensor], relevance: torch.Tensor) -> list[torch.Tensor]:
    """RelPropSimple: x_i * grad_i(R / Z) for Z = fn(*inputs)."""
    inputs = [x.detach().requires_grad_(True) for x in inputs]
    z = fn(*inputs)
    gradients = _gradients(z, inputs, safe_divide(relevance, z))
    return [(x * g).detach() for x, g in zip(inputs, gradients)]


def add_relprop(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    share_a, share_b = simple_relprop(torch.add, [a, b], relevance)
    sum_a, sum_b = share_a.sum(), share_b.sum()
    factor_a = safe_divide(sum_a.abs(), sum_a.abs() + sum_b.abs()) * relevance.sum()
    factor_b = safe_divide(sum_b.abs(), sum_a.abs() + sum_b.abs()) * relevance.sum()
    return share_a * safe_divide(factor_a, share_a.sum()), share_b * safe_divide(factor_b, share_b.sum())


def clone_relprop(x: torch.Tensor, relevances: list[torch.Tensor]) -> torch.Tensor:
    return x * sum(safe_divide(r, x) for r in relevances)


@dataclass
class BlockTensors:
    x: torch.Tensor
    norm1: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn: torch.Tensor
    heads_out: torch.Tensor
    mid: torch.Tensor
    norm2: torch.Tensor
    gelu: torch.Tensor


@dataclass
class Forward:
    image: torch.Tensor
    tokens: torch.Tensor  # class token and patches, before the position embedding
    blocks: list[BlockTensors]
    final: torch.Tensor  # the final norm's output
    logits: torch.Tensor


def forward(model, image: torch.Tensor) -> Forward:
    """timm's VisionTransformer forward written out (no fused attention), keeping every tensor relprop reads."""
    patches = model.patch_embed.proj(image).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token.expand(len(image), -1, -1), patches], dim=1)
    x = tokens + model.pos_embed
    blocks = []
    for block in model.blocks:
        attention = block.attn
        b, n, d = x.shape
        norm1 = block.norm1(x)
        q, k, v = attention.qkv(norm1).reshape(b, n, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (torch.einsum("bhid,bhjd->bhij", q, k) * attention.scale).softmax(dim=-1)
        attn.retain_grad()
        heads_out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(b, n, d)
        mid = x + attention.proj(heads_out)
        norm2 = block.norm2(mid)
        gelu = block.mlp.act(block.mlp.fc1(norm2))
        blocks.append(BlockTensors(x, norm1, q, k, v, attn, heads_out, mid, norm2, gelu))
        x = mid + block.mlp.fc2(gelu)
    final = model.norm(x)
    logits = model.head(final[:, 0])
    torch.testing.assert_close(logits, model(image), rtol=1e-4, atol=1e-4 * logits.abs().max().item())
    return Forward(image, tokens, blocks, final, logits)


def attention_relprop(block, t: BlockTensors, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT_LRP.Attention.relprop: (relevance of the block's norm1 output, the attention relevance)."""
    heads = block.attn.num_heads
    b, n, d = relevance.shape
    cam = linear_relprop(t.heads_out, block.attn.proj.weight, relevance).reshape(b, n, heads, -1).transpose(1, 2)
    cam_attn, cam_v = (r / 2 for r in simple_relprop(lambda a, v: torch.einsum("bhij,bhjd->bhid", a, v),
                                                     [t.attn, t.v], cam))
    cam_q, cam_k = (r / 2 for r in simple_relprop(lambda q, k: torch.einsum("bhid,bhjd->bhij", q, k),
                                                  [t.q, t.k], cam_attn))
    cam_qkv = torch.stack([cam_q, cam_k, cam_v]).permute(1, 3, 0, 2, 4).reshape(b, n, 3 * d)
    return linear_relprop(t.norm1, block.attn.qkv.weight, cam_qkv), cam_attn


def block_relprop(block, t: BlockTensors, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT_LRP.Block.relprop: (relevance of the block's input, the attention relevance)."""
    mlp_out = block.mlp.fc2(t.gelu)
    residual, branch = add_relprop(t.mid, mlp_out, relevance)
    branch = linear_relprop(t.gelu, block.mlp.fc2.weight, branch)
    branch = linear_relprop(t.norm2, block.mlp.fc1.weight, branch)
    relevance = clone_relprop(t.mid, [residual, branch])
    attn_out = block.attn.proj(t.heads_out)
    residual, branch = add_relprop(t.x, attn_out, relevance)
    branch, attention = attention_relprop(block, t, branch)
    return clone_relprop(t.x, [residual, branch]), attention


@dataclass
class Attribution:
    attention_relevance: list[np.ndarray]  # per block [heads, T, T]
    attention_gradient: list[np.ndarray]
    map: np.ndarray  # [T - 1]: the class token's row over the patches
    input_relevance: np.ndarray  # [H, W]: method "full", summed over channels
    logit: float


def chefer_attribution(model, image: np.ndarray, target: int) -> Attribution:
    """Their LRP(method="transformer_attribution") and LRP(method="full") for one image [1, 3, H, W]."""
    dtype = next(model.parameters()).dtype
    with torch.enable_grad():
        f = forward(model, torch.from_numpy(image).to(dtype))
        one_hot = torch.zeros_like(f.logits)
        one_hot[0, target] = 1
        (one_hot * f.logits).sum().backward()
        relevance = linear_relprop(f.final[:, 0], model.head.weight, one_hot).unsqueeze(1)
        relevance = simple_relprop(lambda x: x[:, :1], [f.final], relevance)[0]  # IndexSelect; norm: passes
        attention = []
        for block, t in reversed(list(zip(model.blocks, f.blocks))):
            relevance, cam = block_relprop(block, t, relevance)
            attention.insert(0, cam.detach())
        relevance = add_relprop(f.tokens, model.pos_embed, relevance)[0][:, 1:]
        grid = model.patch_embed.grid_size
        relevance = relevance.transpose(1, 2).reshape(1, -1, *grid)
        pixels = first_conv_relprop(model.patch_embed.proj, f.image, relevance).sum(dim=1)
    gradients = [t.attn.grad.detach() for t in f.blocks]
    cams = [(g[0] * a[0]).clamp(min=0).mean(dim=0).unsqueeze(0) for g, a in zip(gradients, attention)]
    eye = torch.eye(cams[0].shape[-1], dtype=dtype)
    rollout = cams[0] + eye
    for cam in cams[1:]:
        rollout = (cam + eye).bmm(rollout)
    return Attribution([a[0].numpy() for a in attention], [g[0].numpy() for g in gradients],
                       rollout[0, 0, 1:].detach().numpy(), pixels[0].detach().numpy(), f.logits[0, target].item())


def float64_contract(model):
    """The contract model in float64 (initializers, tensor types, Casts and tensor attributes), to be run by
    onnx's reference evaluator (onnxruntime has no float64 Conv): the rules without float32's round-off."""
    import onnx
    from onnx import TensorProto, numpy_helper

    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            info.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.DOUBLE
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT:
                attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float64)))
    return result


def run_float64(model, x: np.ndarray, targets, names: list[str]) -> dict[str, np.ndarray]:
    from camrt import contract
    from tests.exporters.rule_harness import reference

    evaluator = reference(float64_contract(model))
    feeds = {model.graph.input[0].name: x.astype(np.float64), contract.TARGET_INPUT: np.asarray(targets, np.int64)}
    return dict(zip(names, evaluator.run(names, feeds)))
