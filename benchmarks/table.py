"""The Markdown table every benchmark prints: each figure beside its same-run baseline."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

__all__ = ["Row", "markdown"]


@dataclasses.dataclass(frozen=True)
class Row:
    """One measure: trioserve's figure, the baseline's, their ratio, and the aim if any."""

    what: str
    figure: str
    baseline: str
    ratio: str
    aim: str = ""


def markdown(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table; the Aim column appears when a row has an aim."""
    header = ["Measure", "trioserve", "Baseline (same run)", "Time vs baseline"]
    with_aim = any(r.aim for r in rows)
    if with_aim:
        header.append("Aim")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.what, r.figure, r.baseline, r.ratio] + ([r.aim or "-"] if with_aim else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
