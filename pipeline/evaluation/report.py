"""``proseco report``: the results of ``proseco eval`` as one Markdown and one HTML page.

The page opens with the folder, the date and the number of results and failures. Then, per task
(all evaluated models together; one line per model x sampler, T varying along the line):

* a figure of the task's primary metric against NFE with its diversity metric beside it
  (:mod:`pipeline.evaluation.plots`: a legend on every plot, log axes where values span decades);
* a table of every sampler setting (T, S, omega, the number of samples n, NFE, primary and
  diversity metrics);
* an NFE-matched comparison: for each NFE budget the best setting of each line within it, the
  best of the row in bold;
* a few decoded samples of each line at its best setting.

Then training curves (loss, mdm, correction, val_mdm_nelbo from the run's ``metrics.jsonl``, with
the evaluated steps marked) for results of training checkpoints, the failed items with their
messages, and the commands that produced the results (``commands.txt``).

Low-diversity rule (stated in the report too): a result is flagged "⚠ low diversity" when its
task's diversity metric is below ``LOW_DIVERSITY_FRACTION`` (0.5) x the highest diversity among
the task's results (all models and samplers in the folder) whose primary metric is equal or worse.
It catches a better primary metric bought by collapse onto repetitive or identical samples (low
unigram entropy, few distinct grids or molecules), and only that: a count such as distinct valid
grids also falls with quality, so comparing a poor setting against better ones would flag it for
being poor. A line's best setting is chosen among its unflagged settings (a flagged one only when
nothing else fits, shown with the flag), and a flagged result is never bold.

Result files are read tolerantly: a missing field shows as "-", and a result without the fields
the report needs (task, NFE, metrics) is listed with the failed items.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pipeline.errors import ProsecoError
from pipeline.evaluation import plots
from pipeline.evaluation.matching import best, nfe_matched
from pipeline.io import atomic_write
from pipeline.runlog import read_metrics

LOW_DIVERSITY_FRACTION = 0.5
FLAG = "⚠ low diversity"
SAMPLES_SHOWN = 3
SAMPLE_CHARS = 400
NFE = "NFE = mean network evaluations per sample (predictor + corrector)"
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; line-height: 1.45; color: #222; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.flag { color: #b00; white-space: nowrap; }
img { max-width: 100%; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; white-space: pre-wrap; font-size: .85em; }
code { background: #f3f3f3; padding: 0 .2em; }
"""


# ------------------------------------------------------------------------------------ results
def load_results(folder: Path) -> list[dict]:
    """Every result JSON under ``folder/results``, with ``_path`` (relative to ``folder``) added."""
    rows = []
    for path in sorted((folder / "results").rglob("*.json")):
        try:
            rows.append({**json.loads(path.read_text()), "_path": str(path.relative_to(folder))})
        except (OSError, ValueError):
            continue
    return rows


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def usable(r: dict) -> bool:
    """An ``ok`` result with what the report needs: a task, a numeric NFE and a metrics dict."""
    return (r.get("status") == "ok" and bool(r.get("task")) and _number(r.get("nfe")) is not None
            and isinstance(r.get("metrics"), dict))


def metric(r: dict, name: str | None) -> float | None:
    return _number(r["metrics"].get(name)) if name else None


def flag_low_diversity(rows: list[dict], primary: str | None, higher: bool, diversity: str | None) -> None:
    """Set each row's ``_low_diversity``: its diversity is below LOW_DIVERSITY_FRACTION x the highest
    diversity among the rows whose primary metric is equal or worse (the rule of the module docstring)."""
    sign = 1 if higher else -1
    scored = [(sign * q, d) for r in rows
              if (q := metric(r, primary)) is not None and (d := metric(r, diversity)) is not None]
    for r in rows:
        q, d = metric(r, primary), metric(r, diversity)
        r["_low_diversity"] = q is not None and d is not None and d < LOW_DIVERSITY_FRACTION * max(
            other for quality, other in scored if quality <= sign * q)


def best_setting(rows: list[dict], primary: str, higher: bool) -> dict | None:
    """The row with the best primary metric, unflagged rows first (a flagged one only if no other has a value)."""
    return best(rows, lambda r: metric(r, primary), higher)


def _by_label(rows: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in rows:
        out[r["_label"]].append(r)
    return out


def _prepare(rows: list[dict]) -> dict[str, list[dict]]:
    """Group usable results by task; set each row's ``_label`` (prefixed by the model when a task
    has several) and ``_low_diversity`` flag."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["task"]].append(r)
    for rs in groups.values():
        several = len({_model_key(r) for r in rs}) > 1
        for r in rs:
            label = r.get("label") or _setting(r, "sampler") or "?"
            r["_label"] = f"{_model_key(r)}: {label}" if several else label
        flag_low_diversity(rs, rs[0].get("primary"), _higher(rs[0]), rs[0].get("diversity"))
    return dict(sorted(groups.items()))


def _higher(r: dict) -> bool:
    return bool(r.get("higher_is_better", True))


def _setting(r: dict, key: str):
    return (r.get("setting") or {}).get(key)


def _model_key(r: dict) -> str:
    model = r.get("model") or {}
    return str(model.get("key") or model.get("path") or "?")


# ------------------------------------------------------------------------------------ page model
@dataclass(frozen=True)
class Cell:
    text: str
    numeric: bool = True
    bold: bool = False
    flag: bool = False


@dataclass(frozen=True)
class Block:
    """One piece of the page, rendered to both Markdown and HTML. kind: h1 h2 h3 p (text with
    `code` spans) img (text = alt, src) table (header, rows of Cells) pre list (items)."""

    kind: str
    text: str = ""
    src: str = ""
    header: tuple = ()
    rows: tuple = ()
    items: tuple = ()


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _inline_html(text: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text, quote=False))


def _md_cell(c: Cell) -> str:
    text = (f"**{c.text}**" if c.bold else c.text) + (f" {FLAG}" if c.flag else "")
    return text.replace("|", "\\|")


def _html_cell(c: Cell) -> str:
    text = html.escape(c.text)
    text = (f"<b>{text}</b>" if c.bold else text) + (f' <span class="flag">{FLAG}</span>' if c.flag else "")
    return f'<td class="num">{text}</td>' if c.numeric else f"<td>{text}</td>"


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "img":
            out.append(f"![{b.text}]({b.src})")
        elif b.kind == "table":
            out.append("\n".join(["| " + " | ".join(b.header) + " |", "|" + "---|" * len(b.header)]
                                 + ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows]))
        elif b.kind == "pre":  # an indented code block: no sample text can close it
            out.append("\n".join("    " + line for line in b.text.splitlines()))
        elif b.kind == "list":
            out.append("\n".join(f"- {item}" for item in b.items))
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[Block], title: str) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{_inline_html(b.text)}</p>")
        elif b.kind == "img":
            out.append(f'<img src="{html.escape(b.src)}" alt="{html.escape(b.text)}">')
        elif b.kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b.header) + "</tr>\n"
                       + "\n".join("<tr>" + "".join(map(_html_cell, row)) + "</tr>" for row in b.rows) + "</table>")
        elif b.kind == "pre":
            out.append(f"<pre>{html.escape(b.text)}</pre>")
        elif b.kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in b.items) + "</ul>")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(out) + "\n</body></html>\n")


# ------------------------------------------------------------------------------------ sections
def _task_section(task: str, rs: list[dict], folder: Path) -> list[Block]:
    """Figure, settings table, NFE-matched table and samples of one task."""
    primary, diversity = rs[0].get("primary", "?"), rs[0].get("diversity")
    higher = _higher(rs[0])
    models = sorted({(_model_key(r), (r.get("model") or {}).get("step")) for r in rs}, key=str)
    title = f"{task}: " + ", ".join(f"{k}{f' (step {st})' if st is not None else ''}" for k, st in models)
    png = _slug(f"plot_{task}") + ".png"
    lines = {label: [plots.Point(r["nfe"], metric(r, primary), metric(r, diversity), r["_low_diversity"])
                     for r in group] for label, group in sorted(_by_label(rs).items())}
    fig = plots.quality_figure(lines, primary, higher, diversity, title)
    plots.save(fig, folder / png)
    arrow = plots.direction(higher)
    intro = f"Primary metric: `{primary}` ({arrow})."
    if diversity:
        intro += f" Diversity: `{diversity}` ({plots.direction(True)})."
        intro += (f" {FLAG}: `{diversity}` below {LOW_DIVERSITY_FRACTION:g} x the highest value among this task's "
                  f"results with equal or worse `{primary}` (a better `{primary}` bought by collapse); such a "
                  "setting is never marked best.")
    blocks = [Block("h2", title), Block("p", intro), Block("img", title, src=png)]
    header = ["line", "T", "S", "omega", "n", "NFE", "NFE corrector", primary] + ([diversity] if diversity else [])
    table = []
    for r in sorted(rs, key=lambda r: (r["_label"], r["nfe"])):
        corr = _setting(r, "corrector_steps")
        row = [Cell(r["_label"], numeric=False), Cell(_fmt(_setting(r, "steps"))), Cell(_fmt(corr)),
               Cell(_fmt(_setting(r, "corrector_every") if corr else None)), Cell(_fmt(r.get("num_samples"))),
               Cell(_fmt(r["nfe"])), Cell(_fmt(r.get("nfe_corrector"))), Cell(_fmt(metric(r, primary)))]
        if diversity:
            row.append(Cell(_fmt(metric(r, diversity)), flag=r["_low_diversity"]))
        table.append(row)
    blocks.append(Block("table", header=tuple(header), rows=tuple(table)))
    return blocks + _matched_blocks(rs, primary, higher) + _sample_blocks(rs, primary, higher, folder)


def _matched_blocks(rs: list[dict], primary: str, higher: bool) -> list[Block]:
    """For each power-of-2 budget around the NFE range: each line's best setting within it."""
    nfes = [r["nfe"] for r in rs]
    budgets = [2 ** i for i in range(16) if min(nfes) / 2 <= 2 ** i <= 2 * max(nfes)]
    matched = nfe_matched(rs, budgets, lambda r: metric(r, primary), higher)
    rows = []
    for b in budgets:
        present = [r for r in (matched[lb][b] for lb in matched) if r is not None]
        unflagged = [metric(r, primary) for r in present if not r["_low_diversity"]]
        best = (max if higher else min)(unflagged, default=None)
        cells = [Cell(str(b))]
        for r in (matched[lb][b] for lb in matched):
            if r is None:
                cells.append(Cell("-"))
                continue
            value = metric(r, primary)
            strong = len(present) > 1 and not r["_low_diversity"] and value == best
            cells.append(Cell(f"{_fmt(value)} (T={_fmt(_setting(r, 'steps'))}, NFE {r['nfe']:.3g})",
                              bold=strong, flag=r["_low_diversity"]))
        rows.append(cells)
    note = (f"NFE-matched: best `{primary}` of each line with mean NFE <= the budget (its T and NFE in brackets; "
            "low-diversity settings only where nothing else fits); the best of the row in bold.")
    return [Block("p", note), Block("table", header=("NFE <=", *matched), rows=tuple(rows))]


def read_samples(path: Path, k: int) -> list[dict]:
    """The first ``k`` rows ({"i", "nfe", "text"}) of a samples JSONL file ([] if it cannot be read)."""
    out = []
    with contextlib.suppress(OSError, ValueError), open(path, encoding="utf-8") as f:
        for line in f:
            if len(out) == k:
                break
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if isinstance(row, dict) and "text" in row:
                    out.append(row)
    return out


def _sample_blocks(rs: list[dict], primary: str, higher: bool, folder: Path) -> list[Block]:
    blocks = []
    for label, group in sorted(_by_label(rs).items()):
        r = best_setting(group, primary, higher)
        if r is None or not r.get("samples_file"):
            continue
        samples = read_samples((folder / r["_path"]).parent / Path(r["samples_file"]).name, SAMPLES_SHOWN)
        if not samples:
            continue
        texts = []
        for s in samples:
            text = str(s["text"])
            if len(text) > SAMPLE_CHARS:
                text = text[:SAMPLE_CHARS] + f" … [{len(text) - SAMPLE_CHARS} more characters]"
            texts.append(f"[sample {s.get('i', '?')}, NFE {_fmt(s.get('nfe'))}]\n{text}")
        flag = f" {FLAG}" if r["_low_diversity"] else ""
        blocks += [Block("p", f"`{label}` at T={_fmt(_setting(r, 'steps'))} (NFE {r['nfe']:.3g}, "
                              f"{primary} {_fmt(metric(r, primary))}){flag}:"),
                   Block("pre", "\n\n".join(texts))]
    if not blocks:
        return []
    intro = (f"The first {SAMPLES_SHOWN} samples of each line at its best setting, "
             f"at most {SAMPLE_CHARS} characters each.")
    return [Block("h3", "Samples"), Block("p", intro), *blocks]


def checkpoint_run(r: dict) -> Path | None:
    """RUN for a result of a training checkpoint RUN/checkpoints/step_N, else None."""
    model = r.get("model") or {}
    if model.get("step") is None or not model.get("path"):
        return None
    path = Path(model["path"])
    return path.parent.parent if path.parent.name == "checkpoints" else None


def _training_blocks(rows: list[dict], folder: Path) -> list[Block]:
    """One training-curve figure per run whose checkpoints were evaluated and whose metrics.jsonl exists."""
    steps = defaultdict(set)
    for r in rows:
        if (run := checkpoint_run(r)) is not None:
            steps[run].add(int(r["model"]["step"]))
    blocks = []
    for run, evaluated in sorted(steps.items()):
        metrics_file = run / "metrics.jsonl"
        try:
            logged = read_metrics(metrics_file)
        except OSError:
            continue
        fig = plots.training_figure(logged, evaluated, f"training: {run.name}")
        if fig is None:
            continue
        png = _slug(f"train_{run.name}") + ".png"
        plots.save(fig, folder / png)
        blocks += [Block("h3", run.name),
                   Block("p", f"`{metrics_file}`; dashed lines: the evaluated checkpoints (steps "
                              f"{', '.join(map(str, sorted(evaluated)))})."),
                   Block("img", f"training curves of {run.name}", src=png)]
    return [Block("h2", "Training"), *blocks] if blocks else []


def build(folder: str | Path) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and the PNG plots into ``folder``; return the two pages."""
    folder = Path(folder)
    rows = load_results(folder)
    if not rows:
        raise ProsecoError(f"no results under {folder / 'results'}; run `proseco eval` first")
    ok = [r for r in rows if usable(r)]
    failed = [r for r in rows if not usable(r)]
    groups = _prepare(ok)
    title = f"ProSeCo evaluation report: {folder}"
    blocks = [Block("h1", title),
              Block("p", f"Folder `{folder}`, generated {datetime.now():%Y-%m-%d %H:%M}: {len(ok)} results "
                         f"({len(groups)} task(s), {len({_model_key(r) for r in ok})} model(s)), "
                         f"{len(failed)} failed. {NFE}; n = samples per result.")]
    for task, rs in groups.items():
        blocks += _task_section(task, rs, folder)
    blocks += _training_blocks(ok, folder)
    if failed:
        blocks += [Block("h2", "Failed items"), Block("list", items=tuple(
            f"`{r['_path']}`: {r.get('error') or 'incomplete result (no task, NFE or metrics)'}" for r in failed))]
    commands = (folder / "commands.txt").read_text(errors="replace").splitlines() if (folder / "commands.txt").is_file() else []
    blocks += [Block("h2", "Commands"), Block("pre", "\n".join([*commands, f"proseco report {folder}"]))]
    md_path, html_path = folder / "report.md", folder / "report.html"
    atomic_write(md_path, to_markdown(blocks))
    atomic_write(html_path, to_html(blocks, title))
    return md_path, html_path
