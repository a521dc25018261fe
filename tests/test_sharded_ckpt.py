"""Sharded checkpoints (``checkpoint.format=sharded``, torch.distributed.checkpoint) and asynchronous
saves (``checkpoint.async_save=true``): the golden test of tests/test_train.py again - kill -9, resume,
bitwise equal to an uninterrupted run - where the uninterrupted run saves in the *full* format, so the
sharded files are checked against the independent full-state path (gather on rank 0) too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from train_utils import STEPS, _args, _finish, _kill9, _losses, _train, _train_here, _wait_for_step

from pipeline import cli
from pipeline.checkpoint.manager import CheckpointManager
from pipeline.checkpoint.tools import checkpoint_meta, weight_sets

SHARDED = ("checkpoint.format=sharded",)
ASYNC = (*SHARDED, "checkpoint.async_save=true")
DIST = ("optim.grad_accum=2", "log.val_every=4", "log.val_batches=2", "optim.steps=8")
needs_megatron = pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed")
MEGATRON = ("parallel.backend=megatron", "parallel.tp_size=2", "model.dropout=0.0", *DIST)


def _weights(run: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    """{"raw", "ema"} full weights of checkpoint ``step``, whatever its format (verified first)."""
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    return weight_sets(ckpt, checkpoint_meta(ckpt))


def _assert_same(a: Path, b: Path, steps: int) -> None:
    """Same loss at every step and bitwise the same final weights and EMA."""
    assert _losses(a) == _losses(b) and sorted(_losses(a)) == list(range(1, steps + 1))
    wa, wb = _weights(a, steps), _weights(b, steps)
    assert wa.keys() == wb.keys() == {"raw", "ema"}
    for part in wa:
        assert wa[part].keys() == wb[part].keys()
        assert all(torch.equal(v, wb[part][k]) for k, v in wa[part].items()), part


def _complete_steps(run: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in (run / "checkpoints").glob("step_*/COMPLETE"))


def _kill_mid_run(shards: Path, run: Path, *extra: str, nproc: int = 0, distributed: str | None = "ddp") -> None:
    """Start a run, kill -9 it (and its ranks) at step 5: the step-4 checkpoint is then being
    written (asynchronous) or complete (synchronous)."""
    proc = _train(shards, run, *extra, delay=0.3, nproc=nproc, distributed=distributed)
    _wait_for_step(proc, run, 5)
    if nproc:
        _kill9(proc)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """An uninterrupted single-process run, full-format checkpoints."""
    run = tmp_path_factory.mktemp("reference") / "run"
    _train_here(shards, run)
    return run


def test_async_kill_9_keeps_the_previous_checkpoint_and_resume_equals_uninterrupted(shards, reference, tmp_path,
                                                                                     capsys):
    """kill -9 while an asynchronous save is uncommitted: that step has no COMPLETE, the one before
    is in charge; the resumed run ends bitwise equal to the uninterrupted full-format run. Then a
    corrupted shard is refused before anything loads."""
    run = tmp_path / "run"
    _kill_mid_run(shards, run, *ASYNC)
    done = _complete_steps(run)
    pending = sorted((run / "checkpoints").glob("step_*.tmp-*"))
    assert done and pending and int(pending[-1].name[5:13]) > done[-1], (done, pending)  # the newest is uncommitted
    assert (pending[-1] / "dcp").is_dir() and not (pending[-1] / "COMPLETE").exists()
    capsys.readouterr()
    _train_here(shards, run, *ASYNC)
    out = capsys.readouterr().out
    assert f"resuming from step_{done[-1]:08d}" in out and "writing in the background" in out
    assert not list((run / "checkpoints").glob("*.tmp-*"))
    _assert_same(reference, run, STEPS)
    meta = json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").read_text())
    assert {"dcp/.metadata", "dcp/__0_0.distcp"} <= set(meta["files"]) and "state.pt" not in meta["files"]
    assert cli.main(["ckpt", "info", str(run)]) == 0 and "format sharded" in capsys.readouterr().out
    assert cli.main(["ckpt", "export", str(run), "--out", str(tmp_path / "export")]) == 0  # one safetensors folder
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "export" / "ema.safetensors"))
    assert all(torch.equal(v, exported[k]) for k, v in _weights(reference, STEPS)["ema"].items())

    shard = run / "checkpoints" / f"step_{STEPS:08d}" / "dcp" / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert cli.main(_args(shards, run, f"optim.steps={STEPS + 2}", *SHARDED)) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "__0_0.distcp fails its sha256 check" in err, err


def test_async_commit_waits_for_the_write_and_a_failed_write_commits_nothing(tmp_path):
    """CheckpointManager.save_async: nothing is visible until wait(); a write that failed leaves the
    previous checkpoint the latest, and the next save clears the uncommitted folder."""
    manager = CheckpointManager(tmp_path, keep_last=5)

    def writer(result: Future):
        def write(tmp: Path):
            (tmp / "part").write_bytes(b"abc")
            return {}, result
        return write

    first: Future = Future()
    assert manager.save_async(1, {"note": 1}, writer=writer(first)) is None
    assert manager.latest() is None  # written, not committed
    first.set_result({})
    assert manager.wait() == manager.path_for(1) == manager.latest()
    assert json.loads((manager.latest() / "meta.json").read_text())["files"]["part"]["size"] == 3

    second: Future = Future()
    manager.save_async(2, {}, writer=writer(second))
    second.set_exception(OSError("disk full"))
    with pytest.raises(RuntimeError, match="asynchronous save of step 2 failed .*disk full"):
        manager.wait()
    assert manager.latest() == manager.path_for(1) and list(tmp_path.glob("checkpoints/step_00000002.tmp-*"))
    manager.save(3, {}, writer=lambda tmp: {})
    assert not list(tmp_path.glob("checkpoints/*.tmp-*")) and manager.latest() == manager.path_for(3)


@pytest.mark.parametrize(("override", "needle"), [
    (("checkpoint.async_save=true",), "checkpoint.async_save=true needs checkpoint.format=sharded"),
    (("checkpoint.format=sharded", "parallel.backend=deepspeed"), "DeepSpeed always writes its own"),
    (("checkpoint.format=dcp",), "checkpoint.format must be one of: full, sharded"),
    (("checkpoint.async=true",), "moved to checkpoint.async_save")])
def test_checkpoint_format_errors_are_one_line(shards, tmp_path, capsys, override, needle):
    assert cli.main(_args(shards, tmp_path / "run", *override)) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_sharded_kill_9_and_resume_equals_uninterrupted_and_reshards_to_one_rank(shards, tmp_path, capsys, layout):
    """2 ranks (DDP or FSDP2), asynchronous sharded saves: kill -9 and resume equals the uninterrupted
    full-format run; each rank wrote its own file; both checkpoints resume in one process alike."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    _finish(_train(shards, ref, *DIST, nproc=2, distributed=layout))
    _kill_mid_run(shards, run, *DIST, *ASYNC, nproc=2, distributed=layout)
    assert max(_losses(run)) < 8
    out = _finish(_train(shards, run, *DIST, *ASYNC, nproc=2, distributed=layout))
    assert "resuming" in out
    _assert_same(ref, run, 8)
    parts = sorted((run / "checkpoints" / "step_00000008" / "dcp").glob("__*_0.distcp"))
    assert [p.name for p in parts] == ["__0_0.distcp", "__1_0.distcp"] and all(p.stat().st_size > 0 for p in parts)

    for folder in (ref, run):  # 2 ranks -> 1: full state and DCP shards give the same two more steps
        capsys.readouterr()
        _train_here(shards, folder, *DIST[:-1], "optim.steps=10", *SHARDED)
        assert "under another layout" in capsys.readouterr().out
    assert {s: _losses(run)[s] for s in (9, 10)} == {s: _losses(ref)[s] for s in (9, 10)}


@needs_megatron
@pytest.mark.distributed
def test_megatron_tp2_sharded_kill_9_and_resume_equals_uninterrupted_then_tp1(shards, tmp_path, capsys):
    """TP=2, sharded synchronous saves: the q/k/v blocks and the other split weights land at their
    place in the full tensors (the final weights equal the gathered full-format run's bitwise, as
    do the losses after a kill -9 and resume), and the checkpoint resumes at TP=1 like the full one."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    _finish(_train(shards, ref, *MEGATRON, nproc=2, distributed=None))
    _kill_mid_run(shards, run, *MEGATRON, *SHARDED, nproc=2, distributed=None)
    out = _finish(_train(shards, run, *MEGATRON, *SHARDED, nproc=2, distributed=None))
    assert "resuming from step_00000004" in out
    _assert_same(ref, run, 8)

    copies = {name: tmp_path / f"{name}_tp1" for name in ("ref", "run")}
    for name, src in (("ref", ref), ("run", run)):
        shutil.copytree(src, copies[name])
        capsys.readouterr()
        _train_here(shards, copies[name], *MEGATRON[:1], *MEGATRON[2:-1], "optim.steps=10")  # TP=1, one process
        assert "under another layout" in capsys.readouterr().out
    assert {s: _losses(copies["run"])[s] for s in (9, 10)} == {s: _losses(copies["ref"])[s] for s in (9, 10)}
