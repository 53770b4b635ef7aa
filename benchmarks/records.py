"""The suite's figures as structured records, and the one Markdown table they make.

Every benchmark module that takes part in ``python -m benchmarks`` has a
``records(quick: bool) -> list[Record]`` function. A record is one figure of
trioserve beside its baseline measured in the same run, the ratio
trioserve / baseline, and the target when the issue sets one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Record", "fmt", "load", "markdown", "save"]


@dataclasses.dataclass
class Record:
    """One figure, its same-run baseline, and the target if any.

    ``ratio`` is ``value / baseline_value`` (so above 1 is more requests/s,
    or a longer time, than the baseline). ``met`` is None when there is no
    target. ``key`` names the figure for the peer run's ratios.
    """

    group: str
    name: str
    value: float
    unit: str
    baseline_name: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""
    key: str = ""

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline_value and not math.isnan(self.value):
            self.ratio = self.value / self.baseline_value


def fmt(value: float | None, unit: str) -> str:
    """``value`` in ``unit``, rounded as a reader wants it."""
    if value is None or math.isnan(value):
        return "-"
    if unit in ("ms", "s"):
        if value < 0.1:
            return f"{value:.2g} {unit}"
        digits = 2 if value < 10 else 1
        return f"{value:,.{digits}f} {unit}"
    if unit == "MB":
        return f"{value:,.0f} MB"
    if unit == "":
        return f"{value:,.2f}"
    if value >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:,.1f} {unit}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(records: Sequence[Record]) -> str:
    """The records as one Markdown table, grouped in the order they came."""
    lines = [
        "| Group | Figure | trioserve | Baseline (same run) | Ratio | Target | Met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        baseline = (
            f"{r.baseline_name}: {fmt(r.baseline_value, r.unit)}"
            if r.baseline_value is not None
            else (r.baseline_name or "-")
        )
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        name = r.name + (f" ({r.note})" if r.note else "")
        cells = [r.group, name, fmt(r.value, r.unit), baseline, ratio, r.target or "-", met]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def save(records: Iterable[Record], path: str | Path) -> None:
    Path(path).write_text(json.dumps([dataclasses.asdict(r) for r in records], indent=1) + "\n")


def load(path: str | Path) -> list[Record]:
    raw: list[dict[str, Any]] = json.loads(Path(path).read_text())
    return [Record(**r) for r in raw]
