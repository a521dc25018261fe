"""The SLURM side of ``proseco launch``: executor parameters, the job script, and the one submit recipe.

:func:`submit` is the recipe every launch (train, prep, eval) goes through: refuse a run folder
whose recorded job is still active, build the submitit executor, let ``sbatch --test-only``
check the job script, snapshot config and code into ``FOLDER/launch/<time>-<stage>/``, submit,
and record the job in ``FOLDER/slurm/job.json`` (read back by ``status``/``cancel`` and by the
next launch). :func:`job_state` asks squeue/sacct for a job's state.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config, dump_yaml
from pipeline.errors import ProsecoError
from pipeline.io import atomic_write, atomic_write_json

ROOT = Path(__file__).resolve().parents[2]
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}


def slurm_parameters(cfg: Config, name: str, **extra) -> dict:
    """submitit ``SlurmExecutor`` parameters for ``cfg.cluster`` (``extra`` added or overriding)."""
    c = cfg.cluster
    params = {"job_name": name, "nodes": c.nodes, "ntasks_per_node": c.tasks_per_node,
              "cpus_per_task": c.cpus_per_task, "time": c.time_min, "signal_delay_s": c.signal_delay_s,
              "array_parallelism": c.array_parallelism, "stderr_to_stdout": False,
              "srun_args": ["--kill-on-bad-exit=1"] if c.kill_on_bad_exit else [],
              "setup": [f"cd {ROOT}", f"source {ROOT / 'slurm' / 'env.sh'}", *c.setup]}
    for key, value in (("partition", c.partition), ("account", c.account), ("qos", c.qos),
                       ("constraint", c.constraint)):
        if value:
            params[key] = value
    if c.gpus_per_node:
        params["gpus_per_node"] = c.gpus_per_node
    if c.mem_gb:
        params["mem"] = f"{int(c.mem_gb * 1024)}MB"
    return {**params, **extra}


def train_parameters(cfg: Config, run: Path, name: str) -> dict:
    """The training job's parameters: requeueable (``--requeue``; the self-requeues need it where
    SLURM's default is not to requeue) and, with cluster.retries_on_failure, the failure requeue."""
    extra: dict = {"additional_parameters": {"requeue": True}}
    if cfg.cluster.retries_on_failure:
        extra["teardown"] = requeue_on_failure(run / "slurm", cfg.cluster.retries_on_failure)
    return slurm_parameters(cfg, name, **extra)


# Job-script lines after srun (submitit's "teardown"); {folder} and {retries} are filled in.
REQUEUE_ON_FAILURE = """\
proseco_exit=$?
proseco_failures={folder}/"${{SLURM_JOB_ID}}_failures.log"
if [ "$proseco_exit" -ne 0 ]; then
    echo "$(date -Is) restart ${{SLURM_RESTART_COUNT:-0}}: srun exit $proseco_exit" >> "$proseco_failures"
    proseco_n=$(wc -l < "$proseco_failures")
    if [ "$proseco_n" -le {retries} ]; then
        echo "proseco: the training step failed (srun exit $proseco_exit): requeueing job $SLURM_JOB_ID" \\
             "(retry $proseco_n of cluster.retries_on_failure={retries})"
        scontrol requeue "$SLURM_JOB_ID" || echo "proseco: scontrol requeue failed; the job ends here"
    else
        echo "proseco: the training step failed (srun exit $proseco_exit): giving up, the" \\
             "cluster.retries_on_failure={retries} requeue(s) are used; failures listed in $proseco_failures"
    fi
fi
exit "$proseco_exit"
"""


def requeue_on_failure(folder: Path, retries: int) -> list[str]:
    """The job-script lines, run after ``srun`` returns, that requeue a failed step up to ``retries`` times.

    srun returns 0 when every rank returned, having finished or saved for a planned requeue (which
    rank 0 already asked for; SLURM's SIGTERM then ends the script before these lines). Anything
    else is a failure: a rank that raised or was killed, a lost node. Failures are counted per job in
    ``FOLDER/<job>_failures.log``, a line each (SLURM_RESTART_COUNT also counts planned requeues).
    """
    return REQUEUE_ON_FAILURE.format(folder=shlex.quote(str(folder)), retries=retries).splitlines()


def make_executor(cfg: Config, folder: Path, params: dict):
    """A submitit executor writing its job files and logs to ``folder`` (``params``: slurm_parameters)."""
    try:
        import submitit
    except ImportError as exc:
        raise ProsecoError(f"proseco launch needs submitit ({exc}); pip install submitit") from None
    c = cfg.cluster
    check_slurm_commands(cfg)
    if c.executor == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=c.time_min, tasks_per_node=c.nodes * c.tasks_per_node,
                             nodes=1, gpus_per_node=c.gpus_per_node, cpus_per_task=c.cpus_per_task,
                             signal_delay_s=c.signal_delay_s, name=params["job_name"])
        return ex
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=c.max_requeues)
    ex.update_parameters(**params)
    return ex


def job_script(cfg: Config, folder: Path, params: dict, array: int = 1) -> str:
    """The sbatch script submitit's SlurmExecutor submits for ``params`` (rendered by submitit's own
    function, so it is exactly what goes to sbatch; no SLURM command is needed to render it).
    ``array``: the number of tasks ``map_array`` submits (submitit makes an array job of more than one)."""
    if cfg.cluster.executor == "local":
        return "# cluster.executor=local: no job script (submitit starts the tasks as local processes)\n"
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([sys.executable, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    map_count = array if array > 1 else None  # submitit submits a single task as a plain job
    return _make_sbatch_string(command=command, folder=folder, map_count=map_count, **params)


def check_slurm_commands(cfg: Config) -> None:
    if cfg.cluster.executor != "slurm":
        return
    missing = [cmd for cmd in ("sbatch", "srun", "squeue", "scontrol") if shutil.which(cmd) is None]
    if missing:
        raise ProsecoError(f"SLURM commands not found on PATH: {', '.join(missing)}. Run this on a SLURM login node, "
                           "or use cluster.executor=local to run the job on this machine")


def preflight(cfg: Config, script: str) -> None:
    """``sbatch --test-only`` on the job script: SLURM checks partition, resources and limits and
    answers without queueing anything, so a job that could never start is refused here (a plain
    sbatch would accept e.g. more nodes than the partition has and leave the job pending forever)."""
    if cfg.cluster.executor != "slurm":
        return
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=120,
                             check=False)
    except subprocess.TimeoutExpired:
        raise ProsecoError("sbatch --test-only got no answer in 120 s: is the SLURM controller reachable?") from None
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        lines = [line for line in (out.stderr + out.stdout).splitlines() if line.strip()]
        raise sbatch_error(RuntimeError(" / ".join(lines[-2:]) or f"exit {out.returncode}"))


def sbatch_error(exc: Exception) -> ProsecoError:
    text = " ".join(str(exc).split())
    hint = ""
    if "partition" in text.lower():
        hint = " (check cluster.partition; `sinfo -s` lists the partitions)"
    elif "unable to contact" in text.lower() or "connection refused" in text.lower():
        hint = " (the SLURM controller is unreachable: is slurmctld running and SLURM_CONF right?)"
    elif any(k in text.lower() for k in ("node configuration is not available", "node count", "partitionconfig",
                                          "more processors", "memory specification")):
        hint = " (more nodes / CPUs / GPUs / memory than the partition has: lower cluster.*)"
    return ProsecoError(f"sbatch refused the job: {text}{hint}; nothing was submitted")


def job_file(run: Path) -> Path:
    return run / "slurm" / "job.json"


def job_state(job_id: str) -> str:
    """SLURM's state of a job (squeue while it is known there, else sacct); UNKNOWN if neither says."""
    for cmd in (["squeue", "-h", "-j", job_id, "-o", "%T"],
                ["sacct", "-n", "-X", "-P", "-j", job_id.split("_")[0], "-o", "State"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        except subprocess.TimeoutExpired:
            continue
        lines = [line.split()[0] for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []
        if lines:
            return lines[0].rstrip("+")
    return "UNKNOWN"


def check_not_owned(run: Path) -> None:
    if not job_file(run).is_file():
        return
    job = read_job(run)
    state = job_state(str(job["job_id"]))
    if state in ACTIVE_STATES:
        raise ProsecoError(f"run folder {run} belongs to job {job['job_id']}, which is {state}; a run folder takes "
                           f"one job at a time. Wait for it, `proseco cancel {run}`, or pick another run.name")


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout if out.returncode == 0 else ""


def snapshot(run: Path, cfg: Config, script: str, stage: str) -> Path:
    """``RUN/launch/<time>-<stage>/``: the resolved config, the job script, the code version and its diff."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    snap = run / "launch" / f"{stamp}-{stage}"
    snap.mkdir(parents=True, exist_ok=True)
    code = {"git_sha": _git("rev-parse", "HEAD").strip() or None, "dirty": bool(_git("status", "--porcelain").strip()),
            "argv": sys.argv}
    for name, text in (("config.yaml", dump_yaml(cfg)), ("job.sbatch", script),
                       ("code.json", json.dumps(code, indent=1) + "\n"), ("code.diff", _git("diff", "HEAD"))):
        atomic_write(snap / name, text)
    return snap


def read_job(run: Path) -> dict:
    path = job_file(run)
    if not path.is_file():
        raise ProsecoError(f"{run} has no launched job ({path} missing); `proseco launch` writes it")
    try:
        job = json.loads(path.read_text())
        str(job["job_id"])
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ProsecoError(f"{path} is unreadable ({type(exc).__name__}: {exc}); if no job of this run is queued "
                           "or running (squeue), delete it and launch again") from None
    return job


def array_id(jobs: list) -> str:
    """The array job's id from the jobs submitit's ``map_array`` returned (``ARRAY_TASK`` ids)."""
    return jobs[0].job_id.split("_")[0]


def submit(cfg: Config, folder: Path, stage: str, params: dict, script: str,
           send: Callable[[object], dict]) -> dict:
    """The one submit recipe (module doc); ``send(executor)`` submits and returns the job ids to record.

    Returns the record written to ``FOLDER/slurm/job.json``: ``send``'s keys (``job_id`` at least)
    plus ``stage``, ``submitted`` (time), ``snapshot`` (folder) and ``executor``.
    """
    check_not_owned(folder)
    executor = make_executor(cfg, folder / "slurm", params)
    preflight(cfg, script)
    snap = snapshot(folder, cfg, script, stage)
    submitted = time.time()
    try:
        ids = send(executor)
    except Exception as exc:  # submitit wraps sbatch's error output
        raise sbatch_error(exc) from exc
    record = {**ids, "stage": stage, "submitted": submitted, "snapshot": str(snap),
              "executor": cfg.cluster.executor}
    atomic_write_json(job_file(folder), record)
    return record
