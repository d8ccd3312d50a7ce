"""The method contract: what a method needs from the file (`Requirements`) and how it makes raw maps.

A method turns the fetched graph outputs into raw maps [B, h, w], one call per explained layer.
ReLU, upsampling, normalisation and multi-layer fusion are not the method's business: they live in
`camrt.postprocess` and are applied once by the explainer.
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .. import contract
from ..errors import ModelError, PluginError, UsageError


@dataclass(frozen=True)
class Requirements:
    """The contract outputs a method needs.

    activations / gradients: ``camrt/act/<layer>`` / ``camrt/grad/<layer>`` of each explained
    layer; input_gradient: the rule set (``vanilla``, ``guided``, ...) of the
    ``camrt/input_grad/<rule>`` output it needs, or None.
    """

    activations: bool = False
    gradients: bool = False
    input_gradient: str | None = None
    #: The method runs further passes through the file (perturbed inputs: Score-CAM, SmoothGrad,
    #: Integrated Gradients) through ``outputs.context`` (`camrt.execution.context.ExplainContext`).
    extra_passes: bool = False
    #: The method runs the layer's tail graph (activations -> logits: Ablation-CAM); the runtime
    #: builds it when the file is opened, so a layer without a tail fails early.
    tail: bool = False
    #: ``camrt/cam_weights/<layer>``: the classifier weights of the target class (CAM); the
    #: exporter adds them only for layers followed by global average pooling and a linear layer.
    cam_weights: bool = False
    #: ``camrt/bias_grad/<node>`` of every bias-carrying Conv / BatchNormalization node, listed in
    #: the file's metadata (FullGrad; ``camrt export --fullgrad``).
    bias_gradients: bool = False
    #: ``camrt/attn/<map>`` / ``camrt/attn_grad/<map>`` / ``camrt/attn_layer_grad/<map>`` of every
    #: attention map the file's metadata lists (``camrt export --attention``; the last one with
    #: ``--attention-layer-scores``).
    attention: bool = False
    attention_gradients: bool = False
    attention_layer_gradients: bool = False
    #: ``camrt/attn_rule_grad/<rule set>/<map>``: what this rule set propagates back to every attention
    #: map (an LRP rule set's relevance; ``camrt export --rules ...,<rule set> --attention``), or None.
    attention_rule_gradients: str | None = None

    @property
    def uses_layers(self) -> bool:
        return self.activations or self.gradients or self.tail or self.cam_weights

    @property
    def uses_attention(self) -> bool:
        return (self.attention or self.attention_gradients or self.attention_layer_gradients
                or self.attention_rule_gradients is not None)

    def outputs(self, layers: Sequence[str], info: contract.ContractInfo | None = None) -> list[str]:
        """The output names to fetch for `layers` (bias-gradient terms: those `info` lists)."""
        names: list[str] = []
        for layer in layers if self.uses_layers else ():
            if self.activations:
                names.append(contract.activation_output(layer))
            if self.gradients:
                names.append(contract.gradient_output(layer))
            if self.cam_weights:
                names.append(contract.cam_weights_output(layer))
        if self.input_gradient is not None:
            names.append(contract.input_gradient_output(self.input_gradient))
        if self.bias_gradients and info is not None:
            names += [contract.bias_gradient_output(node) for node in info.bias_terms or ()]
        if info is not None and info.attention is not None:
            for name in info.attention.maps:
                names += self.attention_outputs(name)
        return names

    def attention_outputs(self, name: str) -> list[str]:
        """The outputs of attention map `name` the method reads."""
        names = [output(name) for output, wanted in (
            (contract.attention_output, self.attention),
            (contract.attention_gradient_output, self.attention_gradients),
            (contract.attention_layer_gradient_output, self.attention_layer_gradients)) if wanted]
        if self.attention_rule_gradients is not None:
            names.append(contract.attention_rule_gradient_output(self.attention_rule_gradients, name))
        return names

    def to_dict(self) -> dict[str, Any]:
        """The fields; the optional ones (``extra_passes``, ``tail``, ``cam_weights``,
        ``bias_gradients``, the attention ones) only when set (single-pass methods keep the three-key form)."""
        data = dataclasses.asdict(self)
        for key in ("extra_passes", "tail", "cam_weights", "bias_gradients", "attention", "attention_gradients",
                    "attention_layer_gradients", "attention_rule_gradients"):
            if not data[key]:
                del data[key]
        return data


@dataclass(frozen=True)
class GraphOutputs:
    """What one run of the contract file produced for a batch, by output name."""

    values: Mapping[str, np.ndarray]
    #: The preprocessed model input, NCHW float32.
    inputs: np.ndarray
    #: Further passes through the same file (`camrt.execution.context.ExplainContext`); set by the Explainer.
    context: Any = None

    def require_context(self, method: str):
        """The ExplainContext, or PluginError when the caller gave none."""
        if self.context is None:
            raise PluginError(f"method {method!r} runs further passes through the file; it needs "
                              "GraphOutputs(..., context=ExplainContext(...)) (the Explainer gives one)")
        return self.context

    def get(self, name: str) -> np.ndarray:
        try:
            return self.values[name]
        except KeyError:
            raise ModelError(f"output {name!r} was not fetched; declare it in the method's `requires`") from None

    @property
    def logits(self) -> np.ndarray:
        return self.get(contract.LOGITS_OUTPUT)

    @property
    def target_index(self) -> np.ndarray:
        return self.get(contract.TARGET_INDEX_OUTPUT)

    def _spatial(self, name: str) -> np.ndarray:
        value = self.get(name)
        if value.ndim != 4:
            raise ModelError(f"output {name!r} has shape {value.shape}; methods need NCHW feature maps")
        return value

    def activation(self, layer: str) -> np.ndarray:
        """[B, K, h, w] feature maps of `layer`."""
        return self._spatial(contract.activation_output(layer))

    def gradient(self, layer: str) -> np.ndarray:
        """[B, K, h, w] gradient of the target score with respect to `layer`."""
        return self._spatial(contract.gradient_output(layer))

    def input_gradient(self, rule_set: str) -> np.ndarray:
        """[B, C, H, W] gradient of the target score with respect to the input, under `rule_set`."""
        return self._spatial(contract.input_gradient_output(rule_set))

    def cam_weights(self, layer: str) -> np.ndarray:
        """[B, K]: the classifier weights of each sample's target class over `layer`'s channels."""
        name = contract.cam_weights_output(layer)
        value = self.get(name)
        if value.ndim != 2:
            raise ModelError(f"output {name!r} has shape {value.shape}; expected [B, channels]")
        return value

    def bias_gradients(self) -> list[np.ndarray]:
        """The fetched FullGrad terms d score / d (node output) * bias, [B, C, h, w] each, in file order."""
        return [self._spatial(name) for name in self.values if name.startswith(contract.BIAS_GRADIENT_PREFIX)]


def _coerce(value: Any, annotation: Any, owner: str, name: str) -> Any:
    """Options given as text (from the CLI) become the declared type."""
    if not isinstance(value, str) or annotation in (str, Any):
        return value
    try:
        if annotation is bool:
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation in (int, float):
            return annotation(value)
    except ValueError:
        raise UsageError(f"{owner}: option {name!r} must be {annotation.__name__}, got {value!r}") from None
    return value


@dataclass(frozen=True)
class BatchOptions:
    """batch_size: inputs (or activation copies) per extra pass; bounds the memory of a run."""

    batch_size: int = 32

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def check_sampling(n_samples: int, **scales: float) -> None:
    """The option checks of the sampling methods: n_samples >= 1 and each noise scale >= 0 (not NaN)."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    for name, value in scales.items():
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


class Method(ABC):
    """An explanation method. Subclasses set `name`, `requires` and optionally `aliases`, `Options`."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[Requirements] = Requirements()
    #: What it is called in messages (`camrt.metrics.base.Metric` reuses the options machinery).
    kind: ClassVar[str] = "method"
    #: Whether the postprocessing applies ReLU to the raw maps (methods whose maps are signed on
    #: purpose turn it off).
    relu: ClassVar[bool] = True
    #: The seeded target kinds it alone explains (D-RISE: "box"), None: class targets and the seeded
    #: kinds its requirements serve (camrt.seeds.targets.method_refusal).
    target_kinds: ClassVar[tuple[str, ...] | None] = None
    #: Whether its further passes (``extra_passes``, ``tail``) get the explained target only through
    #: ``ExplainContext.target_scores`` / ``target_gradients``, so that they explain any target (a
    #: seeded one, camrt.seeds.targets, as a class); a method with further passes that does not say
    #: so is refused a seeded target (`camrt.seeds.targets.method_refusal`).
    scores_seeded_targets: ClassVar[bool] = False

    def seed_from(self, seeds: np.ndarray, scores: np.ndarray, targets: Sequence[Any]) -> np.ndarray:
        """The seed rows a seeded run feeds the backward pass (`camrt.seeded_explain`), from the
        target's seed rows dL/d score [M, ...], the score rows they explain [M, ...] and each row's
        target (a class index or a camrt.seeds.targets.SeededTarget): the seed itself (the gradient
        of L). A method whose backward pass starts from another output relevance overrides it (the
        LRP plugin: seed * score, zennit's `attr_output`, the IoU held constant for a box)."""
        return seeds

    @dataclass(frozen=True)
    class Options:
        """No options."""

    def __init__(self, **options: Any):
        self.options = self.parse_options(options)

    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> Any:
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            valid = ", ".join(sorted(fields)) if fields else "none (it takes no options)"
            raise UsageError(f"{cls.kind} {cls.name!r} has no option(s) {', '.join(unknown)}; valid options: {valid}")
        hints = typing.get_type_hints(cls.Options)
        values = {key: _coerce(value, hints.get(key, Any), f"{cls.kind} {cls.name!r}", key) for key, value in options.items()}
        try:
            return cls.Options(**values)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{cls.kind} {cls.name!r}: bad options: {exc}") from None

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """name, aliases, requires, options and a one-line description, for `camrt methods`."""
        hints = typing.get_type_hints(cls.Options)
        options = []
        for f in dataclasses.fields(cls.Options):
            default = f.default if f.default is not dataclasses.MISSING else None
            kind = hints.get(f.name, Any)
            options.append({"name": f.name, "type": getattr(kind, "__name__", str(kind)), "default": default})
        if cls.takes_aug_smooth():  # the explainer's option (camrt.postprocess)
            options.append({"name": "aug_smooth", "type": "bool", "default": False})
        doc = (cls.__doc__ or "").strip().splitlines()
        return {
            "name": cls.name,
            "aliases": list(cls.aliases),
            "requires": cls.requires.to_dict(),
            "options": options,
            "description": doc[0] if doc else "",
        }

    @classmethod
    def takes_aug_smooth(cls) -> bool:
        """Whether the explainer's aug_smooth (test-time augmentation) applies: the CAM family,
        i.e. methods that explain a layer (FullGrad, which pytorch-grad-cam also smooths, says so)."""
        return cls.requires.uses_layers

    @abstractmethod
    def explain(self, outputs: GraphOutputs, *, layer: str | None) -> np.ndarray:
        """Raw maps [B, h, w] (float32) for `layer` (None for methods that use no layer)."""

    def layer_fusion(self) -> str:
        """How the maps of several layers are fused: one of `camrt.postprocess.FUSIONS` (the mean;
        Layer-CAM lets its options choose)."""
        return "mean"

    def session_weights_graph(self):
        """For heatmaps made inside the session (`camrt.execution.heatmap_graph`): a function
        ``(builder, activation, gradient) -> name of the [B, K, 1, 1] channel weights`` that builds
        this method's weights as ONNX nodes, or None when it cannot with its options."""
        return None


def channel_max_abs(attribution: np.ndarray) -> np.ndarray:
    """Input-space attributions [B, C, H, W] -> maps [B, H, W]: the max over channels of |value|.

    Simonyan et al. 2014 sec. 3.1's reduction of a colour-image gradient to one map; camrt's
    display convention for every input-space method.
    """
    attribution = np.asarray(attribution)
    if attribution.ndim != 4:
        raise ModelError(f"input-space attributions must be [B, C, H, W], got {attribution.shape}")
    return np.abs(attribution).max(axis=1).astype(np.float32, copy=False)


class InputGradientMethod(Method):
    """The input-gradient family: one input gradient under a backward rule set, reduced by
    `channel_max_abs`. Subclasses set `requires = Requirements(input_gradient=<rule set>)`.

    `attribution` is the signed [B, C, H, W] tensor (what Captum returns); `explain` its map.
    The maps are >= 0 already, so no ReLU is applied after.
    """

    relu: ClassVar[bool] = False

    def attribution(self, outputs: GraphOutputs, *, layer: str | None = None) -> np.ndarray:
        rule = self.requires.input_gradient
        if rule is None:
            raise PluginError(f"method {self.name!r} declares no input_gradient rule set")
        return outputs.input_gradient(rule)

    def explain(self, outputs: GraphOutputs, *, layer: str | None) -> np.ndarray:
        return channel_max_abs(self.attribution(outputs, layer=layer))


@dataclass(frozen=True)
class EigenSmoothOptions:
    """eigen_smooth: first principal component of the weighted activations instead of their sum."""

    eigen_smooth: bool = False


@dataclass(frozen=True)
class BatchedCAMOptions(BatchOptions, EigenSmoothOptions):
    """batch_size: inputs (or activation copies) per extra pass; eigen_smooth: first principal
    component of the weighted activations instead of their sum."""


class EigenSmoothMethod(Method):
    """A method whose map reads ``options.eigen_smooth``: its Options must keep the option."""

    Options = EigenSmoothOptions

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not issubclass(cls.Options, EigenSmoothOptions):  # fail where the class is written, not mid-run
            raise PluginError(f"{cls.__module__}.{cls.__qualname__}.Options must subclass "
                              "camrt.EigenSmoothOptions (the CAM family's eigen_smooth option)")


class ChannelWeightingMethod(EigenSmoothMethod):
    """The CAM family's shape: map = sum_k w_k A^k, one weight per channel; subclasses implement
    `layer_weights` (from one pass's tensors, or from further passes: Score-CAM, Ablation-CAM).

    Option eigen_smooth (pytorch-grad-cam's ``get_cam_image``): the map is instead the projection
    of the weighted activations w_k A^k on their first principal component (camrt.methods.projection).
    """

    requires: ClassVar[Requirements] = Requirements(activations=True)

    @abstractmethod
    def layer_weights(self, outputs: GraphOutputs, layer: str) -> np.ndarray:
        """Channel weights [B, K] of `layer`."""

    def explain(self, outputs: GraphOutputs, *, layer: str | None) -> np.ndarray:
        if layer is None:
            raise UsageError(f"method {self.name!r} needs a layer")
        activations = outputs.activation(layer).astype(np.float32, copy=False)
        weights = np.asarray(self.layer_weights(outputs, layer), dtype=np.float32)
        batch, channels, height, width = activations.shape
        if weights.shape != (batch, channels):
            raise PluginError(f"method {self.name!r} returned weights of shape {weights.shape}, expected {(batch, channels)}")
        if self.options.eigen_smooth:
            from .projection import first_principal_component

            return first_principal_component(weights[:, :, None, None] * activations)
        flat = activations.reshape(batch, channels, height * width)
        return np.matmul(weights[:, None, :], flat).reshape(batch, height, width)


class ActivationWeightingMethod(ChannelWeightingMethod):
    """The gradient CAM family: channel weights from one pass's activations and gradients;
    subclasses implement only `weights`."""

    requires: ClassVar[Requirements] = Requirements(activations=True, gradients=True)

    #: Optional: the same weights as ONNX nodes, for heatmaps made inside the session
    #: (`camrt.execution.heatmap_graph`): a method ``weights_graph(builder, activation, gradient) -> name of [B, K, 1, 1]``.
    weights_graph = None

    def session_weights_graph(self):
        # the projection of eigen_smooth has no ONNX form here
        return None if self.options.eigen_smooth else self.weights_graph

    @abstractmethod
    def weights(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        """Channel weights [B, K] from activations and gradients [B, K, h, w]."""

    def layer_weights(self, outputs: GraphOutputs, layer: str) -> np.ndarray:
        """`weights` of the layer's activations and gradients (methods that need further passes,
        e.g. Smooth Grad-CAM++, override this instead)."""
        activations = outputs.activation(layer)
        gradients = outputs.gradient(layer) if self.requires.gradients else np.zeros_like(activations)
        return self.weights(activations, gradients)


class ElementwiseWeightingMethod(EigenSmoothMethod):
    """The element-wise CAM family (HiResCAM, Grad-CAM element-wise, Layer-CAM): map = sum_k of
    per-element weighted activations [B, K, h, w]; subclasses implement `weighted_activations`.

    Option eigen_smooth (pytorch-grad-cam's ``get_cam_image`` of these classes): the map is the
    projection of the weighted activations on their first principal component instead of their sum.
    """

    requires: ClassVar[Requirements] = Requirements(activations=True, gradients=True)

    @abstractmethod
    def weighted_activations(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        """[B, K, h, w] from activations and gradients [B, K, h, w]."""

    def explain(self, outputs: GraphOutputs, *, layer: str | None) -> np.ndarray:
        if layer is None:
            raise UsageError(f"method {self.name!r} needs a layer")
        weighted = self.weighted_activations(outputs.activation(layer), outputs.gradient(layer))
        if self.options.eigen_smooth:
            from .projection import first_principal_component

            return first_principal_component(weighted)
        return weighted.sum(axis=1, dtype=np.float32)
