"""Validation of an exported camrt file before it is written.

Torch front end: onnxruntime's activations and gradients against torch autograd.
ONNX front end: central finite differences along unit directions (each row's gradient, random ones).
Every mismatching tensor is reported; a failure raises ValidationError and nothing is written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from camrt import contract
from camrt.errors import first_line
from camrt.modelfile.shapes import cpu_session

from .errors import ExportError, ValidationError
from .float16 import FLOAT16, float32_twin
from .straight_through import activation_quantizers, straight_through_surrogate

#: max|a - b| <= MAX_REL * max|b| for forward tensors and activation gradients.
FORWARD_MAX_REL = 1e-4
LAYER_GRAD_MAX_REL = 1e-3
#: ||a - b|| <= L2_REL * ||b|| for input gradients, which cross every ReLU/MaxPool switch and
#: legitimately differ at a few pixels between float32 implementations.
INPUT_GRAD_L2_REL = 2e-2
#: ||a - b|| <= SWITCH_L2_REL * ||b|| against torch float64 for a layer gradient when a ReLU switch
#: downstream flipped in onnxruntime but not in torch (an exact max-relative match is then impossible).
SWITCH_L2_REL = 1e-2
#: The rule sets whose input gradients torch autograd can reproduce (torch_frontend.relu_backward);
#: a plugin's rule set (LRP) is checked by the plugin's own tests against its reference implementation.
TORCH_REFERENCE_RULE_SETS = (contract.RULE_VANILLA, contract.RULE_GUIDED, contract.RULE_DECONVNET)
#: Finite-difference checks (ONNX front end). Along a unit-norm direction v the directional
#: derivative <g, v> is at most ||g|| (g over v's support), so the error of a central difference
#: D_h is measured in units of that bound: a scale-free number that means the same for every model.
#: Correct gradients measured 7e-5..2e-3 (torchvision resnet18, resnet50, mobilenet_v2/v3_large,
#: efficientnet_b0, squeezenet1_1, regnet_y_400mf; random weights; 112 and 224), one regnet row at
#: 112 9e-3..1.3e-2 (a ReLU kink very near the point); a wrong rule (a negated Conv or Relu, an Add
#: dropping an operand, a Gemm weight not transposed, a pooling divisor off) 0.2..1.8 on a small
#: residual net. 1e-2 plus the round-off allowance below sits between them.
FD_REL = 1e-2
#: FD_REL for a QDQ quantized model's straight-through surrogate (straight_through.py): its
#: activations sit on the quantization grid, so max-pool windows hold exact ties, where the file
#: routes the gradient to one element and a difference sees the largest move (resnet18 int8: 1.2e-2;
#: a straight-through rule that ignores clipping, i.e. every folded ReLU: 0.5 and above).
QUANTIZED_FD_REL = 3e-2
#: FD_REL for a float16 model against its float32 twin (float16.py): the file's gradient carries the
#: float16 rounding of its forward and backward passes (eps16 = 9.8e-4, accumulated over the layers;
#: measured resnet18 2.5e-3, mobilenet_v3_large 2.1e-3, random weights, 224).
FLOAT16_FD_REL = 2e-2
#: FORWARD_MAX_REL for float16 files: the CAM weights against the spatial sum of a float16 gradient
#: (resnet18 float16: 6e-4, the sum of 49 values rounded to eps16 = 9.8e-4).
FLOAT16_MAX_REL = 1e-2
#: Steps h, in units of the tensor's RMS, tried in this order until one agrees. A unit-direction step
#: moves the whole tensor by h*RMS in L2 norm, each element by about h*RMS/sqrt(n): too little to
#: cross many ReLU/MaxPool/Hardswish kinks (whose error grows with h; the old check moved each
#: element by 1e-3*max|x|, the whole 224x224 image by over 1), large enough that the score's float32
#: round-off (error ~ round-off / h) stays small. The best step depends on the model (kinks near the
#: point want a small one, round-off a large one), hence several; the first that agrees decides.
FD_STEPS = (1e-2, 3e-2, 1e-1, 3e-3)
#: Smaller steps, tried after FD_STEPS, for scores that curve within 3e-3: ultralytics' YOLOv8n
#: (random weights; a raw head of pixel-unit boxes from DFL softmaxes) moves its score by ~100 px per
#: 3e-3 step along the gradient, where torch float64 differences of the module itself are 0.07..0.17
#: off the exact derivative (camrt's gradient equals torch float64 autograd within 6.3e-4); at 3e-4
#: onnxruntime's float32 differences agree within 1.1e-3. Their round-off allowance grows as 1/h, so
#: one counts only where that allowance stays at most FD_SMALL_STEP_MAX_ROUNDOFF (in FD_REL's units;
#: YOLOv8n needs 1.1e-2): uncapped, a negated Conv passed (0.29 under 0.40) on a score that float32
#: barely resolves, and a negated Sigmoid that only a detector's class rows feel errs by 0.03.
FD_SMALL_STEPS = (1e-3, 3e-4)
FD_SMALL_STEP_MAX_ROUNDOFF = 1.5 * FD_REL
#: Absolute float32 round-off of one score evaluation, in units of eps32 * sum_b max_c |logits[b, c]|.
#: Measured 0.8..2.2 for the difference of two evaluations on resnet18 and mobilenet_v3_large; 8
#: leaves 3.6x room. A central difference at step h carries at most round-off / h of it, which is
#: added to FD_REL (in the same units) as the step's tolerance. Where ||g|| * h is below the
#: round-off (a score that float32 cannot resolve, e.g. a random-weight googlenet whose logits do
#: not depend on the image: ||g|| 3e-13) the tolerance grows accordingly: such a file passes,
#: unverified, with its tolerance in the log.
SCORE_ROUNDOFF_ULPS = 8
#: Random unit directions per tensor, besides each batch row's own gradient direction (which detects
#: any error that changes <g, g>: a sign, a scale, most dropped terms); random ones catch the rest.
FD_RANDOM_DIRECTIONS = 2


@dataclass
class Check:
    name: str
    error: float
    tolerance: float
    kind: str

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.error)) and self.error <= self.tolerance

    @property
    def resolved(self) -> bool:
        """False when the tolerance admits an error as large as the gradient itself (errors are relative
        to it): then the check could not have refused a wrong gradient, e.g. a score whose change
        float32 cannot resolve (googlenet with random weights: ||g|| ~ 3e-13 at logits ~ 1)."""
        return self.tolerance < 1.0

    def describe(self) -> str:
        return f"{self.name}: {self.kind} error {self.error:.3g} > tolerance {self.tolerance:.3g}"


def max_rel(actual: np.ndarray, expected: np.ndarray) -> float:
    if actual.shape != expected.shape:
        return float("inf")
    scale = float(np.abs(expected).max()) or 1.0
    return float(np.abs(actual.astype(np.float64) - expected).max()) / scale


def l2_rel(actual: np.ndarray, expected: np.ndarray) -> float:
    if actual.shape != expected.shape:
        return float("inf")
    scale = float(np.linalg.norm(expected)) or 1.0
    return float(np.linalg.norm(actual.astype(np.float64) - expected)) / scale


def raise_on_failures(checks: list[Check]) -> list[Check]:
    failures = [c.describe() for c in checks if not c.ok]
    if failures:
        raise ValidationError(failures)
    return checks


class _OrtSession:
    """An onnxruntime session whose failures are ExportErrors (the exported graph does not run)."""

    def __init__(self, model: onnx.ModelProto):
        try:
            self._session = cpu_session(model)
        except Exception as exc:  # onnxruntime raises its own unrelated exception types
            raise ExportError(f"onnxruntime cannot load the exported graph: {first_line(exc)}") from None

    def output_names(self) -> list[str]:
        return [o.name for o in self._session.get_outputs()]

    def run(self, fetch, feeds):
        try:
            return self._session.run(fetch, feeds)
        except Exception as exc:  # onnxruntime raises its own unrelated exception types
            raise ExportError(f"onnxruntime cannot run the exported graph: {first_line(exc)}") from None



def session_for(model: onnx.ModelProto) -> _OrtSession:
    return _OrtSession(model)


def run_contract(model: onnx.ModelProto, image_input: str, x: np.ndarray, targets: np.ndarray,
                 seed: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every output of the file for images `x` and `targets`; with `seed`, of the file fed that seed."""
    from camrt.execution.seeded import feed_seed

    feeds = {image_input: x, contract.TARGET_INPUT: targets}
    if seed is not None:
        model, feeds[contract.SEED_TENSOR] = feed_seed(model), seed
    session = session_for(model)
    names = session.output_names()
    return dict(zip(names, session.run(None, feeds)))


def is_seeded(model: onnx.ModelProto) -> bool:
    return any(p.key == contract.META_SEED for p in model.metadata_props)


def random_seed(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seed shaped like the score, for checking the gradients of L = <seed, score> for any seed."""
    return rng.standard_normal(logits.shape).astype(logits.dtype)


def require_finite(outputs: dict[str, np.ndarray]) -> None:
    """ValidationError listing every output that holds NaN or inf on the validation input.

    A graph that produces them on ordinary (standard normal) inputs would give NaN heatmaps; the
    runtime also refuses non-finite outputs per input, for inputs that only some images reach."""
    bad = [f"{name}: {int(np.count_nonzero(~np.isfinite(value)))} NaN/inf value(s) of {value.size} on the "
           "validation input (the graph itself produces them, e.g. a Log, Sqrt or Div meeting 0 or a negative number)"
           for name, value in outputs.items() if value.dtype.kind == "f" and not np.isfinite(value).all()]
    if bad:
        raise ValidationError(bad)


def validate_against_torch(model, contract_model, refs, layers: dict[str, str], rule_sets, image_input: str,
                           input_size: tuple[int, int], maps: Sequence[str] = (), layer_scores: bool = False,
                           score_output: str | None = None) -> list[Check]:
    """Compare with torch float32 autograd; a tensor outside tolerance is judged again against torch
    float64, where camrt must be no further from the truth than twice torch float32's own error
    (float32 ReLU/MaxPool switches legitimately flip between implementations). A layer gradient that
    still differs (a switch flipped in onnxruntime only) must be within SWITCH_L2_REL in relative L2.
    Attention maps `maps` and their gradients (and, with `layer_scores`, the gradients of LeGrad's
    layer scores) are checked like layer activations and gradients. A seeded file is checked twice:
    on the target path, and fed a random seed (L = <seed, score>)."""
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, *input_size)).astype(np.float32)
    requested = np.array([contract.TOP1_TARGET, 1], dtype=np.int64)
    got = run_contract(contract_model, image_input, x, requested)
    require_finite(got)
    targets = torch.tensor(got[contract.TARGET_INDEX_OUTPUT])
    bias_terms = [o.name for o in contract_model.graph.output if o.name.startswith(contract.BIAS_GRADIENT_PREFIX)]
    reference = _TorchReference(model, refs, x, targets, score_output, maps=maps, layer_scores=layer_scores)
    checks = _cam_weight_checks(got, contract_model) + _compare_with_torch(got, reference, rule_sets, bias_terms)
    if is_seeded(contract_model):
        seed = random_seed(got[contract.LOGITS_OUTPUT], rng)
        seeded = run_contract(contract_model, image_input, x, requested, seed)
        require_finite(seeded)
        checks += _compare_with_torch(seeded, replace(reference, seed=seed), rule_sets, bias_terms,
                                      label="fed a random seed: ")
    return raise_on_failures(checks)


@dataclass
class _TorchReference:
    """torch autograd's tensors for one input, per rule set, in float32 and (on demand) float64. The
    attention `maps` (and, with `layer_scores`, LeGrad's layer-score gradients) come with vanilla."""

    model: Any
    refs: Sequence[Any]
    x: np.ndarray
    targets: Any
    score_output: str | None = None
    seed: np.ndarray | None = None
    maps: Sequence[str] = ()
    layer_scores: bool = False

    def maps_of(self, rule_set: str) -> Sequence[str]:
        return self.maps if rule_set == contract.RULE_VANILLA else ()

    def tensors(self, rule_set: str, bias_terms, float64: bool = False) -> dict[str, np.ndarray]:
        import copy

        import torch

        from .torch_frontend import reference_gradients

        model, x = self.model, torch.from_numpy(self.x)
        seed = torch.from_numpy(self.seed) if self.seed is not None else None
        if float64:
            model, x = copy.deepcopy(model).double(), x.double()
        maps = self.maps_of(rule_set)
        return _flatten(reference_gradients(model, self.refs, x, self.targets, rule_set, bool(bias_terms), maps,
                                            self.layer_scores, self.score_output, seed), self.refs, bias_terms, maps)


def _compare_with_torch(got: dict[str, np.ndarray], reference: _TorchReference, rule_sets, bias_terms,
                        label: str = "") -> list[Check]:
    checks = []
    # The logits and the layers' activations and gradients come with vanilla, requested or not
    # (`--rules ''`); _torch_checks skips the input gradients the file does not carry.
    for rule_set in dict.fromkeys([contract.RULE_VANILLA, *rule_sets]):
        if rule_set not in TORCH_REFERENCE_RULE_SETS:
            continue
        terms = bias_terms if rule_set == contract.RULE_VANILLA else []
        ref = reference.tensors(rule_set, terms)
        pending = [(name, metric, tol, kind) for name, metric, tol, kind
                   in _torch_checks(reference.refs, rule_set, terms, reference.maps_of(rule_set), reference.layer_scores)
                   if name in got]
        truth = None
        for name, metric, tol, kind in pending:
            check = Check(label + name, metric(got[name], ref[name]), tol, kind)
            if not check.ok:
                if truth is None:
                    truth = reference.tensors(rule_set, terms, float64=True)
                own_error = metric(ref[name], truth[name])
                check = Check(label + name, metric(got[name], truth[name]), max(2 * own_error, tol),
                              f"{kind} vs torch float64 (torch float32's own error {own_error:.2e}, x2)")
                if not check.ok and name.startswith((contract.GRADIENT_PREFIX, contract.BIAS_GRADIENT_PREFIX,
                                                     contract.ATTENTION_GRADIENT_PREFIX,
                                                     contract.ATTENTION_LAYER_GRADIENT_PREFIX)):
                    check = Check(label + name, l2_rel(got[name], truth[name]), SWITCH_L2_REL,
                                  "relative-L2 vs torch float64 (a downstream switch flipped in onnxruntime)")
            checks.append(check)
    return checks


def _torch_checks(refs, rule_set: str, bias_terms=(), maps=(), layer_scores: bool = False):
    if rule_set == contract.RULE_VANILLA:
        yield contract.LOGITS_OUTPUT, max_rel, FORWARD_MAX_REL, "max-relative"
        for ref in refs:
            yield contract.activation_output(ref.name), max_rel, FORWARD_MAX_REL, "max-relative"
            yield contract.gradient_output(ref.name), max_rel, LAYER_GRAD_MAX_REL, "max-relative"
    for name in maps:
        yield contract.attention_output(name), max_rel, FORWARD_MAX_REL, "max-relative"
        yield contract.attention_gradient_output(name), max_rel, LAYER_GRAD_MAX_REL, "max-relative"
        if layer_scores:
            yield contract.attention_layer_gradient_output(name), max_rel, LAYER_GRAD_MAX_REL, "max-relative"
    for name in bias_terms:
        yield name, max_rel, LAYER_GRAD_MAX_REL, "max-relative"
    yield contract.input_gradient_output(rule_set), l2_rel, INPUT_GRAD_L2_REL, "relative-L2"


def _cam_weight_checks(got: dict[str, np.ndarray], contract_model,
                       tolerance: float = FORWARD_MAX_REL) -> list[Check]:
    """CAM weights against the closed form of a GAP + FC head: the layer's gradient is w^c / (h w)
    at every position, so its spatial sum is w^c (over h and w of the layer's layout)."""
    meta = {p.key: p.value for p in contract_model.metadata_props}
    layouts = json.loads(meta.get(contract.META_LAYER_LAYOUTS, "{}"))
    checks = []
    for name, weights in got.items():
        if name.startswith(contract.CAM_WEIGHTS_PREFIX):
            layer = name[len(contract.CAM_WEIGHTS_PREFIX):]
            channels_last = layouts.get(layer, {}).get("layout") == contract.LAYOUT_NHWC
            spatial_sum = got[contract.gradient_output(layer)].astype(np.float64).sum(axis=(1, 2) if channels_last else (2, 3))
            checks.append(Check(name, max_rel(weights, spatial_sum), tolerance,
                                "max-relative vs the spatial sum of the layer gradient"))
    return checks


def _flatten(ref: dict, refs, bias_terms=(), maps=()) -> dict[str, np.ndarray]:
    """reference_gradients() output keyed by contract names; the rule set is the caller's. The
    file's bias terms (`bias_terms`) and torch's are both in execution order."""
    if len(ref["bias_terms"]) != len(bias_terms):
        raise ValidationError([f"the file has {len(bias_terms)} FullGrad bias terms, the torch model "
                               f"{len(ref['bias_terms'])} calls of a Conv2d with a bias or a BatchNorm2d"])
    flat = {contract.LOGITS_OUTPUT: ref["logits"], **dict(zip(bias_terms, ref["bias_terms"]))}
    for layer, act, grad in zip(refs, ref["acts"], ref["grads"]):
        flat[contract.activation_output(layer.name)] = act
        flat[contract.gradient_output(layer.name)] = grad
    for name, value, grad in zip(maps, ref["attention"], ref["attention_grads"]):
        flat[contract.attention_output(name)] = value
        flat[contract.attention_gradient_output(name)] = grad
    for name, grad in zip(maps, ref["attention_layer_grads"]):
        flat[contract.attention_layer_gradient_output(name)] = grad
    for rule_set in (contract.RULE_VANILLA, contract.RULE_GUIDED, contract.RULE_DECONVNET):
        flat[contract.input_gradient_output(rule_set)] = ref["input_grad"]
    return flat


def _fd_directions(point: np.ndarray, grad: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Unit-norm float64 directions over the movable elements: each batch row's gradient direction,
    then FD_RANDOM_DIRECTIONS random ones. Exact zeros (ReLU outputs) tie inside MaxPool windows,
    where no derivative exists, so they stay put."""
    movable = point != 0
    masked = np.where(movable, grad.astype(np.float64), 0.0)
    directions = []
    for row in range(len(point)):
        v = np.zeros_like(masked)
        v[row] = masked[row]
        directions.append(v)
    for _ in range(FD_RANDOM_DIRECTIONS):
        directions.append(np.where(movable, rng.standard_normal(point.shape), 0.0))
    return [v / np.linalg.norm(v) for v in directions if np.linalg.norm(v) > 0]


def _directional_error(score: "_Scorer", point: np.ndarray, grad: np.ndarray, v: np.ndarray,
                       rel: float = FD_REL) -> tuple[float, float]:
    """(error, tolerance) at the first of FD_STEPS, then FD_SMALL_STEPS, that agrees, else at the most lenient one:
    error |D_h - <g, dx>/2h| / max(||g on v's support||, |D_h|), tolerance FD_REL plus the score's
    round-off / h in the same units.

    dx is the displacement actually taken (x+ - x- after rounding to float32), so rounding the
    point does not count as error. The denominator makes a zero or tiny gradient whose score does
    move fail (error 1), as it must."""
    g = grad.astype(np.float64)
    bound = float(np.linalg.norm(g[v != 0]))
    rms = float(np.sqrt(np.mean(point.astype(np.float64) ** 2))) or 1.0
    best = (float("inf"), rel)
    for step in FD_STEPS + FD_SMALL_STEPS:
        h = step * rms
        plus, minus = (point + h * v).astype(point.dtype), (point - h * v).astype(point.dtype)
        fd = (score(plus) - score(minus)) / (2 * h)
        analytic = float((g * (plus.astype(np.float64) - minus)).sum()) / (2 * h)
        scale = max(bound, abs(fd)) or 1.0
        error, tolerance = abs(fd - analytic) / scale, rel + score.roundoff / (h * scale)
        if step in FD_SMALL_STEPS and tolerance - rel > FD_SMALL_STEP_MAX_ROUNDOFF:
            continue
        if error / tolerance < best[0] / best[1]:
            best = (error, tolerance)
        if error <= tolerance:
            break
    return best


def _directional_check(name: str, score: "_Scorer", point: np.ndarray, grad: np.ndarray,
                       rng: np.random.Generator, rel: float = FD_REL) -> Check:
    if grad.shape != point.shape:
        return Check(name, float("inf"), rel, f"shape {grad.shape} vs the tensor's {point.shape}")
    results = [_directional_error(score, point, grad, v, rel) for v in _fd_directions(point, grad, rng)]
    error, tolerance = max(results, key=lambda r: r[0] / r[1], default=(0.0, rel))
    return Check(name, error, tolerance, "finite-difference (unit directions, relative to ||g||)")


def validate_finite_differences(forward_model: onnx.ModelProto, contract_model, layers: dict[str, str],
                                image_input: str, score_tensor: str, input_shape: tuple[int, ...],
                                maps: dict[str, str] | None = None) -> list[Check]:
    """Directional derivatives of L vs central differences in onnxruntime (float32), for the input,
    the `layers` and the attention `maps` (each {name: tensor}): L is the target score, and for a
    seeded file also <seed, score> for a random seed.

    A QDQ quantized model is a step function of its input: its differences are taken of its
    straight-through surrogate at the same point instead (straight_through.py), whose derivative is
    the straight-through gradient the file computes. A float16 model's are taken of its float32 twin
    (float16.py), float16 differences resolving nothing."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *input_shape)).astype(np.float32)
    rel, cam_rel, feed = FD_REL, FORWARD_MAX_REL, x
    if activation_quantizers(forward_model):
        forward_model, rel = straight_through_surrogate(forward_model, contract_model, {image_input: x}), QUANTIZED_FD_REL
    if next(i for i in forward_model.graph.input if i.name == image_input).type.tensor_type.elem_type == FLOAT16:
        feed = x.astype(np.float16)
        x, forward_model = feed.astype(np.float32), float32_twin(forward_model)
        rel, cam_rel = FLOAT16_FD_REL, FLOAT16_MAX_REL
    requested = np.array([contract.TOP1_TARGET, 0], dtype=np.int64)
    got = _widened(run_contract(contract_model, image_input, feed, requested))
    require_finite(got)
    logits = got[contract.LOGITS_OUTPUT]
    checks = _cam_weight_checks(got, contract_model, cam_rel)
    tensors = _checked_tensors(layers, maps or {})
    checks += _fd_checks(forward_model, got, _target_weights(logits, got[contract.TARGET_INDEX_OUTPUT]), tensors,
                         image_input, score_tensor, x, rng, rel=rel)
    if is_seeded(contract_model):
        seed = random_seed(logits, rng)
        # a float16 model's score, hence its seed, is float16 like its image input
        seeded = _widened(run_contract(contract_model, image_input, feed, requested, seed.astype(feed.dtype)))
        require_finite(seeded)
        checks += _fd_checks(forward_model, seeded, seed, tensors, image_input, score_tensor, x, rng,
                             label="fed a random seed: ", rel=rel)
    return raise_on_failures(checks)


def _widened(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`outputs` with float16 arrays widened to float32 (a float16 file's), for the float64 checks."""
    return {name: value.astype(np.float32) if value.dtype == np.float16 else value for name, value in outputs.items()}


def _target_weights(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The target path's seed: 1 on each row's class channel (every position of it for rank > 2)."""
    weights = np.zeros_like(logits)
    weights[np.arange(len(targets)), targets] = 1
    return weights


def _checked_tensors(layers: dict[str, str], maps: dict[str, str]) -> list[tuple[str, str, str]]:
    """(value output, gradient output, graph tensor) of each layer and attention map."""
    return ([(contract.activation_output(layer), contract.gradient_output(layer), tensor)
             for layer, tensor in layers.items()]
            + [(contract.attention_output(name), contract.attention_gradient_output(name), tensor)
               for name, tensor in maps.items()])


def _fd_checks(forward_model: onnx.ModelProto, got: dict[str, np.ndarray], weights: np.ndarray,
               tensors: list[tuple[str, str, str]], image_input: str, score_tensor: str, x: np.ndarray,
               rng: np.random.Generator, label: str = "", rel: float = FD_REL) -> list[Check]:
    checks = []
    vanilla_input = contract.input_gradient_output(contract.RULE_VANILLA)
    logits = got[contract.LOGITS_OUTPUT]
    if vanilla_input in got:
        scorer = _Scorer(forward_model, score_tensor, weights, image_input, x, image_input, logits)
        checks.append(_directional_check(label + vanilla_input, scorer, x, got[vanilla_input], rng, rel))
    for value, gradient, tensor in tensors:
        scorer = _Scorer(forward_model, score_tensor, weights, image_input, x, tensor, logits)
        checks.append(_directional_check(label + gradient, scorer, got[value], got[gradient], rng, rel))
    return checks


class _Scorer:
    """L = sum(weights * score) as a function of tensor `overridden` (all other tensors as in the
    forward pass), in float64 from onnxruntime's float32 score. `roundoff` bounds the float32
    round-off of one evaluation (SCORE_ROUNDOFF_ULPS)."""

    def __init__(self, forward_model: onnx.ModelProto, score_tensor: str, weights: np.ndarray, image_input: str,
                 x: np.ndarray, overridden: str, logits: np.ndarray):
        self._session = session_for(cut_at(forward_model, overridden, score_tensor))
        self._score_tensor, self._weights, self._overridden = score_tensor, weights.astype(np.float64), overridden
        self._fixed = {image_input: x} if overridden != image_input else {}
        # sum_b max|score_b| * max(1, ||weights_b||): a one-hot row counts its largest score once
        # (independent round-off errors of many weighted terms grow like the weights' L2 norm)
        rows = len(logits)
        largest = np.abs(logits.astype(np.float64)).reshape(rows, -1).max(axis=1)
        spread = np.maximum(1.0, np.linalg.norm(self._weights.reshape(rows, -1), axis=1))
        self.roundoff = SCORE_ROUNDOFF_ULPS * float(np.finfo(np.float32).eps) * float((largest * spread).sum())

    def __call__(self, value: np.ndarray) -> float:
        logits = self._session.run([self._score_tensor], {**self._fixed, self._overridden: value})[0]
        return float((logits.astype(np.float64) * self._weights).sum())


def cut_at(model: onnx.ModelProto, tensor: str, output: str) -> onnx.ModelProto:
    """A copy of `model` whose tensor `tensor` is a graph input instead of computed, with `output` as output."""
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    graph = cut.graph
    del graph.output[:]
    graph.output.append(onnx.helper.make_empty_tensor_value_info(output))
    if any(i.name == tensor for i in graph.input):
        return cut
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == tensor:
                node.output[i] = tensor + "/camrt_replaced"
    graph.input.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    return cut
