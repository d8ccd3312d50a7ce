"""Which inputs a batch run reads, in what order, in what chunks, and under which output names."""

from __future__ import annotations

import glob
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TextIO, TypeVar

from ..errors import InputError

if TYPE_CHECKING:
    import numpy as np

T = TypeVar("T")
_GLOB_CHARS = frozenset("*?[")


def warn_on_stderr(message: str) -> None:
    """The default of `warn`: one `camrt: warning:` line on (the current) stderr."""
    print(f"camrt: warning: {message}", file=sys.stderr, flush=True)


def iter_inputs(specs: Iterable[str], stdin: TextIO | None = None, skip_dir: str | None = None,
                warn: Callable[[str], None] | None = None) -> Iterator[str]:
    """Paths to explain, lazily: files as given, directories walked (image extensions, sorted,
    hidden names and `skip_dir` skipped), globs expanded (sorted, `**` recursive; a matched
    directory is walked), "-" reads one path per line from `stdin` (default: sys.stdin)."""
    from ..imaging.decode import IMAGE_EXTENSIONS

    warn = warn or warn_on_stderr
    skip = os.path.realpath(skip_dir) if skip_dir else None

    def walk(folder: str) -> Iterator[str]:
        found = False
        for dirpath, dirnames, filenames in os.walk(folder, onerror=lambda e: warn(
                f"cannot list {e.filename}: {e.strerror or e}")):
            dirnames[:] = sorted(
                d for d in dirnames
                if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) != skip
            )
            for name in sorted(filenames):
                if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    found = True
                    yield os.path.join(dirpath, name)
        if not found:
            warn(f"no image files under {folder}")

    for spec in specs:
        if spec == "-":
            for line in stdin if stdin is not None else sys.stdin:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line
        elif os.path.isdir(spec):
            yield from walk(spec)
        elif not os.path.lexists(spec) and _GLOB_CHARS & set(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                warn(f"no files match {spec}")
            for match in matches:
                yield from (walk(match) if os.path.isdir(match) else (match,))
        else:
            yield spec  # a missing file becomes an error record naming it


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` items (the last one shorter), pulled from `items` only as each is needed."""
    items = iter(items)
    while True:
        chunk = list(itertools.islice(items, size))
        if not chunk:
            return
        yield chunk


class SpooledPaths:
    """Paths from a one-shot iterator (a directory walk, stdin) that can be read again: the first
    pass writes each path to a temporary file as it hands it on, later passes read that file, so
    memory does not grow with the number of paths. Passes run one after the other."""

    def __init__(self, paths: Iterable[str]):
        self._paths = iter(paths)
        self._spool: TextIO | None = None
        self._complete = False

    def __iter__(self) -> Iterator[str]:
        if self._complete:
            self._spool.seek(0)
            yield from (json.loads(line) for line in self._spool)
            return
        if self._spool is not None:
            raise RuntimeError("SpooledPaths: a pass started before the first one finished")
        self._spool = tempfile.TemporaryFile("w+", encoding="utf-8", prefix="camrt-paths-")
        for path in self._paths:
            self._spool.write(json.dumps(path) + "\n")
            yield path
        self._complete = True

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()

    def __enter__(self) -> SpooledPaths:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decode_inputs(paths: Iterable[str]) -> Iterator[tuple[str, np.ndarray | InputError]]:
    """(path, its HWC uint8 RGB image or the InputError that says why it cannot be read), lazily."""
    from ..imaging.decode import load_image

    for path in paths:
        try:
            yield path, load_image(path)
        except InputError as exc:
            yield path, exc


class OutputNames:
    """Unique output stems within one run, claimed in input order: the second `a/x.png` and
    `b/x.png` becomes `x-2`. The same input list gives the same names (how --skip-existing finds
    an interrupted run's outputs)."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def claim(self, path: str) -> str:
        stem = os.path.splitext(os.path.basename(path.rstrip("/\\")))[0] or "input"
        name, number = stem, 1
        while name.casefold() in self._used:
            number += 1
            name = f"{stem}-{number}"
        self._used.add(name.casefold())
        return name
