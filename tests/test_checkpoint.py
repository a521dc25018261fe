"""Model files and `proseco sample`: round trip, refusal of a foreign config, bad input as one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import load_model, save_model
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ProsecoError
from pipeline.model import Backbone
from pipeline.tasks import sudoku

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture()
def model_file(tmp_path):
    cfg = load_config(TINY, ["parallel.threads=1"])
    torch.manual_seed(0)
    model = Backbone(cfg.model, vocab_size=sudoku.VOCAB_SIZE)
    path = tmp_path / "m.pt"
    save_model(path, model, cfg, sudoku.VOCAB_SIZE, sudoku.MASK_ID, steps=3)
    return path, model, cfg


def test_round_trip_gives_the_same_logits(model_file):
    path, model, cfg = model_file
    loaded, saved_cfg, blob = load_model(path, cfg)
    x = torch.randint(0, 5, (3, 16))
    assert torch.equal(loaded(x), model.eval()(x))
    assert saved_cfg == cfg and blob["steps"] == 3 and blob["mask_id"] == sudoku.MASK_ID
    assert not path.with_name("m.pt.tmp").exists()


def test_checkpoint_from_another_model_config_is_refused(model_file):
    path = model_file[0]
    other = load_config(TINY, ["model.hidden=128", "model.layers=2"])
    with pytest.raises(ProsecoError, match=r"model.hidden: checkpoint 64, config 128.*model.layers"):
        load_model(path, other)


def test_foreign_and_missing_files_are_user_errors(tmp_path):
    with pytest.raises(ProsecoError, match="no model file"):
        load_model(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ProsecoError, match="not a readable model file"):
        load_model(junk)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ProsecoError, match="is not a proseco-model/1 file"):
        load_model(tmp_path / "other.pt")


def test_sample_verb_reports_exact_nfe_and_writes_json(model_file, tmp_path, capsys):
    path, _, _ = model_file
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


def test_sample_infill_keeps_the_clues(model_file, tmp_path):
    path, _, _ = model_file
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
def test_sample_bad_input_is_one_error_line(model_file, override, message):
    path, _, _ = model_file
    proc = subprocess.run([sys.executable, "-m", "pipeline", "sample", str(path), override],
                          check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
