"""The generated GSM8K-form word problems of the Hugging Face worked example (data_prep/wordproblems.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from data_prep.wordproblems import generate, write_sets
from pipeline.tasks.gsm8k import DEFAULT_TEMPLATE, answers_match, extract_answer, load_problems


def _check_arithmetic(answer: str) -> None:
    """Every ``a op b = c`` in a worked solution holds, and the final number is the last result."""
    steps = re.findall(r"(\d+) ([+\-x]) (\d+) = (\d+)", answer)
    assert steps, answer
    for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        assert {"+": a + b, "-": a - b, "x": a * b}[op] == c, answer
    assert extract_answer(answer) == steps[-1][3]


def test_problems_are_exact_distinct_and_deterministic():
    problems = generate(300, seed=5)
    assert problems == generate(300, seed=5) and problems != generate(300, seed=6)
    assert len({p["question"] for p in problems}) == 300
    for p in problems:
        _check_arithmetic(p["answer"])
        assert int(extract_answer(p["answer"])) >= 0


def test_written_sets_are_held_out_and_read_by_the_gsm8k_task(tmp_path):
    sets = write_sets(tmp_path, train=50, heldout=10, seed=1)
    train = [json.loads(line) for line in Path(sets["train"]).read_text().splitlines()]
    held = load_problems(sets["heldout"])
    assert len(train) == 50 and len(held) == 10
    questions = {p["question"] for p in held}
    prompts = {r["prompt"] for r in train}
    assert not {DEFAULT_TEMPLATE.format(question=q) for q in questions} & prompts  # never trained on
    for r in train:  # the SFT prompt is the gsm8k task's template; the response ends with the answer
        assert r["prompt"].startswith("Question: ") and r["prompt"].endswith("\nAnswer:")
        assert answers_match(extract_answer(r["response"]), r["response"].rsplit("#### ", 1)[1])
