"""camrt-exporters: turn models into camrt contract files (forward + gradient subgraphs).

The public names below are imported lazily on first use: `import camrt_exporters` (which the
`camrt` CLI does for every command, through this package's entry point) imports neither torch
nor onnx nor onnxruntime. The errors are cheap and come eagerly.

Writing a rule set: a `RuleSet` maps op types to `BackwardRule` functions (they build ONNX nodes
through a `RuleContext`) and names a base set for the op types it leaves alone (`VANILLA`: the plain
gradient); a plugin registers it through the `register_gradient_rules` hook (camrt_exporters/hookspecs.py).
`attribute(node, name, default)` reads an ONNX node's attribute. plugins/camrt-lrp is the worked example.
"""

from __future__ import annotations

from camrt.lazy import lazy_names

from .errors import ExportError, UnsupportedOpError, ValidationError

__version__ = "0.1.0"

_LAZY = {
    "export_torch": "camrt_exporters.export",
    "export_onnx": "camrt_exporters.export",
    "write_model": "camrt_exporters.export",
    "default_preprocessing": "camrt_exporters.export",
    "read_image_geometry": "camrt_exporters.export",
    "ImageGeometry": "camrt_exporters.export",
    "rule_sets": "camrt_exporters.export",
    "load_model": "camrt_exporters.torch_frontend",
    "Check": "camrt_exporters.validate",
    "validate_against_torch": "camrt_exporters.validate",
    "validate_finite_differences": "camrt_exporters.validate",
    "RuleSet": "camrt_exporters.autodiff.reverse",
    "RuleContext": "camrt_exporters.autodiff.reverse",
    "BackwardRule": "camrt_exporters.autodiff.reverse",
    "rule_table": "camrt_exporters.autodiff.reverse",
    "VANILLA": "camrt_exporters.autodiff.rules",
    "attribute": "camrt_exporters.autodiff.graph",
}

__all__ = ["__version__", "ExportError", "UnsupportedOpError", "ValidationError", *sorted(_LAZY)]


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
