"""The paper's effect on the demo task, end to end through `proseco demo` (slow; CI runs it).

A tiny model trained with the ProSeCo objective and sampled with the corrector loop must beat
the MDM model (trained for twice the steps, i.e. the same compute) at the same NFE budget, and
the gain must come from the training term: the MDM model with the same corrector loop and the
ProSeCo model with the corrector off stay below. Fixed seeds; training is deterministic on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import demo
from pipeline.config import load_config
from pipeline.evaluation.report import LOW_DIVERSITY_FRACTION

ROOT = Path(__file__).resolve().parents[1]


def best(results: list[dict], method: str, metric: str, nfe_key: str, budget: float) -> float:
    return max((r[metric] for r in results if r["method"] == method and r[nfe_key] <= budget), default=0.0)


@pytest.mark.slow
def test_proseco_with_corrector_beats_mdm_at_equal_nfe(tmp_path, capsys):
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [
        # at 300 ProSeCo steps (600 for MDM) (d) already leads a / c / b by 0.35 / 0.45 / 0.38 where the
        # asserts ask 0.10 / 0.10 / 0.05 (0.47 / 0.51 / 0.52 at 600 steps); T=32 lies above the NFE budget
        "demo.proseco_steps=300", "demo.eval_samples=256", "demo.steps_grid=[4,8,16]",
        "demo.corrector_grid=[2]", f"demo.out_dir={tmp_path}", "parallel.threads=1",
    ])
    assert demo.run(cfg) == 0  # conftest puts torch's threads back afterwards
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert "NFE-matched" in printed

    budget = 12.0  # about T=4 with two corrector passes; MDM decodes all 16 cells one by one within it
    a, b, c, d = (best(results, m, "valid", "nfe", budget) for m in "abcd")
    assert d >= a + 0.10, (a, d)  # ProSeCo + corrector vs MDM at the same NFE
    assert d >= c + 0.10, (c, d)  # the corrector loop matters at sampling time ...
    assert d >= b + 0.05, (b, d)  # ... and so does training for it
    solved_a, solved_d = (best(results, m, "solved", "solve_nfe", budget) for m in "ad")
    assert solved_d >= solved_a, (solved_a, solved_d)
    # no collapse, by the report's rule (pipeline.evaluation.report.flag_low_diversity): ProSeCo's best
    # setting keeps at least half the distinct valid grids of any setting of equal or lower validity
    # (measured: 59 distinct valid at 79% valid, where MDM's most diverse setting has 78 at 35%)
    top = max((r for r in results if r["method"] == "d" and r["nfe"] <= budget), key=lambda r: r["valid"])
    rivals = max(r["distinct_valid"] for r in results if r["valid"] <= top["valid"])
    assert top["distinct_valid"] >= LOW_DIVERSITY_FRACTION * rivals, (top, rivals)
