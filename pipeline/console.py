"""What `proseco train` prints (rank 0 only): a start-up header, one line every ``log.every``
steps, validation results, checkpoint saves and stops.

Plain lines, flushed at once, are the log: a SLURM ``.out`` file or a pipe gets them and nothing
else (no carriage-return progress stream). When stderr is a terminal a tqdm progress bar runs
below the lines as well. ``metrics.jsonl`` (:mod:`pipeline.runlog`) holds the same numbers for
machines; this module is for people::

    step     20/200 | loss 5.8193 | mdm 3.0121 | corr 2.8072 | lr 2.00e-04 | gnorm 1.32 | 9,310 tok/s | 0.22 s/step | mem 612 MiB | eta 0:00:40

Several devices add tokens/s per device (``tok/s/dev``); a known device peak (``log.peak_tflops``) adds
``mfu``, the model FLOPs utilisation.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``D days, H:MM:SS`` past a day) of a non-negative number of seconds."""
    seconds = max(round(seconds), 0)
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    clock = f"{h}:{m:02d}:{s:02d}"
    return f"{days} day{'s' if days > 1 else ''}, {clock}" if days else clock


def step_line(row: dict, total_steps: int, eta_s: float | None) -> str:
    """One log line of a metrics row (keys of :func:`pipeline.train` rows; missing ones are left out)."""
    width = len(str(total_steps))
    parts = [f"step {row['step']:>{width}}/{total_steps}"]
    for key, label, fmt in (("loss", "loss", ".4f"), ("mdm", "mdm", ".4f"), ("correction", "corr", ".4f"),
                            ("lr", "lr", ".2e"), ("grad_norm", "gnorm", ".3g")):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:{fmt}}")
    if row.get("tokens_per_s") is not None:
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    if row.get("tokens_per_s_per_device") is not None and row.get("tokens_per_s") != row["tokens_per_s_per_device"]:
        parts.append(f"{row['tokens_per_s_per_device']:,.0f} tok/s/dev")
    if row.get("mfu") is not None:
        parts.append(f"mfu {row['mfu']:.1%}")
    if row.get("step_s") is not None:
        parts.append(f"{row['step_s']:.3g} s/step")
    if row.get("memory_mb") is not None:
        parts.append(f"mem {row['memory_mb']:,.0f} MiB")
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


class Console:
    """The human-readable training log of one process (``enabled=False``: every call is a no-op)."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True, stream=None):
        self.total, self.enabled = total_steps, enabled
        self.stream = stream or sys.stdout
        self._start_step, self._t0 = start_step, time.monotonic()
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", mininterval=1.0,
                             dynamic_ncols=True, leave=False)

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)
        self.stream.flush()

    def header(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.print(line)

    def step_done(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def eta(self, step: int) -> float | None:
        """Seconds to ``total_steps`` at this process's average pace so far (None before a step)."""
        done = step - self._start_step
        if done <= 0:
            return None
        return (time.monotonic() - self._t0) / done * (self.total - step)

    def log_step(self, row: dict) -> None:
        self.print(step_line(row, self.total, self.eta(int(row["step"]))))
        if self._bar is not None and row.get("loss") is not None:
            self._bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)

    def validation(self, step: int, row: dict) -> None:
        self.print(f"val  {step:>{len(str(self.total))}}/{self.total} | mdm nelbo {row['val_mdm_nelbo']:.4f} | "
                   f"ppl {row['val_ppl']:.4g} | correction {row['val_correction']:.4f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _hf_parameters(model) -> int:
    """Parameters of a (possibly ZeRO-3 partitioned or FSDP2 sharded) model, each counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in unique)


def train_header(cfg, engine, world: int, device, vocab: int, run_id: str, folder, resumed: str | None,
                 step: int, data: str) -> list[str]:
    """The start-up lines of `proseco train`'s log: where, what, how big, on which layout.
    ``engine``: the :class:`pipeline.engines.Engine`; ``resumed``: the checkpoint resumed at
    ``step`` (None: a new run); ``data``: what the run reads and how many batches an epoch holds."""
    from pipeline.model import parameter_count

    m = cfg.model
    topo = engine.topology
    dp, tp = engine.data_world, world // engine.data_world
    seq = cfg.data.seq_len
    per_step = cfg.optim.batch_size * cfg.optim.grad_accum * dp
    layout = {"torch": f"torch ({cfg.parallel.distributed if world > 1 else 'single process'})",
              "deepspeed": f"deepspeed (ZeRO stage {cfg.parallel.zero_stage})",
              "megatron": f"megatron-core (tensor parallel {tp})"}[topo["backend"]]
    if topo["backend"] == "deepspeed":
        precision = "bf16 (DeepSpeed, fp32 master weights)" if cfg.parallel.bf16 else "fp32"
    elif cfg.parallel.bf16:
        precision = f"bf16 autocast on {device.type} (fp32 weights)"
    else:
        precision = "fp32"
    if cfg.parallel.compile:
        precision += ", blocks compiled (torch.compile)"
    objective = (f"ProSeCo (mdm + {cfg.diffusion.corrector_weight:g} x correction)"
                 if cfg.diffusion.corrector_weight > 0 else "MDM (no correction term)")
    if cfg.diffusion.corrector_weight > 0 and cfg.diffusion.corrector_start_step > 0:
        objective += f", plain MDM for the first {cfg.diffusion.corrector_start_step} steps"
    start = f"resuming from {resumed} (step {step})" if resumed is not None else "new run"
    return [
        f"proseco train: {folder} (run id {run_id}): {start}",
        (f"  model      {parameter_count(m, vocab):,} parameters ({m.layers} layers x hidden {m.hidden}, "
         f"{m.heads} heads, vocabulary {vocab:,}), objective {objective}" if not m.init else
         f"  model      {m.init}: {_hf_parameters(engine.model):,} parameters, vocabulary {vocab:,} "
         f"(mask {engine.model.mask_id}), objective {objective}"),
        (f"  layout     {layout}, world {world} = data parallel {dp} x tensor parallel {tp}, device {device.type}, "
         f"precision {precision}"),
        (f"  batch      {per_step:,} sequences x {seq} tokens = {per_step * seq:,} tokens per step "
         f"({cfg.optim.batch_size} per rank x {cfg.optim.grad_accum} micro-steps x {dp} data-parallel ranks)"),
        (f"  schedule   steps {step} -> {cfg.optim.steps}, "
         f"lr {cfg.optim.lr:g} (warmup {cfg.optim.warmup_steps}, {cfg.optim.schedule}), log every {cfg.log.every}, "
         f"validate every {cfg.log.val_every or 'never'}, checkpoint every {cfg.checkpoint.every}"),
        f"  data       {data}",
        f"  logs       {folder}/metrics.jsonl, wandb {cfg.log.wandb}",
    ]
