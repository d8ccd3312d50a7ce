"""The attention methods on given attention tensors (no model): closed forms of one layer, token
positions, the contract metadata and the refusals. The model-level checks against the authors'
formulas and torchcam are in tests/exporters/test_attention_methods.py and test_legrad_torchcam.py.

One layer, row-stochastic A (the class token at position c):
- rollout: A' = 0.5 A + 0.5 I has rows summing to 1 already, so the class row over the patches is
  0.5 mean_h A[c, patches] (the identity adds only at (c, c));
- generic-attention: R = I + E_h[(G ⊙ A)^+], class row over the patches E_h[(G ⊙ A)^+][c, patches];
- legrad: mean over heads and queries of ReLU(G) at the patch keys.
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest

from camrt import contract
from camrt.errors import ContractError, ModelError, UsageError
from camrt.methods.base import GraphOutputs, Method, Requirements
from camrt.modelfile.metadata import parse_contract
from camrt.plan import ExplainPlan, PlanRefused
from camrt.plugins.registry import build_method_registry

GRID = (2, 3)


def _info(extra_tokens, maps=("a", "b"), layer_scores=True) -> contract.ContractInfo:
    tokens = contract.LayerLayout(contract.LAYOUT_TOKENS, GRID, tuple(extra_tokens))
    return contract.ContractInfo(version=1, input_name="x", layers=[], default_layer=None,
                                 preprocessing=contract.Preprocessing(32, 48), rule_sets=[],
                                 attention=contract.Attention(tuple(maps), tokens, layer_scores))


def _random_attention(rng, batch, heads, tokens) -> np.ndarray:
    scores = rng.standard_normal((batch, heads, tokens, tokens))
    exp = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def _outputs(info, maps, gradients=None, layer_gradients=None) -> GraphOutputs:
    values = {}
    for i, name in enumerate(info.attention.maps):
        values[contract.attention_output(name)] = maps[i]
        if gradients is not None:
            values[contract.attention_gradient_output(name)] = gradients[i]
        if layer_gradients is not None:
            values[contract.attention_layer_gradient_output(name)] = layer_gradients[i]
    context = SimpleNamespace(session=SimpleNamespace(info=info))
    return GraphOutputs(values, np.zeros((maps[0].shape[0], 3, 32, 48), np.float32), context)


def _method(name, **options):
    return build_method_registry().get(name)(**options)


def _patches(extra_tokens, tokens):
    return [t for t in range(tokens) if t not in extra_tokens]


@pytest.mark.parametrize("extra_tokens", [(0,), (0, 1), (6, 7)], ids=["class", "class+distillation", "trailing"])
def test_one_layer_closed_forms(extra_tokens):
    rng = np.random.default_rng(0)
    info = _info(extra_tokens, maps=("a",))
    tokens = len(extra_tokens) + GRID[0] * GRID[1]
    a = _random_attention(rng, 2, 3, tokens)
    g = rng.standard_normal(a.shape).astype(np.float32)
    outputs = _outputs(info, [a], [g], [g])
    cls, patches = extra_tokens[0], _patches(extra_tokens, tokens)
    expected = {
        "attention-rollout": 0.5 * a.astype(np.float64).mean(axis=1)[:, cls, patches],
        "generic-attention": np.maximum(g.astype(np.float64) * a, 0).mean(axis=1)[:, cls, patches],
        "legrad": np.maximum(g.astype(np.float64), 0).mean(axis=(1, 2))[:, patches],
    }
    for name, reference in expected.items():
        got = _method(name).explain(outputs, layer=None)
        assert got.dtype == np.float32 and got.shape == (2, *GRID)
        np.testing.assert_allclose(got, reference.reshape(2, *GRID), rtol=1e-6, atol=1e-9, err_msg=name)


def test_rollout_multiplies_layers_from_the_input_up():
    """Two layers: the class row of A2' A1' (not A1' A2'), heads fused by max."""
    rng = np.random.default_rng(1)
    info = _info((0,))
    a1, a2 = (_random_attention(rng, 1, 2, 7).astype(np.float64) for _ in range(2))

    def with_identity(a):
        fused = a.max(axis=1) + np.eye(7)
        return fused / fused.sum(axis=-1, keepdims=True)

    reference = (with_identity(a2) @ with_identity(a1))[:, 0, 1:].reshape(1, *GRID)
    got = _method("attention-rollout", head_fusion="max").explain(_outputs(info, [a1, a2]), layer=None)
    np.testing.assert_allclose(got, reference, rtol=1e-6)
    reversed_order = (with_identity(a1) @ with_identity(a2))[:, 0, 1:].reshape(1, *GRID)
    assert not np.allclose(got, reversed_order, rtol=1e-3)


def test_mean_pooled_model_reads_the_mean_row():
    """Without extra tokens the pooled output is the mean of all tokens: the mean of the rows."""
    rng = np.random.default_rng(2)
    info = _info(())
    a = _random_attention(rng, 1, 2, 6).astype(np.float64)
    fused = 0.5 * a.mean(axis=1) + 0.5 * np.eye(6)
    got = _method("attention-rollout").explain(_outputs(info, [a, a]), layer=None)
    np.testing.assert_allclose(got, (fused @ fused).mean(axis=1).reshape(1, *GRID), rtol=1e-6)


def test_discard_ratio_zeroes_the_lowest_entries_but_the_class_tokens_own():
    info = _info((0,), maps=("a",))
    a = np.full((1, 1, 7, 7), 1 / 7, np.float64)
    a[0, 0, 0, 0] = 0.0  # the lowest entry, but the class token's own attention: kept
    a[0, 0, 0, 3] = 2 / 7  # the class row sums to 1 again
    got = _method("attention-rollout", discard_ratio=0.5).explain(_outputs(info, [a]), layer=None)
    kept = np.zeros(7)
    kept[3] = 2 / 7  # the 24 lowest of the 49 entries: the kept 0, then 23 of the 1/7s in index order, row 0 first
    row = 0.5 * kept + 0.5 * np.eye(7)[0]
    np.testing.assert_allclose(got[0].ravel(), (row / row.sum())[1:], rtol=1e-6)


def test_legrad_last_blocks():
    rng = np.random.default_rng(3)
    info = _info((0,), maps=("a", "b", "c"))
    gradients = [rng.standard_normal((1, 2, 7, 7)).astype(np.float32) for _ in range(3)]
    outputs = _outputs(info, [np.zeros_like(g) for g in gradients], layer_gradients=gradients)
    reference = np.mean([np.maximum(g, 0).mean(axis=(1, 2))[:, 1:] for g in gradients[1:]], axis=0)
    got = _method("legrad", last_blocks=2).explain(outputs, layer=None)
    np.testing.assert_allclose(got, reference.reshape(1, *GRID), rtol=1e-6)


def test_options_are_checked():
    for name, options in (("attention-rollout", {"head_fusion": "median"}),
                          ("attention-rollout", {"discard_ratio": "1.0"}), ("legrad", {"last_blocks": "-1"})):
        with pytest.raises(UsageError, match=next(iter(options))):
            _method(name, **options)


def test_a_map_over_other_tokens_is_refused():
    info = _info((0,), maps=("a",))
    outputs = _outputs(info, [np.zeros((1, 2, 9, 9), np.float32)])
    with pytest.raises(ModelError, match=r"camrt/attn/a.*\[B, heads, 7, 7\]"):
        _method("attention-rollout").explain(outputs, layer=None)


def test_requirements_list_every_map_and_the_plan_refuses_a_file_without_them():
    info = _info((0,))
    assert Requirements(attention=True, attention_gradients=True).outputs([], info) == [
        "camrt/attn/a", "camrt/attn_grad/a", "camrt/attn/b", "camrt/attn_grad/b"]
    assert Requirements(attention_layer_gradients=True).outputs([], info) == [
        "camrt/attn_layer_grad/a", "camrt/attn_layer_grad/b"]
    registry = build_method_registry()
    base = [contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT]
    plan = ExplainPlan.build(info, [*base, "camrt/attn_layer_grad/a", "camrt/attn_layer_grad/b"], registry.get("legrad"))
    assert plan.layers == () and plan.fetch[2:] == ("camrt/attn_layer_grad/a", "camrt/attn_layer_grad/b")
    no_attention = contract.ContractInfo(version=1, input_name="x", layers=[], default_layer=None,
                                         preprocessing=contract.Preprocessing(32, 48), rule_sets=[])
    for name, info, missing, flags in (
            ("generic-attention", no_attention, ("camrt/attn/<map>", "camrt/attn_grad/<map>"), ("--attention",)),
            ("legrad", _info((0,), layer_scores=False), ("camrt/attn_layer_grad/a", "camrt/attn_layer_grad/b"),
             ("--attention --attention-layer-scores",))):
        with pytest.raises(PlanRefused, match=r"re-export it with `camrt export \.\.\. --attention") as error:
            ExplainPlan.build(info, base, registry.get(name), path="vit.camrt.onnx")
        assert error.value.missing == missing and error.value.export_flags == flags


def test_rule_set_attention_outputs_are_required_and_refused_with_both_flags():
    """A method that reads what a rule set propagates to the maps (the camrt-lrp plugin's
    transformer-attribution: lrp-chefer) asks for camrt/attn_rule_grad/<rule set>/<map>; a file without the
    rule set, without --attention, or with both from an exporter before these outputs, is refused naming
    the flags that add them."""

    class RuleSetAttention(Method):
        name = "rule-set-attention"
        requires = Requirements(attention_gradients=True, attention_rule_gradients="my-rules")

        def explain(self, outputs, *, layer):
            raise AssertionError("not run")

    info = _info((0,))
    assert RuleSetAttention.requires.outputs([], info) == [
        "camrt/attn_grad/a", "camrt/attn_rule_grad/my-rules/a", "camrt/attn_grad/b", "camrt/attn_rule_grad/my-rules/b"]
    assert RuleSetAttention.requires.to_dict()["attention_rule_gradients"] == "my-rules"
    base = [contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT]
    served = ExplainPlan.build(dataclasses.replace(info, rule_sets=["vanilla", "my-rules"]),
                               [*base, *RuleSetAttention.requires.outputs([], info)], RuleSetAttention)
    assert served.fetch[2:] == tuple(RuleSetAttention.requires.outputs([], info))
    no_attention = contract.ContractInfo(version=1, input_name="x", layers=[], default_layer=None,
                                         preprocessing=contract.Preprocessing(32, 48), rule_sets=["vanilla"])
    old_export = dataclasses.replace(info, rule_sets=["vanilla", "my-rules"])
    for info, flags in ((dataclasses.replace(info, rule_sets=["vanilla"]), ("--rules vanilla,my-rules", "--attention")),
                        (no_attention, ("--rules vanilla,my-rules", "--attention")),
                        (dataclasses.replace(no_attention, rule_sets=["vanilla", "my-rules"]), ("--attention",)),
                        (old_export, ("--rules vanilla,my-rules", "--attention"))):
        with pytest.raises(PlanRefused, match="re-export it with `camrt export ...") as error:
            ExplainPlan.build(info, [*base, "camrt/attn_grad/a", "camrt/attn_grad/b"], RuleSetAttention, path="vit.onnx")
        assert error.value.export_flags == flags


def _meta(attention: str) -> dict[str, str]:
    return {contract.META_CONTRACT_VERSION: "1", contract.META_INPUT: "x",
            contract.META_PREPROCESSING: contract.Preprocessing(32, 48).to_json(), contract.META_ATTENTION: attention}


def test_attention_metadata_round_trips_and_malformed_is_refused():
    attention = _info((0, 1)).attention
    assert parse_contract(_meta(attention.to_json())).attention == attention
    nchw = json.dumps({"maps": ["a"], "tokens": {"layout": "nchw"}})
    for text in ("{", json.dumps({"tokens": {}}), nchw):
        with pytest.raises(ContractError, match=r"camrt.attention.*re-export.*--attention"):
            parse_contract(_meta(text))
