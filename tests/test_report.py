"""`proseco report` on hand-written result folders (the runner's file format): log axes, legends,
the low-diversity flag and the NFE-matched best, samples, the n column, training curves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.evaluation import plots, report

RUN_STEP = 10
COLLAPSED = 8.3  # the best perplexity of the folder, reached by collapsing (entropy 1.2 against ~5.5)
# (line, T, S, NFE, gen_ppl, unigram_entropy)
TEXT_RESULTS = [
    ("ancestral (MDM)", 4, 0, 4.0, 2935.0, 5.6),
    ("ancestral (MDM)", 16, 0, 16.0, 120.0, 5.5),
    ("ancestral (MDM)", 64, 0, 64.0, 45.0, 5.4),
    ("ancestral + corrector S=1 w=1", 2, 1, 4.0, COLLAPSED, 1.2),
    ("ancestral + corrector S=1 w=1", 8, 1, 16.0, 50.0, 5.2),
    ("ancestral + corrector S=1 w=1", 32, 1, 64.0, 40.0, 5.1),
]


def write_result(folder: Path, model: dict, task: str, setting: dict, **fields) -> Path:
    """One result JSON (+ its samples JSONL when ``samples`` is given) laid out like the runner's."""
    slug = f"{setting['sampler']}_T{setting['steps']}" + (
        f"_S{setting['corrector_steps']}_w{setting['corrector_every']}" if setting["corrector_steps"] else "")
    path = folder / "results" / model["key"] / task / f"{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = fields.pop("samples", None)
    if samples is not None:
        sample_path = path.with_suffix(".samples.jsonl")
        sample_path.write_text("".join(json.dumps({"i": i, "nfe": 4, "text": t}) + "\n" for i, t in enumerate(samples)))
        fields["samples_file"] = sample_path.name
    path.write_text(json.dumps({"format": "proseco-eval/1", "model": model, "task": task, "setting": setting,
                                **fields}))
    return path


def text_folder(tmp_path: Path, with_metrics: bool = True) -> Path:
    """A text-task eval folder of one training checkpoint RUN/checkpoints/step_00000010 (RUN has a
    metrics.jsonl when ``with_metrics``), two lines, one collapsed setting, one failed item."""
    run = tmp_path / "run1"
    ckpt = run / "checkpoints" / f"step_{RUN_STEP:08d}"
    ckpt.mkdir(parents=True)
    if with_metrics:
        rows = [{"step": s, "loss": 6.0 / s, "mdm": 4.0 / s, "correction": 2.0 / s} for s in range(1, 21)]
        rows[9]["val_mdm_nelbo"] = rows[19]["val_mdm_nelbo"] = 0.5
        lines = [json.dumps(r) for r in rows] + [json.dumps({"step": 20, "loss": 0.3}), '{"step": 21, "lo']
        (run / "metrics.jsonl").write_text("\n".join(lines))  # a replayed step and a torn last line
    model = {"key": f"run1/step_{RUN_STEP:08d}", "path": str(ckpt), "step": RUN_STEP}
    folder = tmp_path / "eval"
    for label, steps, corr, nfe, ppl, entropy in TEXT_RESULTS:
        collapsed = ppl == COLLAPSED
        texts = ["the the the <b>"] * 3 if collapsed else [f"{label} T={steps} sample {i} " + "word " * 300
                                                           for i in range(4)]
        write_result(folder, model, "text",
                     {"sampler": "ancestral", "steps": steps, "corrector_steps": corr, "corrector_every": 1},
                     label=label, status="ok", primary="gen_ppl", higher_is_better=False,
                     diversity="unigram_entropy", metrics={"gen_ppl": ppl, "unigram_entropy": entropy},
                     nfe=nfe, nfe_predictor=nfe, nfe_corrector=0.0, num_samples=64, samples=texts)
    write_result(folder, model, "text", {"sampler": "remdm", "steps": 8, "corrector_steps": 0, "corrector_every": 1},
                 label="remdm", status="failed", error="reference LM missing")
    (folder / "commands.txt").write_text("proseco eval runs/run1 eval.tasks=[text]\n")
    return folder


def matched_rows(md: str) -> dict[str, str]:
    """budget -> the Markdown row of the NFE-matched table."""
    return {m.group(1): line for line in md.splitlines() if (m := re.match(r"\| (\d+) \| ", line))}


def test_log_scale_decides_on_the_span_of_positive_values():
    assert plots.log_scale([8.3, 2935])  # generative perplexities: 2.5 decades
    assert not plots.log_scale([0.6, 0.9])
    assert not plots.log_scale([2, 4, 8, 16, 32])  # 1.2 decades
    assert plots.log_scale([2, 4, 8, 16, 32, 64, 128])  # 1.8 decades
    assert not plots.log_scale([0.0, 0.5, 100.0])  # a log axis would drop the zero
    assert not plots.log_scale([5.0, None]) and not plots.log_scale([])


def test_every_plot_has_a_legend_even_with_one_line():
    one = {"ancestral (MDM)": [plots.Point(4, 0.2, 10.0), plots.Point(8, 0.5, 30.0, low_diversity=True)]}
    for diversity in ("distinct_valid", None):
        fig = plots.quality_figure(one, "valid", True, diversity, "sudoku4")
        assert len(fig.axes) == (2 if diversity else 1)
        for ax in fig.axes:
            assert ax.get_legend() is not None
            assert "ancestral (MDM)" in [t.get_text() for t in ax.get_legend().get_texts()]
            assert "is better" in ax.get_ylabel()
    fig = plots.training_figure([{"step": s, "loss": 1.0 / s} for s in range(1, 5)], [2], "run")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["loss", "evaluated checkpoint"]
    assert plots.training_figure([{"step": 1, "lr": 0.1}], [], "run") is None


def test_perplexity_axis_is_log_and_entropy_axis_linear():
    lines = {"a": [plots.Point(nfe, ppl, ent) for _, _, _, nfe, ppl, ent in TEXT_RESULTS]}
    quality, diversity = plots.quality_figure(lines, "gen_ppl", False, "unigram_entropy", "text").axes
    assert quality.get_yscale() == "log" and diversity.get_yscale() == "linear"
    assert quality.get_xscale() == "linear"  # NFE 4..64 spans 1.2 decades
    assert quality.get_ylabel() == "gen_ppl (lower is better)"


def test_low_diversity_flags_a_better_primary_bought_by_collapse_not_a_poor_setting():
    def row(valid, distinct):
        return {"metrics": {"valid": valid, "distinct_valid": distinct}}

    rows = [row(0.05, 5.0), row(0.5, 120.0), row(0.9, 200.0), row(0.95, 110.0), row(0.99, 3.0), row(None, 1.0)]
    report.flag_low_diversity(rows, "valid", True, "distinct_valid")
    assert [r["_low_diversity"] for r in rows] == [False, False, False, False, True, False]
    ppl = [{"metrics": {"gen_ppl": p, "unigram_entropy": e}} for p, e in ((8.3, 1.2), (40.0, 5.1), (900.0, 2.0))]
    report.flag_low_diversity(ppl, "gen_ppl", False, "unigram_entropy")
    assert [r["_low_diversity"] for r in ppl] == [True, False, False]
    report.flag_low_diversity(ppl, "gen_ppl", False, None)
    assert not any(r["_low_diversity"] for r in ppl)


def test_collapsed_setting_is_flagged_and_never_the_nfe_matched_best(tmp_path):
    md_path, page_path = report.build(text_folder(tmp_path))
    md, page = md_path.read_text(), page_path.read_text()
    collapsed_row = next(line for line in md.splitlines() if line.startswith("| ancestral + corrector")
                         and f"| {COLLAPSED} |" in line)
    assert collapsed_row.endswith(f"1.2 {report.FLAG} |")
    assert sum(report.FLAG in line for line in md.splitlines() if line.startswith("| ancestral")) == 1
    assert f"**{COLLAPSED}" not in md and f"<b>{COLLAPSED}" not in page
    rows = matched_rows(md)
    # budget 4: the collapsed setting is its line's only one (shown, flagged); MDM's 2935 is the best
    assert f"{COLLAPSED} (T=2, NFE 4) {report.FLAG}" in rows["4"] and "**2935 (T=4, NFE 4)**" in rows["4"]
    # budget 16: the corrector line's best is its unflagged T=8 setting, and it beats MDM
    assert "**50 (T=8, NFE 16)**" in rows["16"] and str(COLLAPSED) not in rows["16"]
    assert "**40 (T=32, NFE 64)**" in rows["64"]
    assert "below 0.5 x the highest value among this task's results with equal or worse `gen_ppl`" in md
    assert f'<span class="flag">{report.FLAG}</span>' in page


def test_report_shows_n_samples_escaped_and_truncated_and_every_png(tmp_path):
    folder = text_folder(tmp_path)
    md_path, page_path = report.build(folder)
    md, page = md_path.read_text(), page_path.read_text()
    header = next(line for line in md.splitlines() if line.startswith("| line |"))
    assert header.split(" | ")[4] == "n"
    assert all(line.split(" | ")[4] == "64" for line in md.splitlines() if line.startswith("| ancestral"))
    # samples of each line at its best setting: MDM at T=64; the corrector line at T=32 (not the collapsed T=2)
    assert "<pre>[sample 0, NFE 4]\nancestral (MDM) T=64 sample 0" in page
    assert "ancestral + corrector S=1 w=1 T=32 sample 2" in page and "T=32 sample 3" not in page
    assert "the the the" not in page
    assert "more characters]" in page
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == ["plot_text.png", "train_run1.png"]
    assert all(f'<img src="{p}"' in page and f"]({p})" in md for p in pngs)
    assert "1 failed" in page and "reference LM missing" in page and "Failed items" in md
    assert "proseco eval runs/run1 eval.tasks=[text]" in page and "<style>" in page
    assert re.search(r"generated \d{4}-\d\d-\d\d \d\d:\d\d: 6 results", md)


def test_a_line_with_only_collapsed_settings_shows_them_flagged_and_escaped(tmp_path):
    folder = tmp_path / "eval"
    model = {"key": "m", "path": str(tmp_path / "m.pt"), "step": None}  # a model file, not a checkpoint
    for corr, steps, valid, distinct, text in ((1, 4, 0.9, 2.0, "1234/<x>"), (0, 4, 0.1, 20.0, "4321"),
                                               (0, 8, 0.5, 100.0, "2143")):
        write_result(folder, model, "sudoku4", {"sampler": "ancestral", "steps": steps, "corrector_steps": corr,
                                                "corrector_every": 1},
                     label="ancestral + corrector S=1 w=1" if corr else "ancestral (MDM)", status="ok",
                     primary="valid", higher_is_better=True, diversity="distinct_valid",
                     metrics={"valid": valid, "distinct_valid": distinct}, nfe=float(steps + corr * steps),
                     samples=[text] * 3)
    md, page = (p.read_text() for p in report.build(folder))
    assert "1234/&lt;x&gt;" in page and "1234/<x>" not in page
    assert f"`ancestral + corrector S=1 w=1` at T=4 (NFE 8, valid 0.9) {report.FLAG}:" in md
    rows = matched_rows(md)
    assert f"0.9 (T=4, NFE 8) {report.FLAG}" in rows["8"] and "**0.5 (T=8, NFE 8)**" in rows["8"]
    assert rows["4"] == "| 4 | 0.1 (T=4, NFE 4) | - |"  # few distinct grids, but no better valid: no flag
    assert "Training" not in md


def test_training_curves_of_evaluated_checkpoints(tmp_path):
    folder = text_folder(tmp_path)
    md, page = (p.read_text() for p in report.build(folder))
    assert "## Training" in md and f"(steps {RUN_STEP})" in md
    assert str(tmp_path / "run1" / "metrics.jsonl") in page and '<img src="train_run1.png"' in page
    fig = plots.training_figure(report.read_metrics(tmp_path / "run1" / "metrics.jsonl"), [RUN_STEP], "run1")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["loss", "mdm", "correction", "val_mdm_nelbo", "evaluated checkpoint"]
    loss = ax.get_lines()[0]
    assert list(loss.get_xdata()) == list(range(1, 21)) and loss.get_ydata()[-1] == pytest.approx(0.3)
    assert ax.get_yscale() == "log"  # 6.0 .. 0.2: 1.5+ decades


def test_missing_metrics_and_missing_fields_do_not_break_the_report(tmp_path):
    folder = text_folder(tmp_path, with_metrics=False)
    model = {"key": "other"}  # no path, no step
    write_result(folder, model, "text", {"sampler": "confidence", "steps": 4, "corrector_steps": 0},
                 status="ok", metrics={"gen_ppl": 70.0}, nfe=4.0, primary="gen_ppl", higher_is_better=False)
    write_result(folder, model, "text", {"sampler": "confidence", "steps": 8, "corrector_steps": 0},
                 status="ok", metrics={"gen_ppl": 70.0})  # no NFE: cannot be placed, listed as incomplete
    md, page = (p.read_text() for p in report.build(folder))
    assert "Training" not in md and not (folder / "train_run1.png").exists()
    assert "incomplete result" in page and "2 failed" in md
    assert "| other: confidence | 4 | 0 | - | - | 4 | - | 70 |" in md
