"""The batch engine: many inputs in bounded memory, one record per input, resumable.

`camrt explain` and `camrt eval` are thin command-line layers over it, and a data-parallel
framework's per-batch callable can use it as they do (no click here):

- `inputs`: which paths a run reads (`iter_inputs`: files, directories, globs, "-" for stdin),
  lazily; `chunked` groups them; `decode_inputs` turns paths into (path, image or error);
  `SpooledPaths` reads them again (one pass per method in `camrt eval`) without holding them;
  `OutputNames` gives each input a unique output stem.
- `records`: the record fields (`RECORD_FIELDS`), the error record, the JSON-lines `RecordLog`
  and `logged_records` (what an interrupted run already did).
- `runner`: `ExplainRun`, an Explainer plus what to write, explaining chunk by chunk
- `evaluation`: `Evaluation`, the engine of `camrt eval`: metrics of methods over inputs, chunk by chunk
  (`run`, `explain_chunk` for paths, `explain_images` for decoded images).
- `progress`: the one-line progress display.

Memory stays flat in the number of inputs: paths are pulled from the input iterator one chunk at a
time and each chunk's images are released before the next chunk is read.
"""

from __future__ import annotations

from .inputs import OutputNames, SpooledPaths, chunked, decode_inputs, iter_inputs
from .progress import Progress, is_terminal
from .records import (
                      RECORD_FIELDS,
                      RecordLog,
                      base_record,
                      latest_ok_records,
                      logged_records,
                      mark_failed,
                      open_log,
                      record_line,
)
from .runner import ExplainRun

__all__ = [
    "RECORD_FIELDS", "ExplainRun", "OutputNames", "Progress", "RecordLog", "SpooledPaths", "base_record", "chunked",
    "decode_inputs", "is_terminal", "iter_inputs", "latest_ok_records", "logged_records", "mark_failed", "open_log", "record_line",
]
