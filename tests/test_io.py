"""pipeline/io.py (atomic writes, checksums) and the file modes of everything the pipeline writes."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys

import pytest
import torch
from train_utils import ROOT, TINY, _env

from pipeline.io import (
    AtomicFile,
    atomic_write,
    atomic_write_json,
    check_sums,
    current_umask,
    read_json,
    save_torch,
    sha256_file,
    sha256_files,
    write_sums,
)


def test_atomic_write_follows_the_umask_and_leaves_no_temporary(tmp_path):
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        atomic_write(tmp_path / "a.txt", "hello")
        atomic_write_json(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert (tmp_path / "a.txt").read_text() == "hello" and read_json(tmp_path / "b.json") == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]


def test_atomic_file_streams_then_commits_or_discards(tmp_path):
    """The streaming form (shard tars): the target appears whole on commit, never on failure."""
    target = tmp_path / "shard.tar"
    target.write_bytes(b"old")
    f = AtomicFile(target, unique=False)  # a fixed temporary name a rerun can find
    for _ in range(3):
        f.write(b"abc")
    assert f.tmp.name == ".shard.tar.tmp" and target.read_bytes() == b"old"
    f.commit()
    assert target.read_bytes() == b"abcabcabc" and sorted(p.name for p in tmp_path.iterdir()) == ["shard.tar"]
    with pytest.raises(RuntimeError, match="boom"), AtomicFile(target) as g:
        g.write(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"abcabcabc" and sorted(p.name for p in tmp_path.iterdir()) == ["shard.tar"]


def test_save_torch_hashes_exactly_the_bytes_on_disk(tmp_path):
    obj = {"w": torch.randn(1000), "step": 3}
    info = save_torch(obj, tmp_path / "s.pt")
    raw = (tmp_path / "s.pt").read_bytes()
    assert info == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    assert torch.equal(torch.load(tmp_path / "s.pt", weights_only=True)["w"], obj["w"])
    assert sha256_file(tmp_path / "s.pt") == info["sha256"]
    assert sha256_files([tmp_path / "s.pt"] * 3, threads=2) == [info["sha256"]] * 3


def test_sums_file_matches_sha256sum_and_finds_damage(tmp_path):
    for name, data in (("a.bin", b"a" * 100), ("b.json", b"{}")):
        (tmp_path / name).write_bytes(data)
    write_sums(tmp_path, ["a.bin", "b.json"])
    assert check_sums(tmp_path) == []
    done = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], check=False, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr  # the standard tool agrees
    (tmp_path / "a.bin").write_bytes(b"a" * 99 + b"b")
    (tmp_path / "b.json").unlink()
    assert check_sums(tmp_path) == ["b.json is missing", "a.bin fails its sha256 check"]


@pytest.mark.slow
def test_files_of_prep_train_and_export_follow_the_umask(shards, tmp_path):
    """With umask 002 (a group-shared project folder) every file the pipeline writes is group-writable:
    tokenizer, run folder, checkpoints, export (safetensors alone would make 0600)."""
    def run(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "pipeline", *args], check=False, cwd=ROOT, env=_env(), text=True,
                              capture_output=True, preexec_fn=lambda: os.umask(0o002))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    tok, run_dir, export = tmp_path / "tok", tmp_path / "run", tmp_path / "export"
    run("prep", "tokenizer", "--config", "text", f"prep.tokenizer_dir={tok}", "model.vocab_size=512",
        "--import", str(shards.parent / "tok" / "tokenizer.model"))  # the same writer as training one, faster
    run("train", "--config", "text", f"data.shards={shards}", f"run.dir={run_dir}", "optim.steps=2", *TINY)
    run("ckpt", "export", str(run_dir), "--out", str(export))
    files = [p for root in (tok, run_dir, export) for p in root.rglob("*") if p.is_file()]
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert len(files) > 8 and set(modes.values()) == {"0o664"}, modes


def test_bytes_that_are_not_utf8_give_one_line_errors_or_a_skip(tmp_path, capsys):
    """Every text file the pipeline reads back, or takes from a user, with a byte that is not
    UTF-8 (a flipped bit, a file in another encoding): a one-line error naming it, or, for a log
    line, a skip; never a UnicodeDecodeError."""
    from data_prep.sft import _read_samples
    from pipeline import cli
    from pipeline.checkpoint.manager import MARKER, CheckpointManager
    from pipeline.errors import ProsecoError
    from pipeline.runlog import read_metrics
    from pipeline.tasks.arrays import _read_manifest

    bad = b"\xff\xfe"
    (tmp_path / "preset.yaml").write_bytes(b"optim:\n  lr: 1" + bad + b"\n")
    assert cli.main(["config", "--config", str(tmp_path / "preset.yaml")]) == cli.EXIT_USER_ERROR
    assert "is not UTF-8 text" in capsys.readouterr().err

    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    (step / MARKER).write_bytes(b"2 " + bad + b"\n")
    with pytest.raises(ProsecoError, match="fails its sha256 check"):
        CheckpointManager(tmp_path / "run").read_meta(step)

    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1}\n{"step": ' + bad + b'}\n{"step": 3}\n')
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 3]

    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("a")
    write_sums(tmp_path / "folder", ["a.txt"])
    with open(tmp_path / "folder" / "SHA256SUMS", "ab") as f:
        f.write(bad + b"  b.txt\n")
    assert check_sums(tmp_path / "folder") == ["b.txt is missing"]

    (tmp_path / "arrays").mkdir()
    (tmp_path / "arrays" / "manifest.json").write_bytes(b'{"fingerprint": "' + bad + b'"}')
    with pytest.raises(ProsecoError, match="not a readable manifest"):
        _read_manifest(tmp_path / "arrays")

    (tmp_path / "chat.jsonl").write_bytes(b'{"prompt": "a' + bad + b'", "response": "b"}\n')
    with pytest.raises(ProsecoError, match="is not UTF-8 text"):
        _read_samples([tmp_path / "chat.jsonl"], None, 32, 0.0, 100)
