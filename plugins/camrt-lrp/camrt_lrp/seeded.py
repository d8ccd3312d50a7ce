"""The seeded target kinds of a seeded run, for the methods that serve only the kinds they were tested on."""

from __future__ import annotations

from typing import Any


def seeded_kinds(outputs: Any) -> set[str]:
    """The kinds (seg, similar, box, a plugin's) of the seeded targets the run of `outputs` explains: its
    context's SeededPasses, or a stacked run's rows (class rows have no kind); empty for a class run."""
    seeded = getattr(outputs.context, "seeded", None)
    if seeded is None:
        return set()
    targets = getattr(seeded, "targets", None) or [getattr(seeded, "target", None)]
    return {kind for kind in (getattr(target, "kind", None) for target in targets) if kind is not None}
