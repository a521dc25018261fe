"""`proseco launch | status | cancel` (pipeline/launch/) and the start-up rendezvous (pipeline/distributed.py).

The first tests need no cluster (dry runs, one against a golden file; refusals; the failure
requeue lines run by bash; the rendezvous deadline). The ``slurm`` ones run against the real local
cluster of ``slurm/cluster/`` (CI starts it; they skip with the reason when it is absent): a 2-node
x 1-task gloo training job, the same job requeued mid-run, a job that reaches its time limit and
requeues itself, a rank killed at start-up, and prep / eval array jobs.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_helpers as sh
import torch
import yaml
from train_utils import ROOT, STEPS, TINY, _finish, _losses, _train

from pipeline import cli, launch
from pipeline.config import load_config
from pipeline.errors import ProsecoError
from pipeline.runlog import read_metrics

GOLDEN = Path(__file__).resolve().parent / "golden" / "launch_train_dry_run.sbatch"


def _launch_args(shards: Path, run: Path, *extra: str) -> list[str]:
    return ["launch", "train", "--config", "text", "--config", "cluster_local", f"data.shards={shards}",
            f"run.dir={run}", f"optim.steps={STEPS}", *TINY, *extra]


def _normalise(script: str, run: Path) -> str:
    return script.replace(str(run), "<RUN>").replace(sys.executable, "<PYTHON>").replace(str(ROOT), "<ROOT>")


def _sections(out: str) -> dict[str, str]:
    """A dry run's output by section title (``# ===== title =====`` lines)."""
    parts = re.split(r"^# ===== (.+) =====\n", out, flags=re.MULTILINE)
    assert parts[0] == "", parts[0]
    return {title: body for title, body in zip(parts[1::2], parts[2::2])}


def test_dry_run_prints_the_job_script_matching_the_golden_file_and_what_each_task_runs(shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main([*_launch_args(shards, run), "--dry-run"]) == 0
    out = capsys.readouterr()
    sections = _sections(_normalise(out.out, run))
    assert list(sections) == ["job script (sbatch; exactly what would be submitted)", "each of the 2 tasks runs",
                              "the resolved config"]
    script, tasks, config = sections.values()
    if os.environ.get("PROSECO_UPDATE_GOLDEN"):
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text()
    assert "srun" in script and "--kill-on-bad-exit=1" in script and "#SBATCH --requeue" in script
    assert "# teardown" not in script  # no failure requeue unless cluster.retries_on_failure asks for one
    assert "RANK = SLURM_PROCID (0..1)" in tasks and "WORLD_SIZE = 2" in tasks and "MASTER_ADDR = the first node" in tasks
    assert "pipeline.train.run(cfg)" in tasks and "run folder <RUN>" in tasks
    assert "cluster.startup_timeout_s=300" in tasks and "not requeued" in tasks
    resolved = yaml.safe_load(config)  # the config each task runs, as `proseco train --config` would load it
    assert resolved["run"]["dir"] == "<RUN>" and resolved["optim"]["steps"] == STEPS
    assert resolved["cluster"]["nodes"] == 2 and resolved["data"]["shards"] == str(shards)
    assert out.err == ""  # a CPU config asks for no GPU: no warning
    assert not run.exists()  # a dry run writes nothing



def test_a_hugging_face_init_named_from_here_is_made_absolute(shards, tmp_path, capsys, monkeypatch):
    """The tasks start in the repository: model.init=hf:PATH relative to where launch ran becomes
    absolute (a folder that does not exist is left for the run's own error)."""
    from hf_utils import arithmetic_records, build_llama_folder, build_tokenizer

    tok = build_tokenizer([r["prompt"] + r["response"] for r in arithmetic_records(8)])
    build_llama_folder(tmp_path / "llama", tok)
    monkeypatch.chdir(tmp_path)
    args = [*_launch_args(shards, tmp_path / "run"), "model.vocab_size=null", "--dry-run"]
    assert cli.main([*args, "model.init=hf:llama"]) == 0
    out = capsys.readouterr().out  # reading the folder imported transformers, and DeepSpeed printed a line
    config = _sections(out[out.index("# ===== "):])["the resolved config"]
    assert yaml.safe_load(config)["model"]["init"] == f"hf:{tmp_path / 'llama'}"


def test_retries_on_failure_add_the_requeue_lines_and_kill_on_bad_exit_can_be_turned_off(shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main([*_launch_args(shards, run, "cluster.retries_on_failure=2"), "--dry-run"]) == 0
    script = _sections(capsys.readouterr().out)["job script (sbatch; exactly what would be submitted)"]
    command, teardown = script.split("# teardown\n")
    assert "--kill-on-bad-exit=1" in command and "srun" in command
    assert teardown.startswith("proseco_exit=$?\n") and 'scontrol requeue "$SLURM_JOB_ID"' in teardown
    assert f"{run}/slurm/" in teardown and "cluster.retries_on_failure=2" in teardown
    assert teardown.rstrip().endswith('exit "$proseco_exit"')
    assert cli.main([*_launch_args(shards, run, "cluster.kill_on_bad_exit=false"), "--dry-run"]) == 0
    assert "kill-on-bad-exit" not in capsys.readouterr().out
    for bad in ("cluster.retries_on_failure=-1", "cluster.startup_timeout_s=0"):
        assert cli.main([*_launch_args(shards, run, bad), "--dry-run"]) == cli.EXIT_USER_ERROR
        assert bad.split("=")[0] in capsys.readouterr().err


def test_a_time_limit_signal_after_the_loop_ended_does_not_kill_the_task(tmp_path):
    """Seen on the SLURM cluster: a run finished just as SLURM's time-limit warning (SIGUSR2) came;
    the task was tearing down, the signal killed it and the finished job was marked FAILED. After
    the loop, a task ignores the warning signals for good (a signal during teardown exits 0)."""
    code = f"""
import os, signal, types, submitit
from pipeline import train
from pipeline.config import Config, to_dict
from pipeline.launch.tasks import TrainTask
env = types.SimpleNamespace(rank=0, world_size=1, local_rank=0, master_addr="x", master_port=0)
submitit.helpers.TorchDistributedEnvironment = lambda: types.SimpleNamespace(export=lambda **kw: env)
train.run = lambda cfg: 0
cfg = to_dict(Config())
cfg["run"]["dir"] = {str(tmp_path / "run")!r}
assert TrainTask(cfg)() == 0
os.kill(os.getpid(), signal.SIGUSR2)
os.kill(os.getpid(), signal.SIGUSR1)
print("survived")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0 and "survived" in done.stdout, done.stderr[-2000:]


def test_the_job_environment_drops_a_rank_layout_of_the_submitting_shell():
    """sbatch exports the submitting shell's environment; RANK & co. from it (a shell inside torchrun,
    an in-process DeepSpeed run) made submitit refuse to start the task."""
    env = {**os.environ, "RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "elsewhere", "MASTER_PORT": "1"}
    script = "source slurm/env.sh; echo ${RANK:-unset} ${WORLD_SIZE:-unset} ${MASTER_ADDR:-unset} ${MASTER_PORT:-unset}"
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["unset"] * 4


def test_the_failure_requeue_lines_requeue_a_failed_step_a_bounded_number_of_times(tmp_path):
    """The job-script lines run by bash after a fake srun, with a fake scontrol: failures 1 and 2
    requeue, the third gives up; a step that ended well (exit 0) is not counted."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n')
    (bin_dir / "scontrol").chmod(0o755)
    lines = "\n".join(launch.requeue_on_failure(tmp_path / "slurm folder", retries=2))
    (tmp_path / "slurm folder").mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77"}

    def step(code: int) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", f"(exit {code})\n{lines}"], env=env, capture_output=True, text=True,
                              check=False)

    done = step(0)
    assert done.returncode == 0 and done.stdout == ""
    first, second, third = step(137), step(1), step(137)
    assert [first.returncode, second.returncode, third.returncode] == [137, 1, 137]
    assert "requeueing job 77 (retry 1 of cluster.retries_on_failure=2)" in first.stdout
    assert "retry 2 of" in second.stdout
    assert "giving up" in third.stdout and "scontrol" not in third.stdout
    assert (tmp_path / "scontrol.calls").read_text().splitlines() == ["requeue 77", "requeue 77"]
    failures = (tmp_path / "slurm folder" / "77_failures.log").read_text().splitlines()
    assert [line.split(": ")[-1] for line in failures] == ["srun exit 137", "srun exit 1", "srun exit 137"]


def test_prep_dry_run_shows_the_array_each_partition_and_the_dependent_merge(tmp_path, capsys):
    out = tmp_path / "shards"
    assert cli.main(["launch", "prep", "--parts", "3", "--config", "text", "--config", "cluster_local",
                     "cluster.nodes=1", "cluster.array_parallelism=2", f"data.shards={out}", "--dry-run"]) == 0
    sections = _sections(capsys.readouterr().out)
    array, tasks, merge, merge_runs, config = sections.values()
    assert "#SBATCH --array=0-2%2" in array and "%A_%a_0_log.out" in array  # as submitit's map_array renders it
    assert [line.split(": ")[1] for line in tasks.splitlines()[1:]] == [f"proseco prep shards --task {i}/3"
                                                                        for i in range(3)]
    assert "#SBATCH --dependency=afterok:ARRAY_JOB_ID" in merge and "--array" not in merge
    assert "#SBATCH --nodes=1" in merge and "proseco prep merge" in merge_runs
    assert yaml.safe_load(config)["data"]["shards"] == str(out)
    assert not out.with_name("shards.jobs").exists()


def test_eval_dry_run_shows_the_array_and_each_shard(tmp_path, capsys, monkeypatch):
    from pipeline.artifact import write_export
    from pipeline.model import Backbone
    from pipeline.tasks import sudoku

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), ["model.layers=1", "model.hidden=32", "model.heads=2"])
    model = write_export(tmp_path / "tiny", {"raw": Backbone(cfg.model, vocab_size=sudoku.VOCAB_SIZE).state_dict()},
                         cfg, sudoku.VOCAB_SIZE, sudoku.MASK_ID)
    out = tmp_path / "eval"
    assert cli.main(["launch", "eval", "--target", str(model), "--parts", "2", "--config", "cluster_local",
                     f"eval.out={out}", "--dry-run"]) == 0
    array, tasks, _ = _sections(capsys.readouterr().out).values()
    assert "#SBATCH --array=0-1%2" in array
    assert f"proseco eval {model} --shard 1/2 --out {out}" in tasks
    assert not out.exists()

    # the array tasks start in the repository: files named relative to where launch ran become absolute
    (tmp_path / "q.jsonl").write_text("{}\n")
    (tmp_path / "yaml_a").mkdir()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["launch", "eval", "--target", "tiny", "--parts", "2", "--config", "cluster_local",
                     "eval.out=eval", "eval.gsm8k_questions=q.jsonl", f"eval.lm_eval_include=yaml_a{os.pathsep}gone",
                     "--dry-run"]) == 0
    _, tasks, config = _sections(capsys.readouterr().out).values()
    e = yaml.safe_load(config)["eval"]
    assert e["gsm8k_questions"] == str(tmp_path / "q.jsonl") and e["reference_lm"] == "smollm2"
    assert e["lm_eval_include"] == f"{tmp_path / 'yaml_a'}{os.pathsep}gone"  # a missing folder stays for eval's own error
    assert f"proseco eval {model} --shard 0/2 --out {out}" in tasks


def test_a_gpu_sized_run_without_gpus_warns_and_cluster_gpu_asks_for_eight(tmp_path, capsys):
    args = ["launch", "train", "--config", "owt_small", f"run.dir={tmp_path / 'run'}", "--dry-run"]
    assert cli.main([*args, "--config", "cluster_local"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: cluster.gpus_per_node is 0 but this looks like a GPU run") and ">= 50M" in err
    assert cli.main([*args, "--config", "cluster_local", "model.hidden=64", "model.heads=2", "parallel.bf16=true"]) == 0
    err = capsys.readouterr().err
    assert "parallel.bf16 is on" in err and "parameters" not in err  # a small model, but bf16 is for GPUs
    assert cli.main([*args, "--config", "cluster_gpu"]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    script = _sections(out.out)["job script (sbatch; exactly what would be submitted)"]
    assert "#SBATCH --gpus-per-node=8" in script and "#SBATCH --ntasks-per-node=8" in script
    assert "each of the 8 tasks runs" in out.out


def test_ranks_that_do_not_all_arrive_stop_at_the_start_up_deadline(monkeypatch):
    from pipeline.distributed import init_process_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    t0 = time.monotonic()
    with pytest.raises(ProsecoError) as err:  # rank 0 of 2; rank 1 never comes
        init_process_group("gloo", rank=0, world=2, startup_timeout_s=1)
    assert time.monotonic() - t0 < 10
    assert f"127.0.0.1:{port}" in str(err.value) and "1 of 2 ranks arrived" in str(err.value)
    assert "cluster.startup_timeout_s=1" in str(err.value)


def test_missing_slurm_commands_are_one_clear_line(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # python, but no sbatch
    assert cli.main(_launch_args(shards, tmp_path / "run")) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SLURM commands not found" in err and "cluster.executor=local" in err


def test_a_run_folder_owned_by_a_live_job_is_refused(shards, tmp_path, capsys, monkeypatch):
    from pipeline.launch import slurm

    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    (run / "slurm" / "job.json").write_text(json.dumps({"job_id": "4242", "stage": "train"}))
    monkeypatch.setattr(slurm, "job_state", lambda job_id: "RUNNING")
    monkeypatch.setattr(slurm, "check_slurm_commands", lambda cfg: None)
    before = sorted(p.name for p in run.rglob("*"))
    assert cli.main(_launch_args(shards, run)) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "belongs to job 4242, which is RUNNING" in err and "proseco cancel" in err
    assert sorted(p.name for p in run.rglob("*")) == before
    (run / "slurm" / "job.json").write_text("")  # torn by a crash: one line, not a traceback
    for args in (_launch_args(shards, run), ["status", str(run)], ["cancel", str(run)]):
        assert cli.main(args) == cli.EXIT_USER_ERROR
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "job.json is unreadable" in err and "delete it" in err, err


# ------------------------------------------------------------------------------ on a real cluster
slurm = pytest.mark.skipif(sh.slurm_available() is not None, reason=sh.slurm_available() or "")


@pytest.fixture
def cluster(tmp_path):
    """Cancels what the test submitted (its jobs' scripts lie under tmp_path) when it ends."""
    yield
    sh.cancel_under(tmp_path)


def _job(run: Path) -> str:
    return str(json.loads((run / "slurm" / "job.json").read_text())["job_id"])


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """The training of the 2-node jobs (DDP over 2 ranks, 12 steps), run uninterrupted on this machine."""
    run = tmp_path_factory.mktemp("reference") / "run"
    _finish(_train(shards, run, nproc=2))
    return run


def _assert_same_final_state(a: Path, b: Path) -> None:
    assert _losses(a) == _losses(b)
    last = max(_losses(a))
    sa, sb = (torch.load(r / "checkpoints" / f"step_{last:08d}" / "state.pt", weights_only=True) for r in (a, b))
    for part in ("model", "ema"):
        assert all(torch.equal(v, sb[part][k]) for k, v in sa[part].items()), part


def _first_step_after(run: Path, since: float, step_above: int = 0, timeout: float = 180) -> float:
    """Seconds from ``since`` until metrics.jsonl has a row with step > ``step_above``."""
    def seen():
        path = run / "metrics.jsonl"
        return path.is_file() and any(r["step"] > step_above for r in read_metrics(path)[-3:])
    sh.wait_for(seen, timeout=timeout, interval=0.1, what=f"a step > {step_above} in {run}")
    return time.monotonic() - since


@slurm
@pytest.mark.slurm
@pytest.mark.distributed
def test_two_node_job_trains_and_a_requeue_mid_run_resumes_to_the_same_state(shards, reference, tmp_path, cluster,
                                                                             monkeypatch, capsys):
    run = tmp_path / "run"
    monkeypatch.setenv("PROSECO_STEP_DELAY_S", "0.5")  # sbatch exports the environment to the job
    t0 = time.monotonic()
    assert cli.main(_launch_args(shards, run, "parallel.distributed=ddp")) == 0
    out = capsys.readouterr().out
    job = _job(run)
    assert f"submitted job {job}" in out and (run / "launch").is_dir()
    snap = next((run / "launch").iterdir())
    assert {"config.yaml", "job.sbatch", "code.json", "code.diff"} <= {p.name for p in snap.iterdir()}
    to_first = _first_step_after(run, t0)
    sh.wait_for(lambda: list((run / "checkpoints").glob("step_*/COMPLETE")) and max(_losses(run)) >= 5,
                timeout=120, what="step 5 and a checkpoint")
    assert cli.main(["launch", "train", "--config", "text", f"run.dir={run}"]) == cli.EXIT_USER_ERROR
    assert f"belongs to job {job}" in capsys.readouterr().err  # a second job may not write the folder
    stopped = max(_losses(run))
    sh.requeue(job)
    t1 = time.monotonic()
    sh.release_requeue_hold(job, timeout=120)
    to_resume = _first_step_after(run, t1, step_above=stopped - 2, timeout=180)
    sh.wait_job(job, states={"COMPLETED"}, timeout=240)
    log0 = (run / "slurm" / f"{job}_0_log.out").read_text()
    assert "restart 0" in log0 and "restart 1" in log0 and "resuming" in log0  # appended across starts
    _assert_same_final_state(reference, run)
    assert cli.main(["status", str(run)]) == 0
    status = capsys.readouterr().out
    assert f"job {job}" in status and "COMPLETED" in status and "latest checkpoint" in status
    print(f"launch -> first step {to_first:.1f} s; requeue -> first resumed step {to_resume:.1f} s")


@slurm
@pytest.mark.slurm
@pytest.mark.slow
def test_a_job_at_its_time_limit_saves_requeues_itself_and_finishes(shards, reference, tmp_path, cluster,
                                                                    monkeypatch):
    """SLURM sends SIGUSR2 15 s before the 1-minute limit: every start trains some steps, saves and
    requeues itself until the run is done. slurmctld checks every 30 s and signals once the time left
    is below signal_delay + 30 s, so here 15-45 s into each start (with signal_delay_s=40 it could
    come 0 s in and kill a task still starting Python, before any handler exists)."""
    run = tmp_path / "run"
    monkeypatch.setenv("PROSECO_STEP_DELAY_S", "4.5")  # 12 steps x 4.5 s: more than one start's share
    assert cli.main(_launch_args(shards, run, "parallel.distributed=ddp", "cluster.time_min=1",
                                 "cluster.signal_delay_s=15", "cluster.max_requeues=6")) == 0
    job = _job(run)
    deadline = time.monotonic() + 600
    while sh.job_state(job) not in sh.TERMINAL_STATES:
        assert time.monotonic() < deadline, sh.describe_job(job)
        if sh._pending_reason(job) == "BeginTime":  # requeued by the job itself: skip SLURM's hold
            sh.release_requeue_hold(job, timeout=120)
        time.sleep(1)
    assert sh.job_state(job) == "COMPLETED", sh.describe_job(job)
    log0 = (run / "slurm" / f"{job}_0_log.out").read_text()
    assert "after signal SIGUSR2" in log0 and "requeueing job" in log0 and "done: 12 steps" in log0
    _assert_same_final_state(reference, run)


def _killed_at(log: Path) -> float:
    """The wall-clock time at which the fault-injection hook killed the rank writing ``log``."""
    match = re.search(rf"{launch.KILL_AT_START_ENV}=\d+: .* at (\d+\.\d+)", log.read_text())
    assert match, log.read_text()
    return float(match.group(1))


def _seconds_until_not_running(job: str, since: float, timeout: float = 120) -> float:
    """Wall-clock seconds from ``since`` until SLURM no longer shows the job RUNNING (nor COMPLETING:
    its processes are gone and the nodes free)."""
    sh.wait_for(lambda: launch.job_state(job) not in {"RUNNING", "COMPLETING", "UNKNOWN"}, timeout=timeout,
                interval=0.1, what=f"job {job} to leave RUNNING")
    return time.time() - since


@slurm
@pytest.mark.slurm
@pytest.mark.distributed
def test_a_rank_killed_at_start_up_ends_the_job_at_once_retries_are_bounded_and_a_resubmit_finishes(
        shards, tmp_path, cluster, monkeypatch, capsys):
    """Rank 1 SIGKILLs itself before the process group forms, on every start: srun's
    --kill-on-bad-exit ends the step (rank 0, waiting at the rendezvous, is killed within SLURM's
    KillWait) and the job script requeues it once (cluster.retries_on_failure=1), then gives up.
    Resubmitted without the fault, the run trains to its last step."""
    run = tmp_path / "run"
    monkeypatch.setenv(launch.KILL_AT_START_ENV, "1")  # sbatch exports the environment to the job
    assert cli.main(_launch_args(shards, run, "parallel.distributed=ddp", "cluster.retries_on_failure=1")) == 0
    job = _job(run)
    log1 = run / "slurm" / f"{job}_1_log.out"
    sh.wait_for(lambda: log1.is_file() and launch.KILL_AT_START_ENV in log1.read_text(), timeout=120,
                interval=0.1, what="rank 1 to kill itself")
    first = _seconds_until_not_running(job, _killed_at(log1))
    assert first < 60, sh.describe_job(job)
    sh.release_requeue_hold(job, timeout=60)  # requeued by the job script: skip SLURM's ~2-minute hold
    sh.wait_job(job, states={"FAILED"}, timeout=120)  # the second start fails too: no third
    log0 = (run / "slurm" / f"{job}_0_log.out").read_text()
    assert "requeueing job" in log0 and "retry 1 of cluster.retries_on_failure=1" in log0, log0
    assert "giving up" in log0 and "restart 1" in log0, log0
    assert len((run / "slurm" / f"{job}_failures.log").read_text().splitlines()) == 2
    assert not (run / "checkpoints").is_dir() or not list((run / "checkpoints").glob("step_*"))

    monkeypatch.delenv(launch.KILL_AT_START_ENV)
    capsys.readouterr()
    assert cli.main(_launch_args(shards, run, "parallel.distributed=ddp", "cluster.retries_on_failure=1")) == 0
    again = _job(run)
    sh.wait_job(again, states={"COMPLETED"}, timeout=180)
    assert (run / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").is_file()
    assert max(_losses(run)) == STEPS
    assert not (run / "slurm" / f"{again}_failures.log").exists()
    print(f"rank 1 killed -> job no longer RUNNING after {first:.1f} s")


@slurm
@pytest.mark.slurm
@pytest.mark.distributed
def test_without_kill_on_bad_exit_the_start_up_deadline_ends_the_job(shards, tmp_path, cluster, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv(launch.KILL_AT_START_ENV, "1")
    assert cli.main(_launch_args(shards, run, "parallel.distributed=ddp", "cluster.kill_on_bad_exit=false",
                                 "cluster.startup_timeout_s=5")) == 0
    job = _job(run)
    log1 = run / "slurm" / f"{job}_1_log.out"
    sh.wait_for(lambda: log1.is_file() and launch.KILL_AT_START_ENV in log1.read_text(), timeout=120,
                interval=0.1, what="rank 1 to kill itself")
    assert _seconds_until_not_running(job, _killed_at(log1)) < 60
    sh.wait_job(job, states={"FAILED"}, timeout=60)
    err0 = (run / "slurm" / f"{job}_0_log.err").read_text()
    assert "1 of 2 ranks arrived within cluster.startup_timeout_s=5 s" in err0, err0[-2000:]


@slurm
@pytest.mark.slurm
def test_prep_array_job_runs_each_partition_once_then_merges(shards, tmp_path, cluster, capsys):
    out = tmp_path / "shards"
    tok = shards.parent / "tok"  # the session's tokenizer (vocab 512), trained once
    common = ["--config", "text", f"prep.tokenizer_dir={tok}", f"data.shards={out}", "model.vocab_size=512",
              "data.seq_len=32", "model.max_seq_len=32"]
    assert cli.main(["launch", "prep", "--parts", "2", *common, "--config", "cluster_local",
                     "cluster.nodes=1"]) == 0
    jobs = out.with_name("shards.jobs")
    info = json.loads((jobs / "slurm" / "job.json").read_text())
    sh.wait_job(info["job_id"], states={"COMPLETED"}, timeout=240)
    for i in range(2):
        assert sh.job_state(f"{info['array_job_id']}_{i}") == "COMPLETED"
    starts = list((jobs / "slurm").glob(f"{info['array_job_id']}_*_0_log.out"))
    assert len(starts) == 2  # one log per array task: each ran exactly once
    capsys.readouterr()
    assert cli.main(["prep", "verify", *common]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] > 0
    assert cli.main(["status", str(jobs)]) == 0 and "COMPLETED" in capsys.readouterr().out


@slurm
@pytest.mark.slurm
@pytest.mark.parametrize(("overrides", "needle"), [
    (["cluster.partition=nope"], "invalid partition"),
    (["cluster.nodes=5"], "node configuration is not available"),
    (["cluster.cpus_per_task=64"], "node configuration is not available"),
    ([], "Unable to contact slurm controller"),  # with a SLURM_CONF whose controller port is dead
])
def test_impossible_jobs_are_refused_before_anything_is_queued(shards, tmp_path, capsys, monkeypatch,
                                                               overrides, needle):
    if not overrides:
        conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
        bad = tmp_path / "slurm.conf"
        bad.write_text("\n".join("SlurmctldPort=16899" if line.startswith("SlurmctldPort=") else line
                                 for line in conf.splitlines()) + "\nMessageTimeout=1\n")  # fail in 0 s, not 18
        monkeypatch.setenv("SLURM_CONF", str(bad))
    run = tmp_path / "run"
    assert cli.main(_launch_args(shards, run, *overrides)) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "nothing was submitted" in err, err
    assert not (run / "slurm" / "job.json").exists()


@slurm
@pytest.mark.slurm
def test_eval_array_job_covers_every_item_once(tmp_path, cluster, capsys):
    from pipeline.artifact import write_export
    from pipeline.config import load_config
    from pipeline.model import Backbone
    from pipeline.tasks import sudoku

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), ["model.layers=1", "model.hidden=32", "model.heads=2"])
    torch.manual_seed(0)
    model = write_export(tmp_path / "tiny", {"raw": Backbone(cfg.model, vocab_size=sudoku.VOCAB_SIZE).state_dict()},
                         cfg, sudoku.VOCAB_SIZE, sudoku.MASK_ID)
    out = tmp_path / "eval"
    assert cli.main(["launch", "eval", "--target", str(model), "--parts", "2", "--config", "cluster_local",
                     "cluster.nodes=1", "parallel.threads=1", "eval.steps=[2,4]", "eval.corrector_steps=[0,1]",
                     "eval.samplers=[ancestral]", "eval.num_samples=8", f"eval.out={out}"]) == 0
    job = json.loads((out / "slurm" / "job.json").read_text())["job_id"]
    sh.wait_job(job, states={"COMPLETED"}, timeout=240)
    results = list((out / "results").rglob("*.json"))
    assert len(results) == 4 and all(json.loads(p.read_text())["status"] == "ok" for p in results)
    commands = (out / "commands.txt").read_text()
    assert "--shard 0/2" in commands and "--shard 1/2" in commands  # each shard ran exactly once
    assert commands.count("--shard") == 2
