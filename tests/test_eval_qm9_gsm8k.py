"""Evaluation tasks qm9 (RDKit molecule metrics) and gsm8k (prompted exact match), end to end with
a fake ModelInfo and tiny sentencepiece tokenizers trained here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentencepiece")

from data_prep.tokenizer import Tokenizer, train_tokenizer
from pipeline.config import Config
from pipeline.errors import ProsecoError
from pipeline.tasks import ModelInfo, task_class
from pipeline.tasks.gsm8k import answers_match, extract_answer, load_problems

GSM8K_SAMPLE = Path(__file__).parent / "data" / "gsm8k_sample.jsonl"
SMILES = ["C", "N", "O", "C#C", "C#N", "C=O", "CC", "CO", "CC#C", "CC#N", "CC=O", "NC=O", "CCC", "CCO",
          "COC", "C1CC1", "C1CO1", "CC(C)=O", "CC(N)=O", "NC(N)=O", "C1=CC=CC=C1", "OC1=CC=CC=C1",
          "CC(C)(C)O", "O=C1CC2CC(O2)C1=O", "OC1CC1OC1COC1", "[NH3+]CC([O-])=O", "FC(F)F", "CN1CCCC1"]


# ------------------------------------------------------------------ gsm8k: pure functions


@pytest.mark.parametrize("text, expected", [
    ("so 1000 + 234 = 1234\n#### 1,234", "1234"),
    ("#### $1,234.50", "1234.50"),
    ("#### -7 apples", "-7"),
    ("first #### 3\nthen #### 5\nmore text 9", "5"),
    ("the answer is 42.", "42"),
    ("It costs $1,290 in total.", "1290"),
    ("from 3-4 hours", "4"),
    ("12.5 and then 7", "7"),
    ("#### nothing here, but 8 earlier? no: 11", "11"),
    ("no number at all", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_answers_match():
    assert answers_match("18", "18") and answers_match("18.0", "18") and answers_match("1234.50", "1234.5")
    assert not answers_match("17", "18") and not answers_match(None, "18") and not answers_match("18", None)


def test_load_problems(tmp_path):
    problems = load_problems(GSM8K_SAMPLE)
    assert [p["gold"] for p in problems] == ["18", "1290", "125", "189", "34"]
    bad = tmp_path / "bad.jsonl"
    for text, needle in [('{"question": "q"}\n', "needs string fields"), ("not json\n", ":1: not a JSON"),
                         ('{"question": "q", "answer": "none"}\n', "no final number"), ("\n", "no problems")]:
        bad.write_text(text)
        with pytest.raises(ProsecoError, match=needle):
            load_problems(bad)


# ------------------------------------------------------------------ gsm8k: the task


@pytest.fixture(scope="module")
def gsm_tok(tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("gsm")
    texts = [f"Question: {p['question']}\nAnswer: {p['answer']}" for p in load_problems(GSM8K_SAMPLE)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train_tokenizer([str(root / "corpus.jsonl")], root / "tok", vocab_size=400, num_threads=1)
    return Tokenizer.load(root / "tok")


def _model(tok: Tokenizer, seq_len: int) -> ModelInfo:
    return ModelInfo(vocab_size=tok.vocab_size, mask_id=tok.mask_id, seq_len=seq_len, tokenizer=tok)


def _fill(tok, prompt, fixed, answers: list[str]) -> torch.Tensor:
    """The rows a perfect sampler would return: prompt kept, then ``answer`` + eos, then pad."""
    tokens = prompt.clone()
    for row, text in enumerate(answers):
        k = int(fixed[row].sum())
        ids = (tok.encode(text) + [tok.eos_id])[: tokens.shape[1] - k]
        tokens[row, k:] = tok.pad_id
        tokens[row, k:k + len(ids)] = torch.tensor(ids)
    return tokens


def test_gsm8k_task_end_to_end(gsm_tok):
    tok = gsm_tok
    task = task_class("gsm8k")(Config(), {"data": str(GSM8K_SAMPLE)}, _model(tok, 160))
    assert (task.name, task.primary, task.diversity, task.higher_is_better) \
        == ("gsm8k", "exact_match", None, True)
    assert task.skipped == 0 and len(task.usable) == 5

    prompt, fixed = task.conditioning(7, seed=3)
    assert prompt.shape == fixed.shape == (7, 160)
    assert prompt.dtype == torch.long and fixed.dtype == torch.bool
    again = task.conditioning(7, seed=3)
    assert torch.equal(prompt, again[0]) and torch.equal(fixed, again[1])
    assert not torch.equal(prompt, task.conditioning(7, seed=4)[0])
    picked = task.pick(7, 3)
    assert sorted(set(picked)) == [0, 1, 2, 3, 4] and picked[5:] == picked[:2]  # cycles after 5
    for row, index in enumerate(picked):
        k = int(fixed[row].sum())
        assert fixed[row, :k].all() and not fixed[row, k:].any()  # the prompt is a prefix
        assert (prompt[row, k:] == tok.mask_id).all()
        assert prompt[row, 0] == tok.bos_id
        q = task.problems[index]["question"]
        assert tok.decode(prompt[row, :k].tolist()) == f"Question: {q}\nAnswer:"

    gold = [task.problems[i]["gold"] for i in picked]
    answers = [
        " reasoning ... #### " + gold[0],
        " the total is " + gold[1] + ".",  # fallback: last number
        " #### 999",  # wrong
        " I do not know",  # nothing found
        " #### " + gold[4] + "\nQuestion: junk 5",  # text after the answer line is ignored
        " #### " + gold[5],
        " #### " + gold[6],
    ]
    tokens = _fill(tok, prompt, fixed, answers)
    tokens[6, -1] = tok.mask_id  # a left-over mask after eos changes nothing
    metrics = task.score(tokens, (prompt, fixed))
    assert metrics["exact_match"] == pytest.approx(5 / 7)
    assert metrics["answer_found"] == pytest.approx(6 / 7)
    assert (metrics["skipped"], metrics["questions"], metrics["samples"]) == (0.0, 5.0, 7.0)
    texts = task.decode(tokens)
    assert texts[0].startswith("Question: ") and texts[0].endswith("#### " + gold[0])
    with pytest.raises(ProsecoError, match="conditioning"):
        task.score(tokens, None)


def test_gsm8k_skips_prompts_that_do_not_fit(gsm_tok):
    tok = gsm_tok
    problems = load_problems(GSM8K_SAMPLE)
    lengths = sorted(len(tok.encode(f"Question: {p['question']}\nAnswer:")) + 1 for p in problems)
    seq_len = lengths[2] + 1  # the three shortest prompts fit (with one free position)
    task = task_class("gsm8k")(Config(), {"data": str(GSM8K_SAMPLE)}, _model(tok, seq_len))
    fits = sum(n + 1 <= seq_len for n in lengths)
    assert task.skipped == 5 - fits and len(task.usable) == fits >= 3
    prompt, fixed = task.conditioning(4, seed=0)
    assert set(task.pick(4, 0)) <= set(task.usable)
    metrics = task.score(prompt, (prompt, fixed))  # nothing generated: no answers
    assert metrics["skipped"] == 5 - fits and metrics["answer_found"] == 0.0
    with pytest.raises(ProsecoError, match="no prompt fits"):
        task_class("gsm8k")(Config(), {"data": str(GSM8K_SAMPLE)}, _model(tok, 8))
    with pytest.raises(ProsecoError, match="needs option data"):
        task_class("gsm8k")(Config(), {}, _model(tok, 160))
    with pytest.raises(ProsecoError, match="needs option data"):
        shared = {"data": "", "train_smiles": "", "reference": "smollm2"}  # the evaluator's one dict
        task_class("gsm8k")(Config(), shared, _model(tok, 160))
    with pytest.raises(ProsecoError, match="no tokenizer"):
        task_class("gsm8k")(Config(), {"data": str(GSM8K_SAMPLE)}, ModelInfo(8, 7, 160))


# ------------------------------------------------------------------ qm9: pure functions


def test_canonical_and_molecule_metrics():
    pytest.importorskip("rdkit")
    from rdkit import Chem
    from rdkit.Chem import QED

    from pipeline.tasks.qm9 import canonical, molecule_metrics

    assert canonical("OCC") == canonical("CCO") == "CCO"
    assert canonical("C1=CC=CC=C1") == canonical("c1ccccc1") == "c1ccccc1"  # Kekule == aromatic
    for bad in ("C1CC", "", "   ", None, "CC O", "Xx", "C(C"):
        assert canonical(bad) is None, bad
    assert canonical("  CCO\n") == "CCO"

    samples = ["CCO", "OCC", "c1ccccc1", "C1CC", "", "CC O", "CC(=O)O", "C.C"]
    train = {canonical("CCO"), canonical("CCC")}
    m = molecule_metrics(samples, train)
    valid = ["CCO", "OCC", "c1ccccc1", "CC(=O)O", "C.C"]
    assert m["validity"] == pytest.approx(5 / 8)
    assert m["uniqueness"] == pytest.approx(4 / 5)  # CCO twice
    assert m["novelty"] == pytest.approx(3 / 4)  # CCO is in the training set
    expected_qed = sum(QED.qed(Chem.MolFromSmiles(s)) for s in valid) / 5
    assert m["qed"] == pytest.approx(expected_qed)
    assert QED.qed(Chem.MolFromSmiles("CCO")) == pytest.approx(0.4068, abs=1e-4)
    assert m["rings"] == pytest.approx(1 / 5)  # only benzene has a ring
    assert m["connected"] == pytest.approx(4 / 5)  # C.C is two fragments
    assert (m["samples"], m["valid"], m["unique"], m["novel"]) == (8.0, 5.0, 4.0, 3.0)

    empty = molecule_metrics(["C1CC", "((("], train)
    assert empty["validity"] == empty["uniqueness"] == empty["novelty"] == empty["qed"] == 0.0
    assert molecule_metrics([], None) == {"validity": 0.0, "uniqueness": 0.0, "qed": 0.0, "rings": 0.0,
                                          "connected": 0.0, "samples": 0.0, "valid": 0.0, "unique": 0.0}


# ------------------------------------------------------------------ qm9: the task


@pytest.fixture(scope="module")
def smiles_tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("smiles")
    (root / "train.txt").write_text("\n".join(SMILES) + "\n")
    train_tokenizer([str(root / "train.txt")], root / "tok", vocab_size=40, byte_fallback=False,
                    doc_split="line", num_threads=1)
    return Tokenizer.load(root / "tok"), root / "train.txt"


def _rows(tok, texts: list[str], seq_len: int) -> torch.Tensor:
    """pad-mode rows: bos ids eos pad..."""
    rows = torch.full((len(texts), seq_len), tok.pad_id, dtype=torch.long)
    for r, text in enumerate(texts):
        ids = [tok.bos_id, *tok.encode(text), tok.eos_id][:seq_len]
        rows[r, :len(ids)] = torch.tensor(ids)
    return rows


def test_qm9_task_end_to_end(smiles_tok):
    pytest.importorskip("rdkit")
    from pipeline.tasks.qm9 import smiles_of_row

    tok, train_file = smiles_tok
    model = ModelInfo(vocab_size=tok.vocab_size + 2, mask_id=tok.mask_id, seq_len=24, tokenizer=tok)
    task = task_class("qm9")(Config(), {"train_smiles": str(train_file)}, model)
    assert (task.name, task.primary, task.diversity, task.higher_is_better) \
        == ("qm9", "validity", "uniqueness", True)
    assert task.train_info["molecules"] == len(SMILES) and task.train_info["invalid"] == 0
    assert task.conditioning(4, 0) is None

    generated = ["CCO", "OCC", "C1=CC=CC=C1", "C1CC", "CC(C)CO", "CN1CCCC1", "CCCC"]
    tokens = _rows(tok, generated, 24)
    tokens[6, 3] = tok.mask_id  # left masked: invalid
    assert task.decode(tokens)[:6] == generated[:6] and "<mask>" in task.decode(tokens)[6]
    m = task.score(tokens, None)
    assert m["validity"] == pytest.approx(5 / 7)  # C1CC and the masked row are invalid
    assert m["uniqueness"] == pytest.approx(4 / 5)  # CCO = OCC
    assert m["novelty"] == pytest.approx(1 / 4)  # only CC(C)CO is not a training molecule
    assert m["rings"] == pytest.approx(2 / 5)

    # decoding rules: a leading bos skipped, cut at eos / pad / a later bos, whitespace stripped
    ids = tok.encode("CCO")
    assert smiles_of_row([tok.bos_id, *ids, tok.eos_id, *tok.encode("CCC")], tok) == "CCO"
    assert smiles_of_row([*ids, tok.bos_id, *tok.encode("N")], tok) == "CCO"
    assert smiles_of_row([*ids, tok.pad_id, *tok.encode("N")], tok) == "CCO"
    assert smiles_of_row([tok.bos_id, tok.eos_id], tok) == ""
    assert smiles_of_row([*ids, tok.vocab_size + 1], tok).endswith("<oov>")  # an id beyond the tokenizer


def test_qm9_task_errors_and_default_train_set(smiles_tok, monkeypatch):
    pytest.importorskip("rdkit")
    from pipeline.tasks import qm9

    tok, _ = smiles_tok
    model = ModelInfo(vocab_size=tok.vocab_size, mask_id=tok.mask_id, seq_len=24, tokenizer=tok)
    with pytest.raises(ProsecoError, match="no tokenizer"):
        task_class("qm9")(Config(), {}, ModelInfo(8, 7, 24))
    with pytest.raises(ProsecoError, match="not a file"):
        task_class("qm9")(Config(), {"train_smiles": "/nonexistent/x.txt"}, model)
    # the default training set is QM9 from qm9pack (stubbed here: the real one takes ~7 s)
    monkeypatch.setattr(qm9, "read_qm9_smiles", lambda: ["CCO", "C1CC", "N"])
    monkeypatch.setattr(qm9, "_TRAIN_CACHE", {})
    # the evaluator's shared options dict: other tasks' keys, train_smiles "" = the default
    options = {"reference": "smollm2", "data": "", "train_smiles": "", "mauve_reference": "",
               "batch_size": 64}
    task = task_class("qm9")(Config(), options, model)
    assert task.train_set == {"CCO", "N"} and task.train_info["invalid"] == 1
    assert task.train_info["source"].startswith("qm9pack")


# ------------------------------------------------------------------ the QM9 corpus (pipeline.tasks.qm9)


def test_write_qm9_corpus(tmp_path):
    from pipeline.tasks.qm9 import write_qm9_corpus

    molecules = [f"C{'C' * i}O" for i in range(20)]
    info = write_qm9_corpus(tmp_path / "qm9.txt", smiles=molecules, holdout_fraction=0.25, split_seed=7)
    train = (tmp_path / "qm9.txt").read_text().splitlines()
    held = (tmp_path / "qm9.heldout.txt").read_text().splitlines()
    assert (info["train"]["molecules"], info["heldout"]["molecules"]) == (15, 5) == (len(train), len(held))
    assert sorted(train + held) == sorted(molecules) and not set(train) & set(held)
    assert train == [m for m in molecules if m in set(train)]  # dataset order kept
    again = write_qm9_corpus(tmp_path / "b" / "qm9.txt", smiles=molecules, holdout_fraction=0.25,
                             split_seed=7)
    assert again["heldout"]["sha256"] == info["heldout"]["sha256"]
    with pytest.raises(ProsecoError, match="already exist"):
        write_qm9_corpus(tmp_path / "qm9.txt", smiles=molecules)
    with pytest.raises(ProsecoError, match="holdout_fraction"):
        write_qm9_corpus(tmp_path / "c.txt", smiles=molecules, holdout_fraction=1.0)


def test_write_qm9_corpus_canonical(tmp_path):
    pytest.importorskip("rdkit")
    from pipeline.tasks.qm9 import write_qm9_corpus

    info = write_qm9_corpus(tmp_path / "can.txt", smiles=["OCC", "CCO", "C1CC", "C1=CC=CC=C1"],
                            holdout_fraction=0.0, canonicalize=True)
    assert (tmp_path / "can.txt").read_text().splitlines() == ["CCO", "c1ccccc1"] and info["dropped"] == 2
    assert (tmp_path / "can.heldout.txt").read_text() == ""


def test_qm9pack_bundles_the_data():
    from pipeline.tasks.qm9 import QM9_MOLECULES, qm9pack_data_dir, read_qm9_smiles

    try:
        qm9pack_data_dir()
    except ProsecoError:
        pytest.skip("qm9pack is not installed")
    smiles = read_qm9_smiles()
    assert len(smiles) == QM9_MOLECULES and smiles[:4] == ["C", "N", "O", "C#C"]
    assert max(len(s) for s in smiles) <= 40 and all(" " not in s for s in smiles)
