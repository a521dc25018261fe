"""The run folder: one class owns its layout and the small files the pipeline keeps in it.

::

    runs/NAME/                 (run.dir, else runs/<run.name>)
      run.json                 run id and W&B id, created once, kept across requeues and resumes
      config.yaml              the resolved config of the latest start
      metrics.jsonl            one row per logged step (pipeline.runlog)
      logs/last_exit.json      how the latest start ended (read by the launcher to decide a requeue)
      checkpoints/step_*/      pipeline.checkpoint.manager
      exports/                 `proseco ckpt export` folders
      eval/                    `proseco eval` results and report
      slurm/                   job scripts, job.json and the job logs of `proseco launch`
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config, dump_yaml
from pipeline.io import atomic_write, atomic_write_json, read_json


class RunDir:
    """The paths of one run folder and the read / write of its run.json, config and last_exit."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.run_json = self.path / "run.json"
        self.config_yaml = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.logs = self.path / "logs"
        self.last_exit = self.logs / "last_exit.json"
        self.checkpoints = self.path / "checkpoints"
        self.exports = self.path / "exports"
        self.eval = self.path / "eval"
        self.slurm = self.path / "slurm"

    @classmethod
    def of(cls, cfg: Config) -> RunDir:
        """The run folder of ``cfg``: ``run.dir``, else ``runs/<run.name>``."""
        return cls(cfg.run.dir or f"runs/{cfg.run.name}")

    @classmethod
    def holding(cls, path: str | os.PathLike) -> RunDir | None:
        """The run folder ``path`` is (a folder with ``checkpoints/``) or whose checkpoint it is
        (``RUN/checkpoints/step_*``); None for anything else."""
        p = Path(path)
        if (p / "checkpoints").is_dir():
            return cls(p)
        if p.is_dir() and p.name.startswith("step_"):
            return cls(p.parent.parent)
        return None

    def __str__(self) -> str:
        return str(self.path)

    # ---- run.json ------------------------------------------------------------------------------
    def start(self, cfg: Config, saved_ids: Callable[[], tuple[dict, str | None]]) -> dict:
        """Create the folder and its run.json (run id and wandb id) once; reuse it on every requeue /
        resume. ``saved_ids()``: (the ids kept in the latest checkpoint, its name) or ({}, None).

        Written atomically. One that a crash or a full disk left unreadable is rebuilt from the
        latest checkpoint's copy (every checkpoint keeps the run ids), else started afresh."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        if self.run_json.exists():
            try:
                info = read_json(self.run_json)
                if isinstance(info, dict) and info.get("run_id") and info.get("logger_id"):
                    return info
                problem = "it holds no run id"
            except (OSError, ValueError) as exc:
                problem = f"{type(exc).__name__}: {exc}" if self.run_json.stat().st_size else "it is empty"
            saved, name = saved_ids()
            info = saved if saved.get("run_id") else self._new_info(cfg)
            source = f"the ids kept in {name}" if saved.get("run_id") else "a new run id"
            print(f"warning: {self.run_json} was unreadable ({problem}); rebuilt it from {source}", flush=True)
        else:
            info = self._new_info(cfg)
        atomic_write_json(self.run_json, info)
        return info

    @staticmethod
    def _new_info(cfg: Config) -> dict:
        run_id = uuid.uuid4().hex[:12]
        return {"run_id": run_id, "logger_id": run_id, "name": cfg.run.name, "created": time.time()}

    # ---- config.yaml, last_exit ------------------------------------------------------------------
    def write_config(self, cfg: Config) -> None:
        atomic_write(self.config_yaml, dump_yaml(cfg))

    def write_last_exit(self, step: int, exit_code: int, reason: str) -> None:
        """Record how this start ended (``reason``: ``finished``, ``time_budget`` or a signal name)."""
        atomic_write_json(self.last_exit, {"step": step, "exit_code": exit_code, "reason": reason,
                                           "time": time.time()})

    def read_last_exit(self) -> dict | None:
        """How the last start of the run ended: step, exit_code, reason (``finished``,
        ``time_budget`` or a signal name such as ``SIGUSR2``); None if unknown."""
        try:
            info = read_json(self.last_exit)
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None
