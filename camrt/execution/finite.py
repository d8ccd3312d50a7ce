"""The one check that no NaN or inf reaches a heatmap, for every pass the runtime runs."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import NonFiniteError


def check_finite(values: Mapping[str, np.ndarray], what: str) -> None:
    """NonFiniteError naming the rows and outputs where `what` produced NaN or inf.

    A NaN activation or gradient would become a NaN (or silently normalised) heatmap; the rows are
    refused instead, so that a batch run can report them as error records."""
    bad: dict[int, list[str]] = {}
    for name, value in values.items():
        if value.dtype.kind == "f" and value.ndim and value.size:
            for row in np.flatnonzero(~np.isfinite(value.reshape(value.shape[0], -1)).all(axis=1)):
                bad.setdefault(int(row), []).append(name)
    if bad:
        rows = sorted(bad)
        detail = "; ".join(f"row {row}: {', '.join(bad[row])}" for row in rows[:8])
        raise NonFiniteError(
            f"{what} produced NaN or inf ({detail}{'; ...' if len(rows) > 8 else ''}); no heatmap is made "
            "from non-finite values: check the image and the model (e.g. a Log, Sqrt or Div that meets 0 or "
            "a negative number)", rows)
