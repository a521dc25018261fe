"""Smoke tests of the SLURM test cluster (slurm/cluster/start.sh): multi-node, arrays, requeue, submitit.

Skipped (with the reason) unless a cluster answers: ``bash slurm/cluster/start.sh`` and export the
SLURM_CONF it prints.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from slurm_helpers import (
    cancel,
    describe_job,
    distributed_allreduce,
    job_setup,
    pytestmark_slurm,
    release_requeue_hold,
    requeue,
    wait_for,
    wait_job,
)

pytestmark = pytestmark_slurm


@pytest.fixture
def jobs():
    """Collects the ids of the jobs a test submits and cancels them afterwards."""
    ids: list[str] = []
    yield ids
    cancel(*ids)


def sbatch(*args: str) -> str:
    res = subprocess.run(
        ["sbatch", "--parsable", *args], check=False, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def sacct_field(job_id: str, field: str) -> str:
    res = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", field],
        check=False,
        capture_output=True,
        text=True,
        timeout=15,
    )
    return res.stdout.strip()


def test_two_node_srun(tmp_path: Path, jobs: list[str]):
    jid = sbatch("-N", "2", "-o", str(tmp_path / "%j.out"), "--wrap", "srun hostname")
    jobs.append(jid)
    assert wait_job(jid, timeout=30) == "COMPLETED"
    # sacct lags slurmctld: State can read COMPLETED while NodeList still shows only the batch host
    try:
        wait_for(lambda: sacct_field(jid, "State,NodeList") == "COMPLETED|node[1-2]", timeout=15)
    except TimeoutError:
        pytest.fail(f"sacct never showed COMPLETED on node[1-2]\n{describe_job(jid)}")
    out = (tmp_path / f"{jid}.out").read_text().split()
    assert len(out) == 2, out  # one line per node


def test_kill_on_bad_exit_ends_the_step_when_one_task_dies(tmp_path: Path, jobs: list[str]):
    """What `proseco launch` relies on: with --kill-on-bad-exit, task 1 being killed ends task 0 too
    (at once here; a task that ignores SIGTERM lives KillWait longer), srun returns non-zero and
    the batch script goes on after it."""
    task = "[ $SLURM_PROCID = 1 ] && kill -9 $$; sleep 300"
    jid = sbatch("-N", "2", "-o", str(tmp_path / "out"), "--wrap",
                 f"srun --kill-on-bad-exit=1 bash -c '{task}'; echo \"srun exit $?\"")
    jobs.append(jid)
    t0 = time.monotonic()
    assert wait_job(jid, timeout=60) == "COMPLETED"  # the script's last command is the echo
    assert time.monotonic() - t0 < 40, describe_job(jid)
    lines = (tmp_path / "out").read_text().splitlines()
    assert lines[-1].startswith("srun exit ") and lines[-1] != "srun exit 0", lines


def test_array_runs_each_task_once(tmp_path: Path, jobs: list[str]):
    jid = sbatch(
        "--array=0-3",
        "-o",
        "/dev/null",
        "--wrap",
        f'echo "$SLURM_ARRAY_TASK_ID $SLURM_ARRAY_JOB_ID" >> {tmp_path}/task_$SLURM_ARRAY_TASK_ID',
    )
    jobs.append(jid)
    assert wait_job(jid, timeout=40) == "COMPLETED"
    files = sorted(p.name for p in tmp_path.glob("task_*"))
    assert files == [f"task_{i}" for i in range(4)]
    for i in range(4):
        lines = (tmp_path / f"task_{i}").read_text().splitlines()
        assert lines == [f"{i} {jid}"], lines


def test_requeue_restarts_job(tmp_path: Path, jobs: list[str]):
    starts = tmp_path / "starts"
    script = (
        f'echo "start ${{SLURM_RESTART_COUNT-unset}}" >> {starts}; '
        '[ "${SLURM_RESTART_COUNT:-0}" = 0 ] && sleep 300; exit 0'
    )
    jid = sbatch("--requeue", "-o", str(tmp_path / "out"), "--open-mode=append", "--wrap", script)
    jobs.append(jid)
    wait_for(lambda: starts.exists() and starts.read_text().strip(), timeout=30, what="first start")
    requeue(jid)
    release_requeue_hold(jid, timeout=40)
    assert wait_job(jid, timeout=30) == "COMPLETED"
    # SLURM sets SLURM_RESTART_COUNT only on restarts: unset on the first start, then 1
    assert starts.read_text().splitlines() == ["start unset", "start 1"], describe_job(jid)


def test_submitit_two_node_gloo_allreduce(tmp_path: Path, jobs: list[str]):
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(
        nodes=2,
        tasks_per_node=1,
        cpus_per_task=1,
        timeout_min=5,
        slurm_partition="debug",
        slurm_setup=job_setup(),
    )
    job = executor.submit(distributed_allreduce)
    jobs.append(job.job_id)
    wait_for(job.done, timeout=60, interval=1.0, what=f"submitit job {job.job_id}")
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert sorted(r["node"] for r in results) == ["node1", "node2"]
    # results are written before the job ends; submitit reads the final state from sacct
    wait_for(lambda: job.state == "COMPLETED", timeout=20, interval=0.5, what="submitit to see COMPLETED")
