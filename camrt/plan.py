"""The one answer to "what does this file offer this method": an `ExplainPlan`, or a refusal
naming what the file lacks and the `camrt export` flags that add it.

The Explainer opens a file with a plan, `camrt explain` reports its refusal, and `camrt inspect`
lists every registered method's verdict from the same `ExplainPlan.build`; nothing else decides
whether a file serves a method.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import contract
from .errors import ModelError, UsageError

if TYPE_CHECKING:
    from .methods.base import Requirements


class PlanRefused(ModelError):
    """The file cannot serve `method`: `missing` names the contract outputs it lacks (``<layer>``
    where no layer exists yet), `export_flags` the `camrt export` flags that add them (empty when
    re-exporting cannot help, e.g. CAM on a layer without a pooling + linear head)."""

    def __init__(self, message: str, method: str, missing: Sequence[str] = (), export_flags: Sequence[str] = ()):
        super().__init__(message)
        self.method = method
        self.missing = tuple(missing)
        self.export_flags = tuple(export_flags)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form `camrt inspect` shows, beside `ExplainPlan.to_dict`."""
        return {"method": self.method, "serves": False, "reason": str(self), "missing": list(self.missing),
                "export_flags": list(self.export_flags)}


@dataclass(frozen=True)
class ExplainPlan:
    """What one run of a method on a file fetches and how the method is served.

    fetch: the outputs of every run (logits, target index, then the method's outputs);
    layers: the explained layers (empty for input-space methods); rule_set: the backward rule set
    of the input gradient it reads, if any; extra_passes / tail: the method runs further passes
    through the file / the tail graph of each layer (built when the file is opened).
    """

    method: str
    layers: tuple[str, ...]
    fetch: tuple[str, ...]
    rule_set: str | None = None
    extra_passes: bool = False
    tail: bool = False

    @classmethod
    def build(cls, info: contract.ContractInfo, outputs: Collection[str], method: Any,
              layer: str | Sequence[str] | None = None, path: str = "<model>") -> ExplainPlan:
        """The plan of `method` (a Method class or instance: its ``name`` and ``requires``) on a
        file with contract `info` and graph outputs `outputs`, at `layer` (None: the file's
        default layer). Raises PlanRefused naming what is missing, UsageError for a layer given
        to an input-space method."""
        name, requires = method.name, method.requires
        layers = _layers(info, outputs, name, requires, layer, path)
        _check_cam_layers(info, name, requires, layers, path)
        fetch = (contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT, *requires.outputs(layers, info))
        _check_outputs(info, outputs, name, requires, layers, fetch, path)
        return cls(name, layers, fetch, requires.input_gradient, requires.extra_passes, requires.tail)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form `camrt inspect` shows."""
        return {"method": self.method, "serves": True, "layers": list(self.layers), "fetch": list(self.fetch),
                "rule_set": self.rule_set, "extra_passes": self.extra_passes, "tail": self.tail}


def _default_layer(info: contract.ContractInfo) -> str | None:
    """The layer a method explains when none is asked for: the file's default, else its first."""
    return info.default_layer or (info.layers[0] if info.layers else None)


def _rules_flag(info: contract.ContractInfo, rule: str) -> str:
    """The `camrt export` flag that keeps the file's rule sets and adds `rule`."""
    return f"--rules {','.join(dict.fromkeys([*info.rule_sets, rule]))}"


def _layers(info: contract.ContractInfo, outputs: Collection[str], method: str, requires: Requirements,
            layer: str | Sequence[str] | None, path: str) -> tuple[str, ...]:
    if not requires.uses_layers:
        if layer:
            raise UsageError(f"method {method!r} explains the input, it takes no layer")
        return ()
    if layer is None or (not isinstance(layer, str) and len(layer) == 0):
        default = _default_layer(info)
        if default is None:
            needs = ", ".join(what for what, needed in (
                ("activations", requires.activations), ("gradients", requires.gradients),
                ("CAM class weights", requires.cam_weights), ("tail graph", requires.tail)) if needed)
            rule = requires.input_gradient
            flags = ["--layer NAME", *([_rules_flag(info, rule)] if rule and rule not in info.rule_sets else [])]
            raise PlanRefused(
                f"method {method!r} needs a layer's {needs} but {path} has no layers; "
                f"re-export it with `camrt export ... {' '.join(flags)}`", method,
                missing=[name for name in requires.outputs(["<layer>"], info) if name not in outputs],
                export_flags=flags)
        return (default,)
    layers = (layer,) if isinstance(layer, str) else tuple(layer)
    unknown = [name for name in layers if name not in info.layers]
    if unknown:
        have = ", ".join(info.layers) or "(none)"
        flags = [f"--layer {name}" for name in unknown]
        raise PlanRefused(
            f"layer(s) {', '.join(unknown)} not in {path} (it has: {have}); "
            f"re-export it with `camrt export ... {' '.join(flags)}`", method,
            missing=requires.outputs(unknown, info), export_flags=flags)
    return tuple(dict.fromkeys(layers))


def _check_cam_layers(info: contract.ContractInfo, method: str, requires: Requirements,
                      layers: tuple[str, ...], path: str) -> None:
    """CAM's class weights exist only for layers that feed global average pooling + a linear layer;
    re-exporting does not add them elsewhere. (A file that predates CAM, no ``cam_layers``, lacks
    them everywhere: `_check_outputs` names the re-export.)"""
    if not requires.cam_weights or info.cam_layers is None:
        return
    no_head = [layer for layer in layers if layer not in info.cam_layers]
    if no_head:
        raise PlanRefused(
            f"method {method!r}: layer(s) {', '.join(no_head)} of {path} are not "
            "followed by global average pooling and a fully connected classifier, so CAM's class "
            "weights do not exist for them; use -m gradcam (equal to CAM on such a head) or a layer "
            f"that feeds the pooling (with CAM weights here: {', '.join(info.cam_layers) or 'none'})", method,
            missing=[contract.cam_weights_output(layer) for layer in no_head])


def _check_outputs(info: contract.ContractInfo, outputs: Collection[str], method: str, requires: Requirements,
                   layers: tuple[str, ...], fetch: tuple[str, ...], path: str) -> None:
    missing = [name for name in fetch if name not in outputs]
    no_bias_terms = requires.bias_gradients and not info.bias_terms
    attention_flag = _missing_attention_flag(info, requires)
    if not missing and not no_bias_terms and not attention_flag:
        return
    flags: list[str] = []
    for layer in layers:
        if any(name in missing for name in (contract.activation_output(layer), contract.gradient_output(layer),
                                            contract.cam_weights_output(layer))):
            flags.append(f"--layer {layer}")
    rule = requires.input_gradient
    if rule is not None and contract.input_gradient_output(rule) in missing:
        flags.append(_rules_flag(info, rule))
    attention_rule = requires.attention_rule_gradients
    if attention_rule is not None and (attention_rule not in info.rule_sets or any(
            name.startswith(contract.ATTENTION_RULE_GRADIENT_PREFIX) for name in missing)):
        # the rule set's attention outputs come with both flags (a file from an exporter that predates
        # them has the rule set and the maps but not these outputs)
        flags.append(_rules_flag(info, attention_rule))
        attention_flag = attention_flag or "--attention"
    described = list(missing)
    if no_bias_terms:
        missing.append(contract.bias_gradient_output("<node>"))
        described.append(contract.bias_gradient_output("<node>") + " (FullGrad's bias-gradient terms)")
        flags.append("--fullgrad")
    if attention_flag and info.attention is None:
        missing += requires.attention_outputs("<map>")
        described += [f"{name} (attention maps)" for name in requires.attention_outputs("<map>")]
    if attention_flag:
        flags.append(attention_flag)
    from_onnx = requires.attention_layer_gradients and info.source.get("framework") == "onnx"
    raise PlanRefused(
        f"method {method!r} needs output(s) {', '.join(described)}, which {path} "
        f"lacks; re-export it with `camrt export ... {' '.join(flags)}`"
        f"{' from the torch model (layer scores need its modules)' if from_onnx else ''}", method,
        missing=missing, export_flags=flags)


def _missing_attention_flag(info: contract.ContractInfo, requires: Requirements) -> str | None:
    """The `camrt export` flag(s) that add the attention outputs the method needs, or None when the
    file has them (the maps it lists are fetched like any output)."""
    if not requires.uses_attention:
        return None
    if info.attention is None or (requires.attention_layer_gradients and not info.attention.layer_scores):
        return "--attention" + (" --attention-layer-scores" if requires.attention_layer_gradients else "")
    return None
