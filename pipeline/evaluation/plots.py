"""The figures of ``proseco report``: quality and diversity against NFE, and training curves.

Figures are built as :class:`matplotlib.figure.Figure` objects without pyplot (no global figure
state; ``savefig`` renders PNG through Agg), so the report can build many and tests can inspect
them. Every axes gets a legend, even with a single line.

Axis scale rule (:func:`log_scale`): an axis is logarithmic when all its plotted values are
positive and the largest is more than 10^1.5 (about 32) times the smallest, e.g. generative
perplexities from 8 to 3000; otherwise it is linear. NFE axes use base 2 (budgets are powers of 2).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from matplotlib.axes import Axes
from matplotlib.figure import Figure

LOG_DECADES = 1.5  # an axis whose positive values span more than this many powers of ten is log-scaled
TRAINING_SERIES = ("loss", "mdm", "correction", "val_mdm_nelbo")  # metrics.jsonl keys, plotted when present
LOW_DIVERSITY_LABEL = "low diversity (flagged)"
LEGEND_INSIDE = 4  # a legend with more entries goes below the plot, where it hides no data


class Point(NamedTuple):
    """One sampler setting on a quality-vs-NFE line."""

    nfe: float
    quality: float | None
    diversity: float | None
    low_diversity: bool = False


def log_scale(values: Iterable[float | None], decades: float = LOG_DECADES) -> bool:
    """True when the values (None and non-finite ones ignored) are all positive and span more than
    ``decades`` powers of ten, i.e. max / min > 10**decades."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return len(vals) >= 2 and min(vals) > 0 and math.log10(max(vals) / min(vals)) > decades


def direction(higher_is_better: bool) -> str:
    return "higher is better" if higher_is_better else "lower is better"


def _finish(ax: Axes, xs: list[float], ys: list[float], *, x_base: int = 10) -> None:
    """Scale both axes by :func:`log_scale`, add a grid and the legend."""
    if log_scale(xs):
        ax.set_xscale("log", base=x_base)
    if log_scale(ys):
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    entries = len(ax.get_legend_handles_labels()[0])
    if entries > LEGEND_INSIDE:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    elif entries:
        ax.legend(fontsize=8, loc="best")


def quality_figure(lines: dict[str, Sequence[Point]], primary: str, higher_is_better: bool,
                   diversity: str | None, title: str) -> Figure:
    """Quality (left) and, when the task has one, diversity (right) against NFE: one line per
    label, points sorted by NFE; settings flagged for low diversity get a red cross."""
    panels = [(primary, "quality", direction(higher_is_better))]
    if diversity:
        panels.append((diversity, "diversity", direction(True)))
    entries = len(lines) + 1
    fig = Figure(figsize=(5.8 * len(panels), 4.4 + (0.2 * entries if entries > LEGEND_INSIDE else 0)),
                 layout="constrained")
    for i, (metric, field, arrow) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        xs, ys, flagged = [], [], []
        for label, points in lines.items():
            pts = sorted((p for p in points if getattr(p, field) is not None), key=lambda p: p.nfe)
            ax.plot([p.nfe for p in pts], [getattr(p, field) for p in pts], marker="o", markersize=4, label=label)
            xs += [p.nfe for p in pts]
            ys += [getattr(p, field) for p in pts]
            flagged += [(p.nfe, getattr(p, field)) for p in pts if p.low_diversity]
        if flagged:
            ax.scatter(*zip(*flagged), marker="x", s=70, color="red", zorder=3, label=LOW_DIVERSITY_LABEL)
        ax.set_xlabel("NFE (mean network evaluations per sample)")
        ax.set_ylabel(f"{metric} ({arrow})")
        ax.set_title(f"{metric} against NFE", fontsize=10)
        _finish(ax, xs, ys, x_base=2)
    fig.suptitle(title, fontsize=11)
    return fig


def training_figure(rows: Sequence[dict], evaluated_steps: Iterable[int], title: str) -> Figure | None:
    """The :data:`TRAINING_SERIES` of ``metrics.jsonl`` rows against step (a replayed step: the
    later row wins), with a dashed line at each evaluated checkpoint; None when no series has values."""
    by_step = {row["step"]: row for row in rows if isinstance(row.get("step"), (int, float))}
    steps = sorted(by_step)
    series = {}
    for key in TRAINING_SERIES:
        pts = [(s, float(by_step[s][key])) for s in steps if isinstance(by_step[s].get(key), (int, float))
               and math.isfinite(by_step[s][key])]
        if pts:
            series[key] = pts
    if not series:
        return None
    fig = Figure(figsize=(7.5, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for key, pts in series.items():
        sparse = len(pts) < 0.5 * len(steps)  # e.g. validation, logged every val_every steps
        ax.plot(*zip(*pts), marker="o" if sparse else None, markersize=3, linewidth=1.2, label=key)
    for i, step in enumerate(sorted(set(evaluated_steps))):
        ax.axvline(step, color="0.4", linestyle="--", linewidth=0.9, label="evaluated checkpoint" if i == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (lower is better)")
    ax.set_title(title, fontsize=10)
    _finish(ax, [], [v for pts in series.values() for _, v in pts])
    return fig


def save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110)
