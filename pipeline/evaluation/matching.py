"""The NFE-matched comparison, shared by ``proseco report`` and ``proseco demo``.

Sampling methods are compared at equal compute: for each budget of network evaluations (mean NFE
per sample), each method (a line of sampler settings) is represented by its best setting whose
mean NFE fits the budget. A setting flagged ``_low_diversity`` (the report's collapse rule) is
chosen only when no unflagged setting of the line fits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

BUDGET_SLACK = 1e-9  # a mean NFE equal to the budget up to float rounding fits it


def best(rows: list[dict], value: Callable[[dict], float | None], higher: bool = True) -> dict | None:
    """The row with the best ``value`` (highest, or lowest when not ``higher``), unflagged rows
    first; rows whose value is None are never chosen; ties go to the first row; None if none."""
    sign = 1 if higher else -1
    scored = [(v, r) for r in rows if (v := value(r)) is not None]
    if not scored:
        return None
    return max(scored, key=lambda vr: (not vr[1].get("_low_diversity", False), sign * vr[0]))[1]


def nfe_matched(rows: list[dict], budgets: Iterable[float], value: Callable[[dict], float | None],
                higher: bool = True, *, nfe: str = "nfe", label: str = "_label",
                labels: Iterable[str] | None = None) -> dict:
    """label -> budget -> the :func:`best` row of that label with ``row[nfe] <= budget`` (None when
    none fits). ``labels``: the lines to report, in order (default: every ``row[label]``, sorted)."""
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_label[r[label]].append(r)
    budgets = list(budgets)
    return {lb: {b: best([r for r in by_label[lb] if r[nfe] <= b + BUDGET_SLACK], value, higher) for b in budgets}
            for lb in (sorted(by_label) if labels is None else labels)}
