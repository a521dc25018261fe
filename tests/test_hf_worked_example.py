"""`benchmarks/hf_worked_example.py` end to end on a tiny random Llama (the SmolLM2 run is in
docs/huggingface.md): generated problems -> prep sft -> ProSeCo and MDM SFT -> gsm8k eval table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_utils import build_llama_folder, build_tokenizer

from data_prep.wordproblems import generate

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_worked_example_runs_end_to_end_and_prints_its_table(tmp_path):
    problems = generate(400, seed=0)
    # whole words as tokens, so a problem fits the tiny Llama's 64 positions
    tok = build_tokenizer([f"Question: {p['question']}\nAnswer: {p['answer']}" for p in problems], vocab_size=1000)
    folder = build_llama_folder(tmp_path / "llama", tok)
    out = tmp_path / "example"
    cmd = [sys.executable, "benchmarks/hf_worked_example.py", "--out", str(out), "--model", f"hf:{folder}",
           "--train", "64", "--questions", "2", "--steps", "2", "--steps-grid", "4", "--extra", "parallel.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = json.loads((out / "table.json").read_text())
    settings = sorted((r["model"]["path"].split("/runs/")[1].split("/")[0], r["setting"]["corrector_steps"])
                      for r in table)
    assert settings == [("mdm", 0), ("mdm", 1), ("proseco", 0), ("proseco", 1)]
    assert all(0.0 <= r["metrics"]["exact_match"] <= 1.0 and r["nfe"] > 0 for r in table)
    assert "exact_match" in proc.stdout and proc.stdout.count("$ proseco ") == 5  # prep, 2 x train, 2 x eval
    steps = [json.loads(line)["step"] for line in (out / "runs" / "mdm" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4  # MDM SFT: twice ProSeCo's steps (equal compute)
