"""Write a tokenizer folder (``proseco prep tokenizer``): train a sentencepiece model or import one.

The folder's layout and the reader are :mod:`data_prep.tokenizer`.

Choices (see docs/data_format.md):

* identity normalisation, ``remove_extra_whitespaces=False`` and ``byte_fallback=True`` make
  ``decode(encode(x)) == x`` for any string (no unk, whitespace kept);
* ``<mask>`` is a *control* symbol: it has id 4 but ``encode`` never produces it, so a literal
  "<mask>" in the corpus stays text and cannot inject mask ids into clean training data;
* training is deterministic: the same inputs + settings give a byte-identical model file, also
  across processes (checked for BPE and unigram with ``num_threads`` 1 and 2). The sample of at
  most ``input_sentence_size`` sentences is drawn *here* (seeded reservoir sampling, kept in
  corpus order) and sentencepiece gets ``input_sentence_size=0``: its own sampler ignores
  ``set_random_generator_seed`` in 0.2.3 (measured: one sample per process, a different one in
  the next process, whatever the seed). ``num_threads`` is part
  of the settings: the file records it in its trainer spec, and the unigram trainer's pieces and
  scores depend on it (its EM splits the work per thread); BPE pieces do not (checked 1 vs 2).
"""


from __future__ import annotations

import io
import os
import random
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from data_prep.readers import DEFAULT_INPUTS, SkipLog, expand_inputs, iter_documents
from data_prep.tokenizer import (
    FORMAT,
    MODEL_FILE,
    SIDECAR,
    SPECIALS,
    load_sentencepiece,
    sha256_hex,
    write_folder,
)
from pipeline.errors import ProsecoError

TRAINED_SPECIAL = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}
MODEL_TYPES = ("bpe", "unigram")
# Sentencepiece drops training sentences longer than max_sentence_length bytes, so documents are
# fed line by line and long lines are cut at a space into pieces of at most this many characters
# (<= 4 bytes each). Pieces never span a space, so the cut loses nothing the trainer could learn.
MAX_SENTENCE_BYTES = 16384
_CHUNK_CHARS = MAX_SENTENCE_BYTES // 4

# sentencepiece ModelProto.SentencePiece.Type values
_TYPE_CONTROL = 3
_MODEL_TYPE_NAMES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


# ------------------------------------------------------------------ tiny protobuf helpers
# The sentencepiece wheel's model_pb2 needs the protobuf package; these few lines avoid that
# dependency. Only what is used here: walk top-level fields, encode one SentencePiece message.


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) for each field of a serialized protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _piece_record(piece: str, piece_type: int, score: float = 0.0) -> bytes:
    """ModelProto field 1 (repeated SentencePiece {piece=1, score=2, type=3}) for one piece.

    Protobuf appends repeated fields in order of appearance, so adding this record to the end of
    a serialized ModelProto appends the piece after the last id.
    """

    text = piece.encode("utf-8")
    body = (b"\x0a" + _encode_varint(len(text)) + text + b"\x15" + struct.pack("<f", score)
            + b"\x18" + _encode_varint(piece_type))
    return b"\x0a" + _encode_varint(len(body)) + body


def _model_type(proto: bytes) -> str:
    for number, wire, value in _fields(proto):
        if number == 2 and wire == 2:  # trainer_spec
            for n, w, v in _fields(value):
                if n == 3 and w == 0:  # model_type
                    return _MODEL_TYPE_NAMES.get(v, f"type-{v}")
            return "unigram"  # the proto default
    return "unknown"


# ------------------------------------------------------------------ output folder


def _prepare_out(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ProsecoError(f"{out} exists and is not a folder; choose another output folder")
    existing = [name for name in (SIDECAR, MODEL_FILE) if (out / name).exists()]
    if existing and not overwrite:
        raise ProsecoError(
            f"{out} already holds a tokenizer ({', '.join(existing)}); shards may have been built with it, "
            "so it is not replaced: choose another output folder, or replace it with `--force`"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


# ------------------------------------------------------------------ training


def _training_sentences(text: str) -> Iterator[str]:
    """A document as trainer sentences: its lines, long lines cut at a space before the cap."""
    for line in text.split("\n"):
        while len(line) > _CHUNK_CHARS:
            cut = line.rfind(" ", 1, _CHUNK_CHARS)
            if cut <= 0:
                cut = _CHUNK_CHARS
            yield line[:cut]
            line = line[cut:]  # the space starts the next piece, as it would in the text
        if line.strip():
            yield line


def _reservoir(items: Iterable[str], size: int, seed: int) -> list[str]:
    """A uniform sample of ``size`` items (all if ``size`` is 0 or more than there are), seeded,
    returned in stream order. Holds at most ``size`` items (Algorithm R)."""
    if size == 0:
        return list(items)
    rng = random.Random(seed)
    kept: list[tuple[int, str]] = []
    for i, item in enumerate(items):
        if i < size:
            kept.append((i, item))
        else:
            j = rng.randrange(i + 1)
            if j < size:
                kept[j] = (i, item)
    kept.sort(key=lambda pair: pair[0])
    return [item for _, item in kept]


def _check_train_args(vocab_size, model_type, character_coverage, input_sentence_size, seed, num_threads):
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(vocab_size) or not 8 <= vocab_size <= 1 << 20:
        raise ProsecoError(f"tokenizer vocab_size must be an integer in 8..{1 << 20}, got {vocab_size!r}")
    if model_type not in MODEL_TYPES:
        raise ProsecoError(f"tokenizer model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    if isinstance(character_coverage, bool) or not isinstance(character_coverage, (int, float)) \
            or not 0.0 < character_coverage <= 1.0:
        raise ProsecoError(f"tokenizer character_coverage must be in (0, 1], got {character_coverage!r}")
    if not is_int(input_sentence_size) or input_sentence_size < 0:
        raise ProsecoError(f"tokenizer input_sentence_size must be an integer >= 0, got {input_sentence_size!r}")
    if not is_int(seed) or not 0 <= seed < 1 << 32:
        raise ProsecoError(f"tokenizer seed must be an integer in 0..2^32-1, got {seed!r}")
    if not is_int(num_threads) or num_threads < 1:
        raise ProsecoError(f"tokenizer num_threads must be an integer >= 1, got {num_threads!r}")


def train_tokenizer(
    inputs: list[str] | None,
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2_000_000,
    seed: int = 0,
    text_field: str = "text",
    doc_split: str = "paragraph",
    fmt: str = "auto",
    max_chars: int = 1_000_000,
    num_threads: int = 2,
    overwrite: bool = False,
) -> dict:
    """Train a sentencepiece model on the documents of ``inputs``; write it + sidecar to ``out_dir``.

    ``inputs``: files, globs, folders (None: the bundled corpus). At most ``input_sentence_size``
    sentences (lines) are used, a uniform sample seeded by ``seed`` (0 = use every sentence). Returns the
    sidecar dict. Raises ProsecoError for bad settings, bad paths, an existing tokenizer in
    ``out_dir`` (unless ``overwrite``), or a corpus too small for ``vocab_size``.
    """
    spm = load_sentencepiece()
    _check_train_args(vocab_size, model_type, character_coverage, input_sentence_size, seed, num_threads)
    inputs = list(DEFAULT_INPUTS if inputs is None else inputs)
    files = expand_inputs(inputs, fmt=fmt)  # raises on bad paths before any work
    out = _prepare_out(out_dir, overwrite)

    skips = SkipLog()
    counts = {"documents": 0, "sentences": 0}

    def sentences() -> Iterator[str]:
        for path in files:
            for doc in iter_documents(path, fmt=fmt, text_field=text_field, doc_split=doc_split,
                                      max_chars=max_chars, skips=skips):
                counts["documents"] += 1
                for sentence in _training_sentences(doc.text):
                    counts["sentences"] += 1
                    yield sentence

    sample = _reservoir(sentences(), input_sentence_size, seed)
    if not sample:
        raise ProsecoError(f"no usable text in {', '.join(inputs)} (skipped: {skips!r}); nothing to train on")

    settings = {
        "vocab_size": vocab_size,
        "model_type": model_type,
        "byte_fallback": bool(byte_fallback),
        "character_coverage": float(character_coverage),
        "input_sentence_size": input_sentence_size,
        "sampling": "reservoir, python random.Random(seed), corpus order",
        "seed": seed,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "split_digits": True,
        "max_sentence_length": MAX_SENTENCE_BYTES,
        "text_field": text_field,
        "doc_split": doc_split,
        "format": fmt,
        "max_chars": max_chars,
        "num_threads": num_threads,
    }
    writer = io.BytesIO()
    spm.set_random_generator_seed(seed)  # harmless; the sampling that matters is done above
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=writer,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=bool(byte_fallback),
            character_coverage=float(character_coverage),
            input_sentence_size=0,  # already sampled (deterministically) above
            shuffle_input_sentence=False,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            pad_id=TRAINED_SPECIAL["pad"],
            unk_id=TRAINED_SPECIAL["unk"],
            bos_id=TRAINED_SPECIAL["bos"],
            eos_id=TRAINED_SPECIAL["eos"],
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            control_symbols=["<mask>"],
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        if counts["documents"] == 0:
            raise ProsecoError(
                f"no usable documents in {', '.join(inputs)} (skipped: {skips!r}); nothing to train on"
            ) from exc
        raise ProsecoError(
            f"sentencepiece training failed: {exc} ({counts['documents']} documents, "
            f"{counts['sentences']} sentences; a smaller vocab_size may fit a small corpus)"
        ) from exc
    model = writer.getvalue()

    sp = spm.SentencePieceProcessor(model_proto=model)
    special = {name: _special_id(sp, name) for name in ("pad", "unk", "bos", "eos")}
    special["mask"] = sp.piece_to_id("<mask>")
    if special != TRAINED_SPECIAL:  # pragma: no cover - guards a sentencepiece behaviour change
        raise RuntimeError(f"trained tokenizer has special ids {special}, expected {TRAINED_SPECIAL}")
    sidecar = {
        "format": FORMAT,
        "model_file": MODEL_FILE,
        "sha256": sha256_hex(model),
        "vocab_size": sp.get_piece_size(),
        "special": special,
        "model_type": model_type,
        "trained_on": {
            "inputs": inputs,
            "files": [str(p) for p in files],
            "documents": counts["documents"],
            "sentences": counts["sentences"],
            "sentences_sampled": len(sample),
            "skipped": skips.as_dict(),
            "skip_examples": skips.examples,
        },
        "settings": settings,
    }
    write_folder(out, model, sidecar)
    return sidecar


def _special_id(sp, name: str) -> int:
    return {"pad": sp.pad_id, "unk": sp.unk_id, "bos": sp.bos_id, "eos": sp.eos_id}[name]()


# ------------------------------------------------------------------ import


def _free_piece_name(sp, wanted: str) -> str:
    name = wanted
    while sp.piece_to_id(name) != sp.unk_id() or name == sp.id_to_piece(sp.unk_id()):
        name = f"<{name.strip('<>')}_>"
    return name


def import_tokenizer(
    model_path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> dict:
    """Adopt an existing sentencepiece model: copy it (plus any missing special pieces) and write the sidecar.

    The pad/unk/bos/eos ids are read from the model (``sp.pad_id()`` etc., -1 = absent). A
    missing ``<mask>``, pad, bos or eos piece is appended as a new *control* piece after the last
    id (so ``vocab_size`` grows by one each; existing ids are unchanged). An existing ``<mask>``
    piece is used as is. Returns the sidecar dict.

    A ``tokenizer.json``, a transformers tokenizer folder or a ``.gguf`` file is a Hugging Face
    tokenizer instead (:func:`data_prep.tokenizer_hf.import_hf_tokenizer`).
    """
    src = Path(model_path)
    if not src.exists():
        raise ProsecoError(f"{src}: no such tokenizer model file or folder")
    from data_prep.tokenizer_hf import import_hf_tokenizer, is_hf_source

    if is_hf_source(src):
        return import_hf_tokenizer(src, _prepare_out(out_dir, overwrite))
    spm = load_sentencepiece()
    original = src.read_bytes()
    try:
        sp = spm.SentencePieceProcessor(model_proto=original)
    except (RuntimeError, OSError) as exc:
        raise ProsecoError(f"{src} is not a sentencepiece model ({exc})") from exc
    out = _prepare_out(out_dir, overwrite)

    model = original
    special = {name: _special_id(sp, name) for name in ("pad", "unk", "bos", "eos")}
    mask = sp.piece_to_id("<mask>")
    special["mask"] = mask if sp.id_to_piece(mask) == "<mask>" and mask != sp.unk_id() else -1
    defaults = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "mask": "<mask>"}
    appended = []
    next_id = sp.get_piece_size()
    for name in ("pad", "bos", "eos", "mask"):
        if special[name] < 0:
            piece = defaults[name] if name == "mask" else _free_piece_name(sp, defaults[name])
            model += _piece_record(piece, _TYPE_CONTROL)
            special[name] = next_id
            appended.append({"name": name, "piece": piece, "id": next_id})
            next_id += 1
    sp2 = spm.SentencePieceProcessor(model_proto=model)
    for item in appended:  # the appended pieces must be where the sidecar says
        if sp2.id_to_piece(item["id"]) != item["piece"] or not sp2.is_control(item["id"]):
            raise RuntimeError(f"appending {item} to {src} failed")  # pragma: no cover
    sidecar = {
        "format": FORMAT,
        "model_file": MODEL_FILE,
        "sha256": sha256_hex(model),
        "vocab_size": sp2.get_piece_size(),
        "special": {name: special[name] for name in SPECIALS},
        "model_type": _model_type(model),
        "trained_on": {"imported_from": str(src), "original_sha256": sha256_hex(original),
                       "original_vocab_size": sp.get_piece_size(), "appended": appended},
        "settings": {},
    }
    write_folder(out, model, sidecar)
    return sidecar


__all__ = ["import_tokenizer", "train_tokenizer"]
