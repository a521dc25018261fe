"""The tokenizer folder that ``proseco prep tokenizer`` writes: its layout, reader and copy.

A tokenizer folder holds two files, written atomically (temporary sibling + rename, the sidecar
last so its presence means "complete")::

    tokenizer.model   the model: a sentencepiece ModelProto (kind ``sentencepiece``), or a
                      Hugging Face ``tokenizers`` JSON (kind ``hf-tokenizers``, docs/huggingface.md)
    tokenizer.json    the sidecar: format, kind, sha256 of the model file, vocab_size, special ids, ...

The two kinds share one interface (:class:`Tokenizer`); prep, the loader, sampling, evaluation
and exports use only it.
The special ids are read from the sidecar, never hard-coded downstream (docs/data_format.md).
Trained models use pad=0, unk=1, bos=2, eos=3, mask=4.

Training and importing (writing a tokenizer folder) live in :mod:`data_prep.tokenizer_build`;
this module reads one (:class:`Tokenizer`) and copies it; the Hugging Face kind lives in
:mod:`data_prep.tokenizer_hf`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import ProsecoError
from pipeline.io import atomic_write

FORMAT = "proseco-tokenizer/1"
MODEL_FILE = "tokenizer.model"
SIDECAR = "tokenizer.json"
SPECIALS = ("pad", "unk", "bos", "eos", "mask")
def load_sentencepiece():
    """The sentencepiece module, or a one-line error saying how to install it."""
    try:
        import sentencepiece
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ProsecoError(
            "the sentencepiece package is needed for tokenizers: pip install 'sentencepiece==0.2.3'"
        ) from exc
    return sentencepiece


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data`` (the sidecar's ``sha256`` of the model file)."""
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ files


def sidecar_bytes(sidecar: dict) -> bytes:
    """The sidecar file's exact bytes (sorted keys, so a copy is byte-identical)."""
    return (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode()


def write_folder(out: Path, model: bytes, sidecar: dict) -> None:
    """Write a tokenizer folder: the model, then the sidecar (its presence means complete)."""
    (out / SIDECAR).unlink(missing_ok=True)  # a sidecar never describes a half-replaced model
    atomic_write(out / MODEL_FILE, model)
    atomic_write(out / SIDECAR, sidecar_bytes(sidecar))  # last: its presence means complete


# ------------------------------------------------------------------ loading


def _read_sidecar(path: Path) -> dict:
    try:
        sidecar = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ProsecoError(f"{path}: no tokenizer sidecar here (run `proseco prep tokenizer`)") from exc
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProsecoError(f"{path} is not a readable tokenizer sidecar ({exc})") from exc
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        raise ProsecoError(f"{path} is not a {FORMAT} sidecar (format={getattr(sidecar, 'get', dict)('format')!r})")
    missing = [k for k in ("model_file", "sha256", "vocab_size", "special") if k not in sidecar]
    missing += [f"special.{k}" for k in SPECIALS if k not in sidecar.get("special", {})]
    if missing:
        raise ProsecoError(f"{path}: sidecar lacks {', '.join(missing)}")
    return sidecar


class Tokenizer:
    """A loaded, verified tokenizer with the sidecar's special ids: the one interface every caller uses.

    Two implementations share it, picked by the sidecar's ``kind`` (absent: sentencepiece):
    :class:`SentencePieceTokenizer` and :class:`HFTokenizer` (a Hugging Face ``tokenizers`` model,
    e.g. GPT-2's or SmolLM2's byte-level BPE). Build one with :meth:`load` or :meth:`from_bytes`.
    Picklable: the state is the model bytes + sidecar; the backend is rebuilt on unpickling, so
    worker processes (spawn included) encode exactly like the parent.
    """

    kind = ""

    def __init__(self, model_proto: bytes, sidecar: dict) -> None:
        self._proto = bytes(model_proto)
        self.sidecar = dict(sidecar)
        self._build()

    def _build(self) -> None:
        self._load_backend()
        special = self.sidecar["special"]
        self._special = {name: int(special[name]) for name in SPECIALS}
        size = self.vocab_size
        if int(self.sidecar["vocab_size"]) != size:
            raise ProsecoError(f"tokenizer sidecar says vocab_size {self.sidecar['vocab_size']}, model has {size}")
        bad = {k: v for k, v in self._special.items() if not 0 <= v < size}
        if bad:
            raise ProsecoError(f"tokenizer special ids {bad} are outside the vocabulary (size {size})")
        self._skip = frozenset(self._special[k] for k in ("pad", "bos", "eos", "mask"))

    @staticmethod
    def from_bytes(model: bytes, sidecar: dict) -> Tokenizer:
        """The implementation the sidecar's ``kind`` names, built from the model file's bytes."""
        kind = sidecar_kind(sidecar)
        if kind == SentencePieceTokenizer.kind:
            return SentencePieceTokenizer(model, sidecar)
        if kind == HF_KIND:
            from data_prep.tokenizer_hf import HFTokenizer  # needs the tokenizers package

            return HFTokenizer(model, sidecar)
        raise ProsecoError(f"tokenizer kind {kind!r} is unknown (known: {', '.join(KINDS)})")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a tokenizer folder or its ``tokenizer.json``; verifies the model's sha256."""
        path = Path(path)
        sidecar_path = path / SIDECAR if path.is_dir() else path
        sidecar = _read_sidecar(sidecar_path)
        model_path = sidecar_path.parent / sidecar["model_file"]
        try:
            proto = model_path.read_bytes()
        except OSError as exc:
            raise ProsecoError(f"{model_path}: cannot read the tokenizer model named by {sidecar_path} ({exc})") \
                from exc
        digest = sha256_hex(proto)
        if digest != sidecar["sha256"]:
            raise ProsecoError(
                f"{model_path}: sha256 {digest[:12]} does not match {sidecar_path} ({str(sidecar['sha256'])[:12]}); "
                "the model file was replaced or corrupted"
            )
        return Tokenizer.from_bytes(proto, sidecar)

    def __getstate__(self) -> dict:
        return {"proto": self._proto, "sidecar": self.sidecar}

    def __setstate__(self, state: dict) -> None:
        self._proto, self.sidecar = state["proto"], state["sidecar"]
        self._build()

    # -- what an implementation provides
    def _load_backend(self) -> None:
        """Build the backend from ``self._proto`` (an implementation's)."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Number of ids (the largest id + 1)."""
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        raise NotImplementedError

    def _decode_ids(self, ids: list[int]) -> str:
        raise NotImplementedError

    def save_hf(self, folder: Path) -> list[str]:
        """Write this tokenizer in Hugging Face form (``AutoTokenizer.from_pretrained(folder)`` loads
        it, with the same ids and special tokens) into ``folder``; returns the file names written."""
        raise NotImplementedError

    # -- shared
    pad_id = property(lambda self: self._special["pad"], doc="The padding id (from the sidecar).")
    unk_id = property(lambda self: self._special["unk"], doc="The unknown-piece id (from the sidecar).")
    bos_id = property(lambda self: self._special["bos"], doc="The begin-of-sequence id (from the sidecar).")
    eos_id = property(lambda self: self._special["eos"], doc="The end-of-sequence id (from the sidecar).")
    mask_id = property(lambda self: self._special["mask"], doc="The mask id (a control piece; from the sidecar).")

    @property
    def sha256(self) -> str:
        return self.sidecar["sha256"]

    @property
    def special(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def model_proto(self) -> bytes:
        """The model file's bytes (a sentencepiece ModelProto, or a ``tokenizers`` JSON)."""
        return self._proto

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; never a special id (a literal "<mask>" in the text stays text)."""
        return self._encode(text)

    def encode_batch(self, texts: Iterable[str], num_threads: int = 1) -> list[list[int]]:
        """Encode many texts in one call (``num_threads`` backend threads; 1 by default)."""
        return self._encode_batch(list(texts), num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, skipping pad/bos/eos/mask (unk renders as the backend renders it)."""
        ids = [int(i) for i in ids]
        size = self.vocab_size
        for i in ids:
            if not 0 <= i < size:
                raise ValueError(f"token id {i} is outside the vocabulary (size {size})")
        return self._decode_ids([i for i in ids if i not in self._skip])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, special={self._special}, "
                f"sha256={self.sha256[:12]})")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (trained by ``prep tokenizer`` or imported from a ``.model`` file)."""

    kind = "sentencepiece"

    def _load_backend(self) -> None:
        spm = load_sentencepiece()
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def _encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int, num_threads=num_threads)

    def _decode_ids(self, ids: list[int]) -> str:
        return self._sp.decode(ids)  # unk renders as sentencepiece's ' ⁇ '

    def save_hf(self, folder: Path) -> list[str]:
        from data_prep.tokenizer_hf import save_sentencepiece_hf

        return save_sentencepiece_hf(self, folder)


def sidecar_kind(sidecar: dict) -> str:
    """The implementation a sidecar names (sidecars written before there were two: sentencepiece)."""
    return sidecar.get("kind", SentencePieceTokenizer.kind)


HF_KIND = "hf-tokenizers"
KINDS = (SentencePieceTokenizer.kind, HF_KIND)


def summary(sidecar: dict) -> str:
    """One line for the CLI: vocab, model type, special ids, what it was trained on, hash."""
    special = ",".join(f"{k}={sidecar['special'][k]}" for k in SPECIALS if k in sidecar["special"])
    trained = sidecar.get("trained_on", {})
    if "imported_from" in trained:
        origin = f"imported from {trained['imported_from']}"
        if trained.get("appended"):
            origin += f" (+{', '.join(a['piece'] for a in trained['appended'])})"
    else:
        skipped = sum(trained.get("skipped", {}).values())
        origin = f"trained on {trained.get('documents', 0)} documents ({skipped} skipped)"
    return (f"tokenizer: {sidecar.get('model_type', '?')} vocab {sidecar['vocab_size']}, {special}, "
            f"{origin}, sha256 {sidecar['sha256'][:12]}")


def copy_tokenizer(src: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Copy a verified tokenizer (model + sidecar) into ``out_dir`` (e.g. a shard folder)."""
    tok = Tokenizer.load(src)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_folder(out, tok.model_proto, tok.sidecar)
    return dict(tok.sidecar)


def __getattr__(name: str):
    """``train_tokenizer`` / ``import_tokenizer`` stay importable from here (they live in tokenizer_build)."""
    if name in ("train_tokenizer", "import_tokenizer"):
        from data_prep import tokenizer_build

        return getattr(tokenizer_build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FORMAT", "MODEL_FILE", "SIDECAR", "SentencePieceTokenizer", "Tokenizer", "copy_tokenizer", "summary"]
