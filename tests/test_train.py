"""`proseco train` (pipeline/train.py): the golden test is "kill and resume equals uninterrupted".

Runs are subprocesses on shards prepared once per module from the bundled corpus (small vocab,
32-token sequences, a 1-layer model), so a step takes milliseconds; runs that must be interrupted
sleep after each step (``PROSECO_STEP_DELAY_S``) so the test can catch them mid-run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import cli
from pipeline.train import EXIT_REQUEUE, STEP_DELAY_ENV, read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
TINY = ["model.vocab_size=null", "model.hidden=32", "model.layers=1", "model.heads=2", "data.seq_len=32",
        "model.max_seq_len=32", "train.batch_size=4", "train.threads=1", "train.log_every=1",
        "train.checkpoint_every=2", "train.keep_last=2", "train.warmup_steps=3", "train.ema=0.9",
        "model.dropout=0.1"]


def _env(delay: float = 0.0) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(STEP_DELAY_ENV, None)
    if delay:
        env[STEP_DELAY_ENV] = str(delay)
    return env


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    prep = ["--config", "text", f"prep.tokenizer_dir={root / 'tok'}", f"prep.out_dir={root / 'shards'}",
            "prep.vocab_size=512", "data.seq_len=32", "model.max_seq_len=32"]
    for target in ("tokenizer", "shards"):
        subprocess.run([sys.executable, "-m", "pipeline", "prep", target, *prep], cwd=ROOT, env=_env(),
                       check=True, capture_output=True)
    return root / "shards"


def _args(shards: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--config", "text", f"data.manifest={shards}", f"run.dir={run}", f"train.steps={STEPS}",
            *TINY, *extra]


def _train(shards: Path, run: Path, *extra: str, delay: float = 0.0, nproc: int = 0,
           distributed: str = "ddp") -> subprocess.Popen:
    if nproc:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    f"--master_port={port}", "-m", "pipeline"]
        extra = (*extra, f"train.distributed={distributed}")
    else:
        launcher = [sys.executable, "-m", "pipeline"]
    return subprocess.Popen([*launcher, *_args(shards, run, *extra)], cwd=ROOT, env=_env(delay),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, expect: int = 0) -> str:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == expect, out[-3000:]
    return out


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int) -> None:
    """Until metrics.jsonl shows ``step`` and a complete checkpoint exists."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        rows = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
        if rows and rows[-1]["step"] >= step and list((run / "checkpoints").glob("step_*/COMPLETE")):
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within 60 s")


def _losses(run: Path) -> dict[int, float]:
    """Per-step loss; a step logged twice (rerun after a resume) counts with its last row."""
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}


def _final_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / f"step_{STEPS:08d}" / "state.pt", weights_only=True)


def _assert_same_run(a: Path, b: Path) -> None:
    assert _losses(a) == _losses(b) and sorted(_losses(a)) == list(range(1, STEPS + 1))
    sa, sb = _final_state(a), _final_state(b)
    for part in ("model", "ema"):
        for k, v in sa[part].items():
            assert torch.equal(v, sb[part][k]), f"{part}.{k} differs"


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """An uninterrupted single-process run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    _finish(_train(shards, run))
    return run


def test_kill_9_and_resume_equals_uninterrupted(shards, reference, tmp_path):
    run = tmp_path / "run"
    proc = _train(shards, run, delay=0.3)
    _wait_for_step(proc, run, 5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(_losses(run)) < STEPS
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    out = _finish(_train(shards, run))
    assert "resuming" in out
    assert json.loads((run / "run.json").read_text())["run_id"] == run_id  # stable across requeues
    _assert_same_run(reference, run)
    assert (run / "config.yaml").is_file()
    assert {"tokens_seen", "tokens_per_s", "data_wait_s", "step_s", "grad_norm", "lr", "mdm",
            "correction"} <= set(read_metrics(run / "metrics.jsonl")[-1])


def test_sigterm_saves_and_exits_3_then_resume_matches(shards, reference, tmp_path):
    run = tmp_path / "run"
    proc = _train(shards, run, delay=0.3)
    _wait_for_step(proc, run, 3)
    os.kill(proc.pid, signal.SIGTERM)
    out = _finish(proc, expect=EXIT_REQUEUE)
    stopped = max(_losses(run))
    assert stopped < STEPS and f"stopping at step {stopped}" in out
    assert (run / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE").is_file()
    _finish(_train(shards, run))
    _assert_same_run(reference, run)


def test_topology_change_is_refused_naming_it(shards, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    meta_file = max((run / "checkpoints").glob("step_*")) / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["topology"]["dp"] = 2  # as if saved by 2 ranks
    meta_file.write_text(json.dumps(meta))
    assert cli.main(_args(shards, run, f"train.steps={STEPS + 2}")) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dp: checkpoint 2, now 1" in err and "cannot resume" in err


@pytest.mark.parametrize(("override", "needle"), [
    ("train.backend=deepspeed", "train.backend='deepspeed' is not implemented yet"),
    ("train.backend=megatron", "train.backend='megatron' is not implemented yet"),
    ("train.distributed=zero", "train.distributed must be one of: none, ddp, fsdp"),
    ("train.grad_accum=0", "train.grad_accum must be > 0"),
    ("data.seq_len=16", "data.seq_len=32"),
])
def test_errors_are_one_line(shards, tmp_path, capsys, override, needle):
    assert cli.main(_args(shards, tmp_path / "run", override)) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err


def test_dry_run_prints_world_and_run_folder(shards, tmp_path, capsys):
    assert cli.main([*_args(shards, tmp_path / "run"), "--dry-run", "train.grad_accum=3"]) == 0
    out = capsys.readouterr().out
    assert "world size 1" in out and f"run folder {tmp_path / 'run'}" in out and "= 12" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ddp_kill_9_and_resume_equals_uninterrupted(shards, tmp_path, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    accum = ("train.grad_accum=2",)
    _finish(_train(shards, ref, *accum, nproc=2))
    proc = _train(shards, run, *accum, delay=0.3, nproc=2)
    _wait_for_step(proc, run, 5)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
    proc.wait()
    assert max(_losses(run)) < STEPS
    _finish(_train(shards, run, *accum, nproc=2))
    _assert_same_run(ref, run)
    # the DDP run folder cannot be resumed by one process
    assert cli.main(_args(shards, run, *accum, f"train.steps={STEPS + 2}")) == cli.EXIT_USER_ERROR
    assert "dp: checkpoint 2, now 1" in capsys.readouterr().err


@pytest.mark.slow
def test_fsdp_kill_9_and_resume_equals_uninterrupted(shards, tmp_path):
    """FSDP2 (2 ranks, grad accumulation, EMA, validation): kill -9 and resume equals uninterrupted;
    step 1 matches DDP; the checkpoint has DDP's format, so a DDP run resumes it."""
    ref, run, ddp = tmp_path / "ref", tmp_path / "run", tmp_path / "ddp"
    extra = ("train.grad_accum=2", "train.val_every=4", "train.val_batches=2")
    _finish(_train(shards, ref, *extra, nproc=2, distributed="fsdp"))
    proc = _train(shards, run, *extra, delay=0.3, nproc=2, distributed="fsdp")
    _wait_for_step(proc, run, 5)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
    proc.wait()
    assert max(_losses(run)) < STEPS
    out = _finish(_train(shards, run, *extra, nproc=2, distributed="fsdp"))
    assert "resuming" in out
    _assert_same_run(ref, run)
    assert "val_mdm_nelbo" in read_metrics(run / "metrics.jsonl")[-1]

    # same first steps as DDP (not bitwise: other reduction order), in the same state.pt layout
    fsdp2 = tmp_path / "fsdp2"
    _finish(_train(shards, ddp, *extra, "train.steps=2", nproc=2))
    _finish(_train(shards, fsdp2, *extra, "train.steps=2", nproc=2, distributed="fsdp"))
    assert _losses(ddp)[1] == pytest.approx(_losses(ref)[1], rel=1e-5)
    s_ddp = torch.load(ddp / "checkpoints" / f"step_{2:08d}" / "state.pt", weights_only=True)
    s_fsdp = torch.load(fsdp2 / "checkpoints" / f"step_{2:08d}" / "state.pt", weights_only=True)
    assert s_ddp.keys() == s_fsdp.keys() and s_ddp["model"].keys() == s_fsdp["model"].keys()
    for k, v in s_ddp["model"].items():
        torch.testing.assert_close(v, s_fsdp["model"][k])
    assert s_ddp["optimizer"]["param_groups"] == s_fsdp["optimizer"]["param_groups"]
    for i, st in s_ddp["optimizer"]["state"].items():
        for name, v in st.items():
            torch.testing.assert_close(v, s_fsdp["optimizer"]["state"][i][name])
    # ddp -> fsdp at the same world size resumes from that checkpoint
    out = _finish(_train(shards, ddp, *extra, "train.steps=4", nproc=2, distributed="fsdp"))
    assert "resuming" in out and sorted(_losses(ddp)) == [1, 2, 3, 4]
