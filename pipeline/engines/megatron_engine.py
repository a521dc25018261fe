"""``train.backend=megatron``: megatron-core tensor parallelism x data parallelism.

``parallel_state.initialize_model_parallel(tensor_model_parallel_size=train.tp_size)`` splits the
world into tensor-parallel (TP) groups of ``tp_size`` consecutive ranks and data-parallel (DP)
groups across them. The model is :class:`pipeline.model.tensor_parallel.TPBackbone` (megatron-core
``ColumnParallelLinear`` / ``RowParallelLinear`` for attention, MLP and head), built from the same
seeded full Backbone as the other backends, so TP=2 starts from - and computes - the same model as
TP=1. Data parallelism is torch DDP over the DP group (gradient sync once per optimizer step, as in
the torch engine); clipping uses the global norm over the TP group (:func:`clip_grad_norm_tp`).

The loop gives every rank of a TP group the same data slice (``data_rank`` = DP rank) and the same
masking / dropout seeds, as tensor parallelism requires.

Checkpoints hold the full unsharded state in the torch engine's format (model, AdamW state in the
Backbone's parameter order, EMA), gathered over the TP group on save and sharded again on load, so
a megatron run resumes under any TP / DP size and from or into a torch-backend checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import Config
from pipeline.engines.base import STATE_FILE, Engine, checkpoint_blocks, load_state_file, param_names
from pipeline.errors import ProsecoError
from pipeline.io import save_torch
from pipeline.optim import EMA, make_optimizer


def _import_tp():
    try:
        from pipeline.model import tensor_parallel
    except ImportError as exc:
        raise ProsecoError(f"train.backend=megatron needs megatron-core ({exc}); install it with "
                           "`pip install 'proseco-pipeline[megatron]'` (or `make venv`)") from None
    return tensor_parallel


class MegatronEngine(Engine):
    name = "megatron"

    def __init__(self, cfg: Config, vocab: int, device: torch.device, rank: int, world: int):
        if device.type == "cuda":
            os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # megatron's advice for TP overlap
        tp = _import_tp()
        t = cfg.train
        tp.check_tp_config(cfg.model, vocab, t.tp_size)
        tp.init_model_parallel(t.tp_size)
        self._tp = tp
        self.cfg, self.vocab, self.device, self.rank, self.world = cfg, vocab, device, rank, world
        from megatron.core import parallel_state

        self.tp_size = t.tp_size
        self.tp_rank = tp.tp_rank()
        self.data_rank = parallel_state.get_data_parallel_rank()
        self.data_world = parallel_state.get_data_parallel_world_size()
        torch.manual_seed(t.seed)  # the same full Backbone as every other backend, then this rank's shard
        self.model = tp.TPBackbone(cfg.model, vocab, init="backbone", device=device)
        if t.activation_checkpointing:
            checkpoint_blocks(self.model.blocks)
        self.ema = EMA(self.model, t.ema, shadow=tp.TPBackbone(cfg.model, vocab, init="empty", device=device)) \
            if t.ema > 0 else None
        self.ddp = nn.parallel.DistributedDataParallel(self.model, process_group=tp.dp_group(),
                                                       forward_sync_buffers=False) \
            if self.data_world > 1 else None
        self.optimizer = make_optimizer(self.model, t)
        self._autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) \
            if t.bf16 and device.type == "cuda" else contextlib.nullcontext
        # the Backbone's optimizer parameter order: checkpoints use it, whatever the TP size
        from pipeline.model import Backbone

        with torch.device("meta"):
            full = Backbone(cfg.model, vocab_size=vocab)
            self._full_names = param_names(full, make_optimizer(full, t))

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

    def _optimizer_full(self) -> dict:
        """AdamW state gathered over TP, in the Backbone's ``optimizer.state_dict()`` format."""
        local = self.optimizer.state_dict()
        names = param_names(self.model, self.optimizer)
        by_name = {names[i]: st for i, st in local["state"].items()}
        keys = sorted({k for st in by_name.values() for k, v in st.items() if v.dim() > 0})
        full_state: dict[str, dict] = {n: {k: v for k, v in st.items() if v.dim() == 0} for n, st in by_name.items()}
        for key in keys:  # exp_avg, exp_avg_sq: parameter-shaped, sharded like the parameter
            present = {n: st[key] for n, st in by_name.items() if key in st}
            for n, v in self._gather(present, alias=False).items():
                full_state[n][key] = v
        ids = {n: i for i, n in enumerate(self._full_names)}
        groups = []
        for group in local["param_groups"]:  # same groups (decay / no decay) as the Backbone's optimizer
            groups.append({**group, "params": sorted(ids[names[i]] for i in group["params"])})
        return {"state": {ids[n]: st for n, st in full_state.items()}, "param_groups": groups}

    def _optimizer_local(self, full: dict) -> dict:
        """The inverse of :meth:`_optimizer_full` for this rank's shards."""
        names = param_names(self.model, self.optimizer)
        local_id = {n: i for i, n in enumerate(names)}
        state = {}
        for i, st in full["state"].items():
            name = self._full_names[int(i)]
            state[local_id[name]] = {k: (v if v.dim() == 0 else
                                         self._tp.shard_tensor(name, v, self.cfg.model, self.tp_rank, self.tp_size))
                                     for k, v in st.items()}
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        groups = []
        for saved, mine in zip(full["param_groups"], self.optimizer.param_groups, strict=True):
            mine_names = [name_of[id(p)] for p in mine["params"]]
            if {self._full_names[int(j)] for j in saved["params"]} != set(mine_names):
                raise ProsecoError("the checkpoint's optimizer parameter groups do not match this model's")
            groups.append({**saved, "params": [local_id[n] for n in mine_names]})
        return {"state": state, "param_groups": groups}

    def save(self, folder: Path, rank: int) -> dict:
        state = {"model": self._gather(self.model.state_dict()), "optimizer": self._optimizer_full()}
        if self.ema is not None:
            state["ema"] = self._gather(self.ema.shadow.state_dict())
        return {STATE_FILE: save_torch(state, folder / STATE_FILE)} if rank == 0 else {}

    def load(self, folder: Path, saved_topology: dict) -> None:
        state = load_state_file(folder, "cpu")
        self.model.load_state_dict(self._shard(state["model"]), strict=True)
        self.optimizer.load_state_dict(self._optimizer_local(state["optimizer"]))
        if self.ema is not None:
            if "ema" not in state:
                raise ProsecoError(f"{folder} has no EMA weights but train.ema={self.cfg.train.ema}; "
                                   "resume with train.ema=0 or start a new run")
            self.ema.shadow.load_state_dict(self._shard(state["ema"]), strict=True)
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        self._tp.destroy_model_parallel()
