"""Helpers for tests that need a real SLURM cluster (see slurm/cluster/README.md).

Start the throw-away test cluster with ``bash slurm/cluster/start.sh`` and export the
``SLURM_CONF`` it prints; without it every test marked with :data:`pytestmark_slurm` is skipped
with the reason from :func:`slurm_available`.

Usage in a test module::

    from slurm_helpers import pytestmark_slurm, wait_job
    pytestmark = pytestmark_slurm

Job-side code (functions sent through submitit) must be importable on the nodes: functions
defined here are, once :data:`JOB_PYTHONPATH` is on the job's ``PYTHONPATH`` (see
:func:`job_setup`).
"""

from __future__ import annotations

import functools
import getpass
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
#: PYTHONPATH for job-side code: this folder (slurm_helpers) and the repo root (pipeline, data_prep).
JOB_PYTHONPATH = f"{TESTS_DIR}{os.pathsep}{REPO_ROOT}"

#: States after which a job (or array task) will not change any more.
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)


# ---------------------------------------------------------------- availability / markers


@functools.lru_cache(maxsize=1)
def slurm_available(timeout: float = 5.0) -> str | None:
    """None when a SLURM cluster answers, else a one-line reason why not (cached)."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH (install: bash slurm/cluster/install.sh)"
    conf = os.environ.get("SLURM_CONF")
    if not conf:
        if not Path("/etc/slurm/slurm.conf").exists():
            return "SLURM_CONF is not set (start the test cluster: bash slurm/cluster/start.sh)"
    elif not Path(conf).is_file():
        return f"SLURM_CONF={conf} does not exist (start the test cluster: bash slurm/cluster/start.sh)"
    try:
        res = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], check=False, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"SLURM controller unreachable (sinfo timed out after {timeout:g} s)"
    if res.returncode != 0 or not res.stdout.strip():
        err = (res.stderr.strip().splitlines() or ["no nodes"])[-1]
        return f"SLURM controller unreachable (sinfo: {err})"
    return None


def _skip_reason() -> str:
    return slurm_available() or ""


#: ``pytestmark = pytestmark_slurm``: mark ``slurm`` + skip (with the reason) when no cluster answers.
pytestmark_slurm = [
    pytest.mark.slurm,
    pytest.mark.skipif(slurm_available() is not None, reason=_skip_reason()),
]


def job_setup() -> list[str]:
    """Lines for submitit's ``slurm_setup`` so the job side can import slurm_helpers and pipeline."""
    return [f'export PYTHONPATH="{JOB_PYTHONPATH}${{PYTHONPATH:+:$PYTHONPATH}}"']


# ---------------------------------------------------------------- polling


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.2, what: str = "") -> T:
    """Call ``predicate`` until it returns something truthy and return that; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what or predicate!r}")
        time.sleep(interval)


def _run(*cmd: str, timeout: float = 15.0, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=check)


# ---------------------------------------------------------------- job state


def job_states(job_id: str | int) -> dict[str, str]:
    """{JobID: State} from sacct (allocations only; array tasks listed one by one), {} if unknown yet.

    States are reduced to their first word ("CANCELLED by 0" -> "CANCELLED").
    """
    res = _run("sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "JobID,State")
    out: dict[str, str] = {}
    if res.returncode == 0:
        for line in res.stdout.splitlines():
            if "|" in line:
                jid, state = line.split("|", 1)
                out[jid.strip()] = (state.split() or ["UNKNOWN"])[0].rstrip("+")
    return out


def job_state(job_id: str | int) -> str:
    """State of a job from sacct, falling back to squeue while sacct does not know it yet.

    For an array parent id, the common state of all tasks, or "MIXED" while they differ.
    Returns "UNKNOWN" when neither knows the job.
    """
    jid = str(job_id)
    states = job_states(jid)
    if jid in states:
        return states[jid]
    if states:
        distinct = set(states.values())
        return distinct.pop() if len(distinct) == 1 else "MIXED"
    res = _run("squeue", "-h", "-j", jid, "-o", "%T")
    lines = sorted(set(res.stdout.split())) if res.returncode == 0 else []
    if len(lines) == 1:
        return lines[0]
    return "MIXED" if lines else "UNKNOWN"


def describe_job(job_id: str | int) -> str:
    """sacct + scontrol view of a job, for assertion messages."""
    acct = _run("sacct", "-P", "-j", str(job_id), "-o", "JobID,State,ExitCode,NodeList,Reason%40").stdout
    show = _run("scontrol", "show", "job", str(job_id)).stdout
    return f"sacct:\n{acct}\nscontrol show job:\n{show}"


def wait_job(
    job_id: str | int,
    states: Iterable[str] = ("COMPLETED",),
    timeout: float = 60.0,
    interval: float = 0.5,
    fail_fast: bool = True,
) -> str:
    """Wait until the job (every task, for an array) is in one of ``states``; return that state.

    With ``fail_fast``, raise RuntimeError as soon as every task is terminal but not in ``states``
    (e.g. FAILED while waiting for COMPLETED). TimeoutError (with the job's description) otherwise.
    """
    wanted = {s.upper() for s in states}
    jid = str(job_id)
    deadline = time.monotonic() + timeout
    last = "UNKNOWN"
    while True:
        per_task = job_states(jid)
        if jid in per_task:
            per_task = {jid: per_task[jid]}
        values = set(per_task.values()) or {job_state(jid)}
        last = ",".join(sorted(values))
        if values <= wanted:
            return values.pop() if len(values) == 1 else last
        if fail_fast and values <= TERMINAL_STATES and not values <= wanted:
            raise RuntimeError(f"job {jid} ended {last}, wanted {sorted(wanted)}\n{describe_job(jid)}")
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"job {jid} still {last} after {timeout:g} s, wanted {sorted(wanted)}\n{describe_job(jid)}"
            )
        time.sleep(interval)


# ---------------------------------------------------------------- requeue / cleanup


def requeue(job_id: str | int) -> None:
    """``scontrol requeue``: kill the running job and put it back in the queue (it then waits
    ~121 s in Reason=BeginTime unless :func:`release_requeue_hold` is called)."""
    _run("scontrol", "requeue", str(job_id), check=True)


def _pending_reason(job_id: str) -> str:
    res = _run("squeue", "-h", "-j", job_id, "-o", "%r")
    return res.stdout.strip() if res.returncode == 0 else ""


def _nodes_completing() -> bool:
    res = _run("sinfo", "-h", "-N", "-t", "completing", "-o", "%N")
    return res.returncode != 0 or bool(res.stdout.strip())


def release_requeue_hold(job_id: str | int, timeout: float = 60.0, settle: float = 2.0) -> None:
    """Let a requeued job start again now instead of after SLURM's ~121 s requeue hold.

    Safe order (releasing at once made the restarted job fail instantly): wait until the job
    pends with Reason=BeginTime and no node is COMPLETING any more, wait ``settle`` s, then
    ``scontrol update JobId=... StartTime=now``.
    """
    jid = str(job_id)
    wait_for(
        lambda: _pending_reason(jid) == "BeginTime" and not _nodes_completing(),
        timeout=timeout,
        interval=0.25,
        what=f"job {jid} to pend on BeginTime with no node COMPLETING",
    )
    time.sleep(settle)
    _run("scontrol", "update", f"JobId={jid}", "StartTime=now", check=True)


def cancel(*job_ids: str | int) -> None:
    """scancel the given jobs (ignores ids that are already gone)."""
    if job_ids:
        _run("scancel", *[str(j) for j in job_ids])


def cancel_under(folder: str | os.PathLike, timeout: float = 30.0) -> None:
    """Cancel the jobs whose batch script lies under ``folder`` (a test's tmp_path: submitit writes
    it into the job folder) and wait until they left the queue. Other users' and sessions' jobs on
    the same cluster are left alone, unlike :func:`cancel_all`."""
    prefix = str(Path(folder).resolve()) + os.sep

    def ours() -> list[str]:
        res = _run("squeue", "-h", "-t", "PD,R,CG,S,CF", "-o", "%F|%o")
        rows = [line.split("|", 1) for line in res.stdout.splitlines() if "|" in line]
        return sorted({jid for jid, script in rows if script.startswith(prefix)})

    jobs = ours()
    if jobs:
        cancel(*jobs)
        wait_for(lambda: not ours(), timeout=timeout, interval=0.5, what=f"the jobs under {folder} to leave the queue")


def cancel_all(wait: bool = True, timeout: float = 30.0) -> None:
    """Cancel every job of the current user and (optionally) wait until none is left in the
    queue as pending/running/completing."""
    user = getpass.getuser()
    _run("scancel", "-u", user)
    if wait:
        wait_for(
            lambda: not _run("squeue", "-h", "-u", user, "-t", "PD,R,CG,S,CF", "-o", "%i").stdout.strip(),
            timeout=timeout,
            interval=0.5,
            what=f"the jobs of {user} to leave the queue",
        )


# ---------------------------------------------------------------- job-side functions


def distributed_allreduce() -> dict:
    """Runs inside a submitit task: gloo all_reduce of (rank + 1) over all tasks.

    With 2 tasks every rank returns sum == 3.0.
    """
    from datetime import timedelta

    import submitit
    import torch
    import torch.distributed as dist

    env = submitit.helpers.TorchDistributedEnvironment().export()
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        t = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(t)
        return {
            "rank": env.rank,
            "world_size": env.world_size,
            "sum": t.item(),
            "node": os.environ.get("SLURMD_NODENAME", ""),
            "master": f"{env.master_addr}:{env.master_port}",
        }
    finally:
        dist.destroy_process_group()
