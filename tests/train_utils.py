"""Helpers shared by the training and launcher tests: tiny-run settings, subprocess runs of
`proseco train`, and comparisons of run folders (losses per step, final weights)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.runlog import read_metrics
from pipeline.train import SAVE_DELAY_ENV, STEP_DELAY_ENV

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
TINY = ["model.vocab_size=null", "model.hidden=32", "model.layers=1", "model.heads=2", "data.seq_len=32",
        "model.max_seq_len=32", "optim.batch_size=4", "parallel.threads=1", "log.every=1",
        "checkpoint.every=2", "checkpoint.keep_last=2", "optim.warmup_steps=3", "optim.ema=0.9",
        "model.dropout=0.1", "log.wandb=disabled"]


def _env(delay: float = 0.0, save_delay: float = 0.0) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # set in this process by an in-process DeepSpeed run: not for the child's launcher
    for key, value in ((STEP_DELAY_ENV, delay), (SAVE_DELAY_ENV, save_delay)):
        env.pop(key, None)
        if value:
            env[key] = str(value)
    return env


def _args(shards: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--config", "text", f"data.shards={shards}", f"run.dir={run}", f"optim.steps={STEPS}",
            *TINY, *extra]


def _train(shards: Path, run: Path, *extra: str, delay: float = 0.0, nproc: int = 0,
           distributed: str | None = "ddp", save_delay: float = 0.0, torchrun: bool = False) -> subprocess.Popen:
    """`proseco train` in a subprocess (its own session); ``nproc`` ranks through `proseco train
    --nproc` (its launcher imports no torch, so ranks start sooner) or, with ``torchrun``, torchrun."""
    launcher = [sys.executable, "-m", "pipeline"]
    if nproc:
        extra = (*extra, f"parallel.distributed={distributed}") if distributed else extra
        if torchrun:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                        f"--master_port={port}", "-m", "pipeline"]
        else:
            extra = (*extra, "--nproc", str(nproc))
    return subprocess.Popen([*launcher, *_args(shards, run, *extra)], cwd=ROOT, env=_env(delay, save_delay),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _train_here(shards: Path, run: Path, *extra: str) -> None:
    """`proseco train` in this process: the same computation as a one-process :func:`_train`,
    without ~4 s of interpreter and torch start-up (tests read what it printed with capsys)."""
    from pipeline import cli

    assert cli.main(_args(shards, run, *extra)) == 0


def _kill9(proc: subprocess.Popen) -> None:
    """kill -9 a run and every rank it started (`--nproc` ranks live in sessions of their own)."""
    import psutil

    try:
        ranks = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        ranks = []
    for p in ranks:  # the ranks first: killed after the launcher they would get SIGTERM and save
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


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


