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
import time
from pathlib import Path

import pytest
import torch
from train_utils import (  # noqa: F401 (re-exported helpers used below)
    ROOT,
    STEPS,
    TINY,
    _args,
    _assert_same_run,
    _env,
    _final_state,
    _finish,
    _kill9,
    _losses,
    _train,
    _train_here,
    _wait_for_step,
)

from pipeline import cli
from pipeline.checkpoint.manager import rewrite_meta
from pipeline.runlog import read_metrics
from pipeline.train import EXIT_REQUEUE


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """An uninterrupted single-process run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    _train_here(shards, run)
    return run


def test_kill_9_and_resume_equals_uninterrupted(shards, reference, tmp_path):
    """... with wandb offline: both starts log into the same wandb run (the id kept in run.json)."""
    run = tmp_path / "run"
    proc = _train(shards, run, "log.wandb=offline", delay=0.3)
    _wait_for_step(proc, run, 5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(_losses(run)) < STEPS
    info = json.loads((run / "run.json").read_text())
    out = _finish(_train(shards, run, "log.wandb=offline"))
    assert "resuming" in out
    assert json.loads((run / "run.json").read_text()) == info  # stable across requeues
    starts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(starts) == 2 and all(info["logger_id"] in p.name for p in starts), starts
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
    _train_here(shards, run)
    _assert_same_run(reference, run)


def test_ctrl_c_saves_and_exits_3_then_resume_matches_and_a_second_ctrl_c_aborts(shards, reference, tmp_path):
    run = tmp_path / "run"
    proc = _train(shards, run, delay=0.3)
    _wait_for_step(proc, run, 3)
    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: save at the step boundary, then stop
    out = _finish(proc, expect=EXIT_REQUEUE)
    stopped = max(_losses(run))
    assert "Ctrl-C: saving at the end of this step" in out and f"stopping at step {stopped} after signal SIGINT" in out
    assert f"Resume: rerun the same command (run folder {run}); it continues from step {stopped}" in out
    assert "Traceback" not in out and (run / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE").is_file()
    _train_here(shards, run)
    _assert_same_run(reference, run)

    aborted = tmp_path / "aborted"
    proc = _train(shards, aborted, delay=3.0)  # steps 3 s apart: both Ctrl-C land inside one step
    _wait_for_step(proc, aborted, 2)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGINT)  # the second one aborts at once, without saving
    out = _finish(proc, expect=130)
    assert "interrupted" in out and "stopping at step" not in out
    assert [p.name for p in (aborted / "checkpoints").glob("step_*")] == ["step_00000002"]


def test_an_unreadable_run_json_is_rebuilt(shards, reference, tmp_path, capsys):
    """A kill during a run's first start could leave run.json empty: the ids come back from the latest
    checkpoint (every checkpoint keeps them), and the run resumes."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text("")
    _train_here(shards, run, f"optim.steps={STEPS + 2}")
    out = capsys.readouterr().out
    assert "run.json was unreadable (it is empty); rebuilt it from the ids kept in step_00000012" in out
    assert json.loads((run / "run.json").read_text()) == info and max(_losses(run)) == STEPS + 2
    fresh = tmp_path / "fresh"  # no checkpoint to take the ids from: a new id
    fresh.mkdir()
    (fresh / "run.json").write_text('{"run_id": ')
    _train_here(shards, fresh, "optim.steps=2")
    out = capsys.readouterr().out
    assert "rebuilt it from a new run id" in out and json.loads((fresh / "run.json").read_text())["run_id"]


def test_the_log_is_plain_lines_a_person_can_read(shards, tmp_path):
    run = tmp_path / "run"
    out = _finish(_train(shards, run, "optim.steps=4", "log.val_every=4", "log.val_batches=1",
                         "diffusion.corrector_start_step=2"))
    assert "\r" not in out  # a pipe / SLURM log gets no progress-bar stream
    lines = out.splitlines()
    assert lines[0].startswith(f"proseco train: {run} (run id ") and lines[0].endswith(": new run")
    header = "\n".join(lines[1:8])
    first_two = "objective ProSeCo (mdm + 1 x correction), plain MDM for the first 2 steps"
    for needle in ("parameters (1 layers x hidden 32", first_two, "layout     torch (single process)",
                   "precision fp32", "batch      4 sequences x 32 tokens = 128 tokens per step",
                   "steps 0 -> 4", "checkpoint every 2", "wandb disabled"):
        assert needle in header, (needle, header)
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in steps] == [f"step {i}/4" for i in range(1, 5)]
    corrections = [float(line.split(" | ")[3].split()[1]) for line in steps]  # diffusion.corrector_start_step=2
    assert corrections[:2] == [0.0, 0.0] and min(corrections[2:]) > 0, corrections
    assert all(k in steps[-1] for k in ("loss ", "mdm ", "corr ", "lr ", "gnorm ", "tok/s", "s/step", "mem ",
                                        "eta 0:00:00"))
    assert sum(line.startswith("val  4/4 | mdm nelbo ") for line in lines) == 1
    assert [line.split()[2] for line in lines if line.startswith("saved checkpoint")] == [
        str(run / "checkpoints" / "step_00000002"), str(run / "checkpoints" / "step_00000004")]
    assert lines[-1] == f"done: 4 steps in {run}"


def _fake_topology(run: Path, **changes) -> None:
    latest = max((run / "checkpoints").glob("step_*"))
    meta = json.loads((latest / "meta.json").read_text())
    meta["topology"].update(changes)
    rewrite_meta(latest, meta)  # a consistent edit (meta.json and its checksum in COMPLETE)


def test_full_state_checkpoint_resumes_under_another_layout(shards, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    _fake_topology(run, dp=2)  # as if saved by 2 ranks: the full state reshards to 1
    assert cli.main(_args(shards, run, f"optim.steps={STEPS + 2}")) == 0
    out = capsys.readouterr().out
    assert "under another layout" in out and "restarts the interrupted epoch" in out
    assert sorted(_losses(run))[-2:] == [STEPS + 1, STEPS + 2]



def test_another_batch_size_resumes_and_restarts_the_interrupted_epoch(shards, reference, tmp_path, capsys):
    """optim.batch_size changed between starts (same world): the weights and optimizer resume, the
    loader says so and starts the saved epoch again at the new batch size (its state after two
    more steps: the saved epoch, 2 batches in, batch size 8). Every training setting that changed
    is named in one line, and only those."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    saved = torch.load(max((run / "checkpoints").glob("step_*")) / "rank_00000.pt", weights_only=True)["loader"]
    assert saved["batch_size"] == 4 and saved["batches"] > 0
    assert cli.main(_args(shards, run, f"optim.steps={STEPS + 2}", "optim.batch_size=8", "optim.lr=0.001",
                          "run.seed=7")) == 0
    out = capsys.readouterr().out
    assert "with another data layout (optim.batch_size 4 -> 8)" in out and "restarts the interrupted epoch" in out
    assert ("with settings changed since it was saved (they apply from here on): optim.batch_size 4 -> 8; "
            f"optim.lr 0.0003 -> 0.001; optim.steps {STEPS} -> {STEPS + 2}; run.seed 0 -> 7 (the data order keeps "
            "the checkpoint's seed)\n") in out, out
    assert sorted(_losses(run))[-2:] == [STEPS + 1, STEPS + 2]
    now = torch.load(max((run / "checkpoints").glob("step_*")) / "rank_00000.pt", weights_only=True)["loader"]
    assert (now["epoch"], now["batches"], now["batch_size"]) == (saved["epoch"], 2, 8)


def test_deepspeed_checkpoint_under_torch_is_refused_naming_the_way_out(shards, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    _fake_topology(run, backend="deepspeed", zero_stage=2)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert cli.main(_args(shards, run, f"optim.steps={STEPS + 2}")) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot resume" in err and "parallel.backend=deepspeed" in err
    assert "proseco ckpt export" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing overwritten


@pytest.mark.parametrize(("override", "needle"), [
    ("parallel.backend=megatron parallel.tp_size=2", "world size 1 is not divisible by parallel.tp_size=2"),
    ("parallel.backend=deepspeed parallel.zero_stage=3 model.tie_embeddings=true", "tied embedding"),
    ("parallel.tp_size=2", "parallel.tp_size=2 needs parallel.backend=megatron"),
    ("parallel.backend=deepspeed parallel.distributed=ddp", "does its own data parallelism"),
    ("parallel.distributed=zero", "parallel.distributed must be one of: none, ddp, fsdp"),
    ("optim.grad_accum=0", "optim.grad_accum must be > 0"),
    ("data.seq_len=16", "data.seq_len=32"),
])
def test_errors_are_one_line(shards, tmp_path, capsys, override, needle):
    assert cli.main(_args(shards, tmp_path / "run", *override.split())) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err


def test_dry_run_prints_world_and_run_folder(shards, tmp_path, capsys):
    assert cli.main([*_args(shards, tmp_path / "run"), "--dry-run", "optim.grad_accum=3"]) == 0
    out = capsys.readouterr().out
    assert "world size 1" in out and f"run folder {tmp_path / 'run'}" in out and "= 12" in out
    assert not (tmp_path / "run").exists()


DDP = ("optim.grad_accum=2", "log.val_every=4", "log.val_batches=2", "checkpoint.permanent_every=2")


@pytest.fixture(scope="module")
def ddp_reference(shards, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank DDP run (`proseco train --nproc 2`): grad accumulation, validation,
    every checkpoint kept. The reference of the DDP, FSDP2, launcher and ZeRO-3 tests."""
    run = tmp_path_factory.mktemp("ddp_reference") / "run"
    _finish(_train(shards, run, *DDP, nproc=2))
    return run


@pytest.mark.slow
def test_ddp_kill_9_under_torchrun_and_resume_equals_uninterrupted(shards, ddp_reference, tmp_path, capsys):
    """Under torchrun (its ranks compute exactly what `--nproc` ranks do): kill -9 of torchrun and
    both ranks, then a resume, ends bitwise equal to the uninterrupted run."""
    run = tmp_path / "run"
    proc = _train(shards, run, *DDP, delay=0.3, nproc=2, torchrun=True)
    _wait_for_step(proc, run, 5)
    _kill9(proc)
    assert max(_losses(run)) < STEPS
    _finish(_train(shards, run, *DDP, nproc=2, torchrun=True))
    _assert_same_run(ddp_reference, run)
    # one process resumes the DDP run folder (full-state checkpoint, loader restarts the epoch)
    assert cli.main(_args(shards, run, *DDP, f"optim.steps={STEPS + 2}")) == 0
    assert "under another layout" in capsys.readouterr().out
    assert max(_losses(run)) == STEPS + 2


@pytest.mark.slow
def test_nproc_launcher_stops_saving_resumes_exactly_and_ends_when_a_rank_dies(shards, ddp_reference, tmp_path):
    """`proseco train --nproc 2`: SIGTERM (or Ctrl-C) to the launcher reaches every rank, they save
    together and the launcher exits 3 (torchrun: a traceback and exit 1); the resumed run equals an
    uninterrupted one. A rank killed mid-run ends the whole run at once with its exit code; the
    launcher killed by -9 leaves no rank behind (they get SIGTERM, save and stop)."""
    import psutil

    run, dead, orphan = (tmp_path / name for name in ("run", "dead", "orphan"))
    proc = _train(shards, run, *DDP, delay=0.3, nproc=2)
    _wait_for_step(proc, run, 3)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher only
    out = _finish(proc, expect=EXIT_REQUEUE)
    assert "Traceback" not in out and "stopping at step" in out
    _finish(_train(shards, run, *DDP, nproc=2))
    _assert_same_run(ddp_reference, run)

    proc = _train(shards, dead, *DDP, delay=0.3, nproc=2)
    _wait_for_step(proc, dead, 3)
    rank1 = next(c for c in psutil.Process(proc.pid).children() if c.environ().get("RANK") == "1")
    t0 = time.monotonic()
    rank1.kill()
    out = _finish(proc, expect=128 + signal.SIGKILL)
    assert time.monotonic() - t0 < 30 and f"rank 1 failed (exit -{int(signal.SIGKILL)})" in out

    proc = _train(shards, orphan, *DDP, delay=0.3, nproc=2)
    _wait_for_step(proc, orphan, 3)
    ranks = psutil.Process(proc.pid).children()
    proc.kill()
    proc.communicate(timeout=60)
    _, alive = psutil.wait_procs(ranks, timeout=60)
    last = json.loads((orphan / "logs" / "last_exit.json").read_text())
    assert not alive and (last["exit_code"], last["reason"]) == (EXIT_REQUEUE, "SIGTERM")  # saved and stopped
    assert (orphan / "checkpoints" / f"step_{last['step']:08d}" / "COMPLETE").is_file()


@pytest.mark.slow
def test_fsdp_kill_9_and_resume_equals_uninterrupted(shards, ddp_reference, tmp_path):
    """FSDP2 (2 ranks, grad accumulation, EMA, validation): kill -9 and resume equals uninterrupted;
    the first steps match DDP; the checkpoint has DDP's format, so DDP and FSDP2 resume each other's."""
    ref, run, ddp = tmp_path / "ref", tmp_path / "run", tmp_path / "ddp"
    _finish(_train(shards, ref, *DDP, nproc=2, distributed="fsdp"))
    proc = _train(shards, run, *DDP, delay=0.3, nproc=2, distributed="fsdp")
    _wait_for_step(proc, run, 5)
    _kill9(proc)
    assert max(_losses(run)) < STEPS
    out = _finish(_train(shards, run, *DDP, nproc=2, distributed="fsdp"))
    assert "resuming" in out
    _assert_same_run(ref, run)
    assert "val_mdm_nelbo" in read_metrics(run / "metrics.jsonl")[-1]

    # same first steps as DDP (not bitwise: other reduction order), in the same state.pt layout
    assert _losses(ddp_reference)[1] == pytest.approx(_losses(ref)[1], rel=1e-5)
    s_ddp = torch.load(ddp_reference / "checkpoints" / f"step_{2:08d}" / "state.pt", weights_only=True)
    s_fsdp = torch.load(ref / "checkpoints" / f"step_{2:08d}" / "state.pt", weights_only=True)
    assert s_ddp.keys() == s_fsdp.keys() and s_ddp["model"].keys() == s_fsdp["model"].keys()
    for k, v in s_ddp["model"].items():
        torch.testing.assert_close(v, s_fsdp["model"][k])
    assert s_ddp["optimizer"]["param_groups"] == s_fsdp["optimizer"]["param_groups"]
    for i, st in s_ddp["optimizer"]["state"].items():
        for name, v in st.items():
            torch.testing.assert_close(v, s_fsdp["optimizer"]["state"][i][name])
    # ddp -> fsdp at the same world size resumes from a DDP checkpoint
    shutil.copytree(ddp_reference, ddp)
    out = _finish(_train(shards, ddp, *DDP, f"optim.steps={STEPS + 2}", nproc=2, distributed="fsdp"))
    assert "resuming" in out and sorted(_losses(ddp))[-2:] == [STEPS + 1, STEPS + 2]


# ------------------------------------------------------------------------- crash during a save
def test_kill_9_during_a_save_keeps_the_previous_checkpoint(shards, reference, tmp_path, capsys):
    """kill -9 while a checkpoint's files are half written: the tmp folder is ignored, cleaned up,
    and the rerun resumes from the checkpoint before it and ends equal to the uninterrupted run."""
    run = tmp_path / "run"
    proc = _train(shards, run, save_delay=30.0)  # the first save (step 2) sleeps with files half written
    deadline = time.monotonic() + 60
    tmp = []
    while time.monotonic() < deadline and not tmp:
        tmp = [p for p in (run / "checkpoints").glob("step_*.tmp-*") if (p / "state.pt").is_file()] \
            if (run / "checkpoints").is_dir() else []
        time.sleep(0.02)
    assert tmp, "the save never started"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((run / "checkpoints").glob("step_*/COMPLETE"))  # nothing complete yet
    _train_here(shards, run)
    assert "resuming" not in capsys.readouterr().out  # no complete checkpoint: starts over, ignoring the partial one
    assert not list((run / "checkpoints").glob("*.tmp-*"))
    _assert_same_run(reference, run)

    # the same once a checkpoint exists: crash while saving step 4 -> resume from step 2
    run2 = tmp_path / "run2"
    _train_here(shards, run2, "optim.steps=2")
    proc = _train(shards, run2, save_delay=30.0)
    while not list((run2 / "checkpoints").glob("step_00000004.tmp-*/state.pt")):
        assert proc.poll() is None and time.monotonic() < deadline + 60
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    capsys.readouterr()
    _train_here(shards, run2)
    out = capsys.readouterr().out
    assert "from step_00000002 (step 2)" in out and not list((run2 / "checkpoints").glob("*.tmp-*"))
    _assert_same_run(reference, run2)


# ----------------------------------------------------------------------------------- DeepSpeed
def _has(module: str) -> bool:
    """Whether ``module`` can be imported (a dotted name whose parent package is missing raises in
    find_spec: that is "not installed" too)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


needs_deepspeed = pytest.mark.skipif(not _has("deepspeed"), reason="DeepSpeed is not installed")
DS_EXTRA = ("parallel.backend=deepspeed", "optim.grad_accum=2", "optim.steps=4", "log.val_every=4",
            "log.val_batches=2")


def _drop_last_checkpoint(src: Path, dst: Path) -> None:
    """A copy of run ``src`` as if it had stopped right after its second-to-last checkpoint."""
    shutil.copytree(src, dst)
    shutil.rmtree(max((dst / "checkpoints").glob("step_*")))


def _export_weights(run: Path, weights: str = "raw", out: Path | None = None) -> dict:
    """The exported weights of a run's latest checkpoint (or of a checkpoint folder)."""
    from safetensors.torch import load_file

    out = out or run / "exports" / weights
    assert cli.main(["ckpt", "export", str(run), "--weights", weights, "--out", str(out), "--force"]) == 0
    return load_file(str(out / f"{weights}.safetensors"))


@pytest.fixture(scope="module")
def deepspeed_run(shards, tmp_path_factory):
    """``deepspeed_run(stage, bf16, torchrun)``: an uninterrupted 2-rank DeepSpeed run of DS_EXTRA,
    trained once per (stage, bf16) and shared (tests that change it work on a copy)."""
    runs: dict[tuple[int, bool], Path] = {}

    def get(stage: int, bf16: bool, torchrun: bool = False) -> Path:
        if (stage, bf16) not in runs:
            run = tmp_path_factory.mktemp(f"zero{stage}_{'bf16' if bf16 else 'fp32'}") / "run"
            _finish(_train(shards, run, *DS_EXTRA, f"parallel.zero_stage={stage}", f"parallel.bf16={str(bf16).lower()}",
                           nproc=2, distributed=None, torchrun=torchrun))
            runs[stage, bf16] = run
        return runs[stage, bf16]

    return get


@needs_deepspeed
@pytest.mark.distributed
@pytest.mark.parametrize(("stage", "bf16"), [
    (1, False), (2, False), (3, False),
    pytest.param(1, True, marks=pytest.mark.slow), pytest.param(2, True, marks=pytest.mark.slow),
    pytest.param(3, True, marks=pytest.mark.slow)])
def test_deepspeed_zero_saves_reloads_and_continues_identically(shards, ddp_reference, deepspeed_run, tmp_path,
                                                                stage, bf16):
    """2 ranks, ZeRO stage 1/2/3, fp32/bf16, grad accumulation, EMA, validation: a run resumed from
    its step-2 checkpoint (DeepSpeed's own save/load) logs the same losses and ends with the same
    weights as the uninterrupted run. ZeRO-1 fp32 runs under torchrun. ZeRO-3 fp32 also trains the
    same model as DDP: ZeRO partitioning, its gradient accumulation over the split backward and the
    zero_to_fp32 export are exact up to reduction order."""
    run = tmp_path / "run"
    extra = (*DS_EXTRA, f"parallel.zero_stage={stage}", f"parallel.bf16={str(bf16).lower()}")
    torchrun = (stage, bf16) == (1, False)
    ref = deepspeed_run(stage, bf16, torchrun)
    assert (max((ref / "checkpoints").glob("step_*")) / "deepspeed").is_dir()
    _drop_last_checkpoint(ref, run)
    out = _finish(_train(shards, run, *extra, nproc=2, distributed=None, torchrun=torchrun))
    assert "from step_00000002 (step 2)" in out
    assert _losses(run) == _losses(ref) and sorted(_losses(ref)) == [1, 2, 3, 4]
    assert "val_mdm_nelbo" in read_metrics(run / "metrics.jsonl")[-1]
    for weights in ("raw", "ema"):
        a, b = _export_weights(ref, weights), _export_weights(run, weights)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights
    if (stage, bf16) == (3, False):  # the same 4 steps as DDP (ddp_reference keeps its step-4 checkpoint)
        for step, loss in _losses(ref).items():
            assert _losses(ddp_reference)[step] == pytest.approx(loss, rel=1e-5)
        for weights in ("raw", "ema"):  # the EMA assembled from the ranks' master partitions too
            a = _export_weights(ddp_reference / "checkpoints" / "step_00000004", weights, tmp_path / f"ddp_{weights}")
            b = _export_weights(ref, weights)
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@needs_deepspeed
@pytest.mark.distributed
def test_deepspeed_other_world_size_needs_universal_conversion(shards, deepspeed_run, tmp_path, capsys):
    run = tmp_path / "run"
    extra = (*DS_EXTRA, "parallel.zero_stage=2")
    shutil.copytree(deepspeed_run(2, False), run)
    more = (*extra, "optim.steps=6")
    assert cli.main(_args(shards, run, *more)) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    latest = run / "checkpoints" / "step_00000004"
    assert len(err.splitlines()) == 1 and f"proseco ckpt universal {latest}" in err
    assert cli.main(["ckpt", "universal", str(run)]) == 0
    assert (latest / "deepspeed_universal").is_dir()
    out = _finish(_train(shards, run, *more))  # one process now (a fresh one: DeepSpeed keeps global state)
    assert "under another layout" in out and sorted(_losses(run))[-2:] == [5, 6]


# ------------------------------------------------------------------------------------- export
def test_export_round_trip_gives_the_same_logits(shards, reference, tmp_path, capsys):
    from pipeline.artifact import load_model
    from pipeline.model import Backbone

    out = tmp_path / "export"
    assert cli.main(["ckpt", "export", str(reference), "--out", str(out)]) == 0
    assert cli.main(["ckpt", "export", str(reference), "--out", str(out)]) == cli.EXIT_USER_ERROR  # exists
    assert "--force" in capsys.readouterr().err
    model, cfg, info = load_model(out)
    assert info.weights == "ema" and info.step == STEPS
    state = _final_state(reference)
    direct = Backbone(cfg.model, vocab_size=info.vocab_size)
    direct.load_state_dict(state["ema"])
    tokens = torch.randint(0, info.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), direct.eval()(tokens))
    assert cli.main(["ckpt", "info", str(reference)]) == 0
    assert f"step {STEPS}" in capsys.readouterr().out
    # a text model samples from its export; the tokenizer comes with it
    assert cli.main(["sample", str(out), "--num", "2", "sampler.steps=4", "sampler.corrector_steps=1"]) == 0
    printed = capsys.readouterr().out
    assert "sample 1  NFE 8 (predictor 4, corrector 4)" in printed and "token ids" not in printed
    assert cli.main(["ckpt", "export", str(tmp_path / "nothing")]) == cli.EXIT_USER_ERROR
    assert "no complete checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------- megatron-core
needs_megatron = pytest.mark.skipif(not _has("megatron.core"), reason="megatron-core is not installed")
MEGATRON_EXTRA = ("parallel.backend=megatron", "optim.grad_accum=2", "optim.steps=4", "log.val_every=4",
                  "log.val_batches=2", "model.dropout=0.0")  # TP-region dropout masks differ from TP=1's


@needs_megatron
@pytest.mark.distributed
def test_megatron_tp2_matches_tp1_and_resumes_identically(shards, tmp_path, capsys):
    """TP=2 over 2 gloo ranks trains the same model as one process (per-step losses equal to
    1e-5); resumed from its step-2 checkpoint it repeats the uninterrupted run bitwise; and its
    full-state checkpoint resumes in one process (TP=1)."""
    single, tp2, resumed = tmp_path / "single", tmp_path / "tp2", tmp_path / "resumed"
    _train_here(shards, single, *MEGATRON_EXTRA)
    _finish(_train(shards, tp2, *MEGATRON_EXTRA, "parallel.tp_size=2", nproc=2, distributed=None))
    for step, loss in _losses(single).items():
        assert _losses(tp2)[step] == pytest.approx(loss, rel=1e-5), step
    assert "val_mdm_nelbo" in read_metrics(tp2 / "metrics.jsonl")[-1]
    meta = json.loads((tp2 / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["topology"] == {"backend": "megatron", "dp": 1, "tp": 2, "zero_stage": 0}
    a, b = _export_weights(single), _export_weights(tp2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)

    _drop_last_checkpoint(tp2, resumed)
    out = _finish(_train(shards, resumed, *MEGATRON_EXTRA, "parallel.tp_size=2", nproc=2, distributed=None))
    assert "from step_00000002 (step 2)" in out and _losses(resumed) == _losses(tp2)
    for weights in ("raw", "ema"):
        a, b = _export_weights(tp2, weights), _export_weights(resumed, weights)
        assert all(torch.equal(a[k], b[k]) for k in a), weights

    capsys.readouterr()
    _train_here(shards, tp2, *MEGATRON_EXTRA, "optim.steps=6")  # TP=2 -> TP=1
    out = capsys.readouterr().out
    assert "under another layout" in out and sorted(_losses(tp2))[-2:] == [5, 6]


@needs_megatron
@pytest.mark.distributed
def test_megatron_data_parallel_matches_ddp(shards, tmp_path):
    """TP=1 x DP=2: megatron's data-parallel group trains like torch DDP."""
    ddp, meg = tmp_path / "ddp", tmp_path / "meg"
    _finish(_train(shards, ddp, *MEGATRON_EXTRA[1:], nproc=2))
    _finish(_train(shards, meg, *MEGATRON_EXTRA, nproc=2, distributed=None))
    for step, loss in _losses(ddp).items():
        assert _losses(meg)[step] == pytest.approx(loss, rel=1e-5), step


# ------------------------------------------------------------------------------------ bad input
def _corrupt(run: Path, how: str) -> list[str]:
    """Damage the latest checkpoint of ``run``; returns the extra overrides the rerun uses."""
    latest = max((run / "checkpoints").glob("step_*"))
    state = latest / "state.pt"
    if how == "flipped byte":
        raw = bytearray(state.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        state.write_bytes(bytes(raw))
    elif how == "truncated":
        state.write_bytes(state.read_bytes()[:100])
    elif how == "other data":
        meta = json.loads((latest / "meta.json").read_text())
        meta["manifest"] = "0" * 16
        rewrite_meta(latest, meta)
    elif how == "edited meta.json":  # by hand, without updating the checksum in COMPLETE
        meta = json.loads((latest / "meta.json").read_text())
        meta["config"]["optim"]["lr"] *= 10
        (latest / "meta.json").write_text(json.dumps(meta))
    return ["model.hidden=64"] if how == "other model" else []


@pytest.mark.parametrize(("how", "needle"), [
    ("flipped byte", "fails its sha256 check"), ("truncated", "meta.json says"),
    ("other model", "model.hidden: checkpoint 32, config 64"), ("other data", "trained on other data"),
    ("edited meta.json", "meta.json fails its sha256 check")])
def test_bad_checkpoint_is_refused_before_training_and_nothing_is_overwritten(shards, reference, tmp_path,
                                                                              capsys, how, needle):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    extra = _corrupt(run, how)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert cli.main(_args(shards, run, f"optim.steps={STEPS + 2}", *extra)) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert after == before  # no step ran, no checkpoint written or removed
