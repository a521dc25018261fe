"""Tokenizer: training, exact round trip, special ids, sidecar verification, import, pickling."""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing as mp
import pickle
from concurrent.futures import ProcessPoolExecutor

import pytest

spm = pytest.importorskip("sentencepiece")

from data_prep.readers import DEFAULT_CORPUS
from data_prep.tokenizer import Tokenizer, copy_tokenizer, import_tokenizer, summary, train_tokenizer
from pipeline.errors import ProsecoError

VOCAB = 512
SAMPLES = [
    "Call me Ishmael.",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\nnew lines\n\nand  double  spaces",
    "Ünïcödé — “quotes”, 😀 emoji, 中文, العربية, numbers 1234567890",
    "a literal <mask> and <s> stay text",
    "",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~200 KB of text in paragraphs, taken from the bundled corpus (plus a bad-UTF-8 file)."""
    root = tmp_path_factory.mktemp("corpus")
    text = gzip.decompress((DEFAULT_CORPUS / "moby-dick.txt.gz").read_bytes()).decode()
    (root / "a.txt").write_text(text[:200_000])
    (root / "b.txt").write_bytes(b"fine line\n\nbroken \xff line\n")
    return root


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    sidecar = train_tokenizer([str(corpus)], out, vocab_size=VOCAB, num_threads=1)
    return out, sidecar


def test_sidecar_and_special_ids(trained):
    out, sidecar = trained
    on_disk = json.loads((out / "tokenizer.json").read_text())
    assert on_disk == sidecar
    assert sidecar["format"] == "proseco-tokenizer/1" and sidecar["model_file"] == "tokenizer.model"
    assert sidecar["vocab_size"] == VOCAB and sidecar["model_type"] == "bpe"
    assert sidecar["special"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}
    assert sidecar["trained_on"]["documents"] > 100 and sidecar["trained_on"]["skipped"]["not_utf8"] == 1
    tok = Tokenizer.load(out)
    assert (tok.vocab_size, tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (VOCAB, 0, 1, 2, 3, 4)
    assert tok.sha256 == sidecar["sha256"]
    assert "vocab 512" in summary(sidecar)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_exact_round_trip(trained):
    tok = Tokenizer.load(trained[0] / "tokenizer.json")
    for text in SAMPLES:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert not set(ids) & {0, 2, 3, 4}  # encode never emits pad/bos/eos/mask
    batch = tok.encode_batch(SAMPLES)
    assert batch == [tok.encode(t) for t in SAMPLES]
    ids = tok.encode("whale")
    assert tok.decode([tok.bos_id, *ids, tok.mask_id, tok.eos_id, tok.pad_id, tok.pad_id]) == "whale"
    with pytest.raises(ValueError):
        tok.decode([VOCAB])


def test_tampered_model_is_rejected(trained, tmp_path):
    out, _ = trained
    for name in ("tokenizer.model", "tokenizer.json"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    Tokenizer.load(tmp_path)
    model = bytearray((tmp_path / "tokenizer.model").read_bytes())
    model[-1] ^= 1
    (tmp_path / "tokenizer.model").write_bytes(bytes(model))
    with pytest.raises(ProsecoError, match="sha256"):
        Tokenizer.load(tmp_path)
    with pytest.raises(ProsecoError, match="sidecar"):
        Tokenizer.load(tmp_path / "elsewhere")


def test_training_is_deterministic(trained, corpus, tmp_path):
    out, sidecar = trained
    again = train_tokenizer([str(corpus)], tmp_path / "same", vocab_size=VOCAB, num_threads=1)
    assert (tmp_path / "same" / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()
    assert again == sidecar
    # two threads: byte-identical across runs; the same pieces as one thread (only the recorded
    # trainer setting num_threads differs in the file)
    two = [train_tokenizer([str(corpus)], tmp_path / f"t{i}", vocab_size=VOCAB, num_threads=2) for i in (0, 1)]
    assert two[0]["sha256"] == two[1]["sha256"]
    a, b = Tokenizer.load(tmp_path / "t0"), Tokenizer.load(out)
    assert [a._sp.id_to_piece(i) for i in range(VOCAB)] == [b._sp.id_to_piece(i) for i in range(VOCAB)]


def test_copy_tokenizer(trained, tmp_path):
    out, sidecar = trained
    assert copy_tokenizer(out, tmp_path / "shards") == sidecar
    assert Tokenizer.load(tmp_path / "shards").sha256 == sidecar["sha256"]


def test_refuses_to_overwrite_and_bad_settings(trained, corpus, tmp_path):
    out, _ = trained
    with pytest.raises(ProsecoError, match="already holds a tokenizer"):
        train_tokenizer([str(corpus)], out, vocab_size=VOCAB)
    with pytest.raises(ProsecoError, match="does not exist"):
        train_tokenizer([str(tmp_path / "missing.txt")], tmp_path / "t")
    with pytest.raises(ProsecoError, match="model_type"):
        train_tokenizer([str(corpus)], tmp_path / "t", model_type="wordpiece")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words\n")
    with pytest.raises(ProsecoError, match="vocab_size"):
        train_tokenizer([str(tiny)], tmp_path / "t2", vocab_size=5000, byte_fallback=False)


def _train_plain_model(corpus, **kw) -> bytes:
    """A sentencepiece model as made elsewhere: default ids (unk=0, bos=1, eos=2, no pad), no <mask>."""
    writer = io.BytesIO()
    lines = (corpus / "a.txt").read_text().split("\n")
    spm.SentencePieceTrainer.train(sentence_iterator=iter([x for x in lines if x.strip()]), model_writer=writer,
                                   vocab_size=300, model_type="bpe", minloglevel=2, num_threads=1, **kw)
    return writer.getvalue()


def test_import_appends_mask_and_pad(corpus, tmp_path):
    src = tmp_path / "other.model"
    src.write_bytes(_train_plain_model(corpus))
    sidecar = import_tokenizer(src, tmp_path / "imp")
    assert sidecar["special"] == {"pad": 300, "unk": 0, "bos": 1, "eos": 2, "mask": 301}
    assert sidecar["vocab_size"] == 302 and sidecar["model_type"] == "bpe"
    assert [a["piece"] for a in sidecar["trained_on"]["appended"]] == ["<pad>", "<mask>"]
    tok = Tokenizer.load(tmp_path / "imp")
    original = spm.SentencePieceProcessor(model_proto=src.read_bytes())
    text = "Call me Ishmael, said the whale."
    assert tok.encode(text) == original.encode(text)  # existing ids unchanged
    assert tok.decode([tok.mask_id, *tok.encode(text), tok.pad_id]) == text
    assert tok.mask_id == tok.vocab_size - 1 and "imported" in summary(sidecar)


def test_import_keeps_existing_mask(corpus, tmp_path):
    src = tmp_path / "with_mask.model"
    src.write_bytes(_train_plain_model(corpus, pad_id=3, user_defined_symbols=["<mask>"]))
    sidecar = import_tokenizer(src, tmp_path / "imp")
    assert sidecar["special"] == {"pad": 3, "unk": 0, "bos": 1, "eos": 2, "mask": 4}
    assert sidecar["vocab_size"] == 300 and sidecar["trained_on"]["appended"] == []


def test_pickles_into_spawn_worker(trained):
    tok = Tokenizer.load(trained[0])
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(SAMPLES[3]) == tok.encode(SAMPLES[3]) and clone.special == tok.special
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        remote = list(pool.map(Tokenizer.encode, [tok] * len(SAMPLES), SAMPLES))
    assert remote == [tok.encode(t) for t in SAMPLES]


def _train_sha(corpus, out, seed) -> str:
    """Module level, so a spawn worker can run it."""
    return train_tokenizer([str(corpus)], out, vocab_size=VOCAB, input_sentence_size=200, seed=seed,
                           num_threads=1)["sha256"]


def test_sentence_sampling_is_seeded_across_processes(corpus, tmp_path):
    # sentencepiece's own sampler ignores its seed and differs per process; ours must not.
    here = _train_sha(corpus, tmp_path / "a", 0)
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        there = pool.submit(_train_sha, corpus, tmp_path / "b", 0).result()
    assert here == there != _train_sha(corpus, tmp_path / "c", 1)
    sidecar = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    assert sidecar["trained_on"]["sentences_sampled"] == 200 < sidecar["trained_on"]["sentences"]
