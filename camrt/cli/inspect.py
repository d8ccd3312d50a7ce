"""`camrt methods` and `camrt inspect`: what methods exist, and what a file offers them."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import click

from ..errors import ModelError
from .common import CONTEXT_SETTINGS

if TYPE_CHECKING:
    from ..contract import ContractInfo

# --- camrt methods / inspect ------------------------------------------------------------------


def _requires_text(requires: dict[str, Any]) -> str:
    parts = [key for key in ("activations", "gradients") if requires.get(key)]
    if requires.get("input_gradient"):
        parts.append(f"input_gradient:{requires['input_gradient']}")
    parts += [key for key in ("cam_weights", "bias_gradients", "extra_passes", "tail", "attention", "attention_gradients",
                              "attention_layer_gradients") if requires.get(key)]
    return ", ".join(parts) or "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


METHODS_EPILOG = """\b
Examples:
  camrt methods
  camrt methods --json
"""


@click.command("methods", context_settings=CONTEXT_SETTINGS, epilog=METHODS_EPILOG)
@click.option("--json", "as_json", is_flag=True, help="A JSON list of objects instead of a table.")
def methods_command(as_json: bool) -> None:
    """List the registered explanation methods: aliases, what each needs from the file
    (activations, gradients, input gradients of a rule set) and its options (-O KEY=VALUE)."""
    from ..plugins.registry import build_method_registry

    registry = build_method_registry()
    described = [dict(cls.describe(), plugin=registry.plugin_of(cls.name)) for cls in registry]
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    rows = [["NAME", "ALIASES", "REQUIRES", "OPTIONS", "PLUGIN"]]
    for m in described:
        rows.append([m["name"], ", ".join(m["aliases"]) or "-", _requires_text(m["requires"]),
                     ", ".join(o["name"] for o in m["options"]) or "-", m["plugin"]])
    click.echo(_table(rows))


def method_plans(info: ContractInfo, outputs: Collection[str], path: str) -> list[dict[str, Any]]:
    """Every registered method's verdict on the camrt file at `path` (contract `info`, graph
    outputs `outputs`), at its default layer: the `camrt.plan.ExplainPlan` the Explainer would open
    it with, or the refusal it would raise."""
    from ..plan import ExplainPlan, PlanRefused
    from ..plugins.registry import build_method_registry

    verdicts = []
    for cls in build_method_registry():
        try:
            verdicts.append(ExplainPlan.build(info, outputs, cls, path=path).to_dict())
        except PlanRefused as refused:
            verdicts.append(refused.to_dict())
    return verdicts


def contract_summary(path: str) -> dict[str, Any]:
    """What `camrt inspect` shows for a camrt file: its contract, the methods it serves and every
    method's plan or refusal (`method_plans`)."""
    from dataclasses import asdict

    from .. import contract
    from ..modelfile.metadata import read_contract, read_output_names
    from ..seeds.targets import target_kinds

    info = read_contract(path)
    plans = method_plans(info, read_output_names(path), path)
    return {
        "file": path,
        "camrt_file": True,
        "contract_version": info.version,
        "exporter_version": info.exporter_version,
        "source": info.source,
        "input": info.input_name,
        "layers": info.layers,
        "layer_layouts": {layer: info.layer_layout(layer).to_dict() for layer in info.layers
                          if info.layer_layout(layer).layout != contract.LAYOUT_NCHW},
        "default_layer": info.default_layer,
        "rule_sets": info.rule_sets,
        "preprocessing": asdict(info.preprocessing),
        "labels": len(info.labels) if info.labels else 0,
        "score": info.score,
        "methods": [plan["method"] for plan in plans if plan["serves"]],
        "targets": target_kinds(info),
        "method_plans": plans,
    }


def onnx_summary(path: str) -> dict[str, Any]:
    """What `camrt inspect` shows for a plain ONNX file: its layer candidates with their layouts
    (nchw, nhwc, tokens) and the default `camrt export` chooses (camrt.modelfile.layers)."""
    import onnx

    from ..errors import first_line
    from ..modelfile.plain import onnx_layers

    try:
        model = onnx.load(path)
    except Exception as exc:  # protobuf and onnx raise unrelated types for damaged files
        raise ModelError(f"{path}: cannot load this ONNX file: {first_line(exc)}") from None
    layers = onnx_layers(model, path)
    return {
        "file": path,
        "camrt_file": False,
        "input": layers.image_input,
        "input_shape": list(layers.input_shape),
        "input_layout": layers.image_layout,
        "output": layers.output,
        "candidates": [{"layer": name, "shape": list(shape), "layout": layout.to_dict()}
                       for name, shape, layout in layers.candidates],
        "default_layer": layers.default,
        "default_reason": layers.reason,
    }


def _shape_text(shape: list[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _default_text(summary: dict[str, Any]) -> str:
    if not summary["default_layer"]:
        return "(none: no tensor with spatial extent feeds the output)"
    return f"{summary['default_layer']} ({summary['default_reason']})"


def _layer_text(layer: str, layouts: dict[str, dict], nchw_too: bool = False) -> str:
    """A layer name, with its layout when it is not NCHW or `nchw_too` (tokens: the grid and the
    extra tokens)."""
    from .. import contract

    layout = layouts.get(layer)
    if layout is None or (layout["layout"] == contract.LAYOUT_NCHW and not nchw_too):
        return layer
    if layout["layout"] != contract.LAYOUT_TOKENS:
        return f"{layer} ({layout['layout']})"
    extra = f" + extra tokens at {layout['extra_tokens']}" if layout["extra_tokens"] else ""
    return f"{layer} (tokens {layout['grid'][0]}x{layout['grid'][1]}{extra})"


def _contract_text(summary: dict[str, Any]) -> list[str]:
    p = summary["preprocessing"]
    return [
        f"file:             {summary['file']}",
        f"contract version: {summary['contract_version']} (exporter {summary['exporter_version'] or '?'})",
        f"source:           {json.dumps(summary['source'])}",
        f"input:            {summary['input']}",
        f"layers:           {', '.join(_layer_text(name, summary['layer_layouts']) for name in summary['layers']) or '(none)'}",
        f"default layer:    {summary['default_layer'] or '(none)'}",
        f"rule sets:        {', '.join(summary['rule_sets']) or '(none)'}",
        f"preprocessing:    {p['height']}x{p['width']} {p['channel_order']} {p['layout']}, scale {p['scale']:.6g}, "
        f"mean {list(p['mean'])}, std {list(p['std'])}",
        f"labels:           {summary['labels'] or '(none)'}",
        f"score:            {json.dumps(summary['score'])}",
        f"methods:          {', '.join(summary['methods']) or '(none)'}",
        f"targets:          {_targets_text(summary['targets'])}",
        *_refusals_text(summary["method_plans"]),
    ]


def _targets_text(kinds: list[str]) -> str:
    """The --target kinds a file serves, with the flag that adds the seeded ones when it has none."""
    if kinds == ["class"]:
        return "class (N, top1, topk:K); seg/similar/box need a file exported with --seed"
    return ", ".join(kinds)


def _refusals_text(plans: list[dict[str, Any]]) -> list[str]:
    """The methods the file cannot serve, each with the `camrt export` flags that would add what
    it lacks (or, where re-exporting cannot help, the reason)."""
    refused = [plan for plan in plans if not plan["serves"]]
    if not refused:
        return []
    rows = [[plan["method"], " ".join(plan["export_flags"]) if plan["export_flags"] else plan["reason"]]
            for plan in refused]
    heading = "not served (the `camrt export` flags that add what it lacks, or why not):"
    return [heading, *("  " + line for line in _table(rows).splitlines())]


def _onnx_text(summary: dict[str, Any]) -> list[str]:
    lines = [
        f"file:             {summary['file']} (plain ONNX, not a camrt file: make one with `camrt export`)",
        f"input:            {summary['input']} {_shape_text(summary['input_shape'])} "
        f"({summary['input_layout'] or 'layout ambiguous: give --input-layout to camrt export'})",
        f"output:           {summary['output']}",
        f"default layer:    {_default_text(summary)}",
        "layer candidates (tensors with spatial extent between the input and the output, in graph order):",
    ]
    layouts = {c["layer"]: c["layout"] for c in summary["candidates"]}
    rows = [[_layer_text(c["layer"], layouts, nchw_too=True), _shape_text(c["shape"]),
             "(default)" if c["layer"] == summary["default_layer"] else ""] for c in summary["candidates"]]
    if rows:
        lines.extend("  " + line for line in _table(rows).splitlines())
    return lines


INSPECT_EPILOG = """\b
Examples:
  camrt inspect model.camrt.onnx
  camrt inspect model.camrt.onnx --json
  camrt inspect plain.onnx
"""


@click.command("inspect", context_settings=CONTEXT_SETTINGS, epilog=INSPECT_EPILOG)
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def inspect_command(model: str, as_json: bool) -> None:
    """Show the camrt contract of MODEL (layers, rule sets, preprocessing, labels, methods), or for
    a plain ONNX file the candidate layers with their shapes and the default `camrt export` would
    choose."""
    from .. import contract
    from ..modelfile.metadata import read_metadata

    is_camrt = contract.META_CONTRACT_VERSION in read_metadata(model)
    summary = contract_summary(model) if is_camrt else onnx_summary(model)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo("\n".join(_contract_text(summary) if is_camrt else _onnx_text(summary)))
