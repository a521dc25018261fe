"""``parallel.backend=megatron``: megatron-core tensor parallelism x data parallelism.

``parallel_state.initialize_model_parallel(tensor_model_parallel_size=parallel.tp_size)`` splits the
world into tensor-parallel (TP) groups of ``tp_size`` consecutive ranks and data-parallel (DP)
groups across them. The model is the same seeded Backbone as the other backends with tensor
parallelism applied to it (:func:`pipeline.model.parallelize.tensor_parallel_backbone`: megatron-core
``ColumnParallelLinear`` / ``RowParallelLinear`` for attention, MLP and head), so TP=2 starts from -
and computes - the same model as TP=1. Data parallelism is torch DDP over the DP group (gradient
sync once per optimizer step, as in the torch engine); clipping uses the global norm over the TP
group (:func:`clip_grad_norm_tp`).

The loop gives every rank of a TP group the same data slice (``data_rank`` = DP rank) and the same
masking / dropout seeds, as tensor parallelism requires.

Checkpoints hold the full unsharded state in the torch engine's format (model, AdamW state in the
Backbone's parameter order, EMA), gathered over the TP group on save and sharded again on load by
the plan's converters (:mod:`pipeline.model.tensor_parallel`), so a megatron run resumes under any
TP / DP size and from or into a torch-backend checkpoint. With ``checkpoint.format: sharded`` nothing
is gathered: every rank's TP shards go to DCP as ShardedTensors of the full Backbone tensors
(:func:`pipeline.model.tensor_parallel.sharded_tensor`; megatron-core's ``dist_checkpointing`` would
need megatron's own model and optimizer classes, this model is the Backbone with megatron layers and
a torch AdamW), so the files reshard to any TP / DP size on load. The EMA shadow is a TP-sharded
Backbone like the model: its update never communicates.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import Config
from pipeline.engines.base import (
    STATE_FILE,
    Engine,
    autocast,
    checkpoint_blocks,
    load_state_file,
    optim_by_id,
    optim_by_name,
    param_names,
)
from pipeline.errors import ProsecoError
from pipeline.io import save_torch
from pipeline.optim import EMA, make_optimizer


def _import_tp():
    """The tensor-parallel modules (plan and state conversion, parallelize), or a one-line error."""
    try:
        from pipeline.model import parallelize, tensor_parallel
    except ImportError as exc:
        raise ProsecoError(f"parallel.backend=megatron needs megatron-core ({exc}); install it with "
                           "`pip install 'proseco-pipeline[megatron]'` (or `make venv`)") from None
    return tensor_parallel, parallelize


class MegatronEngine(Engine):
    name = "megatron"

    def __init__(self, cfg: Config, vocab: int, device: torch.device, rank: int, world: int):
        if device.type == "cuda":
            os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # megatron's advice for TP overlap
        tp, parallelize = _import_tp()
        tp.check_tp_config(cfg.model, vocab, cfg.parallel.tp_size)
        tp.init_model_parallel(cfg.parallel.tp_size)
        self._tp = tp
        self.cfg, self.vocab, self.device, self.rank, self.world = cfg, vocab, device, rank, world
        self.tp_size = cfg.parallel.tp_size
        self.tp_rank = tp.tp_rank()
        self.data_rank, self.data_world = tp.dp_rank_world()
        torch.manual_seed(cfg.run.seed)  # the same full Backbone as every other backend, then this rank's shard
        self.model = parallelize.tensor_parallel_backbone(cfg.model, vocab, device)
        if cfg.parallel.activation_checkpointing:
            checkpoint_blocks(self.model.blocks)
        self.ema = None
        if cfg.optim.ema > 0:  # megatron layers hold process groups (no deep copy): a fresh shadow, RNG untouched
            with torch.random.fork_rng(devices=[]):
                shadow = parallelize.tensor_parallel_backbone(cfg.model, vocab, device)
                self.ema = EMA(self.model, cfg.optim.ema, shadow=shadow)
        self.ddp = nn.parallel.DistributedDataParallel(self.model, process_group=tp.dp_group(),
                                                       forward_sync_buffers=False) \
            if self.data_world > 1 else None
        self.optimizer = make_optimizer(self.model, cfg.optim)
        # the model is the Backbone itself: its optimizer ids are the full model's at any TP size
        self._param_names = param_names(self.model, self.optimizer)
        self._autocast = autocast(cfg, device)

    # ---- step ----------------------------------------------------------------------------------
    def forward(self, z, t, valid, sync):
        no_sync = self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()
        with no_sync, self._autocast():
            return (self.ddp or self.model)(z, t, valid)

    def clip_grad_norm(self, max_norm):
        return self._tp.clip_grad_norm_tp(list(self.model.parameters()), max_norm)  # global norm over TP

    @property
    def eval_collective(self) -> bool:
        return self.tp_size > 1

    @property
    def topology(self):
        return {"backend": "megatron", "dp": self.data_world, "tp": self.tp_size, "zero_stage": 0}

    # ---- checkpoints ---------------------------------------------------------------------------
    def _gather(self, local: dict, alias: bool = True) -> dict:
        return self._tp.gather_full_state(local, self.cfg.model, self.vocab, alias_tied_head=alias)

    def _shard(self, full: dict) -> dict:
        return self._tp.shard_full_state(full, self.cfg.model, self.vocab, self.tp_rank, self.tp_size)

    def save(self, folder: Path, rank: int) -> dict:
        optimizer = self._tp.gather_optimizer_state(self.optimizer.state_dict(), self._param_names,
                                                   self.cfg.model, self.vocab)
        state = {"model": self._gather(self.model.state_dict()), "optimizer": optimizer}
        if self.ema is not None:
            state["ema"] = self._gather(self.ema.shadow.state_dict())
        return {STATE_FILE: save_torch(state, folder / STATE_FILE)} if rank == 0 else {}

    def load(self, folder: Path, saved_topology: dict) -> None:
        state = load_state_file(folder, "cpu")
        self.model.load_state_dict(self._shard(state["model"]), strict=True)
        saved_groups = [[int(i) for i in group["params"]] for group in state["optimizer"]["param_groups"]]
        if saved_groups != [group["params"] for group in self.optimizer.state_dict()["param_groups"]]:
            raise ProsecoError("the checkpoint's optimizer parameter groups do not match this model's")
        self.optimizer.load_state_dict(self._tp.shard_optimizer_state(state["optimizer"], self._param_names,
                                                                      self.tp_rank, self.tp_size))
        if self.ema is not None:
            if "ema" not in state:
                raise ProsecoError(f"{folder} has no EMA weights but optim.ema={self.cfg.optim.ema}; "
                                   "resume with optim.ema=0 or start a new run")
            self.ema.shadow.load_state_dict(self._shard(state["ema"]), strict=True)
        if dist.is_initialized():
            dist.barrier()

    def _sharded_model(self, module: nn.Module) -> dict:
        local = {n: t for n, t in module.state_dict().items() if torch.is_tensor(t)}
        if self.cfg.model.tie_embeddings and "embed.weight" in local:
            local.setdefault("head.weight", local["embed.weight"])  # Backbone's alias, as in the full format
        return {n: self._tp.sharded_tensor(n, t, self.tp_rank, self.tp_size) for n, t in local.items()}

    def sharded_state(self) -> dict:
        """TP-split tensors as ShardedTensors viewing this rank's shards (replicated ones plain); the
        optimizer keyed by parameter name, its state made up (zeros) where no step has run yet."""
        by_id = self.optimizer.state_dict()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._local_optim = {}
        for i, (name, p) in enumerate(zip(self._param_names, params)):
            st = by_id["state"].get(i) or {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p),
                                           "exp_avg_sq": torch.zeros_like(p)}
            self._local_optim[name] = dict(st)
        optim = {"state": {name: {k: self._tp.sharded_tensor(name, v, self.tp_rank, self.tp_size) if v.dim() else v
                                  for k, v in st.items()} for name, st in self._local_optim.items()},
                 "param_groups": optim_by_name(self._param_names, by_id)["param_groups"]}
        state = {"model": self._sharded_model(self.model), "optimizer": optim}
        if self.ema is not None:
            state["ema"] = self._sharded_model(self.ema.shadow)
        return state

    def load_sharded_state(self, state: dict) -> None:
        """Model and EMA were filled in place; the optimizer takes its filled local tensors."""
        groups = [group["params"] for group in state["optimizer"]["param_groups"]]
        if groups != [group["params"] for group in optim_by_name(self._param_names, self.optimizer.state_dict())[
                "param_groups"]]:
            raise ProsecoError("the checkpoint's optimizer parameter groups do not match this model's")
        self.optimizer.load_state_dict(optim_by_id({"state": self._local_optim,
                                                    "param_groups": state["optimizer"]["param_groups"]},
                                                   self._param_names))

    def close(self) -> None:
        self._tp.destroy_model_parallel()
