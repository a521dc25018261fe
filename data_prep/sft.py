"""Prompt/response data into SFT shards (``proseco prep sft``) for a Hugging Face backbone.

Input: JSONL files, one conversation per line, either ``{"prompt": ..., "response": ...}`` or
``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last message is the assistant's
answer, rendered with the tokenizer's chat template (the prompt is the template applied to the
earlier messages with the generation prompt; the response is what the full rendering adds).
Tokens come from the tokenizer of ``model.init=hf:PATH`` (a transformers folder or the
tokenizer inside a ``.gguf``), so the shards' ids are the model's.

A sample is ``[bos] prompt response eos`` padded to ``data.seq_len`` with EOS, as LLaDA's SFT
does (the model learns to fill the rest of the answer with EOS; every position is a real token);
a conversation longer than ``seq_len`` is skipped and counted. It is stored with its prompt
length in front (``docs/data_format.md``, mode ``sft``); the loader turns that into the
``prompt`` mask the objective reads (prompt tokens never masked, no loss on them).

The split is by a stable hash of the line (``prep.val_fraction`` of them go to val). One process,
no partitions: SFT sets are small next to pretraining corpora.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from pipeline.data.format import (
    FORMAT,
    MANIFEST,
    SFT_MODE,
    SPLITS,
    TAR_BLOCK,
    TAR_END,
    dtype_for,
    manifest_fingerprint,
    sample_key,
    shard_name,
)
from pipeline.errors import ProsecoError
from pipeline.io import atomic_write_json

TOKENIZER_DIR = "hf_tokenizer"  # the model's tokenizer, saved with the shards


def load_hf_tokenizer(init: str):
    """The transformers tokenizer of ``model.init=hf:PATH``; a one-line error when there is none."""
    from transformers import AutoTokenizer

    from pipeline.model.hf import source_of

    src = source_of(init)
    try:
        return AutoTokenizer.from_pretrained(src.folder, **src.kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProsecoError(f"{init}: no usable tokenizer next to the model ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def encode_record(tok, record: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one conversation; the response ends with EOS."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise ValueError("messages must be a list ending with the assistant's message")
        if not getattr(tok, "chat_template", None):
            raise ProsecoError("a record has messages, but the tokenizer has no chat template; "
                               "give prompt/response fields instead")
        prompt = list(tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                              return_dict=False))
        full = list(tok.apply_chat_template(messages, tokenize=True, return_dict=False))
        if full[:len(prompt)] != prompt:
            raise ValueError("the chat template renders the prompt differently inside the full conversation")
        response = full[len(prompt):]
    else:
        prompt_text, response_text = record["prompt"], record["response"]
        if not isinstance(prompt_text, str) or not isinstance(response_text, str):
            raise ValueError("prompt and response must be strings")
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        prompt = bos + tok.encode(prompt_text, add_special_tokens=False)
        response = tok.encode(response_text, add_special_tokens=False)
    if not response or response[-1] != tok.eos_token_id:
        response = [*response, tok.eos_token_id]
    return prompt, response


def pack(prompt: list[int], response: list[int], seq_len: int, eos: int) -> np.ndarray | None:
    """``[len(prompt), prompt, response, eos, eos, ...]`` of ``seq_len + 1`` entries (int64), or
    None when prompt + response do not fit in ``seq_len``."""
    n = len(prompt) + len(response)
    if n > seq_len:
        return None
    return np.array([len(prompt), *prompt, *response, *([eos] * (seq_len - n))], dtype=np.int64)


def _split_of(line: str, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(line.encode("utf-8")).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def _read_samples(files: list[Path], tok, seq_len: int, val_fraction: float, mask_id: int):
    samples: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    skipped = {"bad_json": 0, "missing_field": 0, "too_long": 0}
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ProsecoError(f"{file} is not UTF-8 text (byte {exc.start}: {exc.reason}); JSONL inputs must be "
                               "UTF-8") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompt, response = encode_record(tok, record)
            except json.JSONDecodeError:
                skipped["bad_json"] += 1
                continue
            except (KeyError, ValueError, AttributeError, TypeError):
                skipped["missing_field"] += 1
                continue
            sample = pack(prompt, response, seq_len, tok.eos_token_id)
            if sample is None:
                skipped["too_long"] += 1
                continue
            if int(sample[1:].max()) >= mask_id:
                raise ProsecoError(f"{file}:{n}: token id {int(sample[1:].max())} is outside the model's "
                                   f"vocabulary ({mask_id} ids before the mask token): tokenizer and model disagree")
            samples[_split_of(line, val_fraction)].append(sample)
    return samples, skipped


def samples_per_shard(shard_bytes: int, sample_len: int, dtype: str) -> int:
    """Samples that fit in a tar of ``shard_bytes``: a header block plus the padded .npy per sample."""
    npy = len(_npy(np.zeros(sample_len, dtype)))
    return max(1, (shard_bytes - TAR_END) // (TAR_BLOCK + -(-npy // TAR_BLOCK) * TAR_BLOCK))


def _write_split(out: Path, split: str, rows: list[np.ndarray], dtype: str, per_shard: int) -> list[dict]:
    from data_prep.shard_writer import ShardFile

    shards = []
    (out / split).mkdir(parents=True, exist_ok=True)
    for start in range(0, len(rows), per_shard):
        shard = ShardFile(out, shard_name(split, 0, len(shards)))
        try:
            for i, row in enumerate(rows[start:start + per_shard], start):
                buf = _npy(row.astype(dtype))
                shard.add(sample_key(0, i), buf, len(row) - 1)
            shards.append(shard.close())
        except BaseException:
            shard.abort()
            raise
    return shards


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def prep_sft(inputs: list[str], out: str | os.PathLike, init: str, seq_len: int,
             val_fraction: float = 0.0, shard_bytes: int = 64 * 2**20) -> dict:
    """Write SFT shards of ``inputs`` (JSONL) for the model ``init`` into ``out``; returns the manifest."""
    from data_prep.tokenizer_hf import write_model_tokenizer
    from pipeline.model.hf import vocab_info

    files = sorted({Path(p) for p in inputs})
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise ProsecoError(f"prep sft needs JSONL files in prep.inputs; not found: {', '.join(missing) or 'none given'}")
    out = Path(out)
    if (out / MANIFEST).exists():
        raise ProsecoError(f"{out} already holds shards (manifest.json); remove it or choose another --out")
    vocab, mask_id = vocab_info(init)
    tok = load_hf_tokenizer(init)
    if tok.eos_token_id is None:
        raise ProsecoError(f"the tokenizer of {init} has no EOS token; SFT pads responses with EOS")
    samples, skipped = _read_samples(files, tok, seq_len, val_fraction, mask_id)
    if not samples["train"]:
        raise ProsecoError(f"no training conversation fits data.seq_len={seq_len} in {', '.join(map(str, files))} "
                           f"(skipped: {skipped}); raise data.seq_len or check the fields")
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for(vocab)
    splits = {}
    for split in SPLITS:
        shards = _write_split(out, split, samples[split], dtype, samples_per_shard(shard_bytes, seq_len + 1, dtype))
        splits[split] = {"samples": len(samples[split]), "tokens": len(samples[split]) * seq_len,
                         "dropped_tokens": 0, "shards": shards}
    tok.save_pretrained(out / TOKENIZER_DIR)  # the transformers form, for `ckpt export --format hf`
    eos = int(tok.eos_token_id)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    special = {"pad": int(pad), "unk": eos if tok.unk_token_id is None else int(tok.unk_token_id),
               "bos": eos if tok.bos_token_id is None else int(tok.bos_token_id), "eos": eos, "mask": mask_id}
    # the pipeline's form (tokenizer.json + tokenizer.model, ids = the model's): sampling and eval decode with it
    sidecar = write_model_tokenizer(tok, vocab, special, out, init)
    manifest = {
        "format": FORMAT, "seq_len": seq_len, "mode": SFT_MODE, "dtype": dtype, "splits": splits,
        "tokenizer": {"file": "tokenizer.model", "sha256": sidecar["sha256"], "vocab_size": vocab,
                      "special": special, "transformers": TOKENIZER_DIR},
        "documents": {s: len(samples[s]) for s in SPLITS}, "skipped": skipped,
        "sources": [{"path": str(f), "bytes": f.stat().st_size,
                     "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files],
        "config": {"init": init, "seq_len": seq_len, "val_fraction": val_fraction, "shard_bytes": shard_bytes},
    }
    manifest["fingerprint"] = manifest_fingerprint(manifest)
    atomic_write_json(out / MANIFEST, manifest)  # written last: its presence means "complete"
    return manifest
