"""Export folders and `proseco sample`: round trip, raw/EMA weights, refusal of a foreign config,
damaged or foreign folders and tokenizers as one-line errors, bad input as one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.artifact import load_model, write_export
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ProsecoError
from pipeline.io import SUMS_FILE, write_sums
from pipeline.model import Backbone
from pipeline.tasks import sudoku

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture()
def model_export(tmp_path):
    """(export folder of an untrained tiny Sudoku model, the model, its config)."""
    cfg = load_config(TINY, ["parallel.threads=1"])
    torch.manual_seed(0)
    model = Backbone(cfg.model, vocab_size=sudoku.VOCAB_SIZE)
    path = write_export(tmp_path / "m", {"raw": model.state_dict()}, cfg, sudoku.VOCAB_SIZE, sudoku.MASK_ID,
                        extra={"steps": 3})
    return path, model, cfg


def test_round_trip_gives_the_same_logits(model_export):
    path, model, cfg = model_export
    loaded, saved_cfg, info = load_model(path, cfg=cfg)
    x = torch.randint(0, 5, (3, 16))
    assert torch.equal(loaded(x), model.eval()(x))
    assert saved_cfg == cfg and info.extra["steps"] == 3 and info.mask_id == sudoku.MASK_ID
    assert info.kind == "export" and info.weights == "raw" and info.tokenizer is None and len(info.identity) == 16
    assert sorted(p.name for p in path.parent.iterdir()) == ["m"]  # no temporary folder left behind


def test_raw_and_ema_weights_both_load_and_ema_is_the_default(tmp_path):
    cfg = load_config(TINY)
    raw, ema = (Backbone(cfg.model, vocab_size=sudoku.VOCAB_SIZE).state_dict() for _ in range(2))
    path = write_export(tmp_path / "m", {"raw": raw, "ema": ema}, cfg, sudoku.VOCAB_SIZE, sudoku.MASK_ID)
    for weights, expected in (("auto", ema), ("ema", ema), ("raw", raw)):
        model, _, info = load_model(path, weights=weights)
        assert info.weights == (weights if weights != "auto" else "ema")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(ProsecoError, match="exists; pass --force"):
        write_export(path, {"raw": raw}, cfg, sudoku.VOCAB_SIZE, sudoku.MASK_ID)
    write_export(path, {"raw": raw}, cfg, sudoku.VOCAB_SIZE, sudoku.MASK_ID, force=True)
    with pytest.raises(ProsecoError, match="has no ema weights"):
        load_model(path, weights="ema")


def test_weights_that_do_not_fit_their_config_are_refused_before_anything_is_written(tmp_path):
    cfg = load_config(TINY)
    other = Backbone(load_config(TINY, ["model.hidden=32"]).model, vocab_size=sudoku.VOCAB_SIZE).state_dict()
    with pytest.raises(ProsecoError, match="weights do not fit the model its config describes"):
        write_export(tmp_path / "m", {"raw": other}, cfg, sudoku.VOCAB_SIZE, sudoku.MASK_ID)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_from_another_model_config_is_refused(model_export):
    path = model_export[0]
    other = load_config(TINY, ["model.hidden=128", "model.layers=2"])
    with pytest.raises(ProsecoError, match=r"model.hidden: checkpoint 64, config 128.*model.layers"):
        load_model(path, cfg=other)


def test_foreign_missing_and_damaged_models_are_user_errors(model_export, tmp_path):
    with pytest.raises(ProsecoError, match="no model at"):
        load_model(tmp_path / "missing")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ProsecoError, match="is not a model: .*single-file .pt models are retired"):
        load_model(junk)
    with pytest.raises(ProsecoError, match="is not a model"):
        load_model(tmp_path)
    path = model_export[0]
    with open(path / "raw.safetensors", "ab") as f:
        f.write(b"x")
    with pytest.raises(ProsecoError, match=r"is corrupted: raw.safetensors fails its sha256 check"):
        load_model(path)
    (path / SUMS_FILE).unlink()
    with pytest.raises(ProsecoError, match=f"has no {SUMS_FILE}"):
        load_model(path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.json").write_text('{"format": "someone-else/1"}')
    write_sums(foreign, ["model.json"])
    with pytest.raises(ProsecoError, match="is not a proseco-export/2 export .format 'someone-else/1'"):
        load_model(foreign)


def test_a_text_model_whose_tokenizer_does_not_load_says_why(tmp_path):
    cfg = load_config(str(ROOT / "configs" / "text.yaml"), ["model.hidden=32", "model.layers=1", "model.heads=2"])
    state = Backbone(cfg.model, vocab_size=64).state_dict()
    path = write_export(tmp_path / "m", {"raw": state}, cfg, 64, 3)  # no tokenizer copied in
    with pytest.raises(ProsecoError, match=r"the tokenizer of .*m does not load: .*no tokenizer sidecar"):
        load_model(path)


def test_an_export_carries_its_tokenizer_and_checks_it_is_the_trained_one(shards, tmp_path):
    from data_prep.tokenizer import Tokenizer

    cfg = load_config(str(ROOT / "configs" / "text.yaml"), ["model.hidden=32", "model.layers=1", "model.heads=2"])
    tok = Tokenizer.load(shards)
    state = Backbone(cfg.model, vocab_size=tok.vocab_size).state_dict()
    good = write_export(tmp_path / "good", {"raw": state}, cfg, tok.vocab_size, tok.mask_id, tokenizer_dir=shards,
                        data={"tokenizer_sha256": tok.sidecar["sha256"]})
    assert load_model(good)[2].tokenizer.sidecar == tok.sidecar
    bad = write_export(tmp_path / "bad", {"raw": state}, cfg, tok.vocab_size, tok.mask_id, tokenizer_dir=shards,
                       data={"tokenizer_sha256": "0" * 64})
    with pytest.raises(ProsecoError, match="is not the one .* was trained with"):
        load_model(bad)


def test_sample_verb_reports_exact_nfe_and_writes_json(model_export, tmp_path, capsys):
    path, _, _ = model_export
    out = tmp_path / "s.json"
    argv = ["sample", str(path), "--num", "3", "--out", str(out), "sampler.steps=4", "sampler.corrector_steps=2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert len(data["tokens"]) == 3 and all(len(r) == 16 for r in data["tokens"])
    assert all(p == 4 for p in data["nfe_predictor"])  # T=4, fresh input at every step
    assert all(1 <= c <= 8 for c in data["nfe_corrector"])  # 4 loops of at most S=2 passes
    assert data["summary"]["nfe"] == pytest.approx(4 + sum(data["nfe_corrector"]) / 3)
    assert "summary:" in printed and "corrector" in printed


def test_sample_infill_keeps_the_clues(model_export, tmp_path):
    path, _, _ = model_export
    out = tmp_path / "s.json"
    assert main(["sample", str(path), "--infill", "--num", "4", "--out", str(out), "sampler.name=confidence"]) == 0
    assert json.loads(out.read_text())["summary"]["clue_violations"] == 0.0


@pytest.mark.parametrize("override, message", [
    ("model.hidden=128", "trained with another model config"),
    ("sampler.name=foo", "sampler.name must be one of"),
    ("sampler.corrector_steps=-1", "(S) must be >= 0"),
    ("sampler.corrector_every=0", "(omega) must be >= 1"),
    ("data.seq_len=32", "exceeds model.max_seq_len"),
])
def test_sample_bad_input_is_one_error_line(model_export, override, message):
    path, _, _ = model_export
    proc = subprocess.run([sys.executable, "-m", "pipeline", "sample", str(path), override],
                          check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
