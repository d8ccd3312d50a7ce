"""camrt: visual explanations of image models, computed where they are deployed.

The public names below are imported lazily on first use, so that `import camrt` stays cheap
(no onnxruntime, OpenCV or plugin loading until something needs them).
"""

from __future__ import annotations

from .lazy import lazy_names

__version__ = "0.1.0"

_LAZY = {
    "Explainer": "camrt.explainer",
    "Explanation": "camrt.explainer",
    "ExplainSession": "camrt.execution.session",
    "read_contract": "camrt.modelfile.metadata",
    "load_image": "camrt.imaging.decode",
    "preprocess": "camrt.imaging.preprocess",
    "Method": "camrt.methods.base",
    "ChannelWeightingMethod": "camrt.methods.base",
    "ActivationWeightingMethod": "camrt.methods.base",
    "EigenSmoothOptions": "camrt.methods.base",
    "ElementwiseWeightingMethod": "camrt.methods.base",
    "ScoreWeightedMethod": "camrt.methods.scorecam",
    "Requirements": "camrt.methods.base",
    "GraphOutputs": "camrt.methods.base",
    "ExplainPlan": "camrt.plan",
    "PlanRefused": "camrt.plan",
    "Target": "camrt.targets",
    "ClassTarget": "camrt.targets",
    "TargetRequest": "camrt.targets",
    "ClassRequest": "camrt.targets",
    "TopKRequest": "camrt.targets",
    "hookimpl": "camrt.hookspecs",
    "CamrtError": "camrt.errors",
    "ModelError": "camrt.errors",
    "ContractError": "camrt.errors",
    "InputError": "camrt.errors",
    "NonFiniteError": "camrt.errors",
    "UsageError": "camrt.errors",
    "PluginError": "camrt.errors",
    "ExitCode": "camrt.errors",
}

__all__ = ["__version__", *sorted(_LAZY)]


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
