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

Resuming under another layout: the torch and megatron engines save the full unsharded state (or,
with ``checkpoint.format: sharded``, DCP shards that reshard on load), so a run may change its world
size, switch between single process / DDP / FSDP2 / tensor-parallel sizes (the loader then
restarts the interrupted epoch with the new layout); DeepSpeed ZeRO files need
``proseco ckpt universal`` first (the refusal says so).

Graceful stop: SIGTERM / SIGUSR1 / SIGUSR2 / Ctrl-C set a flag; at each optimizer-step boundary
all ranks agree (one all-reduce MAX over [signal seen, time budget ``run.max_time_s`` spent]),
save together and exit with :data:`EXIT_REQUEUE` (3), which tells a launcher to requeue the job;
a second Ctrl-C aborts without saving (:mod:`pipeline.stopflag`). What the run prints is
:mod:`pipeline.console`'s; the run folder's layout is :class:`pipeline.rundir.RunDir`'s.

In-memory data (:class:`pipeline.data.memory.MemoryData`, the demo's task data) is one more batch
source: ``run(cfg, memory=...)`` trains on it through the same loop, engine and checkpoints.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.artifact import data_identity, model_config_mismatch
from pipeline.checkpoint import sharded as sharded_ckpt
from pipeline.checkpoint.manager import (
    CheckpointManager,
    code_version,
    rng_state,
    set_rng_state,
)
from pipeline.config import Config, check_corpus_run, check_shards, check_world_size, to_dict
from pipeline.console import Console, train_header
from pipeline.data.loader import ShardLoader
from pipeline.data.manifest import Manifest
from pipeline.data.memory import MemoryData, TensorLoader
from pipeline.diffusion.objective import objective_at, proseco_loss
from pipeline.distributed import init_process_group, world_from_env
from pipeline.engines import Engine, build_engine
from pipeline.errors import ProsecoError
from pipeline.io import save_torch
from pipeline.model import hf
from pipeline.optim import lr_at
from pipeline.plan import device_peak_tflops, flops_per_token, passes_of
from pipeline.rundir import RunDir
from pipeline.runlog import RunLogger
from pipeline.stopflag import StopFlag

EXIT_REQUEUE = 3  # stopped early (signal or time budget) after saving: requeue the job to continue
STEP_DELAY_ENV = "PROSECO_STEP_DELAY_S"  # fault-injection tests: sleep this long after each step
SAVE_DELAY_ENV = "PROSECO_SAVE_DELAY_S"  # fault-injection tests: sleep inside a save, files half-written
# the loader state's reader layout, by the setting that sets it: resuming under another restarts the epoch
READER_LAYOUT = {"world_size": "world size", "num_workers": "data.loader_workers", "batch_size": "optim.batch_size"}
RESUME_NOTED = ("diffusion", "optim", "data")  # sections that may change between starts: said in one line


# ---------------------------------------------------------------------------------------- helpers
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
            f"run folder {RunDir.of(cfg)}")


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


def _open_data(cfg: Config, memory: MemoryData | None) -> tuple[Manifest | MemoryData, int, int]:
    """(the data, vocabulary size of the model, mask id): ``memory`` when given, else the corpus
    shards of ``data.shards`` (task ``text``)."""
    if memory is not None:
        if cfg.log.val_every > 0:
            raise ProsecoError("validation reads the val split of corpus shards; in-memory data trains with "
                               "log.val_every=0")
        return memory, cfg.model.vocab_size or memory.vocab_size, memory.mask_id
    check_corpus_run(cfg, "proseco train")
    manifest = Manifest.load(cfg.data.shards)
    vocab = check_shards(cfg, manifest.seq_len, int(manifest.data["tokenizer"]["vocab_size"]))
    mask_id = int(manifest.special["mask"])
    if hf.is_hf(cfg.model.init):
        rows, model_mask = hf.vocab_info(cfg.model.init)
        if (vocab, mask_id) != (rows, model_mask):
            raise ProsecoError(f"{cfg.data.shards} has {vocab} ids with mask {mask_id}, but {cfg.model.init} has "
                               f"{rows} with mask {model_mask}: prepare the shards with this model's tokenizer "
                               "(`proseco prep sft` with the same model.init)")
    return manifest, vocab, mask_id


def _data_name(cfg: Config, data: Manifest | MemoryData) -> str:
    return data.name if isinstance(data, MemoryData) else str(cfg.data.shards)


def _open_loader(cfg: Config, data: Manifest | MemoryData, rank: int, world: int) -> ShardLoader | TensorLoader:
    """The training batches of data-parallel rank ``rank`` of ``world``, from shards or from memory."""
    if isinstance(data, MemoryData):
        return data.loader(cfg.optim.batch_size, rank=rank, world_size=world, seed=cfg.run.seed)
    return ShardLoader(data, "train", cfg.optim.batch_size, rank=rank, world_size=world, num_workers=cfg.data.loader_workers,
                       seed=cfg.run.seed)


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
        prompt = batch["prompt"].to(device) if "prompt" in batch else None
        gen = _step_generator(cfg.run.seed, v_rank, 2**40, i, device)  # a stream no train step uses
        terms = proseco_loss(model, x, cfg.diffusion, mask_id, valid=valid, generator=gen, prompt=prompt)
        if counted:
            sums, n = [sums[0] + float(terms.mdm), sums[1] + float(terms.correction)], n + 1
    model.train(was_training)
    mdm, corr, count = _all_reduce([*sums, float(n)], dist.ReduceOp.SUM, device, procs)
    nelbo = mdm / max(count, 1.0)
    return {"val_mdm_nelbo": nelbo, "val_ppl": float(np.exp(min(nelbo, 700.0))),
            "val_correction": corr / max(count, 1.0)}


# ---------------------------------------------------------------------------------------- run
def run(cfg: Config, memory: MemoryData | None = None) -> int:
    """Train ``cfg.optim.steps`` optimizer steps in the run folder; 0 when done, EXIT_REQUEUE when stopped early.

    ``memory``: train on these in-memory sequences instead of ``data.shards``'s shards (the demo)."""
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
        code = _train(cfg, rank, world, device, memory)
        if own_group:
            dist.barrier()  # no rank tears gloo down while a peer is still inside a collective
        return code
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _resume(cfg: Config, engine: Engine, data: Manifest | MemoryData, loader: ShardLoader | TensorLoader,
            ckpt: CheckpointManager, latest: Path, rank: int) -> tuple[int, int]:
    """Restore engine, loader, RNG and counters from ``latest``; (step, local tokens).

    Everything is checked before anything is loaded: files against their checksums, the model
    config, the data (manifest fingerprint), the parallel layout."""
    meta = ckpt.read_meta(latest)
    ckpt.verify(latest, meta)
    diff = model_config_mismatch(meta.get("config", {}).get("model", {}), to_dict(cfg)["model"])
    if diff:
        raise ProsecoError(f"cannot resume from {latest}: it was trained with another model config ({'; '.join(diff)}). "
                           "Restore those settings, or start a new run folder (run.name=... / run.dir=...)")
    if meta.get("manifest") != data.fingerprint:
        raise ProsecoError(f"cannot resume from {latest}: it was trained on other data (manifest fingerprint "
                           f"{meta.get('manifest')}, now {data.fingerprint} for {_data_name(cfg, data)}). "
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
        if sharded_ckpt.is_sharded(meta):  # the checkpoint's format decides, whatever checkpoint.format says now
            state = engine.sharded_state()
            sharded_ckpt.load(state, latest)
            engine.load_sharded_state(state)
        else:
            engine.load(latest, saved)
        own = latest / f"rank_{rank:05d}.pt"
        same_layout = saved == now and own.is_file()
        mine = torch.load(own if same_layout else latest / "rank_00000.pt", map_location="cpu", weights_only=True)
    except ProsecoError:
        raise
    except Exception as exc:  # truncated or foreign files raise many types
        raise ProsecoError(f"cannot load checkpoint {latest} ({type(exc).__name__}: {exc}); it is corrupt or "
                           "from another model config. Move it aside to resume from the one before") from exc
    saved_reader = {k: v for k, v in mine["loader"].items() if k in READER_LAYOUT}
    reader = {k: v for k, v in loader.state_dict().items() if k in READER_LAYOUT}
    # another reader layout (world size, loader workers, per-rank batch size): the interrupted epoch restarts
    loader.load_state_dict(mine["loader"], allow_new_world_size=True)
    if same_layout and saved_reader != reader and rank == 0:
        changes = ", ".join(f"{READER_LAYOUT[k]} {saved_reader.get(k)} -> {v}" for k, v in reader.items()
                            if saved_reader.get(k) != v)
        print(f"resuming {latest.name} with another data layout ({changes}): the data loader restarts the "
              "interrupted epoch from its beginning", flush=True)
    changed = _changed_since(meta.get("config", {}), to_dict(cfg))
    if changed and rank == 0:
        print(f"resuming {latest.name} with settings changed since it was saved (they apply from here on): "
              f"{'; '.join(changed)}", flush=True)
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


def _changed_since(saved: dict, now: dict) -> list[str]:
    """``key old -> new`` for the training settings (RESUME_NOTED sections and run.seed) that differ
    between a checkpoint's config and this start's (none when the checkpoint kept no config)."""
    if not saved:
        return []
    pairs = [(f"{section}.{key}", saved.get(section, {}).get(key), now[section].get(key))
             for section in RESUME_NOTED for key in sorted(set(saved.get(section, {})) | set(now[section]))]
    pairs.append(("run.seed", saved.get("run", {}).get("seed"), now["run"]["seed"]))
    return [f"{key} {old!r} -> {new!r}" + (" (the data order keeps the checkpoint's seed)" if key == "run.seed" else "")
            for key, old, new in pairs if old != new]


def _throughput(tokens_per_s: float, world: int, cfg: Config, vocab: int, seq: int, passes: int,
                peak_tflops: float | None) -> dict[str, float]:
    """Tokens/s per device and, when the device's peak is known, MFU: tokens/s per device x the
    planner's model FLOPs per token (:func:`pipeline.plan.flops_per_token`, every pass counted) / peak."""
    per_device = tokens_per_s / world
    row = {"tokens_per_s_per_device": per_device}
    if peak_tflops:
        row["mfu"] = per_device * flops_per_token(cfg.model, vocab, seq, passes) / (peak_tflops * 1e12)
    return row


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (KiB on Linux)


def _train(cfg: Config, rank: int, world: int, device: torch.device, memory: MemoryData | None) -> int:
    start_time = time.monotonic()
    data, vocab, mask_id = _open_data(cfg, memory)
    engine = build_engine(cfg, vocab, device, rank, world)
    try:
        return _loop(cfg, engine, data, vocab, mask_id, rank, world, device, start_time)
    finally:
        engine.close()


def _loop(cfg: Config, engine: Engine, data: Manifest | MemoryData, vocab: int, mask_id: int, rank: int,
          world: int, device: torch.device, start_time: float) -> int:
    # ---- build: batches, checkpoints, run folder ---------------------------------------------------
    d_rank, d_world, tp = engine.data_rank, engine.data_world, world // engine.data_world
    loader = _open_loader(cfg, data, d_rank, d_world)
    folder = RunDir.of(cfg)
    ckpt = CheckpointManager(folder.path, cfg.checkpoint.keep_last, cfg.checkpoint.permanent_every, rank=rank, world_size=world)
    info = {}
    if rank == 0:
        ckpt.cleanup_partial()
        info = folder.start(cfg, lambda: _saved_run_ids(ckpt))
    if world > 1:
        dist.barrier()

    # ---- resume ------------------------------------------------------------------------------
    step, local_tokens = 0, 0
    latest = ckpt.latest()
    if latest is not None:
        step, local_tokens = _resume(cfg, engine, data, loader, ckpt, latest, rank)
    if rank == 0:  # only once the checkpoint was accepted: a refused rerun leaves the folder as it was
        folder.write_config(cfg)
    console = Console(cfg.optim.steps, step, enabled=rank == 0)
    console.header(train_header(cfg, engine, world, device, vocab, info.get("run_id", "?"), folder,
                                latest.name if latest is not None else None, step,
                                f"{_data_name(cfg, data)} ({loader.batches_per_epoch:,} batches per epoch per rank)"))

    save_delay = float(os.environ.get(SAVE_DELAY_ENV, "0") or 0)
    data_id = data_identity(data) if isinstance(data, Manifest) else {"fingerprint": data.fingerprint,
                                                                       "name": data.name}

    def save() -> None:
        t0 = time.perf_counter()
        mine = {"loader": loader.state_dict(), "rng": rng_state(), "local_tokens": local_tokens}

        def writer(tmp: Path) -> tuple[dict, object]:
            pending = None
            if cfg.checkpoint.format == "sharded":  # every rank its part (in the background when async)
                hashed, pending = {}, sharded_ckpt.save(engine.sharded_state(), tmp, cfg.checkpoint.async_save)
            else:
                hashed = engine.save(tmp, rank) or {}
            if save_delay:  # a crash here leaves a tmp folder with some files and no marker
                time.sleep(save_delay)
            own = f"rank_{rank:05d}.pt"
            return {**hashed, own: save_torch(mine, tmp / own)}, pending

        meta = {"topology": engine.topology, "manifest": data.fingerprint, "data": data_id, "config": to_dict(cfg),
                "code": code_version(), "model": {"vocab_size": vocab, "mask_id": mask_id}, "run": info}
        if cfg.checkpoint.async_save:  # commits the previous one once every rank's write is done
            saved(ckpt.save_async(step, meta, writer=writer), t0)
            if rank == 0:
                console.print(f"checkpoint step {step}: writing in the background")
        else:
            saved(ckpt.save(step, meta, writer=lambda tmp: writer(tmp)[0]), t0)

    def saved(path: Path | None, t0: float) -> None:
        if rank == 0 and path is not None:
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            console.print(f"saved checkpoint {path} ({size / 2**20:,.1f} MiB, {time.perf_counter() - t0:.1f} s)")

    # ---- loop --------------------------------------------------------------------------------
    peak_tflops = device_peak_tflops(cfg, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    last_saved, exit_code, stop_reason = step if latest is not None else -1, 0, "finished"
    batches = iter(loader)
    engine.model.train()
    log = RunLogger(folder.path, cfg, info, enabled=rank == 0)  # metrics.jsonl (+ wandb) on rank 0
    try:
        with log, StopFlag(loud=rank == 0) as stop:
            while step < cfg.optim.steps:
                step_start, data_wait = time.perf_counter(), 0.0
                lr = lr_at(step, cfg.optim)
                engine.set_lr(lr)
                engine.zero_grad()
                sums, step_tokens = [0.0, 0.0, 0.0], 0
                objective = objective_at(cfg.diffusion, step)  # plain MDM before diffusion.corrector_start_step
                n_forwards = passes_of(cfg, step)  # network passes per micro-step (ProSeCo 2, MDM 1)
                for micro in range(cfg.optim.grad_accum):
                    wait = time.perf_counter()
                    batch = next(batches)
                    data_wait += time.perf_counter() - wait
                    x, valid = batch["tokens"].to(device), batch["valid"].to(device)
                    prompt = batch["prompt"].to(device) if "prompt" in batch else None  # SFT shards
                    # Dropout draws from the global RNG, which a new DataLoader iterator also consumes
                    # (once per epoch, and at a resume): reseed it so a resumed run draws the same.
                    torch.manual_seed(_seed_of(cfg.run.seed, d_rank, step, micro, 1))
                    last_micro, calls = micro == cfg.optim.grad_accum - 1, [0]

                    def model_fn(z, tt, v, _last=last_micro, _calls=calls, _passes=n_forwards):
                        # Reduce gradients in the backward of the last forward of the step only.
                        _calls[0] += 1
                        return engine.forward(z, tt, v, sync=_last and _calls[0] == _passes)

                    def backward(loss):
                        engine.backward(loss / cfg.optim.grad_accum)

                    terms = proseco_loss(model_fn, x, objective, mask_id, valid=valid,
                                         generator=_step_generator(cfg.run.seed, d_rank, step, micro, device),
                                         backward=backward if cfg.diffusion.split_backward else None,
                                         prompt=prompt)
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
                    row.update(_throughput(row["tokens_per_s"], world, cfg, vocab, x.shape[1], n_forwards, peak_tflops))
                    console.log_step(row)
                    if val_now:
                        val = _validate(cfg, engine.eval_model, data, mask_id, d_rank, d_world, world,
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
            saved(ckpt.wait(), time.perf_counter())  # an asynchronous save still being written
    finally:
        console.close()

    # ---- exit ----------------------------------------------------------------------------------
    if rank == 0:  # what a launcher reads to decide on a requeue (pipeline.launch)
        folder.write_last_exit(step, exit_code, stop_reason)
        if exit_code == 0:
            console.print(f"done: {step} steps in {folder}")
        else:
            console.print(f"stopped at step {step} of {cfg.optim.steps}; the checkpoint is saved. Resume: rerun the same "
                          f"command (run folder {folder}); it continues from step {step}")
    return exit_code


def _saved_run_ids(ckpt: CheckpointManager) -> tuple[dict, str | None]:
    """The run ids kept in the latest checkpoint and its name, or ({}, None)."""
    latest = ckpt.latest()
    if latest is None:
        return {}, None
    return ckpt.read_meta(latest).get("run") or {}, latest.name
