"""`proseco train`: pretrain a ProSeCo model on corpus shards, on any backend.

:func:`run` reads top to bottom: **build** (process group, engine = model + optimizer + EMA on the
chosen backend, loader, checkpoint manager, run folder) -> **resume** (latest complete checkpoint)
-> **loop** (lr schedule, gradient accumulation, :func:`proseco_loss` with the split backward,
clip + step + EMA in the engine, metrics, validation, checkpoints) -> **save** -> **exit**.

Backends (``parallel.backend``, :mod:`pipeline.engines`): ``torch`` (one process, DDP or FSDP2),
``deepspeed`` (ZeRO 0-3) and ``megatron`` (megatron-core tensor parallelism, data parallel over
the remaining ranks). Launch with ``torchrun`` on one node; the SLURM launcher sets the same
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) on many. gloo on CPU, nccl on
CUDA. ``optim.batch_size`` is per data-parallel rank and micro-step: an optimizer step sees
``batch_size x grad_accum x data-parallel size`` sequences.

Determinism: the masking draws of micro-step ``m`` of step ``s`` on data-parallel rank ``r`` come
from a generator seeded by ``(run.seed, r, s, m)`` and dropout is reseeded the same way, so a
resumed run needs only the engine's state, the loader position and the counters - all in the
checkpoint - to continue bit for bit (``tests/test_train.py``: kill -9 and resume equals
uninterrupted). Tensor-parallel peers share ``r``, so they see the same batch and the same masks.

Resuming under another layout: the torch and megatron engines save the full unsharded state, so a
run may change its world size, switch between single process / DDP / FSDP2 / tensor-parallel sizes
(the loader then restarts the interrupted epoch with the new layout); DeepSpeed ZeRO files need
``proseco ckpt universal`` first (the refusal says so).

Graceful stop: SIGTERM / SIGUSR1 / SIGUSR2 / Ctrl-C set a flag; at each optimizer-step boundary
all ranks agree (one all-reduce MAX over [signal seen, time budget ``run.max_time_s`` spent]),
save together and exit with :data:`EXIT_REQUEUE` (3), which tells a launcher to requeue the job;
a second Ctrl-C aborts without saving. What the run prints is :mod:`pipeline.console`'s.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.artifact import data_identity, model_config_mismatch
from pipeline.checkpoint.manager import (
    CheckpointManager,
    code_version,
    rng_state,
    set_rng_state,
)
from pipeline.config import Config, check_corpus_run, check_shards, check_world_size, dump_yaml, to_dict
from pipeline.console import Console
from pipeline.data.loader import ShardLoader
from pipeline.data.manifest import Manifest
from pipeline.diffusion.objective import proseco_loss
from pipeline.distributed import init_process_group
from pipeline.engines import Engine, build_engine
from pipeline.errors import ProsecoError
from pipeline.io import atomic_write, atomic_write_json, read_json, save_torch
from pipeline.runlog import RunLogger, read_metrics  # noqa: F401 (read_metrics: part of this module's API)
from pipeline.trainer import lr_at

EXIT_REQUEUE = 3  # stopped early (signal or time budget) after saving: requeue the job to continue
STEP_DELAY_ENV = "PROSECO_STEP_DELAY_S"  # fault-injection tests: sleep this long after each step
SAVE_DELAY_ENV = "PROSECO_SAVE_DELAY_S"  # fault-injection tests: sleep inside a save, files half-written
FULL_STATE_BACKENDS = ("torch", "megatron")  # engines whose checkpoints hold the full unsharded state


# ---------------------------------------------------------------------------------------- helpers
def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.dir or f"runs/{cfg.run.name}")


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank): torchrun's / submitit's RANK, WORLD_SIZE, LOCAL_RANK, else
    SLURM's per-task variables under ``srun`` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), else (0, 1, 0)."""
    env = os.environ
    if "RANK" in env or "SLURM_STEP_ID" not in env:
        return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))
    rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))  # for init_process_group(env://)
    return rank, world, local


def world_layout(cfg: Config, nproc: int | None = None) -> str:
    """One paragraph for `--dry-run`: processes (``nproc``, else the launcher's environment),
    device, batch geometry, run folder."""
    rank, world, _ = world_from_env()
    if nproc:
        rank, world = 0, nproc
    device = "cuda" if torch.cuda.is_available() else "cpu"
    comm = ("gloo" if device == "cpu" else "nccl") if world > 1 else "none (single process)"
    tp = cfg.parallel.tp_size if cfg.parallel.backend == "megatron" else 1
    dp = max(world // tp, 1)
    layout = {"torch": f"distributed {cfg.parallel.distributed}", "deepspeed": f"ZeRO stage {cfg.parallel.zero_stage}",
              "megatron": f"tensor parallel {tp} x data parallel {dp}"}[cfg.parallel.backend]
    return (f"backend {cfg.parallel.backend} ({layout}), world size {world} (this is rank {rank}), "
            f"device {device}, process group {comm}; per optimizer step {cfg.optim.batch_size} sequences x "
            f"{cfg.optim.grad_accum} micro-steps x {dp} data-parallel ranks = {cfg.optim.batch_size * cfg.optim.grad_accum * dp}; "
            f"run folder {run_dir(cfg)}")


def _seed_of(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0]) & (2**63 - 1)


def _step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """The masking draws of one micro-step: a pure function of (seed, rank, step, micro)."""
    return torch.Generator(device=device).manual_seed(_seed_of(seed, rank, step, micro))


def _all_reduce(values: list[float], op, device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    buf = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buf, op=op)
    return buf.tolist()


class _StopFlag:
    """SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT -> flag (the signal number, the largest if several); the
    previous handlers come back on exit. SLURM sends SIGUSR2 before the time limit (``--signal``)
    and SIGTERM on ``scancel``, preemption and ``scontrol requeue``; SIGUSR1 is for users
    (``scancel -s USR1``); SIGINT is Ctrl-C. A second Ctrl-C (at least ``ABORT_AFTER_S`` after the
    first: a launcher that forwards the terminal's SIGINT to its workers must not count twice)
    aborts at once with KeyboardInterrupt, without saving."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
    ABORT_AFTER_S = 1.0

    def __init__(self, loud: bool = True):
        self.loud = loud  # say so on stderr (rank 0)

    def __enter__(self):
        self.seen, self._old, self._first_int = 0, {}, None
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_int is not None and now - self._first_int >= self.ABORT_AFTER_S:
                raise KeyboardInterrupt
            if self._first_int is None:
                self._first_int = now
                if self.loud:  # os.write: print() is not safe inside a signal handler (reentrant buffer)
                    os.write(2, b"\nCtrl-C: saving at the end of this step, then stopping "
                                b"(Ctrl-C again to abort without saving)\n")
        self.seen = max(self.seen, int(signum))

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _open_data(cfg: Config) -> tuple[Manifest, int, int]:
    """(manifest, vocabulary size of the model, mask id) for task ``text``."""
    check_corpus_run(cfg, "proseco train")
    manifest = Manifest.load(cfg.data.shards)
    vocab = check_shards(cfg, manifest.seq_len, int(manifest.data["tokenizer"]["vocab_size"]))
    return manifest, vocab, int(manifest.special["mask"])


def _start_run_folder(cfg: Config, folder: Path, ckpt: CheckpointManager) -> dict:
    """run.json: the run id and the wandb id, created once and reused on every requeue / resume.

    Written atomically. One that a crash or a full disk left unreadable is rebuilt from the
    latest checkpoint's copy (every checkpoint keeps the run ids), else started afresh."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    info_path = folder / "run.json"
    if info_path.exists():
        try:
            info = read_json(info_path)
            if isinstance(info, dict) and info.get("run_id") and info.get("logger_id"):
                return info
            problem = "it holds no run id"
        except (OSError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}" if info_path.stat().st_size else "it is empty"
        latest = ckpt.latest()
        saved = (ckpt.read_meta(latest).get("run") or {}) if latest is not None else {}
        info = saved if saved.get("run_id") else _new_run_info(cfg)
        source = f"the ids kept in {latest.name}" if saved.get("run_id") else "a new run id"
        print(f"warning: {info_path} was unreadable ({problem}); rebuilt it from {source}", flush=True)
    else:
        info = _new_run_info(cfg)
    atomic_write_json(info_path, info)
    return info


def _new_run_info(cfg: Config) -> dict:
    run_id = uuid.uuid4().hex[:12]
    return {"run_id": run_id, "logger_id": run_id, "name": cfg.run.name, "created": time.time()}


@torch.no_grad()
def _validate(cfg: Config, model: nn.Module, manifest: Manifest, mask_id: int, rank: int, world: int,
              procs: int, device: torch.device, collective: bool = False) -> dict[str, float]:
    """MDM NELBO (comparable to MDLM), its perplexity and the correction term on the val split.

    The same ``val_batches`` batches every time (fresh loader, fixed masking seeds); sharded over
    the data-parallel ranks (``rank`` of ``world``) when the split has a shard per rank, else every
    rank evaluates the same batches. ``procs``: all processes (tensor-parallel peers count the same
    batches; the averages are unchanged).

    ``collective``: ``model`` runs collectives in its forward (FSDP2, ZeRO-3, tensor parallel), so every rank runs as many
    forwards as the rank with the most batches; a rank out of batches repeats its last one and
    does not count it."""
    sharded = len(manifest.shards("val")) >= world
    v_rank, v_world = (rank, world) if sharded else (0, 1)
    try:
        loader = ShardLoader(manifest, "val", cfg.optim.batch_size, rank=v_rank, world_size=v_world,
                             seed=cfg.run.seed, shuffle=False)
    except ProsecoError as exc:
        raise ProsecoError(f"validation: {exc}; or turn validation off with log.val_every=0") from None
    was_training = model.training
    model.eval()
    sums, n = [0.0, 0.0], 0
    batches, batch = loader.epoch_iter(), None
    for i in range(cfg.log.val_batches):
        nxt = next(batches, None)
        more = nxt is not None
        if collective:
            more = _all_reduce([float(more)], dist.ReduceOp.MAX, device, procs)[0] > 0
        if not more or batch is None and nxt is None:  # (the latter: an empty rank; the loader refuses those)
            break
        counted, batch = nxt is not None, nxt if nxt is not None else batch
        x, valid = batch["tokens"].to(device), batch["valid"].to(device)
        gen = _step_generator(cfg.run.seed, v_rank, 2**40, i, device)  # a stream no train step uses
        terms = proseco_loss(model, x, cfg.diffusion, mask_id, valid=valid, generator=gen)
        if counted:
            sums, n = [sums[0] + float(terms.mdm), sums[1] + float(terms.correction)], n + 1
    model.train(was_training)
    mdm, corr, count = _all_reduce([*sums, float(n)], dist.ReduceOp.SUM, device, procs)
    nelbo = mdm / max(count, 1.0)
    return {"val_mdm_nelbo": nelbo, "val_ppl": float(np.exp(min(nelbo, 700.0))),
            "val_correction": corr / max(count, 1.0)}


# ---------------------------------------------------------------------------------------- run
def run(cfg: Config) -> int:
    """Train ``cfg.optim.steps`` optimizer steps in the run folder; 0 when done, EXIT_REQUEUE when stopped early."""
    rank, world, local_rank = world_from_env()
    check_world_size(cfg, world)
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if cfg.parallel.threads:
        torch.set_num_threads(cfg.parallel.threads)
    # DeepSpeed and megatron-core want a process group even in one process.
    own_group = (world > 1 or cfg.parallel.backend != "torch") and not dist.is_initialized()
    if own_group:  # the ranks meet within cluster.startup_timeout_s, or all stop with an error
        init_process_group("nccl" if cuda else "gloo", rank, world, cfg.cluster.startup_timeout_s)
    try:
        code = _train(cfg, rank, world, device)
        if own_group:
            dist.barrier()  # no rank tears gloo down while a peer is still inside a collective
        return code
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _resume(cfg: Config, engine: Engine, loader: ShardLoader, ckpt: CheckpointManager, latest: Path,
            rank: int, device: torch.device) -> tuple[int, int]:
    """Restore engine, loader, RNG and counters from ``latest``; (step, local tokens).

    Everything is checked before anything is loaded: files against their checksums, the model
    config, the data (manifest fingerprint), the parallel layout."""
    meta = ckpt.read_meta(latest)
    ckpt.verify(latest, meta)
    diff = model_config_mismatch(meta.get("config", {}).get("model", {}), to_dict(cfg)["model"])
    if diff:
        raise ProsecoError(f"cannot resume from {latest}: it was trained with another model config ({'; '.join(diff)}). "
                           "Restore those settings, or start a new run folder (run.name=... / run.dir=...)")
    if meta.get("manifest") != loader.manifest.fingerprint:
        raise ProsecoError(f"cannot resume from {latest}: it was trained on other data (manifest fingerprint "
                           f"{meta.get('manifest')}, now {loader.manifest.fingerprint} for {cfg.data.shards}). "
                           "Point data.shards at the original shards, or start a new run folder")
    saved, now = meta.get("topology", {}), engine.topology
    if saved != now and "deepspeed" in (saved.get("backend"), now["backend"]) \
            and saved.get("backend") != now["backend"]:
        raise ProsecoError(
            f"cannot resume from {latest}: it was saved by backend {saved.get('backend')} and this run uses "
            f"{now['backend']}; DeepSpeed ZeRO checkpoints resume only under parallel.backend=deepspeed (and "
            f"torch/megatron ones not under it). Resume with parallel.backend={saved.get('backend')}, or start a "
            f"new run folder (`proseco ckpt export {latest}` gives its weights)")
    try:
        engine.load(latest, saved)
        own = latest / f"rank_{rank:05d}.pt"
        same_layout = saved == now and own.is_file()
        mine = torch.load(own if same_layout else latest / "rank_00000.pt", map_location="cpu", weights_only=True)
    except ProsecoError:
        raise
    except Exception as exc:  # truncated or foreign files raise many types
        raise ProsecoError(f"cannot load checkpoint {latest} ({type(exc).__name__}: {exc}); it is corrupt or "
                           "from another model config. Move it aside to resume from the one before") from exc
    loader.load_state_dict(mine["loader"], allow_new_world_size=not same_layout)
    if same_layout:
        set_rng_state(mine["rng"])
        local_tokens = int(mine["local_tokens"])
    else:  # another layout: rank 0 carries the token count of the old ranks, the epoch restarts
        old = sorted(latest.glob("rank_*.pt"))
        total = sum(int(torch.load(f, weights_only=True)["local_tokens"]) for f in old) if rank == 0 else 0
        local_tokens = total
        if rank == 0:
            print(f"resuming {latest.name} under another layout ({saved} -> {now}): weights and optimizer "
                  "resharded; the data loader restarts the interrupted epoch", flush=True)
    return int(meta["step"]), local_tokens


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (KiB on Linux)


def _train(cfg: Config, rank: int, world: int, device: torch.device) -> int:
    start_time = time.monotonic()
    manifest, vocab, mask_id = _open_data(cfg)
    engine = build_engine(cfg, vocab, device, rank, world)
    try:
        return _loop(cfg, engine, manifest, vocab, mask_id, rank, world, device, start_time)
    finally:
        engine.close()


def _loop(cfg: Config, engine: Engine, manifest: Manifest, vocab: int, mask_id: int, rank: int, world: int,
          device: torch.device, start_time: float) -> int:
    d_rank, d_world, tp = engine.data_rank, engine.data_world, world // engine.data_world
    loader = ShardLoader(manifest, "train", cfg.optim.batch_size, rank=d_rank, world_size=d_world,
                         num_workers=cfg.data.loader_workers, seed=cfg.run.seed)
    folder = run_dir(cfg)
    ckpt = CheckpointManager(folder, cfg.checkpoint.keep_last, cfg.checkpoint.permanent_every, rank=rank, world_size=world)
    info = {}
    if rank == 0:
        ckpt.cleanup_partial()
        info = _start_run_folder(cfg, folder, ckpt)
    if world > 1:
        dist.barrier()

    # ---- resume ------------------------------------------------------------------------------
    step, local_tokens = 0, 0
    latest = ckpt.latest()
    if latest is not None:
        step, local_tokens = _resume(cfg, engine, loader, ckpt, latest, rank, device)
    if rank == 0:  # only once the checkpoint was accepted: a refused rerun leaves the folder as it was
        atomic_write(folder / "config.yaml", dump_yaml(cfg))
    console = Console(cfg.optim.steps, step, enabled=rank == 0)
    console.header(_header(cfg, engine, loader, world, device, vocab, info, folder, latest, step))

    save_delay = float(os.environ.get(SAVE_DELAY_ENV, "0") or 0)

    def save() -> Path:
        t0 = time.perf_counter()
        mine = {"loader": loader.state_dict(), "rng": rng_state(), "local_tokens": local_tokens}

        def writer(tmp: Path) -> dict:
            hashed = engine.save(tmp, rank) or {}
            if save_delay:  # a crash here leaves a tmp folder with some files and no marker
                time.sleep(save_delay)
            own = f"rank_{rank:05d}.pt"
            return {**hashed, own: save_torch(mine, tmp / own)}

        meta = {"topology": engine.topology, "manifest": manifest.fingerprint, "data": data_identity(manifest),
                "config": to_dict(cfg), "code": code_version(), "model": {"vocab_size": vocab, "mask_id": mask_id},
                "run": info}
        path = ckpt.save(step, meta, writer=writer)
        if rank == 0:
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            console.print(f"saved checkpoint {path} ({size / 2**20:,.1f} MiB, {time.perf_counter() - t0:.1f} s)")
        return path

    # ---- loop --------------------------------------------------------------------------------
    n_forwards = 2 if cfg.diffusion.corrector_weight > 0 else 1
    delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    last_saved, exit_code, stop_reason = step if latest is not None else -1, 0, "finished"
    batches = iter(loader)
    engine.model.train()
    log = RunLogger(folder, cfg, info, enabled=rank == 0)  # metrics.jsonl (+ wandb) on rank 0
    try:
        with log, _StopFlag(loud=rank == 0) as stop:
            while step < cfg.optim.steps:
                step_start, data_wait = time.perf_counter(), 0.0
                lr = lr_at(step, cfg.optim)
                engine.set_lr(lr)
                engine.zero_grad()
                sums, step_tokens = [0.0, 0.0, 0.0], 0
                for micro in range(cfg.optim.grad_accum):
                    wait = time.perf_counter()
                    batch = next(batches)
                    data_wait += time.perf_counter() - wait
                    x, valid = batch["tokens"].to(device), batch["valid"].to(device)
                    # Dropout draws from the global RNG, which a new DataLoader iterator also consumes
                    # (once per epoch, and at a resume): reseed it so a resumed run draws the same.
                    torch.manual_seed(_seed_of(cfg.run.seed, d_rank, step, micro, 1))
                    last_micro, calls = micro == cfg.optim.grad_accum - 1, [0]

                    def model_fn(z, tt, v, _last=last_micro, _calls=calls):
                        # Reduce gradients in the backward of the last forward of the step only.
                        _calls[0] += 1
                        return engine.forward(z, tt, v, sync=_last and _calls[0] == n_forwards)

                    def backward(loss):
                        engine.backward(loss / cfg.optim.grad_accum)

                    terms = proseco_loss(model_fn, x, cfg.diffusion, mask_id, valid=valid,
                                         generator=_step_generator(cfg.run.seed, d_rank, step, micro, device),
                                         backward=backward if cfg.diffusion.split_backward else None)
                    if not cfg.diffusion.split_backward:
                        backward(terms.loss)
                    sums = [s + float(v) for s, v in zip(sums, (terms.loss, terms.mdm, terms.correction))]
                    step_tokens += terms.tokens
                grad_norm = engine.step()
                step += 1
                local_tokens += step_tokens
                console.step_done(step)

                val_now = cfg.log.val_every > 0 and (step % cfg.log.val_every == 0 or step == cfg.optim.steps)
                if val_now or step % cfg.log.every == 0 or step == cfg.optim.steps:
                    red = _all_reduce([*sums, float(step_tokens), float(local_tokens)],
                                      dist.ReduceOp.SUM, device, world)
                    step_s = time.perf_counter() - step_start
                    row = {"step": step, "loss": red[0] / (cfg.optim.grad_accum * world),
                           "mdm": red[1] / (cfg.optim.grad_accum * world), "correction": red[2] / (cfg.optim.grad_accum * world),
                           "lr": lr, "grad_norm": grad_norm, "tokens_seen": int(red[4] / tp),
                           "tokens_per_s": red[3] / tp / max(step_s, 1e-9), "data_wait_s": data_wait,
                           "step_s": step_s, "memory_mb": _memory_mb(device)}
                    console.log_step(row)
                    if val_now:
                        val = _validate(cfg, engine.eval_model, manifest, mask_id, d_rank, d_world, world,
                                        device, collective=engine.eval_collective)
                        console.validation(step, val)
                        row.update(val)
                    log.log(row)
                if step % cfg.checkpoint.every == 0:
                    save()
                    last_saved = step
                if delay:
                    time.sleep(delay)
                spent = cfg.run.max_time_s > 0 and time.monotonic() - start_time > cfg.run.max_time_s
                flags = _all_reduce([float(stop.seen), float(spent)], dist.ReduceOp.MAX, device, world)
                if step < cfg.optim.steps and max(flags) > 0:
                    stop_reason = signal.Signals(int(flags[0])).name if flags[0] else "time_budget"
                    why = f"signal {stop_reason}" if flags[0] else f"the time budget run.max_time_s={cfg.run.max_time_s:g}"
                    console.print(f"stopping at step {step} after {why}; saving, exit {EXIT_REQUEUE} (requeue)")
                    exit_code = log.exit_code = EXIT_REQUEUE
                    break

            # ---- save ------------------------------------------------------------------------
            if last_saved != step:
                save()
    finally:
        console.close()

    # ---- exit ----------------------------------------------------------------------------------
    if rank == 0:  # what a launcher reads to decide on a requeue (pipeline.launch)
        write_last_exit(folder, {"step": step, "exit_code": exit_code, "reason": stop_reason, "time": time.time()})
        if exit_code == 0:
            console.print(f"done: {step} steps in {folder}")
        else:
            console.print(f"stopped at step {step} of {cfg.optim.steps}; the checkpoint is saved. Resume: rerun the same "
                          f"command (run folder {folder}); it continues from step {step}")
    return exit_code


def _header(cfg: Config, engine: Engine, loader: ShardLoader, world: int, device: torch.device, vocab: int,
            info: dict, folder: Path, latest: Path | None, step: int) -> list[str]:
    """The start-up lines of the log: where, what, how big, on which layout."""
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
    elif cfg.parallel.bf16 and device.type == "cuda":
        precision = "bf16 autocast (fp32 weights)"
    else:
        precision = "fp32" + (" (parallel.bf16 applies on CUDA only)" if cfg.parallel.bf16 else "")
    objective = (f"ProSeCo (mdm + {cfg.diffusion.corrector_weight:g} x correction)"
                 if cfg.diffusion.corrector_weight > 0 else "MDM (no correction term)")
    start = (f"resuming from {latest.name} (step {step})" if latest is not None else "new run")
    return [
        f"proseco train: {folder} (run id {info.get('run_id', '?')}): {start}",
        (f"  model      {parameter_count(m, vocab):,} parameters ({m.layers} layers x hidden {m.hidden}, "
        f"{m.heads} heads, vocabulary {vocab:,}), objective {objective}"),
        (f"  layout     {layout}, world {world} = data parallel {dp} x tensor parallel {tp}, device {device.type}, "
        f"precision {precision}"),
        (f"  batch      {per_step:,} sequences x {seq} tokens = {per_step * seq:,} tokens per step "
        f"({cfg.optim.batch_size} per rank x {cfg.optim.grad_accum} micro-steps x {dp} data-parallel ranks)"),
        (f"  schedule   steps {step} -> {cfg.optim.steps}, lr {cfg.optim.lr:g} (warmup {cfg.optim.warmup_steps}, {cfg.optim.schedule}), "
        f"log every {cfg.log.every}, validate every {cfg.log.val_every or 'never'}, checkpoint every {cfg.checkpoint.every}"),
        f"  data       {cfg.data.shards} ({loader.batches_per_epoch:,} batches per epoch per rank)",
        f"  logs       {folder / 'metrics.jsonl'}, wandb {cfg.log.wandb}",
    ]


def write_last_exit(folder: Path, info: dict) -> None:
    atomic_write_json(folder / "logs" / "last_exit.json", info)


def read_last_exit(folder: str | os.PathLike) -> dict | None:
    """How the last start of the run in ``folder`` ended: step, exit_code, reason
    (``finished``, ``time_budget`` or a signal name such as ``SIGUSR2``); None if unknown."""
    try:
        return json.loads((Path(folder) / "logs" / "last_exit.json").read_text())
    except (OSError, ValueError):
        return None
