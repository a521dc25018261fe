"""`proseco demo --suite science`: its bookkeeping on hand-built results, a tiny end-to-end run on
the 4x4 task with caching, and the command line's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import demo, science
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ProsecoError

ROOT = Path(__file__).resolve().parents[1]


def row(method, nfe, quality, diversity=None, task="gen", higher=True, steps=8, corr=0, every=1):
    return {"method": method, "task": task, "sampler": "remdm" if method == "e" else "ancestral", "steps": steps,
            "corrector_steps": corr, "corrector_every": every, "nfe": nfe, "primary": "q", "quality": quality,
            "higher_is_better": higher, "diversity_metric": "div" if diversity is not None else None,
            "diversity": diversity, "metrics": {"q": quality}}


# a lower-is-better metric (e.g. the fraction of impossible sequences): (a) is best at 0.20, first
# reached at 16 NFE (32 NFE ties and is dearer); (d) gets to <= 0.20 at 8 NFE: ratio 16 / 8 = 2
LOWER = [row("a", 8.0, 0.30, higher=False), row("a", 16.0, 0.20, higher=False), row("a", 32.0, 0.20, higher=False),
         row("d", 4.0, 0.25, higher=False, corr=1), row("d", 8.0, 0.18, higher=False, corr=2, every=4),
         row("d", 16.0, 0.10, higher=False, corr=4), row("e", 8.0, 0.22, higher=False)]


def test_nfe_ratio_follows_the_metrics_direction():
    assert demo.nfe_ratio(LOWER, "quality", "nfe", higher=False) == {
        "mdm_best": 0.20, "mdm_nfe": 16.0, "proseco_nfe": 8.0, "ratio": 2.0}
    # read as higher-is-better, (a)'s best is 0.30 at 8 NFE, which (d) never reaches
    assert demo.nfe_ratio(LOWER, "quality", "nfe")["ratio"] is None
    assert science.ratio(LOWER, "gen")["ratio"] == 2.0  # the rows carry their direction
    assert "2.00x fewer network evaluations" in science.ratio_line(LOWER, "gen")
    assert "does not reach" in science.ratio_line([{**r, "higher_is_better": True} for r in LOWER], "gen")
    # (a) flat at 0 (no valid 9x9 grid at any setting): (d) "reaching" 0 is no ratio
    flat = [row("a", 8.0, 0.0), row("a", 32.0, 0.0), row("d", 10.0, 0.0, corr=1), row("d", 56.0, 0.2, corr=4)]
    assert science.ratio(flat, "gen") == {"mdm_best": 0.0, "mdm_nfe": 8.0, "proseco_nfe": None, "ratio": None,
                                          "flat": True}  # not 8 / 10: results.json must not carry it either
    line = science.ratio_line(flat, "gen")
    assert "no NFE ratio" in line and "x fewer" not in line and "0.80x" not in line


def test_graded_metric_gets_its_own_ratio_where_the_primary_is_flat(tmp_path):
    # valid grids: (a) 0 everywhere; constraints (graded): (a) best 0.40 at 46 NFE, (d) passes it
    # first at 12 NFE (0.49; the 10-NFE setting has 0.33): 46 / 12 in the graded line only
    def graded(method, nfe, valid, constraints, corr=0):
        return {**row(method, nfe, valid, corr=corr), "graded_metric": "constraints", "graded": constraints}
    rows = [graded("a", 8.0, 0.0, 0.22), graded("a", 46.0, 0.0, 0.40), graded("a", 30.0, 0.0, 0.33),
            graded("d", 10.0, 0.0, 0.33, corr=1), graded("d", 12.0, 0.0, 0.49, corr=2),
            graded("d", 23.0, 0.06, 0.74, corr=2), graded("e", 59.0, 0.0, 0.39)]
    assert science.ratio(rows, "gen", graded=True) == {"mdm_best": 0.40, "mdm_nfe": 46.0, "proseco_nfe": 12.0,
                                                      "ratio": 46.0 / 12.0}
    primary, line = science.ratio_lines(rows, "gen")
    assert "no NFE ratio" in primary
    assert line == ("gen: ProSeCo (d) reaches MDM's best constraints (0.4 at 46.0 NFE) at 12.0 NFE: "
                    "3.83x fewer network evaluations (graded metric)")
    graded_table = science.table(rows, "gen", graded=True)
    assert graded_table[0].startswith("gen: constraints (higher is better)")
    at_16 = next(line for line in graded_table if line.startswith("| 16 |")).split(" | ")
    assert at_16[1] == "0.22 / - (T=8)" and at_16[4] == "0.49 / - (T=8 S=2 ω=1)"  # (a) at 46 NFE is past 16
    assert science.tables(rows, "gen") == [*science.table(rows, "gen"), "", *graded_table]
    assert science.ratio_lines(LOWER, "gen") == [science.ratio_line(LOWER, "gen")]  # no graded metric: one line
    assert science.tables(LOWER, "gen") == science.table(LOWER, "gen")
    d = [r for r in rows if r["method"] == "d"]  # graded frontier: 0.33 @ 10, 0.49 @ 12, 0.74 @ 23
    assert [(p.nfe, p.quality) for p in science.frontier(d, True, "graded")] == [(10.0, 0.33), (12.0, 0.49), (23.0, 0.74)]
    assert [(p.nfe, p.quality) for p in science.frontier(d, True)] == [(10.0, 0.0), (23.0, 0.06)]
    science.plot(rows, "gen", tmp_path / "gen-graded.png", "t", graded=True)
    assert (tmp_path / "gen-graded.png").stat().st_size > 1000
    assert science.ratio(LOWER, "gen", graded=True) is None


def test_table_puts_diversity_beside_quality_and_picks_by_direction():
    rows = [row("a", 3.0, 0.5, 40), row("a", 7.0, 0.7, 30), row("d", 6.0, 0.9, 35, corr=2, every=4),
            row("e", 4.0, 0.6, 12), row("c", 3.0, 0.4, 50), row("a", 3.0, 1.0, None, task="other")]
    lines = science.table(rows, "gen")
    assert lines[0].startswith("gen: q (higher is better) / div")
    header = lines[2]
    assert all(f"({k}) {n}" in header for k, n in science.METHOD_NAMES.items())
    cells = {line.split(" | ")[0]: line.split(" | ")[1:] for line in lines[4:]}
    assert list(cells) == ["| 2", "| 4", "| 8"]  # powers of two up to twice the largest NFE (7 -> 14)
    a, b, c, d, e = cells["| 8"]
    assert a == "0.7 / 30 (T=8)" and b == "-" and c == "0.4 / 50 (T=8)"
    assert d == "0.9 / 35 (T=8 S=2 ω=4)" and e.startswith("0.6 / 12 (T=8)")
    assert cells["| 4"][0] == "0.5 / 40 (T=8)" and cells["| 2"] == ["-"] * 4 + ["- |"]
    low = science.table(LOWER, "gen")  # lower is better: within 16 NFE (a) shows 0.2, not 0.3
    assert "(lower is better)" in low[0]
    assert [line.split(" | ")[1] for line in low[5:8]] == ["-", "0.3 / - (T=8)", "0.2 / - (T=8)"]  # 4, 8, 16 NFE


def test_methods_frontier_and_missing_results():
    assert [science.method_of("mdm", "ancestral", 0), science.method_of("mdm", "ancestral", 2),
            science.method_of("proseco", "ancestral", 0), science.method_of("proseco", "ancestral", 1),
            science.method_of("mdm", "remdm", 0)] == list("abcde")
    pts = science.frontier([row("a", 4.0, 0.5, 9), row("a", 8.0, 0.4, 8), row("a", 8.0, 0.6, 7),
                            row("a", 16.0, None), row("a", 16.0, 0.9, 5)], higher=True)
    assert [(p.nfe, p.quality, p.diversity) for p in pts] == [(4.0, 0.5, 9), (8.0, 0.6, 7), (16.0, 0.9, 5)]
    low = science.frontier([r for r in LOWER if r["method"] == "a"], higher=False)
    assert [(p.nfe, p.quality) for p in low] == [(8.0, 0.30), (16.0, 0.20)]
    assert science.ratio(LOWER, "absent") is None and science.table(LOWER, "absent") == ["(no results for absent)"]


def test_task_modules_are_checked(monkeypatch):
    monkeypatch.setitem(science.SUITE_MODULES, "ghost", "no_such_task_module")
    monkeypatch.setitem(science.SUITE_MODULES, "bare", "arrays")  # a module without the suite interface
    with pytest.raises(ProsecoError, match="pipeline.tasks.no_such_task_module is not in this installation"):
        science.task_module("ghost")
    with pytest.raises(ProsecoError, match="lacks the suite interface's NAME, VOCAB_SIZE"):
        science.task_module("bare")
    with pytest.raises(ProsecoError, match="unknown demo.tasks entry 'nope'"):
        science.task_module("nope")
    assert science.task_module("sudoku4").SUITE_TASKS[0] == "sudoku4"


def test_tiny_suite_runs_end_to_end_and_reuses_models_and_results(tmp_path, capsys):
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [
        "demo.tasks=[sudoku4]", "demo.proseco_steps=3", "demo.eval_samples=8", "demo.steps_grid=[2]",
        "demo.corrector_grid=[1]", "demo.corrector_every_grid=[1,2]", f"demo.out_dir={tmp_path}",
        "parallel.threads=1", "sampler.batch_size=4"])
    assert science.run(cfg) == 0
    first = capsys.readouterr().out
    assert all(f"[sudoku4] {i}/4" in first for i in range(1, 5))
    folder = tmp_path / "sudoku4"
    saved = json.loads((folder / "results.json").read_text())
    rows = saved["results"]
    # 2 tasks x ((a) 1 + (b) 2 omegas + (e) 1 on MDM; (c) 1 + (d) 2 on ProSeCo)
    assert len(rows) == 14 and {r["method"] for r in rows} == set("abcde")
    assert {(r["corrector_steps"], r["corrector_every"]) for r in rows if r["method"] in "bd"} == {(1, 1), (1, 2)}
    assert all(r["sampler"] == "remdm" and r["corrector_steps"] == 0 for r in rows if r["method"] == "e")
    gen = [r for r in rows if r["task"] == "sudoku4"]
    assert all(r["primary"] == "valid" and r["diversity_metric"] == "distinct_valid"
               and r["diversity"] == r["metrics"]["distinct_valid"] for r in gen)
    assert saved["trained"]["mdm"]["steps"] == 6 and saved["trained"]["proseco"]["steps"] == 3
    assert set(saved["ratios"]) == {"sudoku4", "sudoku4-solve"} and set(saved["stage_seconds"]) == {
        "data", "train mdm", "train proseco", "eval", "report"}
    report = (folder / "report.md").read_text()
    assert "(e) ReMDM (MDM model)" in report and "## sudoku4-solve" in report
    assert all((folder / f"{t}.png").stat().st_size > 0 for t in ("sudoku4", "sudoku4-solve"))
    assert (folder / "eval" / "report.html").is_file()  # `proseco report` of the evaluator's results
    summary = (tmp_path / "science.md").read_text()
    assert "## sudoku4" in summary and "(d) ProSeCo + corrector" in summary and "wall time" in summary
    assert science.run(cfg) == 0  # rerun: both models loaded, every result reused
    second = capsys.readouterr().out
    assert second.count("loaded") == 2 and "eval: [" not in second
    assert json.loads((folder / "results.json").read_text())["results"] == rows


def test_cli_suite_errors_are_one_line(capsys):
    assert main(["demo", "--suite", "bogus"]) == 2
    assert capsys.readouterr().err.strip() == "error: --suite must be one of demo, science; got 'bogus'"
    assert main(["demo", "--suite", "science", "demo.tasks=[sudoku4,nope]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: demo.tasks must be a non-empty list of distinct suite tasks")
    assert main(["demo", "--suite", "science", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would run pipeline.science.run(cfg)" in out and "out_dir: runs/science" in out  # its own preset
    assert main(["demo", "--dry-run"]) == 0 and "would run pipeline.demo.run(cfg)" in capsys.readouterr().out
