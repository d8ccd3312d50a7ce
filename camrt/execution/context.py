"""The execution context of one explain call: further passes through the same contract file.

Most methods need one run of the file (forward + backward) and read its outputs. Methods that
perturb the input (Score-CAM, SmoothGrad, Integrated Gradients) or edit a layer's activations
(Ablation-CAM) need more passes; they declare it in `Requirements` (``extra_passes``, ``tail``) and
get an `ExplainContext` as ``outputs.context``:

    ctx = outputs.context
    logits = ctx.forward(masked_inputs)                         # [N, classes], forward only
    scores = ctx.target_scores(logits, b)                       # the explained target's L per row
    grads = ctx.target_gradients(noisy, b, [input_gradient_output("vanilla")])  # dL/d... per row
    logits = ctx.tail(layer, edited_activations, samples=rows)  # from the layer to the logits
    logits = ctx.masked_tail(layer, masks, samples=rows)        # the layer's maps times masks [N, h, w]
    ctx.add_extra("completeness", per_sample_values)            # -> Explanation.extra

`target_scores` and `target_gradients` are the one place where further passes get their target: the
class explained for batch sample b, or a seeded target (segmentation region, concept similarity,
detection box; camrt.seeds.targets) whose L and seed are made from each pass's own score. A method
that uses only them (``Method.scores_seeded_targets``) explains every target kind.

Every pass goes through the `ExplainSession` of the file (cached onnxruntime sessions of the
pruned subgraphs), so no model other than the file is ever run. Callers bound their memory by
passing chunks; the context does not batch for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import contract
from ..errors import InputError, PluginError
from .feature_layout import from_nchw, to_nchw


class ExplainContext:
    """Passes through the contract file, for the batch being explained.

    inputs: the preprocessed batch [B, C, H, W] of this call; targets: the explained class per
    sample (already resolved, int64 [B]); seeded: for a seeded target, its `SeededPasses`
    (camrt.seeds.targets: L and the seed of score rows made from sample b), which `target_scores`
    and `target_gradients` then use instead of `targets`.
    """

    def __init__(self, session, inputs: np.ndarray, targets: np.ndarray, seeded: Any = None):
        self.session = session
        self.inputs = inputs
        self.targets = np.asarray(targets, dtype=np.int64)
        self.seeded = seeded
        self.extra: dict[str, list[Any]] = {}
        self._side: dict[str, dict[str, np.ndarray]] = {}
        self._layer_values: dict[str, np.ndarray] = {}

    @property
    def target(self) -> Any:
        """The seeded target explained for every sample (D-RISE reads its box), None on the class path."""
        return getattr(self.seeded, "target", None)

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        """``camrt/logits`` [N, classes] of model inputs [N, C, H, W] (the forward subgraph only)."""
        x = np.asarray(inputs)
        return self.session.run(x, np.full(x.shape[0], contract.TOP1_TARGET), [contract.LOGITS_OUTPUT])[
            contract.LOGITS_OUTPUT]

    def target_scores(self, scores: np.ndarray, sample: int) -> np.ndarray:
        """The explained target's score (L) of each row of `forward` outputs [N, ...] made from batch
        sample `sample`: its class logit, or a seeded target's L (float64)."""
        if self.seeded is None:
            return scores[:, self.targets[sample]]
        return np.asarray(self.seeded.scores(scores, sample), dtype=np.float64)

    def target_gradients(self, inputs: np.ndarray, sample: int, fetch: Sequence[str]) -> dict[str, np.ndarray]:
        """Contract outputs (e.g. ``camrt/input_grad/vanilla``, ``camrt/grad/<layer>``) of inputs
        [N, C, H, W] made from batch sample `sample` (noisy or interpolated copies), differentiating
        the explained target at each row: the class explained for `sample` (not each row's top-1),
        or a seeded target's L, whose seed is made from that row's own score (one forward pass, the
        seeds, one backward pass; a row whose L is locally constant, e.g. a box no candidate
        matches any more, gets zero gradients)."""
        x = np.asarray(inputs)
        if self.seeded is None:
            return self.session.run(x, np.full(x.shape[0], self.targets[sample]), list(fetch))
        return self.session.run_seeded(x, lambda forward: self.seeded.seeds(forward[contract.LOGITS_OUTPUT], sample),
                                       list(fetch), allow_zero_rows=True)

    def gradients(self, inputs: np.ndarray, targets: Any, fetch: Sequence[str]) -> dict[str, np.ndarray]:
        """Any contract outputs (e.g. ``camrt/input_grad/vanilla``) for inputs [N, C, H, W] and one
        class target per row (a class index, or -1 for the top-1 of that row). A seeded target has
        no class: `target_gradients` serves every target."""
        if self.seeded is not None:
            raise PluginError("ExplainContext.gradients(inputs, targets, ...) differentiates class logits, but this "
                              "call explains a seeded target: use target_gradients(inputs, sample, fetch)")
        return self.session.run(inputs, targets, list(fetch))

    def tail(self, layer: str, activations: np.ndarray, samples: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """``camrt/logits`` [N, classes] from (edited) activations [N, K, h, w] of `layer`.

        samples: for each row, the index of the batch sample it was made from (default: row i is
        sample i). When the tail reads tensors from before the layer (skip connections), those are
        taken from a forward pass of that sample (computed once per layer and call); so are the
        extra tokens (class, distillation) of a token layer, which the feature maps leave out.
        """
        acts = np.asarray(activations)
        rows = np.arange(acts.shape[0]) if samples is None else np.asarray(samples, dtype=np.int64)
        if rows.shape != (acts.shape[0],):
            raise PluginError(f"tail: {rows.shape[0] if rows.ndim else 1} sample indices for {acts.shape[0]} rows")
        if rows.size and (rows.min() < 0 or rows.max() >= self.inputs.shape[0]):
            raise InputError(f"tail: sample indices out of range for a batch of {self.inputs.shape[0]}")
        if layer not in self._side:
            self._side[layer] = self.session.tail_side_tensors(layer, self.inputs)
        side = {name: value[rows] for name, value in self._side[layer].items()}
        layout = self.session.info.layer_layout(layer)
        if layout.layout != contract.LAYOUT_NCHW:
            acts = from_nchw(acts, layout, self._unedited(layer)[rows])
        return self.session.run_tail(layer, acts, side)

    def masked_tail(self, layer: str, masks: np.ndarray, samples: Sequence[int] | np.ndarray) -> np.ndarray:
        """``camrt/logits`` [N, classes] with the feature maps of `layer` of sample `samples[i]`
        multiplied by `masks[i]` [h, w] (the extra tokens of a token layer kept), and so every
        tensor the tail reads beside the layer that has the layer's shape: the residual stream a
        transformer block adds to its branch (ViT-ReciproCAM masks both, the authors' OpenVINO XAI
        does so), taken in the layer's layout."""
        rows = np.asarray(samples, dtype=np.int64)
        weights = np.asarray(masks, dtype=np.float32)[:, None]
        if layer not in self._side:
            self._side[layer] = self.session.tail_side_tensors(layer, self.inputs)
        layout = self.session.info.layer_layout(layer)
        unedited = self._unedited(layer)[rows]

        def masked(value: np.ndarray) -> np.ndarray:
            return from_nchw(to_nchw(value, layout, layer) * weights, layout, value)

        side = {name: masked(value[rows]) if value.shape[1:] == unedited.shape[1:] else value[rows]
                for name, value in self._side[layer].items()}
        return self.session.run_tail(layer, masked(unedited), side)

    def _unedited(self, layer: str) -> np.ndarray:
        """The batch's activations of `layer` in the file's layout (one forward pass, cached)."""
        key = contract.activation_output(layer)
        if key not in self._layer_values:
            self._layer_values[key] = self.session.run(self.inputs, np.full(self.inputs.shape[0], contract.TOP1_TARGET),
                                                       [key], file_layout=True)[key]
        return self._layer_values[key]

    def add_extra(self, key: str, values: Sequence[Any]) -> None:
        """Per-sample fields (one JSON-able value per sample) for each Explanation's ``extra``."""
        values = list(values)
        if len(values) != self.inputs.shape[0]:
            raise PluginError(f"extra field {key!r}: {len(values)} values for a batch of {self.inputs.shape[0]}")
        self.extra[key] = values
