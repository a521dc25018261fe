"""``proseco launch | status | cancel``: run training (and array stages) as SLURM jobs through submitit.

``proseco launch train`` resolves the config, snapshots it with the code version (git sha plus the
uncommitted diff) and the rendered job script into ``RUN/launch/<time>/``, and submits one job of
``cluster.nodes x cluster.tasks_per_node`` tasks with submitit's ``SlurmExecutor`` (or its
``LocalExecutor`` with ``cluster.executor=local``). Each task is one training rank:

1. :class:`TrainTask` exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the
   SLURM environment (``submitit.helpers.TorchDistributedEnvironment``; no rank guessing) and calls
   :func:`pipeline.train.run`, which initialises the process group for the chosen backend and
   auto-resumes from the run folder's latest complete checkpoint.
2. Before the time limit SLURM sends SIGUSR2 to every task (``--signal=USR2@cluster.signal_delay_s``);
   the train loop's collective stop makes all ranks save at the same step and return 3. Rank 0
   then requeues the job (``scontrol requeue``) unless ``cluster.max_requeues`` restarts were used.
   SIGUSR1 (``scancel -s USR1 JOB``) does the same on demand. SIGTERM - ``scancel``, preemption,
   ``scontrol requeue`` - saves and stops; SLURM itself decides whether the job comes back.
3. A restart runs the same pickled task, which resumes under the same run id, appends to the same
   logs (``RUN/slurm/<job>_<task>_log.{out,err}``) and continues the same wandb run.
4. A rank that dies ends the job step at once (``srun --kill-on-bad-exit``, ``cluster.kill_on_bad_exit``),
   and ranks that do not all meet within ``cluster.startup_timeout_s`` stop with an error
   (:mod:`pipeline.distributed`), so a failure does not hold the allocation until the time limit.
   With ``cluster.retries_on_failure=N`` the job script requeues a failed step up to N times
   (:func:`requeue_on_failure`); the restart resumes from the latest checkpoint.

A run folder belongs to one job at a time: ``launch`` refuses a folder whose recorded job is still
queued or running (``RUN/slurm/job.json``). ``proseco launch prep --parts N`` tokenizes a corpus as
an array job of N partitions (``proseco prep shards --task i/N``), then one dependent job merges
them. ``--dry-run`` prints the job script(s) exactly as they would be submitted, what each task
runs and the resolved config, and submits nothing.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config, config_from_dict, dump_yaml, to_dict
from pipeline.errors import ProsecoError
from pipeline.io import atomic_write_json
from pipeline.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}
REQUEUE_REASONS = {"SIGUSR1", "SIGUSR2", "time_budget"}  # a stop the job asked for; SIGTERM is SLURM's
KILL_AT_START_ENV = "PROSECO_KILL_RANK_AT_START"  # fault-injection tests: this rank SIGKILLs itself at start
GPU_MODEL_PARAMS = 50_000_000  # a model this large is trained on GPUs: warn when the job asks for none


# ------------------------------------------------------------------------------------ the tasks
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
    def __init__(self, cfg: dict):
        self.cfg = cfg

    def __call__(self) -> int:
        from data_prep import stages

        return int(stages.merge(config_from_dict(self.cfg), None) or 0)


# ------------------------------------------------------------------------------------- executors
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
    _check_slurm_commands(cfg)
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


def _check_slurm_commands(cfg: Config) -> None:
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
        raise _sbatch_error(RuntimeError(" / ".join(lines[-2:]) or f"exit {out.returncode}"))


def _sbatch_error(exc: Exception) -> ProsecoError:
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


# ------------------------------------------------------------------------------------- run state
def _job_file(run: Path) -> Path:
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


def _check_not_owned(run: Path) -> None:
    if not _job_file(run).is_file():
        return
    job = _read_job(run)
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


def _snapshot(run: Path, cfg: Config, script: str, stage: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    snap = run / "launch" / f"{stamp}-{stage}"
    snap.mkdir(parents=True, exist_ok=True)
    (snap / "config.yaml").write_text(dump_yaml(cfg))
    (snap / "job.sbatch").write_text(script)
    (snap / "code.json").write_text(json.dumps({"git_sha": _git("rev-parse", "HEAD").strip() or None,
                                                "dirty": bool(_git("status", "--porcelain").strip()),
                                                "argv": sys.argv}, indent=1) + "\n")
    (snap / "code.diff").write_text(_git("diff", "HEAD"))
    return snap


# ------------------------------------------------------------------------------------ commands
def launch_train(cfg: Config, dry_run: bool = False) -> int:

    if cfg.data.task != "text":
        raise ProsecoError(f"proseco launch train reads corpus shards (data.task=text), got {cfg.data.task!r}")
    run = RunDir.of(cfg).path.resolve()
    cfg.run.dir = str(run)  # the job starts in the repository: paths are made absolute here
    cfg.data.manifest = str(Path(cfg.data.manifest).resolve())
    name = cfg.cluster.job_name or f"proseco-train-{cfg.run.name}"
    params = train_parameters(cfg, run, name)
    script = job_script(cfg, run / "slurm", params)
    warning = gpu_warning(cfg)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if dry_run:
        tasks = cfg.cluster.nodes * cfg.cluster.tasks_per_node
        print_sections(("job script (sbatch; exactly what would be submitted)", script),
                       (f"each of the {tasks} tasks runs", _train_tasks(cfg, run)),
                       ("the resolved config", dump_yaml(cfg)))
        return 0
    _check_not_owned(run)
    executor = make_executor(cfg, run / "slurm", params)
    preflight(cfg, script)
    snap = _snapshot(run, cfg, script, "train")
    t0 = time.time()
    try:
        job = executor.submit(TrainTask(to_dict(cfg)))
    except Exception as exc:  # submitit wraps sbatch's error output
        raise _sbatch_error(exc) from exc
    atomic_write_json(_job_file(run), {"job_id": job.job_id, "stage": "train", "submitted": t0,
                                       "snapshot": str(snap), "executor": cfg.cluster.executor})
    print(f"submitted job {job.job_id} ({cfg.cluster.nodes} node(s) x {cfg.cluster.tasks_per_node} task(s)) "
          f"for run {run}")
    print(f"  logs:   {run / 'slurm'}/{job.job_id}_<task>_log.out")
    print(f"  status: proseco status {run}    cancel: proseco cancel {run}")
    return 0


def gpu_warning(cfg: Config) -> str | None:
    """Why a job that asks for no GPU looks like a GPU run, or None. The rule: cluster.gpus_per_node
    is 0 while train.bf16 is on (CUDA-only autocast) or the model has >= 50M parameters."""
    if cfg.cluster.gpus_per_node:
        return None
    from pipeline.model import parameter_count

    reasons = ["train.bf16 is on (bfloat16 autocast runs on CUDA only)"] if cfg.train.bf16 else []
    params = parameter_count(cfg.model, cfg.model.vocab_size or cfg.prep.vocab_size)
    if params >= GPU_MODEL_PARAMS:
        reasons.append(f"the model has {params / 1e6:.0f}M parameters (>= {GPU_MODEL_PARAMS // 10**6}M)")
    if not reasons:
        return None
    return (f"cluster.gpus_per_node is 0 but this looks like a GPU run: {'; '.join(reasons)}. The job gets "
            "no GPU and trains on CPU; set cluster.gpus_per_node and tasks_per_node (e.g. --config cluster_gpu)")


def print_sections(*sections: tuple[str, str]) -> None:
    """A dry run's output: titled sections (job scripts, what the tasks run, the config)."""
    for title, body in sections:
        print(f"# ===== {title} =====")
        print(body.rstrip("\n"))


def _train_tasks(cfg: Config, run: Path) -> str:
    c = cfg.cluster
    world = c.nodes * c.tasks_per_node
    dies = ("ends the job step (srun --kill-on-bad-exit=1)" if c.kill_on_bad_exit
            else "leaves the others waiting (cluster.kill_on_bad_exit is off)")
    failed = f"requeued up to {c.retries_on_failure} times" if c.retries_on_failure else "not requeued"
    if c.executor == "local":
        return (f"# {world} local processes (cluster.executor=local), one training rank each, running "
                f"pipeline.train.run(cfg)\n# with the config below in the run folder {run}")
    return "\n".join([
        f"# {c.nodes} node(s) x {c.tasks_per_node} task(s) per node = {world} tasks, one training rank each:",
        f"#   RANK = SLURM_PROCID (0..{world - 1}), LOCAL_RANK = SLURM_LOCALID, WORLD_SIZE = {world},",
        "#   MASTER_ADDR = the first node of the allocation, MASTER_PORT = one port in 20000-60000 drawn",
        "#   from the job id (submitit's TorchDistributedEnvironment; the same after a requeue).",
        "# Each task runs the pickled pipeline.launch.TrainTask: pipeline.train.run(cfg) with the config",
        "# below, i.e. `proseco train --config <that config>`, resuming from the latest complete",
        f"# checkpoint of the run folder {run}",
        f"# Start-up: the ranks must meet within cluster.startup_timeout_s={c.startup_timeout_s} s.",
        f"# A rank that dies {dies};",
        f"# the failed step is {failed} (cluster.retries_on_failure={c.retries_on_failure}).",
        f"# Time limit: SIGUSR2 {c.signal_delay_s} s before the {c.time_min}-minute limit, every rank saves and",
        f"# the job requeues itself (at most cluster.max_requeues={c.max_requeues} times).",
    ])


def _array_title(parts: int, what: str) -> str:
    return f"array job script: {parts} {what}" if parts > 1 else "job script (--parts 1: one task, no array)"


def _array_tasks(parts: int, call: str, command: Callable[[int], str]) -> str:
    """What array task i of ``parts`` runs: the callable, and each task's equivalent command."""
    shown = list(range(parts)) if parts <= 8 else [0, 1, 2, None, parts - 2, parts - 1]
    lines = [f"# array task i = SLURM_ARRAY_TASK_ID (0..{parts - 1}) runs {call} with the config below:"]
    lines += ["#   ..." if i is None else f"#   task {i}: {command(i)}" for i in shown]
    return "\n".join(lines)


def prep_jobs_dir(out: Path) -> Path:
    """Where a prep launch keeps its job files, logs and snapshot: ``<out_dir>.jobs`` beside the shards."""
    return out.with_name(out.name + ".jobs")


def launch_prep(cfg: Config, parts: int, dry_run: bool = False) -> int:
    if parts < 1:
        raise ProsecoError(f"--parts must be >= 1, got {parts}")
    out = Path(cfg.prep.out_dir).resolve()
    cfg.prep.out_dir = str(out)
    cfg.prep.tokenizer_dir = str(Path(cfg.prep.tokenizer_dir).resolve())
    cfg.prep.inputs = [str(Path(i).resolve()) if Path(i).exists() else i for i in cfg.prep.inputs]
    jobs_dir = prep_jobs_dir(out)  # next to the shards: their folder takes shard output only
    name = cfg.cluster.job_name or "proseco-prep"
    params = slurm_parameters(cfg, name, nodes=1, ntasks_per_node=1)  # an array task is one process
    merge_params = slurm_parameters(cfg, f"{name}-merge", nodes=1, ntasks_per_node=1)
    script = job_script(cfg, jobs_dir / "slurm", params, array=parts)
    if dry_run:  # the merge job's dependency names the array's job id, which sbatch gives at submission
        merge_script = job_script(cfg, jobs_dir / "slurm", {**merge_params, "dependency": "afterok:ARRAY_JOB_ID"})
        print_sections(
            (f"{_array_title(parts, 'partitions')} (sbatch; exactly what would be submitted)", script),
            ("each array task runs", _array_tasks(parts, f"data_prep.stages.shards(cfg, task='i/{parts}')",
                                                  lambda i: f"proseco prep shards --task {i}/{parts}")),
            ("then the merge job, once the whole array succeeded (ARRAY_JOB_ID: its job id)", merge_script),
            ("the merge job runs", "# data_prep.stages.merge(cfg) with the config below: proseco prep merge"),
            ("the resolved config", dump_yaml(cfg)))
        return 0
    _check_not_owned(jobs_dir)
    array = make_executor(cfg, jobs_dir / "slurm", params)
    preflight(cfg, script)
    snap = _snapshot(jobs_dir, cfg, script, "prep")
    try:
        jobs = array.map_array(PrepPartTask(to_dict(cfg), parts), list(range(parts)))
        merge_ex = make_executor(cfg, jobs_dir / "slurm", merge_params)
        if cfg.cluster.executor == "slurm":
            merge_ex.update_parameters(dependency=f"afterok:{jobs[0].job_id.split('_')[0]}")
        else:
            for job in jobs:
                job.result()
        merge = merge_ex.submit(PrepMergeTask(to_dict(cfg)))
    except Exception as exc:
        raise _sbatch_error(exc) from exc
    array_id = jobs[0].job_id.split("_")[0]
    atomic_write_json(_job_file(jobs_dir), {"job_id": merge.job_id, "array_job_id": array_id, "stage": "prep",
                                            "parts": parts, "submitted": time.time(), "snapshot": str(snap)})
    print(f"submitted array job {array_id} ({parts} partitions) and merge job {merge.job_id} (after it) for {out}")
    print(f"  logs:   {jobs_dir / 'slurm'}")
    print(f"  status: proseco status {jobs_dir}")
    return 0


def launch_eval(cfg: Config, spec: str, parts: int, dry_run: bool = False) -> int:
    """``proseco eval`` as an array job of ``parts`` shards; results land in one folder."""
    from pipeline.evaluation import runner

    if parts < 1:
        raise ProsecoError(f"--parts must be >= 1, got {parts}")
    runner.resolve_models(spec)  # a bad spec fails here, before anything is submitted
    out = (Path(cfg.eval.out) if cfg.eval.out else runner.default_out(spec, cfg)).resolve()
    spec = str(Path(spec).resolve()) if not any(c in spec for c in "*?[") else spec
    name = cfg.cluster.job_name or "proseco-eval"
    params = slurm_parameters(cfg, name, nodes=1, ntasks_per_node=1)  # an array task is one process
    script = job_script(cfg, out / "slurm", params, array=parts)
    if dry_run:
        print_sections(
            (f"{_array_title(parts, 'shards')} (sbatch; exactly what would be submitted)", script),
            ("each array task runs", _array_tasks(
                parts, f"pipeline.evaluation.runner.run(cfg, shard_spec='i/{parts}')",
                lambda i: f"proseco eval {shlex.quote(spec)} --shard {i}/{parts} --out {shlex.quote(str(out))}")),
            ("the resolved config", dump_yaml(cfg)))
        return 0
    _check_not_owned(out)
    array = make_executor(cfg, out / "slurm", params)
    preflight(cfg, script)
    snap = _snapshot(out, cfg, script, "eval")
    try:
        jobs = array.map_array(EvalShardTask(to_dict(cfg), spec, str(out), parts), list(range(parts)))
    except Exception as exc:
        raise _sbatch_error(exc) from exc
    array_id = jobs[0].job_id.split("_")[0]
    atomic_write_json(_job_file(out), {"job_id": array_id, "stage": "eval", "parts": parts,
                                       "submitted": time.time(), "snapshot": str(snap)})
    print(f"submitted array job {array_id} ({parts} shards) evaluating {spec} -> {out}")
    print(f"  status: proseco status {out}    then: proseco report {out}")
    return 0


def _read_job(run: Path) -> dict:
    path = _job_file(run)
    if not path.is_file():
        raise ProsecoError(f"{run} has no launched job ({path} missing); `proseco launch` writes it")
    try:
        job = json.loads(path.read_text())
        str(job["job_id"])
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ProsecoError(f"{path} is unreadable ({type(exc).__name__}: {exc}); if no job of this run is queued "
                           "or running (squeue), delete it and launch again") from None
    return job


def status(run: str | os.PathLike) -> int:
    from pipeline.checkpoint.manager import CheckpointManager
    from pipeline.runlog import read_metrics

    run = Path(run)
    job = _read_job(run)
    jid = str(job["job_id"])
    print(f"run {run}")
    print(f"  job {jid} ({job.get('stage')}): {job_state(jid)}"
          + (f"; array {job['array_job_id']}: {job_state(job['array_job_id'])}" if "array_job_id" in job else ""))
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        rows = read_metrics(metrics)
        if rows:
            last = rows[-1]
            print(f"  step {last['step']}: loss {last.get('loss', float('nan')):.4f}, "
                  f"{last.get('tokens_per_s', 0):,.0f} tokens/s")
    if (run / "checkpoints").is_dir():
        latest = CheckpointManager(run).latest()
        print(f"  latest checkpoint: {latest if latest else 'none'}")
    last_exit = RunDir(run).read_last_exit()
    if last_exit:
        print(f"  last start ended: step {last_exit['step']}, {last_exit['reason']} (exit {last_exit['exit_code']})")
    logs = sorted((run / "slurm").glob("*_0_log.out"), key=lambda p: p.stat().st_mtime)
    if logs:
        tail = logs[-1].read_text(errors="replace").splitlines()[-8:]
        print(f"  {logs[-1]} (last lines):")
        for line in tail:
            print(f"    {line[:200]}")
    return 0


def cancel(run: str | os.PathLike) -> int:
    run = Path(run)
    job = _read_job(run)
    ids = [str(job["job_id"])] + ([str(job["array_job_id"])] if "array_job_id" in job else [])
    if shutil.which("scancel") is None:
        raise ProsecoError("scancel not found on PATH: run this where the SLURM commands are")
    for jid in ids:
        state = job_state(jid)
        if state not in ACTIVE_STATES:
            print(f"job {jid} is {state}; nothing to cancel")
            continue
        out = subprocess.run(["scancel", jid], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise ProsecoError(f"scancel {jid} failed: {out.stderr.strip()}")
        print(f"cancelled job {jid} (was {state}); its last complete checkpoint stays in {run}")
    return 0
