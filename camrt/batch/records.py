"""The records of a batch run: their fields, the error record, and the JSON-lines log that lets a
killed run resume."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

#: The fields of every record, in this order (a method's extra fields, `outputs`, `width`,
#: `height`, and `rank` / `skipped` where they apply, come after them).
RECORD_FIELDS = ("input", "status", "error", "method", "layer", "target", "label", "score", "probability",
                 "heatmap", "overlay", "elapsed_ms")


def base_record(spec: str, explainer: Any, rank: int | None = None) -> dict[str, Any]:
    """An ok record of `spec` for `explainer`'s method and layers, its results still empty."""
    record: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
    record.update(input=spec, status="ok", method=explainer.method.name,
                  layer=",".join(explainer.layers) if explainer.layers else None, outputs={},
                  width=None, height=None)
    if rank is not None:
        record["rank"] = rank
    return record


def mark_failed(record: dict[str, Any], message: str) -> None:
    record["status"] = "error"
    record["error"] = message


def record_line(record: dict[str, Any]) -> str:
    """A record as one JSON line (without the newline), non-ASCII kept as it is."""
    return json.dumps(record, ensure_ascii=False)


class RecordLog:
    """A JSON-lines file of records, flushed line by line. Truncated when opened, or, when resuming,
    appended to after dropping a last line that an interrupted run left unfinished."""

    def __init__(self, path: str, resume: bool = False):
        self.path = path
        self._handle = open_log(path, resume)

    def write(self, line: str) -> None:
        """One record line (`record_line`)."""
        self._handle.write(line + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> RecordLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_log(path: str, resume: bool) -> TextIO:
    """A JSON-lines file, truncated; when resuming, appended to after dropping a last line that an
    interrupted run left unfinished."""
    if resume and os.path.exists(path):
        with open(path, "rb+") as handle:
            data = handle.read()
            if data and not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)
        return open(path, "a", encoding="utf-8")
    return open(path, "w", encoding="utf-8")


def logged_records(paths: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The ok records of earlier runs in these JSON-lines logs, by input (the last run's win;
    an unfinished last line is ignored)."""

    def lines() -> Iterator[dict[str, Any]]:
        for path in paths:
            if not os.path.exists(path):
                continue
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    if not line.endswith("\n"):
                        break
                    yield json.loads(line)

    return latest_ok_records(lines())


def latest_ok_records(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The ok records by input, in order (top-k: one per rank), the last run's winning."""
    found: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record.get("status") == "ok":
            mine = found.setdefault(record["input"], [])
            if record.get("rank", 1) == 1:
                mine.clear()
            mine.append({k: v for k, v in record.items() if k != "skipped"})
    return found
