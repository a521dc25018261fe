"""`proseco train`: pretrain a ProSeCo model on corpus shards with the ``torch`` backend.

:func:`run` reads top to bottom: **build** (process group, model, optimizer, EMA, loader,
checkpoint manager, run folder) -> **resume** (latest complete checkpoint, refused under another
topology) -> **loop** (lr schedule, gradient accumulation, :func:`proseco_loss` with the split
backward, clip, step, EMA, metrics, validation, checkpoints) -> **save** -> **exit**.

Single process, or under ``torchrun`` DDP (``train.distributed=ddp``) or FSDP2
(``train.distributed=fsdp``: ``fully_shard`` on each transformer block, then the root, over a 1-D
device mesh); gloo on CPU, nccl on CUDA. ``train.batch_size`` is per rank and micro-step: an
optimizer step sees ``batch_size x grad_accum x world_size`` sequences. Every backward but the last
of an optimizer step skips the gradient sync (DDP: ``no_sync()``; FSDP2:
``set_requires_gradient_sync(False)``; pass 1 and pass 2 of the split backward are separate
backwards), so gradients are reduced once per step and equal those of the summed loss.

FSDP2 checkpoints have the same format as DDP ones: ``get_state_dict`` with
``full_state_dict=True, cpu_offload=True`` gathers the unsharded model and optimizer state on rank 0
(the optimizer state re-keyed to ``optimizer.state_dict()``'s integer ids), so ``state.pt`` stays
loadable by single-process tools, and a run may switch between ddp and fsdp at the same world size
(a resume shards the full state again with ``set_state_dict``). EMA under FSDP2: the shadow is an
unsharded copy made before sharding and updated from ``full_tensor()`` of every parameter, i.e. one
extra all-gather of the whole model per optimizer step and one full model copy per rank.

Determinism: the masking draws of micro-step ``m`` of step ``s`` on rank ``r`` come from a
generator seeded by ``(train.seed, r, s, m)``, so a resumed run needs only the model, optimizer,
EMA, loader position, global RNG states (dropout) and counters - all in the checkpoint - to
continue bit for bit (``tests/test_train.py``: kill -9 and resume equals uninterrupted).

Graceful stop: SIGTERM / SIGUSR1 set a flag; at each optimizer-step boundary all ranks agree
(one all-reduce MAX over [signal seen, time budget ``train.max_time_s`` spent]), save together
and exit with :data:`EXIT_REQUEUE` (3), which tells a launcher to requeue the job.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from tqdm import tqdm

from pipeline.checkpoint.manager import (
    CheckpointManager,
    code_version,
    rng_state,
    set_rng_state,
    topology_mismatch,
    topology_refusal,
)
from pipeline.config import Config, dump_yaml, to_dict
from pipeline.data.loader import ShardLoader
from pipeline.data.manifest import Manifest
from pipeline.diffusion.objective import proseco_loss
from pipeline.errors import ProsecoError
from pipeline.model import Backbone
from pipeline.trainer import EMA, lr_at, make_optimizer

EXIT_REQUEUE = 3  # stopped early (signal or time budget) after saving: requeue the job to continue
STEP_DELAY_ENV = "PROSECO_STEP_DELAY_S"  # fault-injection tests: sleep this long after each step


# ---------------------------------------------------------------------------------------- helpers
def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.dir or f"runs/{cfg.run.name}")


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) without torchrun."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))


def world_layout(cfg: Config) -> str:
    """One paragraph for `--dry-run`: processes, device, batch geometry, run folder."""
    rank, world, _ = world_from_env()
    t = cfg.train
    device = "cuda" if torch.cuda.is_available() else "cpu"
    comm = ("gloo" if device == "cpu" else "nccl") if world > 1 else "none (single process)"
    return (f"backend {t.backend}, distributed {t.distributed}, world size {world} (this is rank {rank}), "
            f"device {device}, process group {comm}; per optimizer step {t.batch_size} sequences x "
            f"{t.grad_accum} micro-steps x {world} ranks = {t.batch_size * t.grad_accum * world}; "
            f"run folder {run_dir(cfg)}")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.jsonl (a line cut by a crash is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


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


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The FQN of each optimizer parameter, in ``optimizer.state_dict()``'s id order."""
    names: dict[nn.Parameter, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(p, name)
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def _optim_by_id(by_name: dict) -> dict:
    """``get_state_dict``'s optimizer state (keyed by parameter FQN) in ``optimizer.state_dict()``'s
    format (integer ids in parameter-group order), the format single-process and DDP runs save."""
    ids, groups = {}, []
    for group in by_name["param_groups"]:
        groups.append({**group, "params": [ids.setdefault(name, len(ids)) for name in group["params"]]})
    return {"state": {ids[name]: v for name, v in by_name["state"].items()}, "param_groups": groups}


def _optim_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, by_id: dict) -> dict:
    """The inverse of :func:`_optim_by_id`, for ``set_state_dict``."""
    names = _param_names(model, optimizer)
    return {"state": {names[i]: v for i, v in by_id["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in by_id["param_groups"]]}


class _StopFlag:
    """SIGTERM / SIGUSR1 -> flag; the previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __enter__(self):
        self.seen, self._old = False, {}
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.seen = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _build_model(cfg: Config, vocab: int, device: torch.device) -> Backbone:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = Backbone(cfg.model, vocab_size=vocab).to(device)
    if cfg.train.activation_checkpointing:
        for block in model.blocks:
            block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
    return model


def _open_data(cfg: Config) -> tuple[Manifest, int, int]:
    """(manifest, vocabulary size of the model, mask id) for task ``text``."""
    if cfg.data.task != "text":
        raise ProsecoError(f"proseco train reads corpus shards (data.task=text), got data.task={cfg.data.task!r}; "
                           "the sudoku4 task trains with `proseco demo`")
    manifest = Manifest.load(cfg.data.manifest)
    if manifest.seq_len != cfg.data.seq_len:
        raise ProsecoError(f"{cfg.data.manifest} holds sequences of {manifest.seq_len} tokens but data.seq_len is "
                           f"{cfg.data.seq_len}; set data.seq_len={manifest.seq_len} or re-run `proseco prep shards`")
    data_vocab = int(manifest.data["tokenizer"]["vocab_size"])
    vocab = cfg.model.vocab_size or data_vocab
    if vocab < data_vocab:
        raise ProsecoError(f"model.vocab_size={vocab} is smaller than the tokenizer's {data_vocab} ids of "
                           f"{cfg.data.manifest}; set model.vocab_size={data_vocab} (or null)")
    return manifest, vocab, int(manifest.special["mask"])


def _start_run_folder(cfg: Config, folder: Path) -> dict:
    """run.json (created once, reused on requeue), config.yaml, a metrics.jsonl without a torn last line."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    info_path = folder / "run.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
    else:
        run_id = uuid.uuid4().hex[:12]
        info = {"run_id": run_id, "logger_id": run_id, "name": cfg.run.name, "created": time.time()}
        info_path.write_text(json.dumps(info, indent=1) + "\n")
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():
        raw = metrics.read_bytes()
        if raw and not raw.endswith(b"\n"):  # killed mid-line: drop the torn row
            with open(metrics, "r+b") as f:
                f.truncate(raw.rfind(b"\n") + 1)
    return info


@torch.no_grad()
def _validate(cfg: Config, model: nn.Module, manifest: Manifest, mask_id: int, rank: int, world: int,
              device: torch.device, collective: bool = False) -> dict[str, float]:
    """MDM NELBO (comparable to MDLM), its perplexity and the correction term on the val split.

    The same ``val_batches`` batches every time (fresh loader, fixed masking seeds); sharded over
    the ranks when the split has a shard per rank, else every rank evaluates the same batches.

    ``collective``: ``model`` runs collectives in its forward (FSDP2), so every rank runs as many
    forwards as the rank with the most batches; a rank out of batches repeats its last one and
    does not count it."""
    sharded = len(manifest.shards("val")) >= world
    v_rank, v_world = (rank, world) if sharded else (0, 1)
    try:
        loader = ShardLoader(manifest, "val", cfg.train.batch_size, rank=v_rank, world_size=v_world,
                             seed=cfg.train.seed, shuffle=False)
    except ProsecoError as exc:
        raise ProsecoError(f"validation: {exc}; or turn validation off with train.val_every=0") from None
    was_training = model.training
    model.eval()
    sums, n = [0.0, 0.0], 0
    batches, batch = loader.epoch_iter(), None
    for i in range(cfg.train.val_batches):
        nxt = next(batches, None)
        more = nxt is not None
        if collective:
            more = _all_reduce([float(more)], dist.ReduceOp.MAX, device, world)[0] > 0
        if not more or batch is None and nxt is None:  # (the latter: an empty rank; the loader refuses those)
            break
        counted, batch = nxt is not None, nxt if nxt is not None else batch
        x, valid = batch["tokens"].to(device), batch["valid"].to(device)
        gen = _step_generator(cfg.train.seed, v_rank, 2**40, i, device)  # a stream no train step uses
        terms = proseco_loss(model, x, cfg.diffusion, mask_id, valid=valid, generator=gen)
        if counted:
            sums, n = [sums[0] + float(terms.mdm), sums[1] + float(terms.correction)], n + 1
    model.train(was_training)
    mdm, corr, count = _all_reduce([*sums, float(n)], dist.ReduceOp.SUM, device, world)
    nelbo = mdm / max(count, 1.0)
    return {"val_mdm_nelbo": nelbo, "val_ppl": float(np.exp(min(nelbo, 700.0))),
            "val_correction": corr / max(count, 1.0)}


# ---------------------------------------------------------------------------------------- run
def run(cfg: Config) -> int:
    """Train ``cfg.train.steps`` optimizer steps in the run folder; 0 when done, EXIT_REQUEUE when stopped early."""
    t = cfg.train
    if t.backend != "torch":
        raise ProsecoError(f"train.backend={t.backend!r} is not implemented yet; use train.backend=torch")

    # ---- build -------------------------------------------------------------------------------
    rank, world, local_rank = world_from_env()
    if world > 1 and t.distributed not in ("ddp", "fsdp"):
        raise ProsecoError(f"{world} processes were launched but train.distributed={t.distributed!r}; "
                           "set train.distributed=ddp (DDP) or train.distributed=fsdp (FSDP2)")
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if t.threads:
        torch.set_num_threads(t.threads)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        code = _train(cfg, rank, world, device)
        if own_group:
            dist.barrier()  # no rank tears gloo down while a peer is still inside a collective
        return code
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, rank: int, world: int, device: torch.device) -> int:
    t, start_time = cfg.train, time.monotonic()
    manifest, vocab, mask_id = _open_data(cfg)
    model = _build_model(cfg, vocab, device)
    ema = EMA(model, t.ema) if t.ema > 0 else None  # before sharding: the shadow stays unsharded
    fsdp = world > 1 and t.distributed == "fsdp"
    if fsdp:  # FSDP2 replaces the parameters with DTensor shards in place: the optimizer comes after
        mesh = init_device_mesh(device.type, (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    ddp = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False) \
        if world > 1 and not fsdp else None
    optimizer = make_optimizer(model, t)
    loader = ShardLoader(manifest, "train", t.batch_size, rank=rank, world_size=world,
                         num_workers=t.loader_workers, seed=t.seed)
    folder = run_dir(cfg)
    ckpt = CheckpointManager(folder, t.keep_last, t.permanent_every, rank=rank, world_size=world)
    topology = {"backend": t.backend, "dp": world, "tp": 1, "zero_stage": 0}
    if rank == 0:
        _start_run_folder(cfg, folder)
        ckpt.cleanup_partial()
    if world > 1:
        dist.barrier()

    # ---- resume ------------------------------------------------------------------------------
    step, local_tokens = 0, 0
    latest = ckpt.latest()
    if latest is not None:
        diffs = topology_mismatch(ckpt.read_meta(latest), topology)
        if diffs:
            raise ProsecoError(topology_refusal(latest, diffs))
        state, _ = ckpt.load(latest, map_location=device,
                             reader=lambda p: {**torch.load(p / "state.pt", map_location=device, weights_only=True),
                                               **torch.load(p / f"rank_{rank:05d}.pt", weights_only=True)})
        if fsdp:  # every rank holds the full state and keeps its own shards of it
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=_optim_by_name(model, optimizer, state["optimizer"]),
                           options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.shadow.load_state_dict(state["ema"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        step, local_tokens = int(state["step"]), int(state["local_tokens"])
        if rank == 0:
            print(f"resuming {folder} from {latest.name} (step {step})", flush=True)

    def save() -> Path:
        if fsdp:  # a collective: gathers the unsharded state on rank 0 (other ranks get empty dicts)
            model_sd, optim_sd = get_state_dict(model, optimizer,
                                                options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            full = {"model": model_sd, "optimizer": _optim_by_id(optim_sd) if rank == 0 else {}, "step": step}
        else:
            full = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
        if ema is not None:
            full["ema"] = ema.shadow.state_dict()
        mine = {"loader": loader.state_dict(), "rng": rng_state(), "local_tokens": local_tokens}

        def writer(tmp: Path, _state: dict) -> None:
            torch.save(mine, tmp / f"rank_{rank:05d}.pt")
            if rank == 0:
                torch.save(full, tmp / "state.pt")

        meta = {"topology": topology, "manifest": manifest.fingerprint, "config": to_dict(cfg),
                "code": code_version()}
        return ckpt.save(step, full, meta, writer=writer)

    # ---- loop --------------------------------------------------------------------------------
    net = ddp if ddp is not None else model

    def _grad_sync(sync: bool) -> contextlib.AbstractContextManager:
        """DDP decides in the forward (``no_sync``); FSDP2 reads a flag in the backward that follows."""
        if fsdp:
            model.set_requires_gradient_sync(sync)
        return ddp.no_sync() if ddp is not None and not sync else contextlib.nullcontext()

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (t.bf16 and device.type == "cuda") \
        else contextlib.nullcontext()
    metrics = open(folder / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115 (closed below)
    bar = tqdm(total=t.steps, initial=step, desc="train", disable=rank != 0, mininterval=1.0, dynamic_ncols=True)
    delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    last_saved, exit_code = step if latest is not None else -1, 0
    batches = iter(loader)
    model.train()
    try:
        with _StopFlag() as stop:
            while step < t.steps:
                step_start, data_wait = time.perf_counter(), 0.0
                lr = lr_at(step, t)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                sums, step_tokens = [0.0, 0.0, 0.0], 0
                for micro in range(t.grad_accum):
                    wait = time.perf_counter()
                    batch = next(batches)
                    data_wait += time.perf_counter() - wait
                    x, valid = batch["tokens"].to(device), batch["valid"].to(device)
                    # Dropout draws from the global RNG, which a new DataLoader iterator also consumes
                    # (once per epoch, and at a resume): reseed it so a resumed run draws the same.
                    torch.manual_seed(_seed_of(t.seed, rank, step, micro, 1))
                    last_micro = micro == t.grad_accum - 1
                    n_forwards = 2 if cfg.diffusion.corrector_weight > 0 else 1
                    calls = [0]

                    def model_fn(z, tt, v, _last=last_micro, _n=n_forwards, _calls=calls):
                        # Reduce gradients in the backward of the last forward of the step only.
                        _calls[0] += 1
                        with _grad_sync(_last and _calls[0] == _n), autocast:
                            return net(z, tt, v)

                    terms = proseco_loss(
                        model_fn, x, cfg.diffusion, mask_id, valid=valid,
                        generator=_step_generator(t.seed, rank, step, micro, device),
                        backward=(lambda loss: (loss / t.grad_accum).backward())
                        if cfg.diffusion.split_backward else None)
                    if not cfg.diffusion.split_backward:
                        (terms.loss / t.grad_accum).backward()
                    sums = [s + float(v) for s, v in zip(sums, (terms.loss, terms.mdm, terms.correction))]
                    step_tokens += terms.tokens
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else 1e30)
                optimizer.step()
                if ema is not None:
                    ema.update(model)
                step += 1
                local_tokens += step_tokens
                bar.update(1)

                val_now = t.val_every > 0 and (step % t.val_every == 0 or step == t.steps)
                if val_now or step % t.log_every == 0 or step == t.steps:
                    red = _all_reduce([*sums, float(step_tokens), float(local_tokens)],
                                      dist.ReduceOp.SUM, device, world)
                    step_s = time.perf_counter() - step_start
                    row = {"step": step, "loss": red[0] / (t.grad_accum * world),
                           "mdm": red[1] / (t.grad_accum * world), "correction": red[2] / (t.grad_accum * world),
                           "lr": lr, "grad_norm": float(grad_norm), "tokens_seen": int(red[4]),
                           "tokens_per_s": red[3] / max(step_s, 1e-9), "data_wait_s": data_wait, "step_s": step_s}
                    if val_now:
                        row.update(_validate(cfg, ema.shadow if ema is not None else model, manifest, mask_id,
                                             rank, world, device, collective=fsdp and ema is None))
                    if metrics is not None:
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}")
                if step % t.checkpoint_every == 0:
                    save()
                    last_saved = step
                if delay:
                    time.sleep(delay)
                spent = t.max_time_s > 0 and time.monotonic() - start_time > t.max_time_s
                flags = _all_reduce([float(stop.seen), float(spent)], dist.ReduceOp.MAX,
                                    device, world)
                if step < t.steps and max(flags) > 0:
                    why = "a stop signal" if flags[0] else f"the time budget train.max_time_s={t.max_time_s:g}"
                    if rank == 0:
                        print(f"\nstopping at step {step} after {why}; saving, exit {EXIT_REQUEUE} (requeue)",
                              flush=True)
                    exit_code = EXIT_REQUEUE
                    break

        # ---- save ----------------------------------------------------------------------------
        if last_saved != step:
            save()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    # ---- exit ----------------------------------------------------------------------------------
    if rank == 0 and exit_code == 0:
        print(f"done: {step} steps in {folder}", flush=True)
    return exit_code
