"""Built-in fallbacks of the firstresult hooks (registered trylast, overridable by any plugin)."""

from __future__ import annotations

from collections.abc import Sequence

from ..hookspecs import hookimpl


@hookimpl(trylast=True)
def choose_target_layer(candidates: Sequence[str], framework: str) -> str | None:
    return candidates[-1] if candidates else None


@hookimpl(trylast=True)
def choose_execution_providers(device: str, available: Sequence[str]) -> list:
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
