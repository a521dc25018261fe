"""The text preset prepares the bundled corpus end to end through the CLI, and the loader reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.data import format as fmt
from pipeline.data.loader import ShardLoader

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("text")
    dirs = [f"prep.tokenizer_dir={base / 'tok'}", f"data.shards={base / 'shards'}", "prep.workers=1"]
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


@pytest.mark.parametrize("files, reasons", [
    ({"empty.txt": b""}, ["empty_file 1"]),
    ({"blob.txt": b"\x00\x01 binary", "latin1.txt": "caf\xe9 au lait\n".encode("latin-1")},
     ["binary_file 1", "not_utf8 1"]),
])
def test_inputs_without_documents_are_a_one_line_error(prepared, tmp_path, capsys, files, reasons):
    base, _ = prepared
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["prep", "shards", "--config", "text", f"prep.tokenizer_dir={base / 'tok'}", f"data.shards={out}",
                 "prep.workers=0", f"prep.inputs=[{tmp_path}/*.txt]"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"no documents found in {tmp_path}/*.txt ({len(files)} file(s)" in errors[0]
    assert all(reason in errors[0] for reason in reasons), errors[0]
    assert not (out / "manifest.json").exists()


def test_verify_fails_on_a_manifest_without_train_samples(prepared, tmp_path, capsys):
    """What an empty corpus used to produce: a consistent manifest with zero shards."""

    base, _ = prepared
    out = tmp_path / "shards"
    out.mkdir()
    for name in fmt.TOKENIZER_FILES:
        (out / name).write_bytes((base / "shards" / name).read_bytes())
    manifest = json.loads((base / "shards" / "manifest.json").read_text())
    manifest["splits"] = {s: {"samples": 0, "tokens": 0, "dropped_tokens": 0, "shards": []} for s in fmt.SPLITS}
    manifest["documents"] = dict.fromkeys(fmt.SPLITS, 0)
    manifest["fingerprint"] = fmt.manifest_fingerprint(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["prep", "verify", "--config", "text", f"data.shards={out}"]) == 1
    assert "split train holds no sample" in capsys.readouterr().out


def test_an_empty_val_split_is_a_warning(prepared, tmp_path, capsys):
    base, _ = prepared
    (tmp_path / "one.txt").write_text(" ".join(["the whale and the sea"] * 200) + "\n")  # one document
    capsys.readouterr()
    assert main(["prep", "shards", "--config", "text", f"prep.tokenizer_dir={base / 'tok'}", "prep.workers=0",
                 f"data.shards={tmp_path / 'out'}", f"prep.inputs=[{tmp_path / 'one.txt'}]", "prep.val_fraction=0.01"]) == 0
    assert "warning: the val split holds no sample (0 document(s) at val_fraction 0.01)" in capsys.readouterr().err


def test_array_partitions_copy_the_tokenizer_into_one_folder_at_once(tmp_path, monkeypatch):
    """Every partition of a prep array job copies the tokenizer into the shard folder; a writer that
    is half-way through must not lose its temporary file to another's rename (seen on SLURM)."""
    from types import SimpleNamespace

    from data_prep import manifest as mf

    tok = SimpleNamespace(model_proto=b"model bytes", sidecar={"format": "x", "vocab_size": 3})
    real, interleaved = mf.file_write, []

    def write_then_let_another_partition_run(f, data):
        real(f, data)
        if not interleaved:  # another partition copies the same files to the end meanwhile
            interleaved.append(True)
            mf.copy_tokenizer(tok, tmp_path)

    monkeypatch.setattr(mf, "file_write", write_then_let_another_partition_run)
    mf.copy_tokenizer(tok, tmp_path)  # raised FileNotFoundError when both used .tokenizer.model.tmp
    assert interleaved and (tmp_path / mf.MODEL_FILE).read_bytes() == b"model bytes"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
