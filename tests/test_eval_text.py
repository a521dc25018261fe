"""Text evaluation task: unigram entropy / distinct-n, reference-LM perplexity, the Task end to end.

The reference LM here is a tiny randomly initialised GPT-2 with a byte-level BPE tokenizer built
offline and saved to a tmp folder (so the local-folder loader is tested too). The real SmolLM2
default is exercised by one ``slow`` test.
"""

from __future__ import annotations

import gzip
import math
import random
import time

import pytest
import torch

pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from data_prep.readers import DEFAULT_CORPUS
from data_prep.tokenizer import Tokenizer, train_tokenizer
from pipeline.config import Config
from pipeline.errors import ProsecoError
from pipeline.tasks import ModelInfo, task_class
from pipeline.tasks.reference_lm import load_reference_lm
from pipeline.tasks.text import Task, distinct_n, unigram_entropy

TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat sat still",
    "x",
    "",
    "the whale, the sea, and a long voyage north",
    "to be or not to be",
]


# ------------------------------------------------------------------ pure metrics


def test_unigram_entropy_exact():
    assert unigram_entropy([]) == 0.0
    assert unigram_entropy([7, 7, 7, 7]) == 0.0
    assert unigram_entropy([1, 2]) == pytest.approx(math.log(2), abs=1e-12)
    # p = (1/2, 1/4, 1/4): H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2
    assert unigram_entropy([5, 5, 9, 3]) == pytest.approx(1.5 * math.log(2), abs=1e-12)
    assert unigram_entropy(torch.tensor([0, 1, 2, 3])) == pytest.approx(math.log(4), abs=1e-12)


def test_distinct_n_exact():
    rows = [[1, 2, 3], [1, 2, 4]]
    assert distinct_n(rows, 1) == 4 / 6
    assert distinct_n(rows, 2) == 3 / 4  # (1,2) twice, (2,3), (2,4)
    assert distinct_n(rows, 3) == 1.0
    assert distinct_n(rows, 4) == 0.0  # no sequence is long enough
    assert distinct_n([[1, 2], [3, 4]], 2) == 1.0  # (2,3) spans two samples: not an n-gram
    assert distinct_n(torch.tensor(rows), 2) == 3 / 4
    assert distinct_n([1, 1, 1, 1], 2) == 1 / 3  # a flat sequence counts as one sample
    assert distinct_n(torch.tensor([1, 1, 1, 1]), 1) == 1 / 4
    with pytest.raises(ValueError):
        distinct_n(rows, 0)


# ------------------------------------------------------------------ tiny reference LM


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A tiny GPT-2 (2 layers, width 32, 64 positions) + byte-level BPE tokenizer, saved as an HF folder."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = HFTokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([t for t in TEXTS if t] * 10, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", unk_token="<unk>")
    folder = tmp_path_factory.mktemp("tiny_lm")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=bpe.get_vocab_size(),
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    return load_reference_lm(str(tiny_lm_dir))


def _hand_nll(ref, text: str, limit: int | None = None) -> tuple[float, int]:
    """Summed NLL and predicted-token count of one text: one unpadded forward + log_softmax."""
    ids = [ref.bos_id] + list(ref.tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = ids[:limit] if limit else ids
    if len(ids) < 2:
        return 0.0, 0
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(ref.model(x).logits[0, :-1].double(), dim=-1)
    return float(-logp.gather(1, x[0, 1:, None]).sum()), len(ids) - 1


def test_local_folder_loads(tiny_lm):
    assert tiny_lm.bos_id == 0 and tiny_lm.context_length == 64
    assert not tiny_lm.model.training and next(tiny_lm.model.parameters()).dtype == torch.float32
    assert tiny_lm.encode("the cat")[0] == 0


def test_batched_perplexity_equals_hand_loop(tiny_lm):
    hand = [_hand_nll(tiny_lm, t) for t in TEXTS]
    total, count = sum(s for s, _ in hand), sum(n for _, n in hand)
    assert hand[3] == (0.0, 0)  # the empty text: BOS only, nothing predicted
    for batch_size in (1, 2, 4, 16):
        out = tiny_lm.perplexity(TEXTS, batch_size=batch_size)
        assert out["ref_tokens"] == count and out["ref_truncated"] == 0
        assert out["gen_nll"] == pytest.approx(total / count, rel=1e-5, abs=1e-6)
        assert out["gen_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
        per_text = tiny_lm.token_nlls(TEXTS, batch_size=batch_size)
        for (s, n), (hs, hn) in zip(per_text, hand):
            assert n == hn and s == pytest.approx(hs, rel=1e-5, abs=1e-5)
    # the vocabulary-uniform baseline: a random tiny model is near log(V) per token
    assert abs(tiny_lm.perplexity(TEXTS)["gen_nll"] - math.log(tiny_lm.model.config.vocab_size)) < 1.0


def test_truncation_to_context_and_max_length(tiny_lm):
    long = " ".join(TEXTS[:2] * 10)
    assert len(tiny_lm.encode(long)) > 64
    out = tiny_lm.perplexity([long, TEXTS[0]], batch_size=2)
    assert out["ref_truncated"] == 1 and out["ref_tokens"] == 63 + len(tiny_lm.encode(TEXTS[0])) - 1
    hand = [_hand_nll(tiny_lm, long, 64), _hand_nll(tiny_lm, TEXTS[0])]
    assert out["gen_nll"] == pytest.approx(sum(s for s, _ in hand) / sum(n for _, n in hand), rel=1e-5)
    short = tiny_lm.perplexity([long, TEXTS[0]], max_length=5)
    assert short["ref_truncated"] == 2 and short["ref_tokens"] == 8
    assert math.isnan(tiny_lm.perplexity([""])["gen_ppl"])


def test_bad_specs_give_one_line_errors(tmp_path):
    cases = [(str(tmp_path / "nope"), "no such file or folder"), (str(tmp_path), "no config.json")]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    cases.append((str(tmp_path / "broken"), "did not load"))
    for spec, reason in cases:
        with pytest.raises(ProsecoError) as info:
            load_reference_lm(spec)
        message = str(info.value)
        assert "\n" not in message and spec in message and reason in message, message


# ------------------------------------------------------------------ the Task


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    text = gzip.decompress((DEFAULT_CORPUS / "moby-dick.txt.gz").read_bytes()).decode()
    (corpus / "a.txt").write_text(text[:60_000])
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([str(corpus)], out, vocab_size=400, num_threads=1)
    return Tokenizer.load(out)


def _rows(tok, texts, length=24):
    rows = []
    for text in texts:
        ids = [tok.bos_id, *tok.encode(text), tok.eos_id][:length]
        rows.append(ids + [tok.pad_id] * (length - len(ids)))
    return torch.tensor(rows)


def test_task_end_to_end_without_reference(sp_tokenizer):
    tok = sp_tokenizer
    assert task_class("text") is Task
    info = ModelInfo(vocab_size=tok.vocab_size, mask_id=tok.mask_id, seq_len=24, tokenizer=tok)
    task = Task(Config(), {"reference": "none", "distinct_n": [1, 2]}, info)
    assert (task.primary, task.higher_is_better, task.diversity) == ("gen_ppl", False, "unigram_entropy")
    texts = ["Call me Ishmael.", "the sea, the sea", "whale"]
    tokens = _rows(tok, texts)
    tokens[2, 3] = tok.mask_id  # a mask left behind in the last sample
    decoded = task.decode(tokens)
    assert decoded[:2] == texts[:2] and "<mask>" in decoded[2]
    out = task.score(tokens, None)
    assert out["mask_left"] == 1 and out["out_of_vocab"] == 0 and math.isnan(out["gen_ppl"])
    real = [[int(i) for i in row if i != tok.pad_id] for row in tokens]
    assert out["unigram_entropy"] == pytest.approx(sum(unigram_entropy(r) for r in real) / 3, abs=1e-12)
    assert out["distinct_1"] == distinct_n(real, 1) and out["distinct_2"] == distinct_n(real, 2)
    assert "distinct_3" not in out
    assert out["mean_chars"] == pytest.approx(sum(len(t) for t in decoded) / 3)
    assert all(isinstance(v, float) for v in out.values())


def test_task_with_reference_lm(sp_tokenizer, tiny_lm_dir, tiny_lm):
    tok = sp_tokenizer
    info = ModelInfo(vocab_size=tok.vocab_size, mask_id=tok.mask_id, seq_len=24, tokenizer=tok)
    task = Task(Config(), {"reference": str(tiny_lm_dir), "batch_size": 2}, info)
    tokens = _rows(tok, ["Call me Ishmael.", "the sea, the sea", "whale"])
    out = task.score(tokens, None)
    expected = tiny_lm.perplexity(task.decode(tokens))
    assert out["gen_ppl"] == pytest.approx(expected["gen_ppl"], rel=1e-5)
    assert out["ref_tokens"] == expected["ref_tokens"]
    assert {"distinct_1", "distinct_2", "distinct_3", "unigram_entropy", "mean_chars"} <= set(out)
    assert task.reference_lm() is task.reference_lm()  # loaded once


def test_task_errors(sp_tokenizer, tmp_path):
    tok = sp_tokenizer
    info = ModelInfo(vocab_size=tok.vocab_size, mask_id=tok.mask_id, seq_len=24, tokenizer=tok)
    with pytest.raises(ProsecoError, match="task text needs a model trained on text shards"):
        Task(Config(), {}, ModelInfo(vocab_size=6, mask_id=5, seq_len=16))
    with pytest.raises(ProsecoError, match="unknown option"):
        Task(Config(), {"reference": "none", "refrence": "x"}, info)
    with pytest.raises(ProsecoError, match="no such file or folder"):  # checked before any sampling
        Task(Config(), {"reference": str(tmp_path / "missing")}, info)
    with pytest.raises(ProsecoError, match="batch_size"):
        Task(Config(), {"reference": "none", "batch_size": 0}, info)
    with pytest.raises(ProsecoError, match="needs a reference LM"):
        Task(Config(), {"reference": "none", "mauve_reference": str(tmp_path / "f.npy")}, info)


def test_task_mauve(sp_tokenizer, tiny_lm_dir, tiny_lm, tmp_path):
    pytest.importorskip("mauve")
    np = pytest.importorskip("numpy")
    tok = sp_tokenizer
    rng = random.Random(0)
    words = ["the", "sea", "whale", "ship", "call", "me", "captain", "white", "long", "voyage", "north"]
    human = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(20)]
    np.save(tmp_path / "ref.npy", tiny_lm.features(human).numpy())
    info = ModelInfo(vocab_size=tok.vocab_size, mask_id=tok.mask_id, seq_len=24, tokenizer=tok)
    task = Task(Config(), {"reference": str(tiny_lm_dir), "mauve_reference": str(tmp_path / "ref.npy")}, info)
    out = task.score(_rows(tok, human), None)
    assert 0.0 < out["mauve"] <= 1.0
    np.save(tmp_path / "bad.npy", np.zeros((4, 3), dtype=np.float32))
    task = Task(Config(), {"reference": str(tiny_lm_dir), "mauve_reference": str(tmp_path / "bad.npy")}, info)
    with pytest.raises(ProsecoError, match="same reference LM"):
        task.score(_rows(tok, human[:3]), None)


# ------------------------------------------------------------------ the real default


@pytest.mark.slow
def test_smollm2_prefers_english_to_shuffled():
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    start = time.perf_counter()
    try:
        ref = load_reference_lm("smollm2")
    except ProsecoError as exc:
        if "pip install" in str(exc):
            pytest.skip(str(exc))
        raise
    loaded = time.perf_counter()
    sentence = ("The history of the city dates back to the Roman period, when a small settlement was founded "
                "on the banks of the river.")
    words = sentence.split()
    random.Random(0).shuffle(words)
    good = ref.perplexity([sentence])["gen_ppl"]
    bad = ref.perplexity([" ".join(words)])["gen_ppl"]
    scored = time.perf_counter()
    print(f"smollm2: load {loaded - start:.1f}s, score {scored - loaded:.1f}s, ppl {good:.1f} vs shuffled {bad:.1f}")
    assert good < bad / 5 and good < 50
