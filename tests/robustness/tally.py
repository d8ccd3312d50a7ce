"""Counts the bad inputs the robustness suite tried and how many gave a clear camrt error.

`refused` is the one way the suite checks a bad input: the call must raise the expected camrt
error type whose message contains every given fragment (the file and the reason), on one line,
with no traceback. The totals are printed at the end of the run (conftest.py) for the report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from camrt.errors import CamrtError

TALLY = {"tried": 0, "clear": 0, "fuzz_examples": 0, "fuzz_refused": 0}


def refused(call: Callable[[], Any], error: type[CamrtError], *fragments: str) -> CamrtError:
    """Run `call`; it must raise `error` whose message names every fragment. Counted."""
    TALLY["tried"] += 1
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message {message!r} lacks {missing}"
    assert "Traceback" not in message
    TALLY["clear"] += 1
    return info.value


def record(tried: int = 0, clear: int = 0) -> None:
    """Count bad inputs checked another way (e.g. error records of a CLI run)."""
    TALLY["tried"] += tried
    TALLY["clear"] += clear


def fuzzed(was_refused: bool) -> None:
    TALLY["fuzz_examples"] += 1
    TALLY["fuzz_refused"] += bool(was_refused)
