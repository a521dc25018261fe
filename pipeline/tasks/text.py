"""Unconditional text generation: generative perplexity, unigram entropy, distinct-n, MAUVE.

Metrics of n generated sequences (``score``):

* ``gen_ppl`` (primary, lower is better), ``gen_nll``, ``ref_tokens``, ``ref_truncated``: the
  decoded samples re-tokenized and scored by a reference causal LM (:mod:`pipeline.tasks.reference_lm`,
  MDLM's protocol). With ``reference: none`` they are NaN.
* ``unigram_entropy`` (diversity): MDLM / ProSeCo's entropy - per sample, the entropy (nats) of the
  unigram distribution of the generated token ids, averaged over samples. It is computed on the
  *model's* token ids (not the reference LM's), all ids of the row except ``pad`` (padding is not
  text; in the ``wrap`` shard layout MDLM uses there is none, so this is exactly MDLM's number).
  Low values flag repetitive samples, which can have deceptively good perplexity.
* ``distinct_N`` for N in ``distinct_n``: unique N-grams / all N-grams over the whole sample set
  (N-grams within a sample, on the model's ids without ``pad``).
* ``mask_left``: mask ids left in the output (a finished sampler leaves none), ``out_of_vocab``:
  ids outside the tokenizer (rendered as unk), ``mean_chars``: mean length of the decoded texts.
* ``mauve`` (only with ``mauve_reference``): MAUVE (``mauve-text``) between reference features
  (a ``.npy`` [m, d] array) and the generated texts' features from the reference LM
  (:meth:`ReferenceLM.features`: last-layer hidden state at the last token, MAUVE's own recipe).
  The reference features must come from the same reference LM (``ReferenceLM.features`` on
  human texts, saved with ``numpy.save``); a feature-size mismatch is an error.

Options (``eval.task_options.text``): ``reference`` ("smollm2" default, a local HF model folder,
a ``.gguf`` file, or "none"), ``batch_size`` (reference LM batch, 8), ``max_length`` (reference
tokens per text; default the reference model's context), ``distinct_n`` ([1, 2, 3]),
``mauve_reference`` (path; "" = no MAUVE), ``device`` ("cpu"; e.g. "cuda" for the reference LM).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from pipeline.errors import ProsecoError
from pipeline.tasks.base import EvalTask, ModelInfo

MASK_TEXT = "<mask>"
OPTIONS = ("reference", "batch_size", "max_length", "distinct_n", "mauve_reference", "device")


def _ids(tokens: Iterable[int] | torch.Tensor) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        return [int(t) for t in tokens.reshape(-1).tolist()]
    return [int(t) for t in tokens]


def unigram_entropy(tokens: Iterable[int] | torch.Tensor) -> float:
    """Entropy (nats) of the empirical unigram distribution of one sequence's ids; 0.0 when empty."""
    counts = Counter(_ids(tokens))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -math.fsum(c / total * math.log(c / total) for c in counts.values())


def distinct_n(tokens: Iterable[Sequence[int]] | torch.Tensor, n: int) -> float:
    """Unique n-grams / total n-grams over a set of sequences (n-grams never span two sequences).

    ``tokens``: a list of sequences or a 2-D tensor [samples, L]; a flat list of ints or a 1-D
    tensor counts as one sequence. 0.0 when no sequence has n tokens.
    """
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    if isinstance(tokens, torch.Tensor):
        rows = [tokens.tolist()] if tokens.dim() == 1 else tokens.reshape(tokens.shape[0], -1).tolist()
    else:
        rows = list(tokens)
        if rows and not isinstance(rows[0], (Sequence, torch.Tensor)):
            rows = [rows]
    seen: set[tuple[int, ...]] = set()
    total = 0
    for row in rows:
        ids = _ids(row)
        for i in range(len(ids) - n + 1):
            seen.add(tuple(ids[i:i + n]))
            total += 1
    return len(seen) / total if total else 0.0


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProsecoError(f"task text option {name} must be a positive integer, got {value!r}")
    return value


class Task(EvalTask):
    name = "text"
    primary = "gen_ppl"
    higher_is_better = False
    diversity = "unigram_entropy"
    eval_options: ClassVar[dict[str, str]] = {"reference": "reference_lm", "mauve_reference": "mauve_reference", "batch_size": "batch_size"}

    def __init__(self, cfg, options: dict, model: ModelInfo):
        super().__init__(cfg, options, model)
        unknown = sorted(set(self.options) - set(OPTIONS))
        if unknown:
            raise ProsecoError(f"task text: unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
        tok = self.tokenizer = self.text_tokenizer()
        eval_cfg = getattr(cfg, "eval", None)
        reference = self.options.get("reference", getattr(eval_cfg, "reference_lm", "smollm2"))
        self.reference = str(reference).strip() if reference is not None else "none"
        self.batch_size = _positive_int("batch_size", self.options.get("batch_size", 8))
        max_length = self.options.get("max_length")
        self.max_length = None if max_length is None else _positive_int("max_length", max_length)
        ns = self.options.get("distinct_n", [1, 2, 3])
        ns = [ns] if isinstance(ns, int) else ns
        if not isinstance(ns, (list, tuple)) or not ns:
            raise ProsecoError(f"task text option distinct_n must be a list of positive integers, got {ns!r}")
        self.distinct = [_positive_int("distinct_n", n) for n in ns]
        self.device = str(self.options.get("device", "cpu"))
        mauve_ref = self.options.get("mauve_reference", getattr(eval_cfg, "mauve_reference", "")) or ""
        self.mauve_reference = Path(str(mauve_ref)).expanduser() if str(mauve_ref).strip() else None

        self.pad_id = int(tok.pad_id)
        self.mask_ids = {int(tok.mask_id), int(model.mask_id)}
        self.unk_id = int(tok.unk_id)
        self.vocab = int(tok.vocab_size)

        # cheap checks now (paths, packages), the weights on first use
        self._ref = None
        if self.uses_reference:
            from pipeline.tasks.reference_lm import resolve_spec

            resolve_spec(self.reference)
        if self.mauve_reference is not None:
            if not self.uses_reference:
                raise ProsecoError("task text: mauve_reference needs a reference LM to featurize the samples "
                                   "(reference is 'none')")
            if not self.mauve_reference.is_file():
                raise ProsecoError(f"task text: mauve_reference {self.mauve_reference}: no such file")
            try:
                import mauve  # noqa: F401
            except ImportError:
                raise ProsecoError("task text: mauve_reference needs the mauve-text package: "
                                   "pip install 'mauve-text==0.4.0'") from None

    @property
    def uses_reference(self) -> bool:
        return self.reference.lower() not in ("none", "")

    def reference_lm(self):
        """The reference LM, loaded on first use and kept for the life of this task."""
        if self._ref is None:
            from pipeline.tasks.reference_lm import load_reference_lm

            self._ref = load_reference_lm(self.reference, device=self.device)
        return self._ref

    # -- decoding
    def _render(self, row: list[int]) -> tuple[str, int, int]:
        """(text, mask ids, out-of-vocabulary ids) of one row; masks render as "<mask>"."""
        pieces, segment = [], []
        masks = oov = 0
        for i in row:
            if i in self.mask_ids:
                masks += 1
                pieces.append(self.tokenizer.decode(segment))
                pieces.append(MASK_TEXT)
                segment = []
                continue
            if not 0 <= i < self.vocab:
                oov += 1
                i = self.unk_id
            segment.append(i)
        pieces.append(self.tokenizer.decode(segment))
        return "".join(pieces), masks, oov

    def decode(self, tokens: torch.Tensor) -> list[str]:
        return [self._render(row)[0] for row in torch.as_tensor(tokens).long().cpu().tolist()]

    # -- metrics
    def score(self, tokens: torch.Tensor, conditioning=None) -> dict[str, float]:
        rows = torch.as_tensor(tokens).long().cpu().tolist()
        rendered = [self._render(row) for row in rows]
        texts = [text for text, _, _ in rendered]
        real = [[i for i in row if i != self.pad_id] for row in rows]
        metrics: dict[str, float] = {
            "unigram_entropy": (math.fsum(unigram_entropy(r) for r in real) / len(real)) if real else float("nan"),
            **{f"distinct_{n}": distinct_n(real, n) for n in self.distinct},
            "mask_left": float(sum(m for _, m, _ in rendered)),
            "out_of_vocab": float(sum(o for _, _, o in rendered)),
            "mean_chars": (sum(len(t) for t in texts) / len(texts)) if texts else float("nan"),
        }
        if self.uses_reference and texts:
            metrics.update(self.reference_lm().perplexity(texts, batch_size=self.batch_size,
                                                          max_length=self.max_length))
        else:
            metrics.update({"gen_ppl": float("nan"), "gen_nll": float("nan"), "ref_tokens": 0.0,
                            "ref_truncated": 0.0})
        if self.mauve_reference is not None and texts:
            metrics["mauve"] = self._mauve(texts)
        return metrics

    def _mauve(self, texts: list[str]) -> float:
        import mauve
        import numpy as np

        try:
            p = np.load(self.mauve_reference)
        except (OSError, ValueError) as exc:
            raise ProsecoError(f"task text: mauve_reference {self.mauve_reference} is not a readable .npy "
                               f"({exc})") from exc
        q = self.reference_lm().features(texts, max_length=self.max_length).numpy()
        if p.ndim != 2 or p.shape[1] != q.shape[1]:
            raise ProsecoError(f"task text: mauve_reference {self.mauve_reference} has shape {p.shape}, but the "
                               f"reference LM {self.reference!r} gives features of size {q.shape[1]}; make the "
                               "reference features with the same reference LM (ReferenceLM.features)")
        out = mauve.compute_mauve(p_features=p, q_features=q, device_id=-1, verbose=False, seed=25)
        return float(out.mauve)


__all__ = ["Task", "distinct_n", "unigram_entropy"]
