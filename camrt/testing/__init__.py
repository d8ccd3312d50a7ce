"""Test helpers for method plugins: a tiny contract file, torch's numbers for it, and a parity check.

The tiny file (`TINY_MODEL`, shipped with camrt) is Conv(3x3, stride 2) -> Relu -> global average
pooling -> Gemm -> Softmax, 3x12x16 input, 5 classes. It has the layers `feat` (after the Relu,
with CAM class weights) and `conv` (before it), the input gradients of the vanilla, guided and
deconvnet rule sets and FullGrad's bias terms, so every built-in method runs on it.
`tiny_reference()` holds torch autograd's float64 numbers for its outputs on fixed inputs: an
oracle for a method's maths that needs no torch at test time.

    from camrt.testing import assert_heatmaps_close, graph_outputs, run_method, tiny_reference

    ref = tiny_reference()
    outputs = graph_outputs(MyMethod(), layer="feat")         # what MyMethod.explain receives
    want = my_closed_form(ref["camrt/act/feat"], ref["camrt/grad/feat"])
    assert_heatmaps_close(MyMethod().explain(outputs, layer="feat"), want, rtol=1e-4)
    results = run_method(MyMethod(), layer="feat")            # the whole path: list[Explanation]

The file and its references are made by tests/fixtures/make_golden.py in camrt's repository.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TINY_FOLDER = Path(__file__).parent
#: The tiny camrt file (see the module docstring).
TINY_MODEL = str(TINY_FOLDER / "tiny.camrt.onnx")


def tiny_reference() -> dict[str, np.ndarray]:
    """torch autograd's float64 numbers for `TINY_MODEL`: `inputs` [3, 3, 12, 16] (preprocessed,
    NCHW), `targets` [3] (-1: top-1), and every graph output of the file by name for them, e.g.
    `camrt/logits`, `camrt/target_index`, `camrt/act/feat`, `camrt/grad/feat` (d logits[b, target_b]
    / d feat), `camrt/cam_weights/feat`, `camrt/input_grad/guided`, `camrt/bias_grad/conv`."""
    with np.load(TINY_FOLDER / "tiny.npz") as stored:
        return dict(stored)


def _inputs_and_targets(inputs: np.ndarray | None, targets: Any) -> tuple[np.ndarray, Any]:
    if inputs is None:
        reference = tiny_reference()
        return reference["inputs"].astype(np.float32), reference["targets"] if targets is None else targets
    return inputs, targets


def graph_outputs(method: Any, *, layer: str | Sequence[str] | None = None, model: str = TINY_MODEL,
                  inputs: np.ndarray | None = None, targets: Any = None):
    """The `camrt.GraphOutputs` that `method` (a `camrt.Method` instance or a method name) receives
    for `inputs` (NCHW float32; default: the reference inputs) and `targets` (one per input, -1 for
    top-1; default: the reference targets, or top-1 for given inputs): the outputs it declares in
    `requires`, fetched exactly as `camrt explain` fetches them."""
    from camrt import contract
    from camrt.execution.context import ExplainContext
    from camrt.explainer import Explainer
    from camrt.methods.base import GraphOutputs

    explainer = Explainer(model, method=method, layer=layer, device="cpu")
    x, targets = _inputs_and_targets(inputs, targets)
    x = explainer.session.check_inputs(x)
    targets = [-1] * x.shape[0] if targets is None else targets
    values = explainer.session.run(x, targets, explainer.fetch)
    return GraphOutputs(values, x, ExplainContext(explainer.session, x, values[contract.TARGET_INDEX_OUTPUT]))


def run_method(method: Any, *, layer: str | Sequence[str] | None = None, model: str = TINY_MODEL,
               inputs: Any = None, targets: Any = None, **explainer_options: Any) -> list:
    """`camrt.explainer.Explainer(model, method, layer=layer, ...).explain(inputs, targets)` on the
    CPU: the finished `Explanation`s (heatmaps in [0, 1] at the input size). Defaults as for
    `graph_outputs`; `inputs` may also be HWC uint8 RGB images."""
    from camrt.explainer import Explainer

    x, targets = _inputs_and_targets(inputs, targets)
    return Explainer(model, method=method, layer=layer, device="cpu", **explainer_options).explain(x, targets)


def _maps(value: Any, what: str) -> np.ndarray:
    """An array from an array, or from a sequence of Explanations (their heatmaps)."""
    if not isinstance(value, np.ndarray) and isinstance(value, Sequence) and value and hasattr(value[0], "heatmap"):
        value = [v.heatmap for v in value]
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise AssertionError(f"{what}: not an array of real numbers ({error})") from None


def assert_heatmaps_close(got: Any, want: Any, *, rtol: float = 1e-5, atol: float = 1e-6, name: str = "heatmaps") -> None:
    """Assert |got - want| <= atol + rtol |want| everywhere, and the same shape, both finite.

    got, want: arrays ([B, h, w] raw maps, [H, W] heatmaps, ...) or lists of Explanations. The
    error message says how many values differ and quotes the worst one with its index."""
    got_maps, want_maps = _maps(got, f"{name} (got)"), _maps(want, f"{name} (want)")
    if got_maps.shape != want_maps.shape:
        raise AssertionError(f"{name}: shape {got_maps.shape} != expected {want_maps.shape}")
    for label, maps in (("got", got_maps), ("want", want_maps)):
        if not np.isfinite(maps).all():
            raise AssertionError(f"{name} ({label}): {int((~np.isfinite(maps)).sum())} non-finite values")
    excess = np.abs(got_maps - want_maps) - (atol + rtol * np.abs(want_maps))
    if (excess > 0).any():
        worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
        raise AssertionError(
            f"{name}: {int((excess > 0).sum())} of {excess.size} values differ beyond atol={atol:g} + rtol={rtol:g} "
            f"x |want|; worst at {tuple(int(i) for i in worst)}: got {got_maps[worst]:.6g}, want {want_maps[worst]:.6g} "
            f"(max |got - want| = {np.abs(got_maps - want_maps).max():.3g})")
