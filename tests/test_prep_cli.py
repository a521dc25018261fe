"""The text preset prepares the bundled corpus end to end through the CLI, and the loader reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.data.loader import ShardLoader

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("text")
    dirs = [f"prep.tokenizer_dir={base / 'tok'}", f"prep.out_dir={base / 'shards'}", "prep.workers=1"]
    assert main(["prep", "tokenizer", "--config", "text", *dirs]) == 0
    assert main(["prep", "shards", "--config", "text", *dirs]) == 0
    return base, dirs


def test_text_preset_prepares_the_bundled_corpus(prepared, capsys):
    base, dirs = prepared
    manifest = json.loads((base / "shards" / "manifest.json").read_text())
    assert manifest["seq_len"] == 256 and manifest["mode"] == "wrap" and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["vocab_size"] == 8192 and manifest["tokenizer"]["special"]["mask"] == 4
    assert manifest["documents"]["train"] + manifest["documents"]["val"] == 2722  # every bundled document
    assert len(manifest["splits"]["train"]["shards"]) >= 4  # enough for 2 ranks x 2 loader workers
    assert sum(manifest["skipped"].values()) == 0
    capsys.readouterr()
    assert main(["prep", "verify", "--config", "text", *dirs]) == 0
    assert "OK: every shard matches the manifest" in capsys.readouterr().out


def test_rerun_is_a_no_op_and_a_second_tokenizer_is_refused(prepared, capsys):
    base, dirs = prepared
    before = {p.name: p.stat().st_mtime_ns for p in (base / "shards" / "train").iterdir()}
    assert main(["prep", "shards", "--config", "text", *dirs]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (base / "shards" / "train").iterdir()} == before
    capsys.readouterr()
    assert main(["prep", "tokenizer", "--config", "text", *dirs]) == 2
    assert "--force" in capsys.readouterr().err


def test_loader_reads_the_prepared_shards(prepared):
    base, _ = prepared
    loader = ShardLoader(base / "shards", split="train", batch_size=4, rank=1, world_size=2, num_workers=0)
    batch = next(iter(loader))
    assert batch["tokens"].shape == (4, 256) and bool(batch["valid"].all())  # wrap mode: no padding
    assert loader.state_dict()["batches"] == 1


def test_bad_task_and_missing_input_are_one_line_errors(tmp_path, capsys):
    assert main(["prep", "shards", "--config", "text", "--task", "3/2"]) == 2
    assert "need 0 <= i < n" in capsys.readouterr().err
    assert main(["prep", "tokenizer", "--config", "text", f"prep.tokenizer_dir={tmp_path / 't'}",
                 f"prep.inputs=[{tmp_path / 'nope.txt'}]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.txt" in err and "Traceback" not in err
