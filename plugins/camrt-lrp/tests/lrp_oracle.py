"""zennit 0.5.1 as the oracle of the LRP rule sets: the same torch model, input and targets through
zennit's composites (with its canonizers: BatchNorm merged into the Conv before it, residual sums through
zennit.layer.Sum) and through the camrt file, compared as input relevance.

BatchNorm merge: zennit 0.5.1's SequentialMergeBatchNorm leaves each merged BatchNorm computing
x / sqrt(1 + eps), not x (it resets the statistics and affine parameters but keeps eps; zennit's main
branch sets eps to 0, and since torch 2.10 running_var and eps to 0.5 each, zennit PR #240). zennit then
explains a net whose every merged layer is scaled by 1 - 5e-6, which the rules magnify, a residual sum's
Norm rule, a / (a + b) with a + b near 0, most: camrt was 5.5e-4 from it on mobilenet_v2 (64x64,
alpha2-beta1) and up to 2.9e-3 on vgg11_bn's second sample (max-relative). A float64 bisection on
mobilenet_v2's prefix (features[:4], 32x32; every tensor's relevance, camrt through onnx's reference
evaluator) found every relevance tensor within 5e-8 of zennit with an exact merge, but 2e-2 from 0.5.1's
at the first residual sum's summands (2.4e-5 at its output, where only the forward values differ, by
5e-6..1.5e-5). The oracle therefore merges with ExactMergeBatchNorm below (0.5.1's merge plus main's fix).

Tolerance: max|camrt - zennit| <= 1e-4 max|zennit| per sample, zennit in float32. Both sides compute in
float32; every rule divides by a stabilised z = z + 1e-6 sign(z), so where |z| is small the float32
round-off of z (summed in another order by onnxruntime than by torch) is amplified by R / z, the more so
the deeper the net. Where float32 zennit is further than 1e-4 away, both are judged against zennit in
float64: camrt must then be no further from it than twice zennit float32's own error (the rule of the
exporter's own validation). Measured against float32: small nets 2e-5, resnet18 1e-5, mobilenet_v2 5e-5
(alpha2-beta1; 4e-6..7e-6 with the other composites).

MaxPool near-ties (test_lrp_torchvision.py): on vgg11_bn's second sample (target 7), in the second
MaxPool, channel 118, output (16, 30), two inputs are 2e-8 apart (4.6e-7 relative); onnxruntime float32
(and torch float32 on the unmerged net) takes the other one than float64, zennit float32 on the merged
net happens to take float64's. A winner switched by round-off is not a rule difference: any float32
implementation may route the relevance to either input. The whole error (1.4e-4..2.5e-4 max-relative from
zennit float64) lies in that window's receptive field (rows 61-70, columns 117-126); outside it camrt is
within 1.5e-6 of zennit float64. The test finds such windows itself (the file's MaxPool inputs in
onnxruntime float32 against torch float64) and leaves their receptive fields out of the maximum, refusing
to if they cover 1% of the input or more. Every case must also be within L2_REL relative L2 of zennit in
float64 over every pixel (measured: 2.3e-5 at most, that sample), far below what a wrong rule does (a rule
swapped for another, a missed first layer or BatchNorm fold changes the maps by 1e-1 and more).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import numpy as np
import torch
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer

from camrt_lrp.names import EPSILON_ALPHA2_BETA1, EPSILON_GAMMA_BOX, EPSILON_PLUS_FLAT

RULE_SETS = (EPSILON_PLUS_FLAT, EPSILON_GAMMA_BOX, EPSILON_ALPHA2_BETA1)
MAX_REL = 1e-4
L2_REL = 1e-4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ExactMergeBatchNorm(SequentialMergeBatchNorm):
    """zennit 0.5.1's SequentialMergeBatchNorm, but the merged BatchNorm is an exact identity, as in zennit's main
    branch. 0.5.1 folds the BatchNorm into the linear layer before it and then sets the BatchNorm's statistics
    and affine parameters to the identity's, but leaves its eps: the BatchNorm then computes x / sqrt(1 + eps),
    scaling every merged layer's output by 1 - 5e-6 (eps 1e-5), so zennit explains a slightly different net than
    the one it was given. zennit's main branch sets eps to 0 (first proposed in zennit PR #171), and since
    torch 2.10 (which refuses eps = 0) running_var and eps to 0.5 each (PR #240); so does this canonizer."""

    def register(self, linears, batch_norm):
        self.batch_norm_eps = batch_norm.eps
        super().register(linears, batch_norm)
        batch_norm.running_var.data = torch.full_like(batch_norm.running_var.data, 0.5)
        batch_norm.eps = 0.5

    def remove(self):
        super().remove()
        self.batch_norm.eps = self.batch_norm_eps


def resnet_canonizers():
    """zennit's ResNetCanonizer with ExactMergeBatchNorm: the residual additions through zennit.layer.Sum."""
    return [ExactMergeBatchNorm(), ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer()]


def composite(rule_set: str, canonizers):
    """zennit's composite of that name; z^B bounds (0 - mean) / std .. (1 - mean) / std as zennit's examples."""
    if rule_set == EPSILON_PLUS_FLAT:
        return EpsilonPlusFlat(canonizers=canonizers)
    if rule_set == EPSILON_ALPHA2_BETA1:
        return EpsilonAlpha2Beta1(canonizers=canonizers)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return EpsilonGammaBox(low=(0 - mean) / std, high=(1 - mean) / std, canonizers=canonizers)


def zennit_relevance(model, x: np.ndarray, targets: np.ndarray, rule_set: str, canonizers=None) -> np.ndarray:
    """Input relevance for the output relevance one-hot(target) (zennit's `attr_output`)."""
    canonizers = [ExactMergeBatchNorm()] if canonizers is None else canonizers
    logits = model(torch.from_numpy(x))
    one_hot = torch.eye(logits.shape[1])[torch.from_numpy(targets)]
    with Gradient(model=model, composite=composite(rule_set, canonizers)) as attributor:
        _, relevance = attributor(torch.from_numpy(x), one_hot)
    return relevance.detach().numpy()


def assert_matches_zennit(got: np.ndarray, model, x: np.ndarray, targets: np.ndarray, rule_set: str,
                          canonizers=None, what: str = "", truth: np.ndarray | None = None,
                          excluded: np.ndarray | None = None) -> None:
    """The tolerance above; `truth`: zennit's float64 relevance when the caller has it already;
    `excluded` [B, H, W]: input pixels left out of the maximum (the receptive fields of MaxPool windows
    whose winner float32 switches, test_lrp_torchvision.py)."""
    reference = zennit_relevance(model, x, targets, rule_set, canonizers)
    errors = max_rel_per_sample(got, reference, excluded)
    if errors.max() <= MAX_REL:
        return
    if truth is None:
        truth = zennit_float64(model, x, targets, rule_set, canonizers)
    own, ours = max_rel_per_sample(reference, truth, excluded), max_rel_per_sample(got, truth, excluded)
    assert (ours <= np.maximum(2 * own, MAX_REL)).all(), (
        f"{what} {rule_set}: max-relative error to zennit float32 {errors}, to zennit float64 {ours} "
        f"(zennit float32's own {own})")


def zennit_float64(model, x: np.ndarray, targets: np.ndarray, rule_set: str, canonizers=None) -> np.ndarray:
    return zennit_relevance(copy.deepcopy(model).double(), x.astype(np.float64), targets, rule_set, canonizers)


def l2_rel_per_sample(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    axes = tuple(range(1, ref.ndim))
    return np.sqrt(((got.astype(np.float64) - ref) ** 2).sum(axis=axes) / (ref ** 2).sum(axis=axes))


def max_rel_per_sample(got: np.ndarray, ref: np.ndarray, excluded: np.ndarray | None = None) -> np.ndarray:
    axes = tuple(range(1, ref.ndim))
    error = np.abs(got.astype(np.float64) - ref)
    if excluded is not None:  # [B, H, W], the same pixels of every channel
        error = np.where(excluded[:, None], 0.0, error)
    return error.max(axis=axes) / np.abs(ref).max(axis=axes)


def run_file(model, x: np.ndarray, targets) -> dict[str, np.ndarray]:
    from camrt_exporters.validate import run_contract

    return run_contract(model, model.graph.input[0].name, x, np.asarray(targets, np.int64))


def randomize_batchnorm(model, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (eval mode folds them into the Conv)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)


@contextmanager
def sum_modules(blocks):
    """Route each block's residual addition through zennit.layer.Sum (what zennit's ResNet canonizer does):
    blocks read `self.canonizer_sum` when set."""
    from zennit.layer import Sum

    for block in blocks:
        block.canonizer_sum = Sum()
    try:
        yield
    finally:
        for block in blocks:
            block.canonizer_sum = None

