"""The exporter's errors: an export that cannot be made, an op without a backward rule, a file
that fails validation. Each is a `camrt.errors.CamrtError`, so the CLI turns it into one message
and exit code 3 (`ExitCode.MODEL_ERROR`), like the runtime's own errors; nothing is written."""

from __future__ import annotations

from camrt.errors import CamrtError, ExitCode


class ExportError(CamrtError):
    """The exporter cannot build a camrt file from this model; nothing was written."""

    exit_code = ExitCode.MODEL_ERROR


class UnsupportedOpError(ExportError):
    """An op on a differentiated path has no backward rule."""

    def __init__(self, op_type: str, node_name: str, path: list[str], rule_set: str):
        self.op_type = op_type
        self.node_name = node_name
        self.path = path
        self.rule_set = rule_set
        super().__init__(
            f"no backward rule for op type {op_type!r} (node {node_name!r}, rule set {rule_set!r}); "
            f"it lies on the differentiated path {' -> '.join(path)}. Register a rule through the "
            "register_gradient_rules hook, or choose a layer that does not need this op."
        )


class ValidationError(ExportError):
    """The exported gradients do not match the oracle; lists every mismatching tensor."""

    def __init__(self, mismatches: list[str]):
        self.mismatches = mismatches
        super().__init__(
            "export validation failed, nothing was written:\n  " + "\n  ".join(mismatches)
        )
