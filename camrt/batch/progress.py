"""A one-line progress display of a batch run."""

from __future__ import annotations

import time
from typing import Any, TextIO


class Progress:
    """`done/total inputs, N failed, rate` on one line of `stream`, redrawn (for a terminal)."""

    def __init__(self, total: int | None, stream: TextIO):
        self.total, self.stream = total, stream
        self.done = self.failed = 0
        self.started = time.monotonic()

    def update(self, records: list[dict[str, Any]]) -> None:
        self.done += len({r["input"] for r in records})
        self.failed += sum(r["status"] != "ok" for r in records)
        rate = self.done / max(time.monotonic() - self.started, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        bar = ""
        if self.total:
            filled = int(30 * self.done / self.total)
            bar = "[" + "#" * filled + "." * (30 - filled) + "] "
        self.stream.write(f"\r{bar}{self.done}{of} inputs, {self.failed} failed, {rate:.1f}/s")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
