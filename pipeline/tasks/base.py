"""The task API: what every task module (:mod:`pipeline.tasks`) provides to prep, sample, eval and demo.

A task module owns its data (generation or reading), its layout, its scoring and its decoding; its
evaluation tasks are :class:`EvalTask` subclasses registered by name in :mod:`pipeline.tasks`. An
evaluation task turns generated token sequences into metrics. The evaluator (:mod:`pipeline.evaluation.runner`)
owns everything else: loading a checkpoint's weights, sampling with a sampler setting in batches,
counting NFE, writing one result JSON per work item. A task is built once per (process, task) and
reused for every checkpoint and sampler setting, so expensive set-up (a reference language model,
a training set for novelty) happens once.

Contract (:class:`EvalTask`):

* ``name``: the registry name (``--tasks NAME``, ``data.task`` for the task a model trains on).
* ``vocab_size``: the fixed vocabulary of a synthetic task (its token layout), None when the
  vocabulary is the tokenizer's (text tasks).
* ``version``: the scorer's version, part of every result's key: bump it when ``score`` or
  ``conditioning`` changes what they compute, so that old results are recomputed, not reused.
* ``primary``: the quality metric the report plots against NFE; ``higher_is_better`` says its
  direction. ``diversity``: the diversity metric shown beside it (or None). ``graded``: for a task
  whose primary is all-or-nothing (a complete valid grid), a metric of how close each sample
  comes, higher is better (or None); the science suite gives its NFE ratio beside the primary's,
  so that a baseline scoring 0 at every setting still leaves a slope to compare.
* ``eval_options``: which ``eval.*`` keys set which of the task's options (``proseco eval`` builds
  ``options`` from them).
* ``__init__(cfg, options, model)``: ``cfg`` is the checkpoint's training config (data.seq_len,
  data.task, ...); ``options`` are the task's settings from ``eval.task_options[name]``;
  ``model`` is a :class:`ModelInfo` (vocabulary size, mask id, sequence length, the tokenizer
  when the model was trained on text shards). Raise :class:`pipeline.errors.ProsecoError` with a
  clear message when the task cannot run for this model (wrong vocabulary, a reference model that
  does not load); the evaluator records it for every item of the task and goes on.
* ``conditioning(n, seed)``: None for unconditional generation, else ``(prompt, fixed)`` - token
  ids [n, L] and a bool mask [n, L] of positions the sampler must keep (clues, a question).
* ``score(tokens, conditioning) -> dict[str, float]``: metrics of the n generated sequences
  (``tokens`` [n, L] long, CPU). Must contain ``primary`` (and ``diversity`` when set). Optional
  extra keys are reported too.
* ``decode(tokens) -> list[str]``: human-readable samples for the samples file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pipeline.config import Config
from pipeline.errors import ProsecoError


@dataclass
class ModelInfo:
    """What a task needs to know about the model it scores: its token layout and tokenizer."""

    vocab_size: int
    mask_id: int
    seq_len: int
    tokenizer: Any = None  # data_prep.tokenizer.Tokenizer for models trained on text shards, else None


class EvalTask:
    """An evaluation task: conditioning, scoring and decoding of generated sequences (contract above)."""

    name = "?"
    vocab_size: int | None = None
    version = 1
    primary = "?"
    higher_is_better = True
    diversity: str | None = None
    graded: str | None = None
    eval_options: ClassVar[dict[str, str]] = {}  # option name -> the eval.* key that sets it (empty values are left out)

    def __init__(self, cfg: Config, options: dict, model: ModelInfo):
        self.cfg, self.options, self.model = cfg, dict(options), model

    def text_tokenizer(self, what: str = "text shards"):
        """The model's tokenizer, for tasks that score decoded text; a task error when the model has
        none (it was not trained on text shards) or when the tokenizer has more ids than the model."""
        tok = self.model.tokenizer
        if tok is None:
            raise ProsecoError(f"task {self.name} needs a model trained on {what} (it has no tokenizer); "
                               "evaluate this model with its own task instead")
        if tok.vocab_size > self.model.vocab_size:
            raise ProsecoError(f"task {self.name}: the tokenizer has {tok.vocab_size} ids, "
                               f"the model only {self.model.vocab_size}")
        return tok

    def check_layout(self, what: str) -> None:
        """Refuse (task error) a model whose token layout is not this synthetic task's:
        ``vocab_size``, ``mask_id`` (the last id) and ``seq_len`` must equal the task's."""
        want = (self.vocab_size, self.vocab_size - 1, getattr(self, "seq_len", None))
        have = (self.model.vocab_size, self.model.mask_id, self.model.seq_len)
        if have != want:
            raise ProsecoError(f"task {self.name} needs {what} (vocabulary, mask id, length = "
                               f"{', '.join(map(str, want))}); this one has {', '.join(map(str, have))}")

    def conditioning(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def score(self, tokens: torch.Tensor, conditioning: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, float]:
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor) -> list[str]:
        return [" ".join(str(int(t)) for t in row) for row in tokens]
