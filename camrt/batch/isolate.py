"""One failing input must not cost the others their results: the batch rule of `camrt explain`
and `camrt eval` (every input yields a result or an error record)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from ..errors import InputError

Result = TypeVar("Result")


def isolate_failures(run: Callable[[Sequence[int]], list[Result]], rows: Sequence[int]) -> list[Result | InputError]:
    """`run(rows)` (one result per row, in order); when it raises InputError (e.g. the model produced
    NaN for one input), each row is run alone, so that only the failing rows get their error."""
    try:
        return run(rows)
    except InputError as exc:
        if len(rows) == 1:
            return [exc]
    return [isolate_failures(run, [row])[0] for row in rows]
