"""AttnLRP and CP-LRP in torch, as LXT 2.1 computes them (lxt/efficient/rules.py and patches.py), on timm's
VisionTransformer: the oracle of the lrp-attn and lrp-cp rule sets.

LXT works in the gradient x input form: relevance at a tensor x is x * dL/dx, and modified gradients make the
products LRP's rules. LXT itself cannot be imported here (its package __init__ imports transformers and its
model patches target torchvision's and HuggingFace's classes, not timm's), so its three rules are restated
below, line for line, and applied to timm's modules:

- stop_gradient: LayerNorm's standard deviation detached (LXT's layer_norm_forward; CP-LRP and AttnLRP);
  for CP-LRP also the attention probabilities (LXT's cp_wrap_attention_forward detaches q and k);
- divide_gradient(., 2): each operand of q @ k^T and attn @ v gets half the gradient (AttnLRP eq. 7; LXT
  divides q and k by 4 and v by 2 at the attention's entrance, the same thing);
- identity_rule_implicit: GELU's gradient replaced by y / (x + 1e-10) (AttnLRP eq. 9);
- everything else keeps its gradient: linear layers are LRP-0 (epsilon 0) in this form, the softmax's
  gradient x input is AttnLRP's softmax rule.
"""

from __future__ import annotations

import functools
import types
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch


class _DivideGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.factor, None


class _IdentityRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, x):
        y = fn(x)
        ctx.save_for_backward(y / (x + 1e-10))
        return y

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.saved_tensors[0] * grad


def halved(x: torch.Tensor, conservative: bool) -> torch.Tensor:
    return x if conservative else _DivideGradient.apply(x, 2)


def attention_forward(self, x, attn_mask=None, is_causal=False, *, conservative: bool, record: list):
    """timm's Attention (no mask, no q/k norm); `record` collects each softmax's input and output."""
    B, N, _ = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    scores = halved(q * self.scale, conservative) @ halved(k, conservative).transpose(-2, -1)
    attn = scores.softmax(dim=-1)
    if conservative:
        attn = attn.detach()
    elif scores.requires_grad:
        scores.retain_grad()
        attn.retain_grad()
        record.append((scores, attn))
    x = (halved(attn, conservative) @ halved(v, conservative)).transpose(1, 2).reshape(B, N, self.attn_dim)
    return self.proj(self.norm(x))


def layer_norm_forward(self, x):
    mean = x.mean(dim=-1, keepdim=True)
    std = (((x - mean) ** 2).mean(dim=-1, keepdim=True) + self.eps).sqrt()
    return (x - mean) / std.detach() * self.weight + self.bias


def gelu_forward(self, x):
    return _IdentityRule.apply(torch.nn.functional.gelu, x)


@contextmanager
def lxt_rules(model: torch.nn.Module, conservative: bool, record: list):
    """The model's LayerNorms, GELUs and attentions with LXT's rules for the time of the block."""
    from timm.models.vision_transformer import Attention

    patched = []
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            forward = layer_norm_forward
        elif isinstance(module, torch.nn.GELU):
            forward = gelu_forward
        elif isinstance(module, Attention):
            forward = functools.partial(attention_forward, conservative=conservative, record=record)
        else:
            continue
        module.forward = types.MethodType(forward, module)
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


@dataclass
class Relevance:
    """LXT's input relevance x * dL/dx for L = the targets' logits (the output relevance one-hot * logit),
    those logits, and per sample the relevance the softmax rules absorbed (sum of R at their outputs minus
    sum of R at their inputs; AttnLRP only)."""

    input: np.ndarray
    score: np.ndarray
    softmax_absorbed: np.ndarray


def lxt_relevance(model, x: np.ndarray, targets: np.ndarray, conservative: bool) -> Relevance:
    dtype = next(model.parameters()).dtype
    image = torch.from_numpy(x).to(dtype).requires_grad_(True)
    record = []
    with lxt_rules(model, conservative, record):
        logits = model(image)
        score = logits[torch.arange(len(targets)), torch.from_numpy(targets)]
        score.sum().backward()
    absorbed = sum(((attn * attn.grad).sum(dim=(1, 2, 3)) - (scores * scores.grad).sum(dim=(1, 2, 3))).detach()
                   for scores, attn in record)
    return Relevance((image * image.grad).detach().numpy(), score.detach().numpy(),
                     np.zeros(len(targets)) if not record else absorbed.numpy())
