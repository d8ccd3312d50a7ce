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

import types
from contextlib import contextmanager

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


def attention_forward(self, x, attn_mask=None, is_causal=False, *, conservative: bool):
    B, N, _ = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    scores = halved(q * self.scale, conservative) @ halved(k, conservative).transpose(-2, -1)
    attn = scores.softmax(dim=-1)
    if conservative:
        attn = attn.detach()
    x = (halved(attn, conservative) @ halved(v, conservative)).transpose(1, 2).reshape(B, N, self.attn_dim)
    return self.proj(self.norm(x))


def layer_norm_forward(self, x):
    mean = x.mean(dim=-1, keepdim=True)
    std = (((x - mean) ** 2).mean(dim=-1, keepdim=True) + self.eps).sqrt()
    return (x - mean) / std.detach() * self.weight + self.bias


def gelu_forward(self, x):
    return _IdentityRule.apply(torch.nn.functional.gelu, x)


@contextmanager
def lxt_rules(model: torch.nn.Module, conservative: bool):
    """The model's LayerNorms, GELUs and attentions with LXT's rules for the time of the block."""
    from timm.models.vision_transformer import Attention

    patched = []
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            forward = layer_norm_forward
        elif isinstance(module, torch.nn.GELU):
            forward = gelu_forward
        elif isinstance(module, Attention):
            forward = lambda self, x, *a, **k: attention_forward(self, x, *a, conservative=conservative, **k)  # noqa: E731
        else:
            continue
        module.forward = types.MethodType(forward, module)
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def lxt_relevance(model, x: np.ndarray, targets: np.ndarray, conservative: bool) -> tuple[np.ndarray, np.ndarray]:
    """(input relevance x * dL/dx for L = the targets' logits, those logits): the relevance for the output
    relevance one-hot * logit, in the dtype of the model."""
    dtype = next(model.parameters()).dtype
    image = torch.from_numpy(x).to(dtype).requires_grad_(True)
    with lxt_rules(model, conservative):
        logits = model(image)
        score = logits[torch.arange(len(targets)), torch.from_numpy(targets)]
        score.sum().backward()
    return (image * image.grad).detach().numpy(), score.detach().numpy()
