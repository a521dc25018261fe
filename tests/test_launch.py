"""`proseco launch | status | cancel` (pipeline/launch.py).

The first tests need no cluster (dry run against a golden file, refusals). The ``slurm`` ones run
against the real local cluster of ``slurm/cluster/`` (CI starts it; they skip with the reason
when it is absent): a 2-node x 1-task gloo training job, the same job requeued mid-run, a job
that reaches its time limit and requeues itself, and a prep array job.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import slurm_helpers as sh
import torch
from train_utils import ROOT, STEPS, TINY, _finish, _losses, _train

from pipeline import cli
from pipeline.runlog import read_metrics

GOLDEN = Path(__file__).resolve().parent / "golden" / "launch_train_dry_run.sbatch"


def _launch_args(shards: Path, run: Path, *extra: str) -> list[str]:
    return ["launch", "train", "--config", "text", "--config", "cluster_local", f"data.manifest={shards}",
            f"run.dir={run}", f"train.steps={STEPS}", *TINY, *extra]


def _normalise(script: str, run: Path) -> str:
    return script.replace(str(run), "<RUN>").replace(sys.executable, "<PYTHON>").replace(str(ROOT), "<ROOT>")


def test_dry_run_prints_the_job_script_matching_the_golden_file(shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main([*_launch_args(shards, run), "--dry-run"]) == 0
    script = _normalise(capsys.readouterr().out, run)
    if os.environ.get("PROSECO_UPDATE_GOLDEN"):
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text()
    assert not run.exists()  # a dry run writes nothing


def test_missing_slurm_commands_are_one_clear_line(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # python, but no sbatch
    assert cli.main(_launch_args(shards, tmp_path / "run")) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SLURM commands not found" in err and "cluster.executor=local" in err


def test_a_run_folder_owned_by_a_live_job_is_refused(shards, tmp_path, capsys, monkeypatch):
    from pipeline import launch

    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    (run / "slurm" / "job.json").write_text(json.dumps({"job_id": "4242", "stage": "train"}))
    monkeypatch.setattr(launch, "job_state", lambda job_id: "RUNNING")
    monkeypatch.setattr(launch, "_check_slurm_commands", lambda cfg: None)
    before = sorted(p.name for p in run.rglob("*"))
    assert cli.main(_launch_args(shards, run)) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "belongs to job 4242, which is RUNNING" in err and "proseco cancel" in err
    assert sorted(p.name for p in run.rglob("*")) == before


# ------------------------------------------------------------------------------ on a real cluster
slurm = pytest.mark.skipif(sh.slurm_available() is not None, reason=sh.slurm_available() or "")


@pytest.fixture
def cluster():
    yield
    sh.cancel_all()


def _job(run: Path) -> str:
    return str(json.loads((run / "slurm" / "job.json").read_text())["job_id"])


def _reference(shards: Path, run: Path, *extra: str) -> Path:
    """The same training as the 2-node job, run uninterrupted by torchrun on this machine."""
    _finish(_train(shards, run, *extra, nproc=2))
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
def test_two_node_job_trains_and_a_requeue_mid_run_resumes_to_the_same_state(shards, tmp_path, cluster,
                                                                             monkeypatch, capsys):
    ref = _reference(shards, tmp_path / "ref", "train.distributed=ddp")
    run = tmp_path / "run"
    monkeypatch.setenv("PROSECO_STEP_DELAY_S", "0.5")  # sbatch exports the environment to the job
    t0 = time.monotonic()
    assert cli.main(_launch_args(shards, run, "train.distributed=ddp")) == 0
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
    _assert_same_final_state(ref, run)
    assert cli.main(["status", str(run)]) == 0
    status = capsys.readouterr().out
    assert f"job {job}" in status and "COMPLETED" in status and "latest checkpoint" in status
    print(f"launch -> first step {to_first:.1f} s; requeue -> first resumed step {to_resume:.1f} s")


@slurm
@pytest.mark.slurm
@pytest.mark.slow
def test_a_job_at_its_time_limit_saves_requeues_itself_and_finishes(shards, tmp_path, cluster, monkeypatch):
    """SLURM sends SIGUSR2 40 s before the 1-minute limit (in practice 20-30 s into each start):
    every start trains ~12 steps, saves and requeues itself until the run is done."""
    steps = ("train.steps=24", "train.checkpoint_every=5", "train.distributed=ddp")
    ref = _reference(shards, tmp_path / "ref", *steps)
    run = tmp_path / "run"
    monkeypatch.setenv("PROSECO_STEP_DELAY_S", "2.0")  # 24 steps x 2 s: more than one start's share
    assert cli.main(_launch_args(shards, run, *steps, "cluster.time_min=1", "cluster.signal_delay_s=40",
                                 "cluster.max_requeues=6")) == 0
    job = _job(run)
    deadline = time.monotonic() + 600
    while sh.job_state(job) not in sh.TERMINAL_STATES:
        assert time.monotonic() < deadline, sh.describe_job(job)
        if sh._pending_reason(job) == "BeginTime":  # requeued by the job itself: skip SLURM's hold
            sh.release_requeue_hold(job, timeout=120)
        time.sleep(1)
    assert sh.job_state(job) == "COMPLETED", sh.describe_job(job)
    log0 = (run / "slurm" / f"{job}_0_log.out").read_text()
    assert "after signal SIGUSR2" in log0 and "requeueing job" in log0 and "done: 24 steps" in log0
    _assert_same_final_state(ref, run)


@slurm
@pytest.mark.slurm
def test_prep_array_job_runs_each_partition_once_then_merges(tmp_path, cluster, capsys):
    out = tmp_path / "shards"
    tok = tmp_path / "tok"
    common = ["--config", "text", f"prep.tokenizer_dir={tok}", f"prep.out_dir={out}", "prep.vocab_size=512",
              "data.seq_len=32", "model.max_seq_len=32"]
    assert cli.main(["prep", "tokenizer", *common]) == 0
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
                                 for line in conf.splitlines()))
        monkeypatch.setenv("SLURM_CONF", str(bad))
    run = tmp_path / "run"
    assert cli.main(_launch_args(shards, run, *overrides)) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "nothing was submitted" in err, err
    assert not (run / "slurm" / "job.json").exists()


@slurm
@pytest.mark.slurm
def test_eval_array_job_covers_every_item_once(tmp_path, cluster, capsys):
    from pipeline.checkpoint import save_model
    from pipeline.config import load_config
    from pipeline.model import Backbone
    from pipeline.tasks import sudoku

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), ["model.layers=1", "model.hidden=32", "model.heads=2"])
    torch.manual_seed(0)
    model = tmp_path / "tiny.pt"
    save_model(model, Backbone(cfg.model, vocab_size=sudoku.VOCAB_SIZE), cfg, sudoku.VOCAB_SIZE, sudoku.MASK_ID)
    out = tmp_path / "eval"
    assert cli.main(["launch", "eval", "--target", str(model), "--parts", "2", "--config", "cluster_local",
                     "cluster.nodes=1", "train.threads=1", "eval.steps=[2,4]", "eval.corrector_steps=[0,1]",
                     "eval.samplers=[ancestral]", "eval.num_samples=8", f"eval.out={out}"]) == 0
    job = json.loads((out / "slurm" / "job.json").read_text())["job_id"]
    sh.wait_job(job, states={"COMPLETED"}, timeout=240)
    results = list((out / "results").rglob("*.json"))
    assert len(results) == 4 and all(json.loads(p.read_text())["status"] == "ok" for p in results)
    commands = (out / "commands.txt").read_text()
    assert "--shard 0/2" in commands and "--shard 1/2" in commands  # each shard ran exactly once
    assert commands.count("--shard") == 2
