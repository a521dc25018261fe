"""``parallel.backend=torch``: one process, DDP, or FSDP2 (``fully_shard``).

Every backward but the step's last skips the gradient sync (DDP: ``no_sync()``; FSDP2:
``set_requires_gradient_sync(False)``), so gradients are reduced once per optimizer step and equal
those of the summed loss.

FSDP2 checkpoints have the DDP format: ``get_state_dict(full_state_dict=True, cpu_offload=True)``
gathers the unsharded model and optimizer on rank 0 (the optimizer re-keyed to integer ids), so a
run may switch between single process, DDP and FSDP2 and change its world size on resume
(``set_state_dict`` shards the full state again). With ``checkpoint.format: sharded`` every rank
writes its own shards instead (:meth:`TorchEngine.sharded_state`, :mod:`pipeline.checkpoint.sharded`).

EMA under FSDP2: the shadow is a copy of the model made before sharding and then sharded the same
way (``fully_shard`` on the same mesh), so each rank averages its own shards - no communication in
the update, 1/world of a model per rank; validating it is a collective like any FSDP2 forward.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from pipeline.config import Config
from pipeline.engines.base import (
    STATE_FILE,
    Engine,
    autocast,
    build_backbone,
    checkpoint_blocks,
    compile_blocks,
    load_state_file,
    optim_by_id,
    optim_by_name,
    param_names,
)
from pipeline.io import save_torch
from pipeline.optim import EMA, make_optimizer


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, cfg: Config, vocab: int, device: torch.device, rank: int, world: int):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.data_rank, self.data_world = rank, world
        self.model = build_backbone(cfg, vocab, device)
        if cfg.parallel.activation_checkpointing:
            checkpoint_blocks(self.model.blocks)
        self.ema = EMA(self.model, cfg.optim.ema) if cfg.optim.ema > 0 else None  # a copy made before sharding
        if cfg.parallel.compile:  # after the EMA copy (it stays eager), before sharding (torchtitan's order)
            compile_blocks(self.model.blocks)
        self.fsdp = world > 1 and cfg.parallel.distributed == "fsdp"
        if self.fsdp:  # replaces the parameters with DTensor shards in place: the optimizer comes after
            mesh = init_device_mesh(device.type, (world,))
            for module in [self.model] + ([self.ema.shadow] if self.ema is not None else []):
                for block in module.blocks:
                    fully_shard(block, mesh=mesh)
                fully_shard(module, mesh=mesh)
        self.ddp = nn.parallel.DistributedDataParallel(self.model, forward_sync_buffers=False) \
            if world > 1 and not self.fsdp else None
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.eval_collective = self.fsdp  # FSDP2 forwards (of the model or of its sharded EMA) all-gather
        self._autocast = autocast(cfg, device)

    # ---- step ----------------------------------------------------------------------------------
    def forward(self, z, t, valid, sync):
        if self.fsdp:  # FSDP2 reads the flag in the backward that follows
            self.model.set_requires_gradient_sync(sync)
        no_sync = self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()
        with no_sync, self._autocast():
            return (self.ddp or self.model)(z, t, valid)

    @property
    def topology(self):
        return {"backend": "torch", "dp": self.world, "tp": 1, "zero_stage": 0}

    # ---- checkpoints ---------------------------------------------------------------------------
    def full_state(self) -> dict:
        """model + optimizer (+ EMA), unsharded; a collective under FSDP2 (rank 0 gets the state)."""
        if self.fsdp:
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=full)
            state = {"model": model_sd, "optimizer": optim_by_id(optim_sd) if self.rank == 0 else {}}
            if self.ema is not None:
                state["ema"] = get_model_state_dict(self.ema.shadow, options=full)
            return state
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.shadow.state_dict()
        return state

    def save(self, folder: Path, rank: int) -> dict:
        state = self.full_state()
        return {STATE_FILE: save_torch(state, folder / STATE_FILE)} if rank == 0 else {}

    def load(self, folder: Path, saved_topology: dict) -> None:
        state = load_state_file(folder, self.device)
        if self.fsdp:  # every rank reads the full state and keeps its own shards of it
            names = param_names(self.model, self.optimizer)
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=optim_by_name(names, state["optimizer"]),
                           options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            ema = self.saved_ema(state, folder)
            if self.fsdp:
                set_model_state_dict(self.ema.shadow, ema, options=StateDictOptions(full_state_dict=True))
            else:
                self.ema.shadow.load_state_dict(ema)
        if dist.is_initialized():
            dist.barrier()

    def sharded_state(self) -> dict:
        """DTensor shards under FSDP2, plain tensors otherwise (every rank holds the same: DCP writes
        each once); the optimizer keyed by parameter name, as ``get_state_dict`` gives it."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        if self.ema is not None:
            state["ema"] = get_model_state_dict(self.ema.shadow)
        return state

    def load_sharded_state(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        if self.ema is not None:
            set_model_state_dict(self.ema.shadow, state["ema"])
