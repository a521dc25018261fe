"""Hugging Face tokenizers in the pipeline: the ``hf-tokenizers`` kind of :class:`data_prep.tokenizer.Tokenizer`,
its import (``proseco prep tokenizer --import``) and the Hugging Face form of both kinds (exports).

``--import`` accepts, besides a sentencepiece ``.model`` file:

* a ``tokenizer.json`` written by the ``tokenizers`` library;
* a transformers tokenizer folder (``tokenizer.json``, or GPT-2's ``vocab.json`` + ``merges.txt``
  with the model's ``config.json``; the special tokens it declares are used);
* a ``.gguf`` model file: the tokenizer stored in its metadata (transformers converts it).

A special token that is not declared is recognised by its usual spelling (:data:`KNOWN_NAMES`,
e.g. GPT-2's ``<|endoftext|>`` is bos, eos and unk). The imported model keeps every id; a missing
pad, unk, bos, eos or mask token is appended as a new *special* token after the last id (so ``vocab_size`` grows by one each). A pad that is also
the bos, eos or mask token counts as missing: padding must be told apart from text. Encoding
never produces a special id from text (``encode_special_tokens``): a literal "<mask>" or
"<|endoftext|>" in the corpus stays text, as with the sentencepiece kind.
"""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stderr
from pathlib import Path

from data_prep.tokenizer import (
    FORMAT,
    HF_KIND,
    MODEL_FILE,
    SIDECAR,
    SPECIALS,
    Tokenizer,
    sha256_hex,
    write_folder,
)
from pipeline.errors import ProsecoError

# usual spellings of the special tokens in a bare tokenizer.json (first match wins)
KNOWN_NAMES = {
    "pad": ("<pad>", "<|pad|>", "[PAD]", "<|padding|>"),
    "unk": ("<unk>", "<|unk|>", "[UNK]", "<|endoftext|>"),
    "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>", "[CLS]"),
    "eos": ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
    "mask": ("<mask>", "<|mask|>", "[MASK]"),
}
APPENDED_NAMES = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "mask": "<mask>"}


def load_tokenizers():
    """The ``tokenizers`` module, or a one-line error saying how to install it."""
    try:
        import tokenizers
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ProsecoError("Hugging Face tokenizers need the tokenizers package: pip install 'tokenizers==0.23.3'") \
            from exc
    return tokenizers


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` model (byte-level BPE such as GPT-2's or SmolLM2's, or any other)."""

    kind = HF_KIND

    def _load_backend(self) -> None:
        tokenizers = load_tokenizers()
        try:
            self._hf = tokenizers.Tokenizer.from_str(self._proto.decode("utf-8"))
        except Exception as exc:  # tokenizers raises its own exception types
            raise ProsecoError(f"the tokenizer model is not a tokenizers JSON ({exc})") from exc
        self._hf.encode_special_tokens = True  # text never turns into special ids
        self._size = max(self._hf.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def vocab_size(self) -> int:
        return self._size

    def _encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        if num_threads <= 1:  # the batch call runs on every core; one thread means one
            return [self._encode(t) for t in texts]
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def _decode_ids(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=False)

    def save_hf(self, folder: Path) -> list[str]:
        return _save_fast(self._hf, self, folder)


def _save_fast(backend, tok: Tokenizer, folder: Path) -> list[str]:
    """``backend`` (a tokenizers.Tokenizer) as a transformers fast tokenizer folder with ``tok``'s specials."""
    import transformers

    names = {name: backend.id_to_token(tok.special[name]) for name in SPECIALS}
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=names["bos"], eos_token=names["eos"], unk_token=names["unk"],
        pad_token=names["pad"], mask_token=names["mask"])
    folder = Path(folder)
    before = set(os.listdir(folder)) if folder.is_dir() else set()
    fast.save_pretrained(str(folder))
    return sorted(set(os.listdir(folder)) - before)


def save_sentencepiece_hf(tok: Tokenizer, folder: Path) -> list[str]:
    """A sentencepiece tokenizer in Hugging Face form: transformers' generic converter rebuilds the
    model from its own settings (BPE merges ranked by piece score, byte fallback, dummy prefix,
    whitespace kept) as a ``tokenizers`` model; the control pieces (pad, bos, eos, mask) become
    special tokens. Ids are unchanged."""
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    tokenizers = load_tokenizers()
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(tok.model_proto)
    if proto.trainer_spec.model_type == 1:  # unigram
        vocab = [(p.piece, p.score) for p in proto.pieces]
    else:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if backend is None:  # pragma: no cover - only BPE and unigram models are written by prep
        raise ProsecoError(f"transformers cannot convert this sentencepiece model ({proto.trainer_spec.model_type})")
    backend.add_special_tokens([tokenizers.AddedToken(p.piece, special=True, normalized=False)
                                for p in proto.pieces if p.type == 3])  # control pieces
    return _save_fast(backend, tok, folder)


# ------------------------------------------------------------------ import


def is_hf_source(path: Path) -> bool:
    """Whether ``--import PATH`` names a Hugging Face tokenizer (folder, tokenizer.json, .gguf)."""
    return path.is_dir() or path.suffix.lower() in (".json", ".gguf")


def _refuse_prepared(path: Path) -> None:
    """A one-line error when ``path`` is the sidecar of an already prepared tokenizer folder."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise ProsecoError(f"{path} is not a readable JSON file ({exc})") from exc
    if isinstance(data, dict) and data.get("format") == FORMAT:
        raise ProsecoError(f"{path} belongs to a tokenizer prepared by proseco already, not a Hugging Face "
                           "tokenizer: use its folder as prep.tokenizer_dir directly")


def _read_source(src: Path):
    """(tokenizers.Tokenizer, {special name: token string or None}) of an import source."""
    if src.is_dir() or src.suffix.lower() == ".json":
        _refuse_prepared(src / SIDECAR if src.is_dir() else src)
    if src.suffix.lower() == ".json" and src.is_file():
        tokenizers = load_tokenizers()
        try:
            backend = tokenizers.Tokenizer.from_file(str(src))
        except Exception as exc:
            raise ProsecoError(f"{src} is not a Hugging Face tokenizers file ({exc})") from exc
        return backend, _known_specials(backend, dict.fromkeys(SPECIALS))
    import transformers

    # no remote code: a folder whose config.json names custom modelling code (a proseco HF export,
    # LLaDA) still has a plain tokenizer, and transformers would otherwise stop to ask
    where = {"gguf_file": src.name} if src.is_file() else {}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with redirect_stderr(io.StringIO()):
            fast = transformers.AutoTokenizer.from_pretrained(str(src.parent if src.is_file() else src),
                                                              local_files_only=True, trust_remote_code=False,
                                                              **where)
    except Exception as exc:  # transformers raises many types for foreign folders / files
        raise ProsecoError(f"{src}: transformers cannot load a tokenizer from it ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    backend = getattr(fast, "backend_tokenizer", None)
    if backend is None:
        raise ProsecoError(f"{src}: its tokenizer ({type(fast).__name__}) is not backed by the tokenizers library")
    declared = {name: getattr(fast, f"{name}_token", None) for name in SPECIALS}
    declared = {k: (str(v) if v is not None else None) for k, v in declared.items()}
    return backend, _known_specials(backend, declared)


def _known_specials(backend, declared: dict) -> dict:
    """``declared`` with each missing special token found by its usual spelling in the vocabulary."""
    vocab = backend.get_vocab(with_added_tokens=True)
    return {name: declared.get(name) or next((n for n in KNOWN_NAMES[name] if n in vocab), None)
            for name in SPECIALS}


def _free_name(vocab: dict, wanted: str) -> str:
    name = wanted
    while name in vocab:
        name = f"<{name.strip('<>')}_>"
    return name


def resolve_specials(backend, declared: dict) -> tuple[dict, list[dict]]:
    """(special ids, appended tokens): the declared special tokens that exist, each missing one
    (and a pad shared with bos/eos/mask) appended to ``backend`` as a new special token."""
    tokenizers = load_tokenizers()
    vocab = backend.get_vocab(with_added_tokens=True)
    special = {name: vocab.get(declared.get(name)) if declared.get(name) else None for name in SPECIALS}
    if special["mask"] is not None and special["mask"] in (special["bos"], special["eos"]):
        special["mask"] = None
    if special["pad"] is not None and special["pad"] in (special["bos"], special["eos"], special["mask"]):
        special["pad"] = None
    appended = []
    for name in ("pad", "unk", "bos", "eos", "mask"):
        if special[name] is None:
            piece = _free_name(vocab, APPENDED_NAMES[name])
            backend.add_special_tokens([tokenizers.AddedToken(piece, special=True, normalized=False)])
            vocab = backend.get_vocab(with_added_tokens=True)
            special[name] = vocab[piece]
            appended.append({"name": name, "piece": piece, "id": special[name]})
    return special, appended


def import_hf_tokenizer(src: Path, out: Path) -> dict:
    """Adopt a Hugging Face tokenizer (``tokenizer.json``, transformers folder or ``.gguf``) into the
    prepared folder ``out``: every id kept, missing specials appended. Returns the sidecar."""
    backend, declared = _read_source(src)
    original_size = _size(backend)
    special, appended = resolve_specials(backend, declared)
    if any(item["id"] < original_size for item in appended):  # pragma: no cover - a tokenizers behaviour change
        raise RuntimeError(f"appended special tokens {appended} did not go after the last id {original_size - 1}")
    return _write_prepared(backend, special, out, {"imported_from": str(src), "original_vocab_size": original_size,
                                                   "appended": appended, "declared": declared})


def _size(backend) -> int:
    """Number of ids of a ``tokenizers`` model (its largest id + 1, added tokens included)."""
    return max(backend.get_vocab(with_added_tokens=True).values()) + 1


def _write_prepared(backend, special: dict, out: Path, trained_on: dict) -> dict:
    """Write ``backend`` with the five ``special`` ids as a prepared ``hf-tokenizers`` folder in
    ``out`` (checked to load as written); returns the sidecar."""
    model = backend.to_str().encode("utf-8")
    sidecar = {
        "format": FORMAT, "kind": HF_KIND, "model_file": MODEL_FILE, "sha256": sha256_hex(model),
        "vocab_size": _size(backend), "special": {name: int(special[name]) for name in SPECIALS},
        "model_type": str(json.loads(model)["model"].get("type", "?")).lower(),
        "trained_on": trained_on, "settings": {},
    }
    Tokenizer.from_bytes(model, sidecar)  # it loads as written (ids in range, sizes agree)
    write_folder(Path(out), model, sidecar)
    return sidecar


def write_model_tokenizer(fast, vocab_size: int, special: dict, out: Path, source: str) -> dict:
    """The tokenizer of a Hugging Face backbone (``model.init=hf:...``) as a prepared folder in
    ``out`` whose ids are the *model's*: every id of the transformers tokenizer ``fast`` kept, and
    the ids the model has beyond it (an autoregressive model's appended mask row, a diffusion
    model's padded embedding table) added as special tokens, the mask one named ``<mask>``. So
    sampling, evaluation and ``decode`` read every id the model can emit (an unused one renders
    as its ``<|unused_N|>`` name, visibly). ``special``: the five special ids (the data's: an SFT
    pad is the EOS, LLaDA's recipe). Returns the sidecar."""
    tokenizers = load_tokenizers()
    backend = tokenizers.Tokenizer.from_str(fast.backend_tokenizer.to_str())
    vocab = backend.get_vocab(with_added_tokens=True)
    original = _size(backend)
    if original > vocab_size:
        raise ProsecoError(f"the tokenizer of {source} has {original} ids, more than the model's {vocab_size}")
    appended = []
    while len(appended) < vocab_size - original:
        want = original + len(appended)
        piece = _free_name(vocab, "<mask>" if want == special["mask"] else f"<|unused_{want}|>")
        backend.add_special_tokens([tokenizers.AddedToken(piece, special=True, normalized=False)])
        vocab = backend.get_vocab(with_added_tokens=True)
        if vocab.get(piece) != want:  # pragma: no cover - a tokenizers behaviour change
            raise RuntimeError(f"appending {piece!r} gave id {vocab.get(piece)}, not {want}")
        appended.append({"piece": piece, "id": want})
    return _write_prepared(backend, special, out, {"model": source, "original_vocab_size": original,
                                                   "appended": appended[:8], "appended_count": len(appended)})


__all__ = ["HFTokenizer", "import_hf_tokenizer", "is_hf_source", "save_sentencepiece_hf", "write_model_tokenizer"]
