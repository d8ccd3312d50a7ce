"""lrp-chefer and transformer-attribution against Chefer, Gur & Wolf's code restated in torch (chefer_oracle.py)
on timm's vit_tiny_patch16_224 at 224x224 (random weights; biases, LayerNorm parameters, class token and position
embedding drawn at random as in test_attnlrp.py), scikit-image's chelsea and coffee, targets 281 and 7.

Their rules divide by z with a stabiliser of 1e-9 only (safe_divide), and z = q . k or a residual sum comes
close to 0 among 197 tokens: the method is ill-conditioned in float32. Their own code in float32 is 0.12 and 0.35
(max abs of normalised maps) from itself in float64 at 224 (0.31 at 112; 3e-4 at 64). So the rules are checked
in float64, where round-off does not decide: camrt's file converted to float64 and run by onnx's reference
evaluator against the oracle in float64 (relevance R^A of every block, the map, the input relevance). The
float32 file, as users run it, is checked against the float64 oracle at no more than twice the error of their
own code in float32 (lrp_oracle's rule): at 64x64, where that means something, and at 224 for the record.

Their code explains one image and sums over the whole tensor where its sum rule (eq. 5) sums; camrt sums per
sample. So the oracle runs per sample, and a batch of two must give what each image gives alone.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from chefer_oracle import chefer_attribution, run_float64
from lrp_oracle import run_file

from camrt import contract
from camrt_lrp.names import CHEFER_LRP
from tests.helpers import imagenet_photos

timm = pytest.importorskip("timm")

SIZE = 224
GRID = (14, 14)
BLOCKS = 12
TARGETS = np.array([281, 7], np.int64)
#: float64 camrt against the float64 oracle: normalised maps (max abs), relevances (max relative per block)
MAP_TOLERANCE = 1e-4
RELEVANCE_TOLERANCE = 1e-6
BATCH_TOLERANCE = 1e-5
#: A 4x4 grid (64x64), where their code in float32 is within 1e-4 of float64: the float32 file's check.
SMALL = 64


def vit(size: int = SIZE) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or name in ("pos_embed", "cls_token"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
            elif "norm" in name:
                parameter.copy_(1 + 0.2 * torch.randn(parameter.shape, generator=generator))
    return model


def relevance_outputs() -> list[str]:
    return [contract.attention_rule_gradient_output(CHEFER_LRP, f"blocks.{b}.attn") for b in range(BLOCKS)]


def gradient_outputs() -> list[str]:
    return [contract.attention_gradient_output(f"blocks.{b}.attn") for b in range(BLOCKS)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from camrt_exporters.export import export_torch, write_model

    model = vit()
    onnx_model, _ = export_torch(model, input_size=(SIZE, SIZE), rules=["vanilla", CHEFER_LRP], attention=[])
    path = str(tmp_path_factory.mktemp("chefer") / "vit.camrt.onnx")
    write_model(onnx_model, path)
    x = imagenet_photos(SIZE)
    double = copy.deepcopy(model).double()
    names = [*relevance_outputs(), *gradient_outputs(), contract.input_gradient_output(CHEFER_LRP)]
    return {"net": model, "path": path, "x": x,
            "oracle": [chefer_attribution(model, x[i:i + 1], int(TARGETS[i])) for i in range(len(x))],
            "oracle64": [chefer_attribution(double, x[i:i + 1].astype(np.float64), int(TARGETS[i]))
                         for i in range(len(x))],
            "float64": [run_float64(onnx_model, x[i:i + 1], TARGETS[i:i + 1], names) for i in range(len(x))]}


def explain(path: str, method: str, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    from camrt import Explainer
    from camrt.execution.context import ExplainContext
    from camrt.methods.base import GraphOutputs

    explainer = Explainer(path, method=method)
    values = explainer.session.run(x, targets, explainer.fetch)
    context = ExplainContext(explainer.session, x, values[contract.TARGET_INDEX_OUTPUT])
    return explainer.method.explain(GraphOutputs(values, x, context), layer=None)


def normalised(maps: np.ndarray) -> np.ndarray:
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    low, high = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    return ((flat - low) / (high - low)).reshape(maps.shape)


def map_error(got: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(normalised(got) - normalised(reference)).max())


def relative(got: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - reference).max() / np.abs(reference).max())


@pytest.mark.slow
def test_attention_relevance_equals_the_authors_in_float64(exported):
    for i, (oracle, ours) in enumerate(zip(exported["oracle64"], exported["float64"])):
        errors = [relative(ours[name][0], reference) for name, reference
                  in zip(relevance_outputs(), oracle.attention_relevance)]
        print(f"sample {i}: R^A, max relative difference per block {max(errors):.2e}")
        assert max(errors) <= RELEVANCE_TOLERANCE, errors


@pytest.mark.slow
def test_map_equals_the_authors_in_float64(exported):
    from camrt_lrp.transformer_attribution import lrp_weighted_rollout

    for i, (oracle, ours) in enumerate(zip(exported["oracle64"], exported["float64"])):
        rollout = lrp_weighted_rollout([ours[name] for name in gradient_outputs()],
                                       [ours[name] for name in relevance_outputs()])
        got, reference = rollout[:, 0, 1:].reshape(1, *GRID), oracle.map.reshape(1, *GRID)
        assert np.ptp(reference) > 1e-3 * np.abs(reference).max(), "degenerate reference"
        print(f"sample {i}: map, max abs difference of normalised maps {map_error(got, reference):.2e}")
        assert map_error(got, reference) <= MAP_TOLERANCE


@pytest.mark.slow
def test_input_relevance_equals_the_authors_full_lrp_in_float64(exported):
    for i, (oracle, ours) in enumerate(zip(exported["oracle64"], exported["float64"])):
        got = ours[contract.input_gradient_output(CHEFER_LRP)][0].sum(axis=0)
        print(f"sample {i}: input relevance, max relative difference {relative(got, oracle.input_relevance):.2e}")
        assert relative(got, oracle.input_relevance) <= RELEVANCE_TOLERANCE


@pytest.mark.slow
def test_float32_maps_within_twice_the_authors_own_float32_error(exported):
    maps = explain(exported["path"], "transformer-attribution", exported["x"], TARGETS)
    for i, (oracle, oracle64) in enumerate(zip(exported["oracle"], exported["oracle64"])):
        reference = oracle64.map.reshape(1, *GRID)
        own, ours = map_error(oracle.map.reshape(1, *GRID), reference), map_error(maps[i:i + 1], reference)
        print(f"sample {i}: float32 map to float64 oracle {ours:.2e} (their code in float32: {own:.2e})")
        assert ours <= max(2 * own, MAP_TOLERANCE)


@pytest.mark.slow
def test_lrp_chefer_map_is_the_channel_sum_of_the_input_relevance(exported):
    maps = explain(exported["path"], CHEFER_LRP, exported["x"], TARGETS)
    for i, oracle in enumerate(exported["oracle"]):  # the method starts from one-hot * logit, theirs from one-hot
        logit = oracle.logit
        own = relative(oracle.input_relevance, exported["oracle64"][i].input_relevance)
        ours = relative(maps[i] / logit, exported["oracle64"][i].input_relevance)
        print(f"sample {i}: float32 input relevance to float64 oracle {ours:.2e} (their code in float32: {own:.2e})")
        assert ours <= max(2 * own, 1e-4)


@pytest.mark.slow
def test_a_batch_gives_what_each_image_gives_alone(exported):
    batch = explain(exported["path"], "transformer-attribution", exported["x"], TARGETS)
    for i in range(len(TARGETS)):
        alone = explain(exported["path"], "transformer-attribution", exported["x"][i:i + 1], TARGETS[i:i + 1])
        assert relative(batch[i], alone[0]) <= BATCH_TOLERANCE


def test_float32_file_at_64_equals_the_authors(tmp_path):
    """At 64x64 (16 patches) the method is well conditioned in float32: the file's map, through the Explainer,
    within twice the float32 error of their code (measured 8e-5) of their code in float64."""
    from camrt_exporters.export import export_torch, write_model

    model = vit(SMALL)
    onnx_model, _ = export_torch(model, input_size=(SMALL, SMALL), rules=["vanilla", CHEFER_LRP], attention=[])
    path = str(tmp_path / "vit.camrt.onnx")
    write_model(onnx_model, path)
    x = imagenet_photos(SMALL)
    maps = explain(path, "transformer-attribution", x, TARGETS)
    double = copy.deepcopy(model).double()
    for i in range(len(x)):
        own = chefer_attribution(model, x[i:i + 1], int(TARGETS[i])).map.reshape(1, 4, 4)
        reference = chefer_attribution(double, x[i:i + 1].astype(np.float64), int(TARGETS[i])).map.reshape(1, 4, 4)
        ours, theirs = map_error(maps[i:i + 1], reference), map_error(own, reference)
        print(f"sample {i} at {SMALL}: float32 map to float64 oracle {ours:.2e} (their code in float32: {theirs:.2e})")
        assert ours <= max(2 * theirs, MAP_TOLERANCE)


def export_small(tmp_path, rules: list[str], attention: bool, seed: bool = False) -> tuple[str, dict]:
    from camrt_exporters.export import export_torch, write_model

    onnx_model, _ = export_torch(vit(32), input_size=(32, 32), rules=rules, attention=[] if attention else None,
                                 seed=seed)
    path = str(tmp_path / "vit.camrt.onnx")
    write_model(onnx_model, path)
    return path, run_file(onnx_model, imagenet_photos(32), TARGETS)


def test_a_file_without_the_rule_set_is_refused_and_cp_lrp_holds_the_attention_constant(tmp_path):
    """Exported with --attention but without lrp-chefer: refused naming --rules and --attention. The file's
    lrp-cp attention relevance is zero (CP-LRP holds the attention probabilities constant)."""
    from camrt import Explainer
    from camrt.plan import PlanRefused
    from camrt_lrp.names import CP_LRP

    path, outputs = export_small(tmp_path, ["vanilla", CP_LRP], attention=True)
    relevance = outputs[contract.attention_rule_gradient_output(CP_LRP, "blocks.0.attn")]
    assert relevance.shape == outputs[contract.attention_output("blocks.0.attn")].shape and not relevance.any()
    with pytest.raises(PlanRefused, match=r"camrt/attn_rule_grad/lrp-chefer/blocks\.0\.attn.*re-export it with "
                                          r"`camrt export \.\.\. --rules vanilla,lrp-cp,lrp-chefer --attention`"):
        Explainer(path, method="transformer-attribution")


def test_a_file_without_attention_is_refused(tmp_path):
    from camrt import Explainer
    from camrt.plan import PlanRefused

    path, _ = export_small(tmp_path, ["vanilla", CHEFER_LRP], attention=False)
    with pytest.raises(PlanRefused, match=r"re-export it with `camrt export \.\.\. --attention`"):
        Explainer(path, method="transformer-attribution")


def test_seeded_targets_are_refused(tmp_path):
    """A seeded target (here similar:) is refused naming generic-attention: the authors' relevance starts from a
    class's one-hot, and a seed's is untested against their code."""
    from camrt import Explainer, UsageError
    from camrt.target_parsing import parse_target

    path, _ = export_small(tmp_path, ["vanilla", CHEFER_LRP], attention=True, seed=True)
    np.save(tmp_path / "concept.npy", np.ones(1000, np.float32))
    with pytest.raises(UsageError, match="transformer-attribution is tested on class targets only, not on similar "
                                         "targets; use generic-attention"):
        Explainer(path, method="transformer-attribution").explain_request(
            imagenet_photos(32), parse_target(f"similar:{tmp_path / 'concept.npy'}"))


def test_an_op_without_a_rule_is_refused_naming_the_node():
    from camrt_exporters import UnsupportedOpError
    from camrt_exporters.export import export_torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.MaxPool2d(2),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    with pytest.raises(UnsupportedOpError, match=r"op type 'ReduceMean' \(node '[^']+', rule set 'lrp-chefer'\)"):
        export_torch(net, input_size=(8, 8), rules=[CHEFER_LRP])
