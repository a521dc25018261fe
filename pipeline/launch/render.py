"""What ``proseco launch --dry-run`` prints: titled sections (job scripts, what each task runs, the
resolved config), rendered without submitting anything; and the GPU warning of a launch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config, dump_yaml
from pipeline.io import read_json

GPU_MODEL_PARAMS = 50_000_000  # a model this large is trained on GPUs: warn when the job asks for none


def gpu_warning(cfg: Config) -> str | None:
    """Why a job that asks for no GPU looks like a GPU run, or None. The rule: cluster.gpus_per_node
    is 0 while parallel.bf16 is on (bfloat16 pays off on GPUs) or the model has >= 50M parameters."""
    if cfg.cluster.gpus_per_node:
        return None
    from pipeline.model import parameter_count

    reasons = ["parallel.bf16 is on (bfloat16 autocast pays off on GPUs; on CPU it is slow)"] if cfg.parallel.bf16 else []
    manifest = Path(cfg.data.shards) / "manifest.json"  # model.vocab_size null: the tokenizer's, as in training
    vocab = cfg.model.vocab_size or (read_json(manifest)["tokenizer"]["vocab_size"] if manifest.is_file() else None)
    params = parameter_count(cfg.model, int(vocab)) if vocab else 0  # 0: unknown until the shards exist
    if params >= GPU_MODEL_PARAMS:
        reasons.append(f"the model has {params / 1e6:.0f}M parameters (>= {GPU_MODEL_PARAMS // 10**6}M)")
    if not reasons:
        return None
    return (f"cluster.gpus_per_node is 0 but this looks like a GPU run: {'; '.join(reasons)}. The job gets "
            "no GPU and trains on CPU; set cluster.gpus_per_node and tasks_per_node (e.g. --config cluster_gpu)")


def print_sections(cfg: Config, *sections: tuple[str, str]) -> None:
    """A dry run's output: titled sections (job scripts, what the tasks run), then the resolved config."""
    for title, body in (*sections, ("the resolved config", dump_yaml(cfg))):
        print(f"# ===== {title} =====")
        print(body.rstrip("\n"))


def train_tasks(cfg: Config, run: Path) -> str:
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
        "# Each task runs the pickled pipeline.launch.tasks.TrainTask: pipeline.train.run(cfg) with the config",
        "# below, i.e. `proseco train --config <that config>`, resuming from the latest complete",
        f"# checkpoint of the run folder {run}",
        f"# Start-up: the ranks must meet within cluster.startup_timeout_s={c.startup_timeout_s} s.",
        f"# A rank that dies {dies};",
        f"# the failed step is {failed} (cluster.retries_on_failure={c.retries_on_failure}).",
        f"# Time limit: SIGUSR2 {c.signal_delay_s} s before the {c.time_min}-minute limit, every rank saves and",
        f"# the job requeues itself (at most cluster.max_requeues={c.max_requeues} times).",
    ])


def array_title(parts: int, what: str) -> str:
    return f"array job script: {parts} {what}" if parts > 1 else "job script (--parts 1: one task, no array)"


def array_tasks(parts: int, call: str, command: Callable[[int], str]) -> str:
    """What array task i of ``parts`` runs: the callable, and each task's equivalent command."""
    shown = list(range(parts)) if parts <= 8 else [0, 1, 2, None, parts - 2, parts - 1]
    lines = [f"# array task i = SLURM_ARRAY_TASK_ID (0..{parts - 1}) runs {call} with the config below:"]
    lines += ["#   ..." if i is None else f"#   task {i}: {command(i)}" for i in shown]
    return "\n".join(lines)
