"""camrt's error types and the CLI exit codes.

Library code raises these; only the CLI turns them into messages and exit codes.
"""

from __future__ import annotations

import enum
import os


class ExitCode(enum.IntEnum):
    OK = 0
    SOME_INPUTS_FAILED = 1
    USAGE_ERROR = 2
    MODEL_ERROR = 3
    INTERNAL_ERROR = 4


class CamrtError(Exception):
    """Base class of every error camrt raises on purpose."""

    exit_code = ExitCode.INTERNAL_ERROR


class ModelError(CamrtError):
    """The model file cannot be used (not ONNX, not a camrt file, missing outputs)."""

    exit_code = ExitCode.MODEL_ERROR


class ContractError(ModelError):
    """A camrt file whose contract version or metadata the runtime does not understand."""


class InputError(CamrtError):
    """One input (image, target) is bad; in a batch run it becomes an error record."""

    exit_code = ExitCode.SOME_INPUTS_FAILED


class NonFiniteError(InputError):
    """The model produced NaN or inf for some rows of a batch; no heatmap is made from them.

    `rows`: the offending row indices of the run (the inputs, for `Explainer.explain`)."""

    def __init__(self, message: str, rows: list[int]):
        self.rows = rows
        super().__init__(message)


class UsageError(CamrtError):
    """Bad arguments or options."""

    exit_code = ExitCode.USAGE_ERROR


class PluginError(CamrtError):
    """A plugin failed to load, registered a duplicate, or returned something invalid."""

    exit_code = ExitCode.USAGE_ERROR


def require_regular_file(path: str | os.PathLike, error: type[CamrtError]) -> str:
    """`path` as a str, or `error` naming it when it does not exist or is not a regular file
    (a directory, a FIFO, a device, a broken symbolic link)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        if os.path.islink(path):
            raise error(f"{path}: no such file (a broken symbolic link to {os.readlink(path)!r})")
        raise error(f"{path}: no such file")
    if not os.path.isfile(path):
        kind = "a directory" if os.path.isdir(path) else "a FIFO, socket or device"
        raise error(f"{path}: not a file ({kind})")
    return path


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (onnx and onnxruntime messages run to pages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
