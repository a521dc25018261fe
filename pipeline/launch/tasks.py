"""The picklable callables a launched job runs on the nodes: a training rank, a prep partition or
merge, an eval shard. submitit pickles them at submission and calls them in each task."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from pipeline.config import Config, config_from_dict
from pipeline.rundir import RunDir

REQUEUE_REASONS = {"SIGUSR1", "SIGUSR2", "time_budget"}  # a stop the job asked for; SIGTERM is SLURM's
KILL_AT_START_ENV = "PROSECO_KILL_RANK_AT_START"  # fault-injection tests: this rank SIGKILLs itself at start


class TrainTask:
    """One training rank inside a SLURM job (picklable: submitit runs it on the nodes)."""

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def __call__(self) -> int:
        import submitit

        from pipeline import train

        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        cfg = config_from_dict(self.cfg)
        folder = RunDir.of(cfg).path
        print(f"proseco: rank {env.rank}/{env.world_size} (local {env.local_rank}) on {os.uname().nodename}, "
              f"master {env.master_addr}:{env.master_port}, restart {os.environ.get('SLURM_RESTART_COUNT', '0')}",
              flush=True)
        if os.environ.get(KILL_AT_START_ENV) == str(env.rank):
            print(f"proseco: {KILL_AT_START_ENV}={env.rank}: killing this rank before the process group "
                  f"forms, at {time.time():.3f}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        code = train.run(cfg)
        # The loop is over (done, or saved for a requeue): a time-limit warning that arrives now, while
        # the interpreter tears down (CPython then resets handlers to the default, which terminates),
        # would mark a finished job FAILED. Ignored handlers survive teardown.
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        if code == train.EXIT_REQUEUE and env.rank == 0:
            _requeue_after_stop(cfg, folder)
        return code

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on SIGUSR2 outside the train loop (start-up): requeue the same task;
        the train loop then resumes from the latest checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainTask(self.cfg))


def _requeue_after_stop(cfg: Config, folder: Path) -> None:
    last = RunDir(folder).read_last_exit() or {}
    job = os.environ.get("SLURM_JOB_ID")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    reason = last.get("reason")
    if job is None or reason not in REQUEUE_REASONS:
        print(f"proseco: stopped at step {last.get('step')} ({reason}); not requeueing", flush=True)
        return
    if restarts >= cfg.cluster.max_requeues:
        print(f"proseco: stopped at step {last.get('step')} ({reason}) after {restarts} restarts = "
              f"cluster.max_requeues; not requeueing (resubmit `proseco launch` to continue)", flush=True)
        return
    print(f"proseco: stopped at step {last.get('step')} ({reason}); requeueing job {job} "
          f"(restart {restarts + 1} of at most {cfg.cluster.max_requeues})", flush=True)
    subprocess.run(["scontrol", "requeue", job], check=False)


class PrepPartTask:
    """``proseco prep shards --task i/n`` as one array task."""

    def __init__(self, cfg: dict, parts: int):
        self.cfg, self.parts = cfg, parts

    def __call__(self, index: int) -> int:
        from data_prep import stages

        return int(stages.shards(config_from_dict(self.cfg), None, task=f"{index}/{self.parts}") or 0)


class EvalShardTask:
    """``proseco eval RUN --shard i/n`` as one array task."""

    def __init__(self, cfg: dict, spec: str, out: str, parts: int):
        self.cfg, self.spec, self.out, self.parts = cfg, spec, out, parts

    def __call__(self, index: int) -> int:
        from pipeline.evaluation import runner

        return runner.run(config_from_dict(self.cfg), self.spec, shard_spec=f"{index}/{self.parts}", out=self.out,
                          command=f"proseco eval {self.spec} --shard {index}/{self.parts} --out {self.out}")


class PrepMergeTask:
    """``proseco prep merge`` as the job that runs after every prep array task succeeded."""

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def __call__(self) -> int:
        from data_prep import stages

        return int(stages.merge(config_from_dict(self.cfg), None) or 0)
