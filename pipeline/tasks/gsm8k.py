"""GSM8K-style maths word problems (``--tasks gsm8k``): prompt-conditioned generation, exact match.

Each sample row starts with a question prompt the sampler keeps fixed::

    [bos] encode("Question: {question}\\nAnswer:")  <mask> <mask> ... <mask>     (model.seq_len)
    fixed = True ....................................  False ............

(``bos`` because every training document starts with it, see ``prep shards``; option ``bos``).
The model fills the rest; :meth:`Task.score` decodes the generated continuation (up to the first
eos/pad/bos), extracts its final answer with :func:`extract_answer` and compares it to the gold
answer (the number after ``####`` in the record's ``answer``), numerically when both are numbers.

Metrics: ``exact_match`` (primary), ``answer_found`` (fraction of samples with an extractable
answer), ``skipped`` (questions of the data file whose prompt leaves fewer than
``min_new_tokens`` positions free in a row: never asked), ``questions`` (those asked from),
``samples``.

Options (keys of the options dict; unknown keys are ignored):

* ``data`` (required; the evaluator fills it from ``eval.gsm8k_questions``): a JSONL file, one
  ``{"question": ..., "answer": ...}`` object a line, the answer in GSM8K form (a worked solution
  ending ``#### <number>``);
* ``template``: the prompt, ``"Question: {question}\\nAnswer:"`` by default;
* ``bos``: put the tokenizer's bos id first (default true);
* ``min_new_tokens``: free positions a prompt must leave to be used (default 1).

Questions are picked per ``conditioning(n, seed)`` call: the usable questions shuffled with
``random.Random(seed)``, cycled when ``n`` exceeds their number. :meth:`Task.score` finds each row's
question again from its fixed prompt tokens, so it needs no state from the ``conditioning`` call.
"""

from __future__ import annotations

import json
import random
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import ClassVar

import torch

from pipeline.errors import ProsecoError
from pipeline.tasks.base import EvalTask, ModelInfo

OPTIONS = ("data", "template", "bos", "min_new_tokens")  # other keys are ignored (one dict for all tasks)
DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
FIELDS = ("question", "answer")

_NUMBER_AT_START = re.compile(r"-?\d+(?:\.\d+)?")
# a number anywhere: optional sign (not after a digit, so "3-4" gives 4), $, digits with commas
_NUMBER = re.compile(r"(?<![\d.])-?\$?\d[\d,]*(?:\.\d+)?|\d[\d,]*(?:\.\d+)?")


def _clean(text: str) -> str:
    return text.replace(",", "").replace("$", "").replace(" ", "")


def extract_answer(text: str | None) -> str | None:
    """The final answer of a GSM8K-style solution: the number after the last ``####`` (on that
    line; commas, ``$`` and spaces removed), else the last number in the text, else None.

    ``"... #### 1,234"`` -> ``"1234"``; ``"the answer is 42."`` -> ``"42"``; ``"no idea"`` -> None.
    """
    if not text:
        return None
    if "####" in text:
        tail = text.rsplit("####", 1)[1].lstrip().split("\n", 1)[0]
        match = _NUMBER_AT_START.match(_clean(tail))
        if match:
            return match.group()
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    answer = _clean(numbers[-1])
    return answer if _NUMBER_AT_START.fullmatch(answer) else None


def answers_match(predicted: str | None, gold: str | None) -> bool:
    """Equal as numbers when both are (``"18.0"`` == ``"18"``), else as strings; None never matches."""
    if predicted is None or gold is None:
        return False
    try:
        return Decimal(predicted) == Decimal(gold)
    except InvalidOperation:
        return predicted == gold


def load_problems(path: str | Path) -> list[dict]:
    """Records ``{"question", "answer", "gold"}`` of a GSM8K JSONL file; ProsecoError naming the line
    for a record that is not JSON, lacks a field, or whose answer has no final number."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ProsecoError(f"gsm8k option data: cannot read {path} ({exc})") from exc
    problems = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProsecoError(f"{path}:{number}: not a JSON object ({exc})") from exc
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in FIELDS):
            raise ProsecoError(f"{path}:{number}: needs string fields 'question' and 'answer'")
        gold = extract_answer(record["answer"])
        if gold is None:
            raise ProsecoError(f"{path}:{number}: the answer has no final number ('#### <number>')")
        problems.append({"question": record["question"], "answer": record["answer"], "gold": gold})
    if not problems:
        raise ProsecoError(f"{path}: no problems in the file")
    return problems


class Task(EvalTask):
    name = "gsm8k"
    primary = "exact_match"
    higher_is_better = True
    diversity = None
    eval_options: ClassVar[dict[str, str]] = {"data": "gsm8k_questions"}

    def __init__(self, cfg, options: dict, model: ModelInfo):
        super().__init__(cfg, options, model)
        if not self.options.get("data"):
            raise ProsecoError("gsm8k needs option data: a JSONL file of {question, answer} "
                               "(eval.gsm8k_questions=PATH)")
        tok = self.text_tokenizer()
        template = self.options.get("template") or DEFAULT_TEMPLATE
        if not isinstance(template, str) or "{question}" not in template:
            raise ProsecoError("gsm8k option template must be a string containing {question}, "
                               f"got {template!r}")
        min_new = self.options.get("min_new_tokens") or 1
        if isinstance(min_new, bool) or not isinstance(min_new, int) or min_new < 1:
            raise ProsecoError(f"gsm8k option min_new_tokens must be an integer >= 1, got {min_new!r}")
        self.tokenizer = tok
        self.problems = load_problems(self.options["data"])
        head = [tok.bos_id] if self.options.get("bos", True) else []
        prompts = tok.encode_batch([template.format(question=p["question"]) for p in self.problems])
        self.prompts = [head + ids for ids in prompts]
        self.usable = [i for i, ids in enumerate(self.prompts) if len(ids) + min_new <= model.seq_len]
        self.skipped = len(self.problems) - len(self.usable)
        if not self.usable:
            shortest = min(len(ids) for ids in self.prompts)
            raise ProsecoError(f"gsm8k: no prompt fits a {model.seq_len}-token row with {min_new} free "
                               f"position(s) (the shortest prompt has {shortest} tokens)")
        self._by_prompt: dict[tuple[int, ...], int] = {}
        for i in self.usable:
            self._by_prompt.setdefault(tuple(self.prompts[i]), i)

    def pick(self, n: int, seed: int) -> list[int]:
        """Indices into ``self.problems`` of the n questions asked for ``seed``."""
        order = list(self.usable)
        random.Random(seed).shuffle(order)
        return [order[i % len(order)] for i in range(n)]

    def conditioning(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.model.seq_len
        prompt = torch.full((n, length), self.model.mask_id, dtype=torch.long)
        fixed = torch.zeros((n, length), dtype=torch.bool)
        for row, index in enumerate(self.pick(n, seed)):
            ids = self.prompts[index]
            prompt[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            fixed[row, :len(ids)] = True
        return prompt, fixed

    def _continuation(self, ids: list[int]) -> str:
        tok = self.tokenizer
        stops = {tok.eos_id, tok.pad_id, tok.bos_id}
        kept = []
        for i in ids:
            if i in stops:
                break
            if i != tok.mask_id and 0 <= i < tok.vocab_size:
                kept.append(i)
        return tok.decode(kept)

    def _split(self, tokens: torch.Tensor, conditioning) -> list[tuple[int | None, str]]:
        """(problem index or None, generated text) per row."""
        if conditioning is None:
            raise ProsecoError("gsm8k scores prompt-conditioned samples; conditioning is missing")
        _, fixed = conditioning
        out = []
        for row, mask in zip(tokens.tolist(), fixed.tolist(), strict=True):
            k = sum(mask)
            out.append((self._by_prompt.get(tuple(row[:k])), self._continuation(row[k:])))
        return out

    def score(self, tokens: torch.Tensor, conditioning) -> dict[str, float]:
        rows = self._split(tokens, conditioning)
        found = correct = 0
        for index, text in rows:
            predicted = extract_answer(text)
            found += predicted is not None
            correct += index is not None and answers_match(predicted, self.problems[index]["gold"])
        n = len(rows)
        return {
            "exact_match": correct / n if n else 0.0,
            "answer_found": found / n if n else 0.0,
            "skipped": float(self.skipped),
            "questions": float(len(self.usable)),
            "samples": float(n),
        }

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Each row as text: the prompt and the continuation up to its first eos/pad."""
        tok = self.tokenizer
        out = []
        for row in tokens.tolist():
            start = 1 if row and row[0] == tok.bos_id else 0
            out.append(self._continuation(row[start:]))
        return out


__all__ = ["Task", "answers_match", "extract_answer", "load_problems"]
