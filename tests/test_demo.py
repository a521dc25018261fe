"""The demo's bookkeeping on hand-built results, and a very short end-to-end run with caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import demo
from pipeline.config import load_config
from pipeline.evaluation.matching import nfe_matched

ROOT = Path(__file__).resolve().parents[1]


def row(method, nfe, valid, steps=4, corr=0):
    return {"method": method, "nfe": nfe, "valid": valid, "distinct_valid": 10, "steps": steps,
            "corrector_steps": corr, "solve_nfe": nfe, "solved": valid, "clue_violations": 0.0}


RESULTS = [
    row("a", 4.0, 0.10), row("a", 7.0, 0.30), row("a", 11.0, 0.50), row("a", 13.0, 0.55),
    row("b", 8.0, 0.20, corr=1), row("c", 4.0, 0.08), row("c", 11.0, 0.45),
    row("d", 6.0, 0.35, corr=1), row("d", 9.0, 0.60, corr=2), row("d", 20.0, 0.90, corr=4),
]


def test_nfe_matched_takes_the_best_setting_within_each_budget():
    table = nfe_matched(RESULTS, [4, 8, 16], lambda r: r["valid"], label="method", labels=demo.METHODS)
    assert table["a"][4]["valid"] == 0.10 and table["a"][8]["valid"] == 0.30 and table["a"][16]["valid"] == 0.55
    assert table["b"][4] is None and table["b"][8]["valid"] == 0.20
    assert table["d"][8]["valid"] == 0.35 and table["d"][16]["valid"] == 0.60


def test_nfe_ratio_is_mdm_best_nfe_over_proseco_nfe_to_match_it():
    ratio = demo.nfe_ratio(RESULTS, "valid", "nfe")
    assert ratio == {"mdm_best": 0.55, "mdm_nfe": 13.0, "proseco_nfe": 9.0, "ratio": pytest.approx(13 / 9)}
    never = [r for r in RESULTS if not (r["method"] == "d" and r["valid"] > 0.5)]
    assert demo.nfe_ratio(never, "valid", "nfe")["ratio"] is None
    # MDM at 0 everywhere: (d) "reaching" 0 at 6 NFE would read as 4 / 6; there is no ratio, and the report says so
    flat = [{**r, "valid": 0.0} if r["method"] == "a" else r for r in RESULTS]
    assert demo.nfe_ratio(flat, "valid", "nfe") == {"mdm_best": 0.0, "mdm_nfe": 4.0, "proseco_nfe": None,
                                                    "ratio": None, "flat": True}
    text = demo.format_report([{**r, "solved": r["valid"], "solve_nfe": r["nfe"], "distinct_valid": 1} for r in flat],
                              [4, 8, 16], {"mdm": {"steps": 2, "seconds": 1.0}, "proseco": {"steps": 1, "seconds": 1.0}})
    assert "MDM (a) scores 0.0% valid at every setting: no NFE ratio" in text and "fewer network" not in text


def test_report_names_every_method_and_budget():
    text = demo.format_report(RESULTS, [4, 8, 16], {"mdm": {"steps": 2, "seconds": 1.0},
                                                    "proseco": {"steps": 1, "seconds": 1.0}})
    for name in demo.METHOD_NAMES.values():
        assert name in text
    assert "1.44x fewer network evaluations" in text


def test_tiny_demo_runs_end_to_end_and_reuses_trained_models(tmp_path, capsys):
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [
        "demo.proseco_steps=3", "demo.eval_samples=8", "demo.steps_grid=[2]", "demo.corrector_grid=[1]",
        f"demo.out_dir={tmp_path}", "parallel.threads=1", "sampler.batch_size=4",
    ])
    assert demo.run(cfg) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in first["results"]} == set("abcd")
    assert first["trained"]["mdm"]["steps"] == 6 and first["trained"]["proseco"]["steps"] == 3
    assert all(r["clue_violations"] == 0.0 for r in first["results"])
    # both models trained through `proseco train`'s loop: a run folder each, a checkpoint at the last step
    runs = sorted(p.name.split("-")[0] for p in (tmp_path / "runs").iterdir())
    assert runs == ["mdm", "proseco"]
    assert [len(list((tmp_path / "runs").glob(f"{k}-*/checkpoints/step_{n:08d}/COMPLETE"))) for k, n in
            (("mdm", 6), ("proseco", 3))] == [1, 1]
    page = (tmp_path / "eval" / "report.html").read_text()  # the batch evaluator's report
    pngs = list((tmp_path / "eval").glob("*.png"))
    assert len(pngs) == 2 and all(p.name in page for p in pngs)  # one plot per task, both models on it
    printed = capsys.readouterr()
    assert "\r" not in printed.err and "eval: [" in printed.out  # not a terminal: plain lines, no progress bars
    assert demo.run(cfg) == 0  # second run: same config and data, so the models are loaded
    second_out = capsys.readouterr().out
    assert second_out.count("loaded") == 2
    second = json.loads((tmp_path / "results.json").read_text())
    assert second["results"] == first["results"]  # deterministic under its seed
