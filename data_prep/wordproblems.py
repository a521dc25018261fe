"""Arithmetic word problems in GSM8K form, generated with exact answers (no dataset download).

Each problem is one of a few templates (a sum, a difference, a product, a two-step purchase) over
small random numbers and names; its answer is a worked solution ending ``#### <number>``, as in
GSM8K, so :mod:`pipeline.tasks.gsm8k` scores it by exact match. :func:`write_sets` writes a
training set as SFT records (``prompt`` = the gsm8k task's template, ``response`` = the solution)
and a held-out set of questions never seen in training (``question`` / ``answer``), both JSONL.
Deterministic under the seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pipeline.io import atomic_write
from pipeline.tasks.gsm8k import DEFAULT_TEMPLATE

NAMES = ("Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Max")
ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stickers", "cards", "shells")


def problem(rng: random.Random) -> dict:
    """One ``{"question", "answer"}`` record; the answer's final number is exact."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        return {"question": q, "answer": f"{name} has {a} + {b} = {a + b} {item}.\n#### {a + b}"}
    if kind == 1:
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        q = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
        return {"question": q, "answer": f"{name} has {a} - {b} = {a - b} {item} left.\n#### {a - b}"}
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        q = f"{name} fills {a} boxes with {b} {item} each. How many {item} is that in total?"
        return {"question": q, "answer": f"{name} has {a} x {b} = {a * b} {item}.\n#### {a * b}"}
    price, count = rng.randint(2, 9), rng.randint(2, 6)
    cost = price * count
    paid = cost + rng.randint(1, 20)
    q = f"{name} buys {count} {item} at {price} dollars each and pays with {paid} dollars. How much change does {name} get?"
    return {"question": q, "answer": (f"The {item} cost {count} x {price} = {cost} dollars. "
                                      f"The change is {paid} - {cost} = {paid - cost} dollars.\n#### {paid - cost}")}


def generate(n: int, seed: int) -> list[dict]:
    """``n`` distinct problems (by question text) drawn with ``random.Random(seed)``."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        record = problem(rng)
        if record["question"] not in seen:
            seen.add(record["question"])
            out.append(record)
    return out


def write_sets(out: str | Path, train: int, heldout: int, seed: int = 0) -> dict:
    """``out/train.jsonl`` (SFT prompt/response records) and ``out/heldout.jsonl`` (GSM8K records);
    the held-out questions never occur in training. Returns the two paths and counts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = generate(train + heldout, seed)
    held, trained = records[:heldout], records[heldout:]
    sft = [{"prompt": DEFAULT_TEMPLATE.format(question=r["question"]), "response": " " + r["answer"]}
           for r in trained]
    paths = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl"}
    atomic_write(paths["train"], "".join(json.dumps(r) + "\n" for r in sft).encode())
    atomic_write(paths["heldout"], "".join(json.dumps(r) + "\n" for r in held).encode())
    return {"train": str(paths["train"]), "heldout": str(paths["heldout"]), "n_train": len(sft), "n_heldout": len(held)}
