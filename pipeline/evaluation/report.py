"""``proseco report``: the results of ``proseco eval`` as one Markdown and one HTML page.

For each task (all evaluated models together; a line per model x sampler): a table of every sampler setting (T, S, omega, NFE, the task's primary
metric and its diversity metric), a plot of quality against NFE with one line per sampler (the
line walks over T) and diversity beside it, and an NFE-matched comparison: for each NFE budget the
best primary metric each sampler reaches within it, the best of the row in bold. Failed items
are listed with their messages. The commands that produced the results (``commands.txt``) close
the page.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path

from pipeline.errors import ProsecoError


def load_results(folder: Path) -> list[dict]:
    rows = []
    for path in sorted((folder / "results").rglob("*.json")):
        try:
            rows.append({**json.loads(path.read_text()), "_path": str(path.relative_to(folder))})
        except (OSError, ValueError):
            continue
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def nfe_matched(rows: list[dict], primary: str, higher: bool, budgets: list[float]) -> dict:
    """label -> budget -> best row with mean NFE <= budget (None when no setting fits)."""
    by_label = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    sign = 1 if higher else -1
    return {label: {b: max((r for r in rs if r["nfe"] <= b + 1e-9 and r["metrics"].get(primary) is not None),
                           key=lambda r: sign * r["metrics"][primary], default=None) for b in budgets}
            for label, rs in sorted(by_label.items())}


def _plot(rows: list[dict], primary: str, diversity: str | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 if diversity else 1
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    by_label = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    for label, rs in sorted(by_label.items()):
        rs = sorted(rs, key=lambda r: r["nfe"])
        for ax, metric in zip(axes[0], [primary, diversity][:n]):
            pts = [(r["nfe"], r["metrics"].get(metric)) for r in rs if r["metrics"].get(metric) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("NFE (mean network evaluations per sample)")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
    axes[0][0].set_title(title)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build(folder: str | Path) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and the PNG plots into ``folder``; return the two pages."""
    folder = Path(folder)
    rows = load_results(folder)
    if not rows:
        raise ProsecoError(f"no results under {folder / 'results'}; run `proseco eval` first")
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    groups = defaultdict(list)
    for r in ok:  # one section per task; with several models, each model x sampler is a line
        groups[r["task"]].append(r)
    for rs in groups.values():
        models = {r["model"]["key"] for r in rs}
        for r in rs:
            r["label"] = f"{r['model']['key']}: {r['label']}" if len(models) > 1 else r["label"]
    md = [f"# ProSeCo evaluation report: {folder}", "",
          (f"{len(ok)} results, {len(failed)} failed. Quality against compute: NFE is the mean number of "
          "network evaluations per sample (predictor + corrector)."), ""]
    body = [f"<h1>ProSeCo evaluation report: {html.escape(str(folder))}</h1>",
            (f"<p>{len(ok)} results, {len(failed)} failed. NFE = mean network evaluations per sample "
            "(predictor + corrector).</p>")]
    for task, rs in sorted(groups.items()):
        primary, higher, diversity = rs[0]["primary"], rs[0]["higher_is_better"], rs[0].get("diversity")
        models = sorted({(r["model"]["key"], r["model"].get("step")) for r in rs}, key=str)
        names = ", ".join(f"{k}{f' (step {st})' if st is not None else ''}" for k, st in models)
        title = f"{task}: {names}"
        png = f"plot_{task}.png".replace("/", "_")
        _plot(rs, primary, diversity, folder / png, title)
        cols = ["sampler", "T", "S", "omega", "NFE", "NFE corrector", primary] + ([diversity] if diversity else [])
        table = [[r["label"], r["setting"]["steps"], r["setting"]["corrector_steps"],
                  r["setting"]["corrector_every"] if r["setting"]["corrector_steps"] else "-",
                  r["nfe"], r["nfe_corrector"], r["metrics"].get(primary)]
                 + ([r["metrics"].get(diversity)] if diversity else [])
                 for r in sorted(rs, key=lambda r: (r["label"], r["nfe"]))]
        arrow = "higher is better" if higher else "lower is better"
        md += [f"## {title}", "", f"Primary metric: `{primary}` ({arrow})" +
               (f"; diversity: `{diversity}`." if diversity else "."), "", f"![{title}]({png})", "",
               "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        md += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in table]
        body += [f"<h2>{html.escape(title)}</h2>",
                 f"<p>Primary metric: <code>{primary}</code> ({arrow})"
                 + (f"; diversity: <code>{diversity}</code>" if diversity else "") + "</p>",
                 f'<img src="{png}" alt="{html.escape(title)}">',
                 "<table border=1 cellpadding=3><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"]
        body += ["<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in table]
        body.append("</table>")
        # NFE-matched comparison
        max_nfe = max(r["nfe"] for r in rs)
        budgets = [2 ** i for i in range(16) if 2 ** i <= 2 * max_nfe and 2 ** i >= min(r["nfe"] for r in rs) / 2]
        matched = nfe_matched(rs, primary, higher, budgets)
        labels = list(matched)
        md += ["", f"NFE-matched: best `{primary}` within each budget (best of the row in bold).", "",
               "| NFE <= | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
        body += [f"<p>NFE-matched: best <code>{primary}</code> within each budget (best of the row in bold).</p>",
                 "<table border=1 cellpadding=3><tr><th>NFE &lt;=</th>"
                 + "".join(f"<th>{html.escape(lb)}</th>" for lb in labels) + "</tr>"]
        for b in budgets:
            vals = {lb: matched[lb][b]["metrics"][primary] if matched[lb][b] else None for lb in labels}
            present = [v for v in vals.values() if v is not None]
            best = (max(present) if higher else min(present)) if present else None
            cells_md, cells_html = [], []
            for lb in labels:
                v = vals[lb]
                text = _fmt(v)
                strong = v is not None and v == best and len(present) > 1
                cells_md.append(f"**{text}**" if strong else text)
                cells_html.append(f"<td><b>{text}</b></td>" if strong else f"<td>{text}</td>")
            md.append(f"| {b} | " + " | ".join(cells_md) + " |")
            body.append(f"<tr><td>{b}</td>" + "".join(cells_html) + "</tr>")
        md.append("")
        body.append("</table>")
    if failed:
        md += ["## Failed items", ""] + [f"- `{r['_path']}`: {r.get('error', '?')}" for r in failed] + [""]
        body += ["<h2>Failed items</h2><ul>"] + [f"<li><code>{html.escape(r['_path'])}</code>: "
                                                  f"{html.escape(str(r.get('error', '?')))}</li>" for r in failed]
        body.append("</ul>")
    commands = (folder / "commands.txt").read_text().splitlines() if (folder / "commands.txt").is_file() else []
    md += ["## Commands", "", "```", *commands, f"proseco report {folder}", "```", ""]
    body += ["<h2>Commands</h2><pre>" + html.escape("\n".join([*commands, f"proseco report {folder}"])) + "</pre>"]
    md_path, html_path = folder / "report.md", folder / "report.html"
    md_path.write_text("\n".join(md))
    html_path.write_text("<!doctype html><html><head><meta charset='utf-8'><title>ProSeCo report</title></head>"
                         "<body>" + "\n".join(body) + "</body></html>\n")
    return md_path, html_path
