"""``proseco prep verify``: re-check a shard folder against its ``manifest.json``.

Reads every shard: sha256, tar structure, sample keys (``p{partition:05d}-{index:010d}``,
contiguous per partition and split), dtype and length of each ``.tokens.npy``, ids inside the
vocabulary, samples and real (non-pad) tokens per shard and per split. Also checks the manifest
fingerprint, the copied tokenizer (sha256, vocab size, special ids, dtype rule) and decodes a few
samples. Nothing is trusted from the manifest that can be recounted from the bytes. A folder
without a train sample fails (``prep shards`` refuses to write one). The tars are read with
:func:`pipeline.data.format.tar_members`, the reader the training loader uses.

SFT shards (mode ``sft``, ``proseco prep sft``) hold ``seq_len + 1`` entries per sample, the prompt
length first: it must leave room for a response, every one of the ``seq_len`` positions is a real
token (responses are padded with EOS), and decoded samples show ``prompt => response``.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from data_prep import manifest as mf
from data_prep.tokenizer import Tokenizer
from pipeline.data.format import (
    FORMAT,
    MANIFEST,
    SAMPLE_MEMBER,
    SFT_MODE,
    SHARD_NAME,
    SPLITS,
    dtype_for,
    manifest_fingerprint,
    sample_key,
    sample_length,
    tar_members,
)
from pipeline.errors import ProsecoError

__all__ = ["verify", "verify_report"]


def _check_tokenizer(out: Path, manifest: dict, problems: list[str]) -> Tokenizer | None:
    try:
        tok = Tokenizer.load(out)
    except ProsecoError as exc:
        problems.append(f"tokenizer copy in {out}: {exc}")
        return None
    want = manifest.get("tokenizer", {})
    if tok.sha256 != want.get("sha256"):
        problems.append(f"tokenizer.model sha256 {tok.sha256[:12]} != manifest {str(want.get('sha256'))[:12]}")
    if tok.vocab_size != want.get("vocab_size"):
        problems.append(f"tokenizer vocab_size {tok.vocab_size} != manifest {want.get('vocab_size')}")
    if tok.special != want.get("special"):
        problems.append(f"tokenizer special ids {tok.special} != manifest {want.get('special')}")
    if manifest.get("dtype") != dtype_for(tok.vocab_size):
        problems.append(f"dtype {manifest.get('dtype')!r} breaks the rule for vocab_size {tok.vocab_size} "
                        f"(expected {dtype_for(tok.vocab_size)!r})")
    return tok


def _check_shard(out: Path, split: str, entry: dict, ctx: dict, problems: list[str]) -> list[np.ndarray]:
    """Check one shard; returns its first sample (for decoding) or []."""
    name = entry.get("name", "?")
    match = SHARD_NAME.match(name)
    if match is None or match.group(1) != split:
        problems.append(f"{name}: not a valid {split} shard name (want {split}/shard-PPPPP-SSSSSS.tar)")
        return []
    partition = int(match.group(2))
    path = out / name
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append(f"{name}: cannot read ({exc.strerror or exc})")
        return []
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        problems.append(f"{name}: sha256 does not match the manifest (corrupted or replaced)")
    samples = tokens = 0
    first: list[np.ndarray] = []
    seq_len, dtype, pad, vocab = ctx["seq_len"], ctx["dtype"], ctx["pad"], ctx["vocab"]
    try:
        for member in tar_members(data, name):
            m = SAMPLE_MEMBER.match(member.name)
            if m is None or not member.is_file:
                problems.append(f"{name}: unexpected member {member.name!r}")
                continue
            index = int(m.group(2))
            expected = ctx["next"].get((split, partition), 0)
            if int(m.group(1)) != partition or index != expected:
                problems.append(f"{name}: sample {member.name} out of order (expected key "
                                f"{sample_key(partition, expected)})")
            ctx["next"][(split, partition)] = index + 1
            raw = data[member.offset:member.offset + member.size]
            array = np.load(io.BytesIO(raw), allow_pickle=False)
            length = ctx["sample_length"]  # sft: the prompt length, then the tokens
            if array.dtype != dtype or array.shape != (length,):
                problems.append(f"{name}: {member.name} is {array.dtype}{list(array.shape)}, "
                                f"expected {dtype}[{length}]")
                continue
            ids = array[1:] if ctx["sft"] else array
            if ctx["sft"] and not 0 <= int(array[0]) < seq_len:
                problems.append(f"{name}: {member.name} has prompt length {int(array[0])}, which leaves no "
                                f"response in {seq_len} tokens")
            if vocab is not None and ids.size and int(ids.max()) >= vocab:
                problems.append(f"{name}: {member.name} holds id {int(ids.max())} >= vocab_size {vocab}")
            samples += 1
            tokens += seq_len if ctx["sft"] else int(np.count_nonzero(array != pad))
            if not first:
                first.append(array)
    except ProsecoError as exc:  # the tar itself is damaged (the message names the shard)
        problems.append(str(exc))
        return []
    except (ValueError, OSError, EOFError) as exc:
        problems.append(f"{name}: not a readable tar of .npy samples ({exc})")
        return []
    if samples != entry.get("samples") or tokens != entry.get("tokens"):
        problems.append(f"{name}: holds {samples} samples / {tokens} tokens, manifest says "
                        f"{entry.get('samples')} / {entry.get('tokens')}")
    ctx["seen"][split][0] += samples
    ctx["seen"][split][1] += tokens
    return first


def _verify(out_dir: str | os.PathLike, decode_samples: int) -> tuple[list[str], list[str], dict]:
    out = Path(out_dir)
    manifest = mf.read_json(out / MANIFEST)
    if manifest is None:
        raise ProsecoError(f"no {MANIFEST} in {out}: nothing to verify (an unfinished prep writes none); "
                           "run or finish `proseco prep shards` first")
    problems: list[str] = []
    if manifest.get("format") != FORMAT:
        problems.append(f"format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("fingerprint") != manifest_fingerprint(manifest):
        problems.append("manifest fingerprint does not match its contents (manifest edited after it was written)")
    tok = _check_tokenizer(out, manifest, problems)
    try:
        ctx = {"seq_len": int(manifest["seq_len"]), "dtype": np.dtype(manifest["dtype"]),
               "pad": int(manifest["tokenizer"]["special"]["pad"]),
               "vocab": int(manifest["tokenizer"]["vocab_size"]), "next": {}, "sft": manifest.get("mode") == SFT_MODE,
               "sample_length": sample_length(int(manifest["seq_len"]), manifest.get("mode")),
               "seen": {split: [0, 0] for split in manifest["splits"]}}
        splits = manifest["splits"]
    except (KeyError, TypeError, ValueError) as exc:
        problems.append(f"manifest lacks or mangles a required field ({exc!r})")
        return problems, [], manifest
    notes: list[str] = []
    firsts: list[tuple[str, np.ndarray]] = []
    listed = set()
    for split, table in splits.items():
        for entry in table.get("shards", []):
            listed.add(entry.get("name"))
            firsts += [(entry.get("name"), a) for a in _check_shard(out, split, entry, ctx, problems)]
        samples, tokens = ctx["seen"][split]
        shards = table.get("shards", [])
        if sum(s.get("samples", 0) for s in shards) != table.get("samples") \
                or sum(s.get("tokens", 0) for s in shards) != table.get("tokens"):
            problems.append(f"split {split}: totals {table.get('samples')} samples / {table.get('tokens')} tokens "
                            "differ from the sum over its shards")
        notes.append(f"{split}: {len(shards)} shards, {samples} samples, {tokens} real tokens recounted")
    if not ctx["seen"].get("train", [0])[0]:
        problems.append("split train holds no sample: nothing to train on (prep of an empty corpus?); "
                        "rebuild it from inputs with documents")
    for split in SPLITS:
        folder = out / split
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if f"{split}/{path.name}" not in listed:
                    problems.append(f"{split}/{path.name}: not listed in the manifest (left over from another run?)")
    if tok is not None and decode_samples > 0 and firsts:
        step = max(1, len(firsts) // decode_samples)
        for name, array in firsts[::step][:decode_samples]:
            try:
                if ctx["sft"]:
                    n = int(array[0])
                    text = f"{tok.decode(array[1:n + 1].tolist())} => {tok.decode(array[n + 1:].tolist())}"
                else:
                    text = tok.decode(array[array != ctx["pad"]].tolist())
            except Exception as exc:  # noqa: BLE001 - any decode failure is a finding, not a crash
                problems.append(f"{name}: first sample does not decode ({exc})")
                continue
            notes.append(f"{name}: {text[:100]!r}")
    return problems, notes, manifest


def verify(out_dir: str | os.PathLike, *, decode_samples: int = 3) -> list[str]:
    """Every mismatch between a shard folder and its manifest (empty list: all good).

    Raises ProsecoError only when there is no manifest to check against.
    """
    return _verify(out_dir, decode_samples)[0]


def verify_report(out_dir: str | os.PathLike, *, decode_samples: int = 3) -> tuple[str, bool]:
    """(human-readable report, ok) for the CLI: counts, decoded samples, then any problems."""
    problems, notes, manifest = _verify(out_dir, decode_samples)
    lines = [(f"verify {out_dir}: fingerprint {str(manifest.get('fingerprint'))[:12]}, "
              f"mode {manifest.get('mode')}, seq_len {manifest.get('seq_len')}, dtype {manifest.get('dtype')}")]
    lines += [f"  {note}" for note in notes]
    if problems:
        lines.append(f"FAILED: {len(problems)} problem(s):")
        lines += [f"  - {p}" for p in problems]
    else:
        lines.append("OK: every shard matches the manifest")
    return "\n".join(lines), not problems
