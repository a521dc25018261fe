"""The ``proseco launch train | prep | eval``, ``status`` and ``cancel`` commands (package doc: :mod:`pipeline.launch`).

Each launch makes its paths absolute (the job starts in the repository), renders its job
script(s), prints them on ``--dry-run``, and otherwise submits through :func:`pipeline.launch.slurm.submit`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.config import Config, check_corpus_run, to_dict
from pipeline.errors import ProsecoError
from pipeline.launch import render, slurm
from pipeline.launch.slurm import (
    ACTIVE_STATES,
    array_id,
    job_script,
    make_executor,
    read_job,
    slurm_parameters,
    submit,
    train_parameters,
)
from pipeline.launch.tasks import EvalShardTask, PrepMergeTask, PrepPartTask, TrainTask
from pipeline.rundir import RunDir


def _check_parts(parts: int) -> None:
    if parts < 1:
        raise ProsecoError(f"--parts must be >= 1, got {parts}")


def _one_process(cfg: Config, name: str) -> dict:
    """Parameters of a job whose tasks are one process each (an array task, the prep merge)."""
    return slurm_parameters(cfg, name, nodes=1, ntasks_per_node=1)


def launch_train(cfg: Config, dry_run: bool = False) -> int:
    """``proseco launch train``: one job of cluster.nodes x cluster.tasks_per_node training ranks."""
    check_corpus_run(cfg, "proseco launch train", need_shards=False)
    run = RunDir.of(cfg).path.resolve()
    cfg.run.dir = str(run)  # the job starts in the repository: paths are made absolute here
    cfg.data.shards = str(Path(cfg.data.shards).resolve())
    if cfg.model.init.startswith("hf:"):  # a Hugging Face folder or .gguf named from here
        cfg.model.init = "hf:" + _absolute(cfg.model.init[3:])
    name = cfg.cluster.job_name or f"proseco-train-{cfg.run.name}"
    params = train_parameters(cfg, run, name)
    script = job_script(cfg, RunDir(run).slurm, params)
    warning = render.gpu_warning(cfg)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if dry_run:
        tasks = cfg.cluster.nodes * cfg.cluster.tasks_per_node
        render.print_sections(cfg, ("job script (sbatch; exactly what would be submitted)", script),
                              (f"each of the {tasks} tasks runs", render.train_tasks(cfg, run)))
        return 0
    job = submit(cfg, run, "train", params, script, lambda ex: {"job_id": ex.submit(TrainTask(to_dict(cfg))).job_id})
    print(f"submitted job {job['job_id']} ({cfg.cluster.nodes} node(s) x {cfg.cluster.tasks_per_node} task(s)) "
          f"for run {run}")
    print(f"  logs:   {run / 'slurm'}/{job['job_id']}_<task>_log.out")
    print(f"  status: proseco status {run}    cancel: proseco cancel {run}")
    return 0


def prep_jobs_dir(out: Path) -> Path:
    """Where a prep launch keeps its job files, logs and snapshot: ``<out_dir>.jobs`` beside the shards."""
    return out.with_name(out.name + ".jobs")


def _absolute(value: str) -> str:
    """``value`` made absolute when it names a file or folder that exists from here (the jobs start
    in the repository); anything else (a name like ``smollm2``, a missing path) is left as it is."""
    return str(Path(value).resolve()) if value and Path(value).exists() else value


def launch_prep(cfg: Config, parts: int, dry_run: bool = False) -> int:
    """``proseco launch prep``: an array job of ``parts`` shard partitions, then a dependent merge job."""
    _check_parts(parts)
    out = Path(cfg.data.shards).resolve()
    cfg.data.shards = str(out)
    cfg.prep.tokenizer_dir = str(Path(cfg.prep.tokenizer_dir).resolve())
    cfg.prep.inputs = [_absolute(i) for i in cfg.prep.inputs]
    jobs_dir = prep_jobs_dir(out)  # next to the shards: their folder takes shard output only
    name = cfg.cluster.job_name or "proseco-prep"
    params, merge_params = _one_process(cfg, name), _one_process(cfg, f"{name}-merge")
    script = job_script(cfg, jobs_dir / "slurm", params, array=parts)
    if dry_run:  # the merge job's dependency names the array's job id, which sbatch gives at submission
        merge_script = job_script(cfg, jobs_dir / "slurm", {**merge_params, "dependency": "afterok:ARRAY_JOB_ID"})
        render.print_sections(
            cfg, (f"{render.array_title(parts, 'partitions')} (sbatch; exactly what would be submitted)", script),
            ("each array task runs", render.array_tasks(parts, f"data_prep.stages.shards(cfg, task='i/{parts}')",
                                                        lambda i: f"proseco prep shards --task {i}/{parts}")),
            ("then the merge job, once the whole array succeeded (ARRAY_JOB_ID: its job id)", merge_script),
            ("the merge job runs", "# data_prep.stages.merge(cfg) with the config below: proseco prep merge"))
        return 0

    def send(array) -> dict:
        jobs = array.map_array(PrepPartTask(to_dict(cfg), parts), list(range(parts)))
        merge_ex = make_executor(cfg, jobs_dir / "slurm", merge_params)
        if cfg.cluster.executor == "slurm":
            merge_ex.update_parameters(dependency=f"afterok:{array_id(jobs)}")
        else:
            for job in jobs:
                job.result()
        merge = merge_ex.submit(PrepMergeTask(to_dict(cfg)))
        return {"job_id": merge.job_id, "array_job_id": array_id(jobs), "parts": parts}

    job = submit(cfg, jobs_dir, "prep", params, script, send)
    print(f"submitted array job {job['array_job_id']} ({parts} partitions) and merge job {job['job_id']} "
          f"(after it) for {out}")
    print(f"  logs:   {jobs_dir / 'slurm'}")
    print(f"  status: proseco status {jobs_dir}")
    return 0


EVAL_FILES = ("reference_lm", "mauve_reference", "gsm8k_questions", "qm9_train_smiles")  # eval.* that name files


def _absolute_eval_files(cfg: Config) -> None:
    """The eval.* files and folders made :func:`_absolute` (lm_eval_include is a path list)."""
    e = cfg.eval
    for key in EVAL_FILES:
        setattr(e, key, _absolute(getattr(e, key)))
    e.lm_eval_include = os.pathsep.join(_absolute(p) for p in e.lm_eval_include.split(os.pathsep) if p)


def launch_eval(cfg: Config, spec: str, parts: int, dry_run: bool = False) -> int:
    """``proseco eval`` as an array job of ``parts`` shards; results land in one folder."""
    from pipeline.evaluation import runner

    _check_parts(parts)
    runner.resolve_models(spec)  # a bad spec fails here, before anything is submitted
    out = (Path(cfg.eval.out) if cfg.eval.out else runner.default_out(spec, cfg)).resolve()
    spec = str(Path(spec).resolve()) if not any(c in spec for c in "*?[") else spec
    _absolute_eval_files(cfg)
    params = _one_process(cfg, cfg.cluster.job_name or "proseco-eval")
    script = job_script(cfg, out / "slurm", params, array=parts)
    if dry_run:
        render.print_sections(
            cfg, (f"{render.array_title(parts, 'shards')} (sbatch; exactly what would be submitted)", script),
            ("each array task runs", render.array_tasks(
                parts, f"pipeline.evaluation.runner.run(cfg, shard_spec='i/{parts}')",
                lambda i: f"proseco eval {shlex.quote(spec)} --shard {i}/{parts} --out {shlex.quote(str(out))}")))
        return 0
    task = EvalShardTask(to_dict(cfg), spec, str(out), parts)
    job = submit(cfg, out, "eval", params, script,
                 lambda ex: {"job_id": array_id(ex.map_array(task, list(range(parts)))), "parts": parts})
    print(f"submitted array job {job['job_id']} ({parts} shards) evaluating {spec} -> {out}")
    print(f"  status: proseco status {out}    then: proseco report {out}")
    return 0


def status(run: str | os.PathLike) -> int:
    from pipeline.checkpoint.manager import CheckpointManager
    from pipeline.runlog import read_metrics

    run = Path(run)
    folder = RunDir(run)
    job = read_job(run)
    jid = str(job["job_id"])
    print(f"run {run}")
    print(f"  job {jid} ({job.get('stage')}): {slurm.job_state(jid)}"
          + (f"; array {job['array_job_id']}: {slurm.job_state(job['array_job_id'])}" if "array_job_id" in job else ""))
    if folder.metrics.is_file():
        rows = read_metrics(folder.metrics)
        if rows:
            last = rows[-1]
            print(f"  step {last['step']}: loss {last.get('loss', float('nan')):.4f}, "
                  f"{last.get('tokens_per_s', 0):,.0f} tokens/s")
    if folder.checkpoints.is_dir():
        latest = CheckpointManager(run).latest()
        print(f"  latest checkpoint: {latest if latest else 'none'}")
    last_exit = folder.read_last_exit()
    if last_exit:
        print(f"  last start ended: step {last_exit['step']}, {last_exit['reason']} (exit {last_exit['exit_code']})")
    logs = sorted(folder.slurm.glob("*_0_log.out"), key=lambda p: p.stat().st_mtime)
    if logs:
        tail = logs[-1].read_text(errors="replace").splitlines()[-8:]
        print(f"  {logs[-1]} (last lines):")
        for line in tail:
            print(f"    {line[:200]}")
    return 0


def cancel(run: str | os.PathLike) -> int:
    run = Path(run)
    job = read_job(run)
    ids = [str(job["job_id"])] + ([str(job["array_job_id"])] if "array_job_id" in job else [])
    if shutil.which("scancel") is None:
        raise ProsecoError("scancel not found on PATH: run this where the SLURM commands are")
    for jid in ids:
        state = slurm.job_state(jid)
        if state not in ACTIVE_STATES:
            print(f"job {jid} is {state}; nothing to cancel")
            continue
        out = subprocess.run(["scancel", jid], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise ProsecoError(f"scancel {jid} failed: {out.stderr.strip()}")
        print(f"cancelled job {jid} (was {state}); its last complete checkpoint stays in {run}")
    return 0
