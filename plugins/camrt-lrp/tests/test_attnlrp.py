"""lrp-attn (AttnLRP) and lrp-cp (CP-LRP) against LXT 2.1's rules restated in torch (attnlrp_oracle.py) on
timm's vit_tiny_patch16_224 (random weights; 32x32 input, 2x2 patches and the class token, all 12 blocks).
The ViT tests are slow (two exports of about 25 s); the refusals are fast.

timm initialises biases, LayerNorm shifts and the position embedding to zero and LayerNorm scales to one;
they are drawn at random here, so that the biases' share of the relevance (what the epsilon rule lets a bias
absorb) and LayerNorm's scale are exercised.

Tolerance: max|camrt - LXT| <= 1e-4 max|LXT| per sample (measured 1.8e-6 against float32, 1.2e-6 against
float64; LXT float32's own error 7e-7), judged against LXT in float64 at twice LXT float32's own error where
float32 LXT is further (lrp_oracle's rule). camrt divides by every node's output, LXT never (gradient x
input), so round-off differs where an output is small; a wrong rule moves the maps by 1e-2 or more (the
stabiliser 1e-6 instead of 1e-12 did: 0.5-1.4%; CP-LRP and AttnLRP differ from each other by
PAIR_DIFFERENCE or more, checked below).

Conservation, on a bias-free ViT (no biases, LayerNorm shifts zero, no position embedding, no class token,
average pooling): CP-LRP conserves: the input relevance sums to the logit. AttnLRP's softmax rule does not
(its Taylor expansion's bias term keeps x * s * sum R): the input relevance sums to the logit minus what the
softmax rules absorbed, which LXT's relevance at the softmax inputs and outputs measures.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from attnlrp_oracle import lxt_relevance
from lrp_oracle import MAX_REL, max_rel_per_sample, run_file

from camrt import contract
from camrt_lrp.names import ATTN_LRP, CP_LRP

SIZE = 32
TARGETS = np.array([contract.TOP1_TARGET, 7], np.int64)
RULE_SETS = {ATTN_LRP: False, CP_LRP: True}  # rule set: conservative (CP-LRP)
CONSERVATION_REL = 1e-4
PAIR_DIFFERENCE = 1e-2


def vit(bias_free: bool = False) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    options = dict(class_token=False, global_pool="avg", pos_embed="none") if bias_free else {}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, **options).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or name in ("pos_embed", "cls_token"):
                parameter.copy_(0 if bias_free else torch.randn(parameter.shape, generator=generator) * 0.1)
            elif "norm" in name:
                parameter.copy_(1 + 0.2 * torch.randn(parameter.shape, generator=generator))
    return model


def export(model, tmp_path_factory=None):
    from camrt_exporters.export import export_torch, write_model

    exported, _ = export_torch(model, input_size=(SIZE, SIZE), rules=list(RULE_SETS))
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    result = {"net": model, "x": x, "model": exported, "outputs": run_file(exported, x, TARGETS)}
    if tmp_path_factory is not None:
        result["path"] = str(tmp_path_factory.mktemp("attnlrp") / "vit.camrt.onnx")
        write_model(exported, result["path"])
    return result


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export(vit(), tmp_path_factory)


def camrt_relevance(exported, rule_set: str, score: np.ndarray) -> np.ndarray:
    """The file's input relevance for the output relevance one-hot * score (what LXT starts from)."""
    return exported["outputs"][contract.input_gradient_output(rule_set)] * score[:, None, None, None]


@pytest.mark.slow
@pytest.mark.parametrize("rule_set", list(RULE_SETS))
def test_relevance_equals_lxt(exported, rule_set):
    targets = exported["outputs"][contract.TARGET_INDEX_OUTPUT]
    reference = lxt_relevance(exported["net"], exported["x"], targets, RULE_SETS[rule_set])
    got = camrt_relevance(exported, rule_set, reference.score)
    errors = max_rel_per_sample(got, reference.input)
    if errors.max() <= MAX_REL:
        return
    truth = lxt_relevance(copy.deepcopy(exported["net"]).double(), exported["x"], targets, RULE_SETS[rule_set]).input
    own, ours = max_rel_per_sample(reference.input, truth), max_rel_per_sample(got, truth)
    assert (ours <= np.maximum(2 * own, MAX_REL)).all(), (
        f"{rule_set}: max-relative error to LXT float32 {errors}, to float64 {ours} (LXT float32's own {own})")


@pytest.mark.slow
def test_the_rule_sets_differ_by_more_than_the_tolerance(exported):
    """The oracle tells CP-LRP from AttnLRP: the comparison above could not pass with the other rule set."""
    targets = exported["outputs"][contract.TARGET_INDEX_OUTPUT]
    attn, cp = (lxt_relevance(exported["net"], exported["x"], targets, conservative).input for conservative in (0, 1))
    assert max_rel_per_sample(attn, cp).min() >= PAIR_DIFFERENCE


@pytest.mark.slow
@pytest.mark.parametrize("rule_set", list(RULE_SETS))
def test_method_map_is_the_channel_sum_of_lxt_relevance(exported, rule_set):
    from camrt import Explainer
    from camrt.methods.base import GraphOutputs

    explainer = Explainer(exported["path"], method=rule_set)
    x = exported["x"]
    outputs = GraphOutputs(explainer.session.run(x, TARGETS, explainer.fetch), x)
    maps = explainer.method.explain(outputs, layer=None)
    reference = lxt_relevance(exported["net"], x, outputs.target_index, RULE_SETS[rule_set])
    errors = max_rel_per_sample(maps, reference.input.sum(axis=1))
    assert errors.max() <= MAX_REL, f"{rule_set}: {errors}"


@pytest.fixture(scope="module")
def bias_free():
    return export(vit(bias_free=True))


@pytest.mark.slow
@pytest.mark.parametrize("rule_set", list(RULE_SETS))
def test_conservation_on_a_bias_free_vit(bias_free, rule_set):
    targets = bias_free["outputs"][contract.TARGET_INDEX_OUTPUT]
    reference = lxt_relevance(bias_free["net"], bias_free["x"], targets, RULE_SETS[rule_set])
    total = camrt_relevance(bias_free, rule_set, reference.score).astype(np.float64).sum(axis=(1, 2, 3))
    if rule_set == CP_LRP:
        assert not reference.softmax_absorbed.any()
    else:  # the softmax rules' share is what keeps AttnLRP from conserving: make sure it is not negligible
        assert (np.abs(reference.softmax_absorbed) > 100 * CONSERVATION_REL * np.abs(reference.score)).all()
    np.testing.assert_allclose(total + reference.softmax_absorbed, reference.score,
                               rtol=CONSERVATION_REL, atol=CONSERVATION_REL * np.abs(reference.score).max())


def test_an_op_without_a_rule_is_refused_naming_the_node():
    from camrt_exporters import UnsupportedOpError
    from camrt_exporters.export import export_torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.MaxPool2d(2),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    with pytest.raises(UnsupportedOpError, match=r"'MaxPool' \(node '[^']+', rule set 'lrp-attn'\)"):
        export_torch(net, input_size=(8, 8), rules=[ATTN_LRP])


class Gated(torch.nn.Module):
    """A product of two activations that is not attention times values."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.head((y * torch.sigmoid(y)).mean(dim=(2, 3)))


def test_cp_lrp_refuses_a_product_that_is_not_attention():
    from camrt_exporters import ExportError
    from camrt_exporters.export import export_torch

    with pytest.raises(ExportError, match=r"node '[^']+' \(Mul\): CP-LRP has a rule for a product of two activations "
                                          "only where one is a Softmax output"):
        export_torch(Gated().eval(), input_size=(8, 8), rules=[CP_LRP])
