"""The tensor-parallel (TP) plan of :class:`pipeline.model.transformer.Backbone` and the one conversion
between its full (unsharded) state and a rank's shard of it.

The plan (:data:`BACKBONE_PLAN`) maps module-name patterns to a split style; it is the single source
of which weight is split along which dim. :func:`pipeline.model.parallelize.apply_tensor_parallel`
swaps the planned ``nn.Linear`` modules for megatron-core layers by it, and :func:`shard_tensor` /
:func:`unshard_tensors` / :func:`shard_full_state` / :func:`gather_full_state` split and rebuild
state dicts (and Adam's parameter-shaped ``exp_avg`` / ``exp_avg_sq``) by it, for checkpoints and
exports. Because parallelism is applied to the one Backbone, parameter names are Backbone's.

  ====================================  ===========  ===========================================
  ``blocks.i.attn.qkv.weight``          0, 3 groups  column-parallel: rank r owns its heads' q, k and
                                                     v rows (three blocks, not one contiguous chunk)
  ``blocks.i.attn.proj.weight``         1            row-parallel (input = this rank's heads)
  ``blocks.i.mlp.0.weight`` / ``.bias``  0            column-parallel
  ``blocks.i.mlp.2.weight``             1            row-parallel; ``mlp.2.bias`` is replicated and
                                                     added once, after the all-reduce
  ``head.weight``                       0            column-parallel over the vocabulary
  ====================================  ===========  ===========================================

Everything else (embedding, ``pos_embed``, LayerNorms, time MLP, adaLN linears) is replicated. With
tied embeddings the head owns no weight (it uses its rows of ``embed.weight``):
:func:`shard_full_state` drops Backbone's ``head.weight`` alias and :func:`gather_full_state`
restores it. This module also wraps megatron's ``parallel_state`` (the TP / DP groups) and computes
the global gradient norm over the TP group (:func:`clip_grad_norm_tp`).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.config import ModelConfig
from pipeline.config.validate import (
    check_tensor_parallel as check_tp_config,  # the one rule, used by the engine
)
from pipeline.errors import ProsecoError

with warnings.catch_warnings():
    # megatron-core's import warns that Transformer Engine / Apex are missing (local fallbacks are used)
    # and emits torch.jit deprecation warnings; none of it concerns the layers used here.
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state


# --------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class ColumnParallel:
    """Split a linear layer's output features (weight dim 0, and its bias) over the TP group.

    ``groups``: the output is ``groups`` equal blocks (q, k, v) each split by rank, so a rank's shard
    holds its part of every block.
    """

    groups: int = 1


@dataclass(frozen=True)
class RowParallel:
    """Split a linear layer's input features (weight dim 1); the output is all-reduced over the TP
    group and the (replicated) bias added once, after it."""


@dataclass(frozen=True)
class VocabParallel(ColumnParallel):
    """The output head: column-parallel over the vocabulary, the logits gathered so every rank returns
    all of them; a head tied to an embedding uses this rank's rows of the embedding's weight."""


Style = ColumnParallel | RowParallel

BACKBONE_PLAN: dict[str, Style] = {
    r"blocks\.\d+\.attn\.qkv": ColumnParallel(groups=3),
    r"blocks\.\d+\.attn\.proj": RowParallel(),
    r"blocks\.\d+\.mlp\.0": ColumnParallel(),
    r"blocks\.\d+\.mlp\.2": RowParallel(),
    r"head": VocabParallel(),
}


def plan_pattern(module_name: str, plan: dict[str, Style] = BACKBONE_PLAN) -> str | None:
    """The plan pattern matching ``module_name`` (optionally after a prefix such as ``module.``), or None."""
    return next((p for p in plan if re.fullmatch(rf"(?:.*\.)?{p}", module_name)), None)


def plan_style(module_name: str, plan: dict[str, Style] = BACKBONE_PLAN) -> Style | None:
    """The split style of module ``module_name``, or None for a replicated module."""
    pattern = plan_pattern(module_name, plan)
    return None if pattern is None else plan[pattern]


def param_split(name: str, plan: dict[str, Style] = BACKBONE_PLAN) -> tuple[int, int] | None:
    """``(dim, groups)`` along which the full tensor of parameter ``name`` is split, or None (replicated)."""
    module, _, leaf = name.rpartition(".")
    style = plan_style(module, plan)
    if isinstance(style, ColumnParallel) and leaf in ("weight", "bias"):
        return 0, style.groups
    if isinstance(style, RowParallel) and leaf == "weight":
        return 1, 1
    return None


def partition_dim(name: str, plan: dict[str, Style] = BACKBONE_PLAN) -> int | None:
    """Dim along which the full tensor of parameter ``name`` is split over TP (None = replicated)."""
    split = param_split(name, plan)
    return None if split is None else split[0]



# --------------------------------------------------------------------------------------------------
# Full state <-> this rank's shard


def shard_tensor(name: str, full: torch.Tensor, tp_rank: int, tp_size: int,
                 plan: dict[str, Style] = BACKBONE_PLAN) -> torch.Tensor:
    """This rank's part of the full tensor (a parameter or a same-shaped optimizer state) named ``name``;
    always a new contiguous tensor."""
    full = full.detach()
    split = param_split(name, plan)
    if split is None or tp_size == 1:
        return full.clone()
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} outside [0, {tp_size})")
    dim, groups = split
    if full.shape[dim] % (groups * tp_size):
        raise ValueError(f"{name}: dim {dim} of shape {tuple(full.shape)} does not split into {groups} "
                         f"block(s) x tp={tp_size}")
    blocks = full.unflatten(dim, (groups, full.shape[dim] // groups))
    return blocks.chunk(tp_size, dim=dim + 1)[tp_rank].flatten(dim, dim + 1).clone()


def unshard_tensors(name: str, shards: list[torch.Tensor],
                    plan: dict[str, Style] = BACKBONE_PLAN) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the full tensor from all ranks' shards (in TP-rank order)."""
    split = param_split(name, plan)
    if split is None or len(shards) == 1:
        return shards[0].detach().clone()
    dim, groups = split
    parts = [s.detach().unflatten(dim, (groups, s.shape[dim] // groups)) for s in shards]
    return torch.cat(parts, dim=dim + 1).flatten(dim, dim + 1)


def sharded_tensor(name: str, local: torch.Tensor, tp_rank: int, tp_size: int,
                   plan: dict[str, Style] = BACKBONE_PLAN):
    """This rank's shard ``local`` of parameter ``name`` (or a same-shaped optimizer state) as a
    ShardedTensor of the full tensor, for sharded checkpoints: one chunk per block (q, k and v
    are three), each at its place in the full Backbone tensor, viewing ``local``'s memory so a load
    fills it in place. A replicated tensor (or TP=1) is returned as it is."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    split = param_split(name, plan)
    if split is None or tp_size == 1:
        return local
    dim, groups = split
    block = local.shape[dim] // groups
    full = list(local.shape)
    full[dim] *= tp_size
    ranks = [dist.get_global_rank(tp_group(), r) for r in range(tp_size)]

    def chunk_meta(rank: int, group: int) -> ShardMetadata:
        offsets = [0] * local.dim()
        offsets[dim] = group * block * tp_size + rank * block
        sizes = list(local.shape)
        sizes[dim] = block
        return ShardMetadata(offsets, sizes, f"rank:{ranks[rank]}/{local.device}")

    shards = [Shard(local.narrow(dim, g * block, block), chunk_meta(tp_rank, g)) for g in range(groups)]
    meta = ShardedTensorMetadata([chunk_meta(r, g) for r in range(tp_size) for g in range(groups)],
                                 torch.Size(full), TensorProperties(dtype=local.dtype))
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, meta)


def _tied_alias(name: str) -> bool:
    return re.search(r"(^|\.)head\.weight$", name) is not None


def shard_full_state(full_sd: dict, cfg: ModelConfig, vocab: int, tp_rank: int, tp_size: int) -> dict:
    """A full Backbone ``{name: tensor}`` dict (state dict or per-parameter optimizer state) -> this
    rank's. With tied embeddings Backbone's ``head.weight`` alias is dropped."""
    check_tp_config(cfg, vocab, tp_size)
    return {name: shard_tensor(name, value, tp_rank, tp_size) if torch.is_tensor(value) else value
            for name, value in full_sd.items() if not (cfg.tie_embeddings and _tied_alias(name))}


def gather_full_state(local_sd: dict, cfg: ModelConfig, vocab: int, *, alias_tied_head: bool = True) -> dict:
    """Collective over the TP group: this rank's ``{name: tensor}`` dict -> the full Backbone dict
    (returned on every TP rank); the exact inverse of :func:`shard_full_state`.

    Every TP rank must pass the same names. Non-tensor entries (megatron's ``_extra_state`` = None) are
    dropped. With tied embeddings and ``alias_tied_head`` (the default, for model state dicts) the result
    gets ``head.weight`` = ``embed.weight`` as Backbone's state dict has; pass False for optimizer state
    (``named_parameters()`` lists the tied weight once, as ``embed.weight``).
    Tensors keep their device; under NCCL CPU tensors travel through the current CUDA device.
    """
    world = tp_world()
    check_tp_config(cfg, vocab, world)
    group = tp_group()
    names = [n for n, v in local_sd.items() if torch.is_tensor(v)]
    gathered = {}
    for name in sorted(names):  # one order on every rank, whatever the dicts' insertion order
        local = local_sd[name].detach()
        if param_split(name) is None or world == 1:
            gathered[name] = local.clone()
            continue
        comm = local.contiguous()
        if dist.get_backend(group) == "nccl" and not comm.is_cuda:
            comm = comm.to(torch.device("cuda", torch.cuda.current_device()))
        shards = [torch.empty_like(comm) for _ in range(world)]
        dist.all_gather(shards, comm, group=group)
        gathered[name] = unshard_tensors(name, shards).to(local.device)
    out = {name: gathered[name] for name in names}
    if cfg.tie_embeddings and alias_tied_head and "embed.weight" in out and "head.weight" not in out:
        out["head.weight"] = out["embed.weight"]
    return out


def gather_optimizer_state(local: dict, names: list[str], cfg: ModelConfig, vocab: int) -> dict:
    """Collective over the TP group: this rank's ``optimizer.state_dict()`` -> the full model's.

    ``names``: the parameter name of each optimizer id. Parameter-shaped entries (Adam's ``exp_avg``,
    ``exp_avg_sq``) are gathered like their parameter; scalars (``step``) are kept. Ids and parameter
    groups are unchanged: the sharded model has the full model's parameters in the same order.
    """
    state = {i: {k: v for k, v in st.items() if v.dim() == 0} for i, st in local["state"].items()}
    keys = sorted({k for st in local["state"].values() for k, v in st.items() if v.dim() > 0})
    for key in keys:
        present = {names[i]: st[key] for i, st in local["state"].items() if key in st}
        full = gather_full_state(present, cfg, vocab, alias_tied_head=False)
        for i, st in local["state"].items():
            if key in st:
                state[i][key] = full[names[i]]
    return {"state": state, "param_groups": local["param_groups"]}


def shard_optimizer_state(full: dict, names: list[str], tp_rank: int, tp_size: int) -> dict:
    """The inverse of :func:`gather_optimizer_state` for this rank (no collective)."""
    state = {int(i): {k: v if v.dim() == 0 else shard_tensor(names[int(i)], v, tp_rank, tp_size)
                      for k, v in st.items()} for i, st in full["state"].items()}
    return {"state": state, "param_groups": full["param_groups"]}


# --------------------------------------------------------------------------------------------------
# megatron's parallel state


def init_model_parallel(tp_size: int) -> None:
    """Build megatron's TP / DP groups over the existing default process group (gloo or NCCL).

    Ranks ``[k*tp, (k+1)*tp)`` form a TP group; ranks with the same TP rank form a DP group.
    Idempotent for the same ``tp_size``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("init_model_parallel needs the default process group (dist.init_process_group)")
    world = dist.get_world_size()
    if tp_size < 1 or world % tp_size:
        raise ProsecoError(f"parallel.tp_size={tp_size} must be >= 1 and divide the number of processes "
                           f"({world}); use a tp_size that divides it")
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() == tp_size:
            return
        raise RuntimeError("model parallel state already initialised with another TP size; "
                           "call destroy_model_parallel() first")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size)


def model_parallel_is_initialized() -> bool:
    """Whether :func:`init_model_parallel` has built the groups."""
    return parallel_state.model_parallel_is_initialized()


def destroy_model_parallel() -> None:
    """Tear down megatron's groups (the default process group is left alone)."""
    parallel_state.destroy_model_parallel()


def tp_rank() -> int:
    """This process's rank in its TP group."""
    return parallel_state.get_tensor_model_parallel_rank()


def tp_world() -> int:
    """The TP group's size."""
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_group():
    """This process's TP group."""
    return parallel_state.get_tensor_model_parallel_group()


def dp_group():
    """This process's data-parallel group."""
    return parallel_state.get_data_parallel_group()


def dp_rank_world() -> tuple[int, int]:
    """This process's rank in its data-parallel group and the group's size."""
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


# --------------------------------------------------------------------------------------------------
# Gradient norm, sizes


def clip_grad_norm_tp(params, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a TP model: the L2 norm of the full model's gradient.

    Parameters marked ``tensor_model_parallel`` (megatron's attribute) contribute their squared norms
    summed over the TP group; replicated ones (identical gradients on every TP rank) count once.
    Call after any data-parallel gradient reduction. Returns the total norm (before clipping).
    """
    if torch.is_tensor(params):
        params = [params]
    unique = {id(p): p for p in params if p.grad is not None}
    grads = [p.grad for p in unique.values()]
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device

    def sq(gs):
        if not gs:
            return torch.zeros((), dtype=torch.float32, device=device)
        return torch.stack([torch.linalg.vector_norm(g.float()) for g in gs]).pow(2).sum()

    sharded = sq([p.grad for p in unique.values() if getattr(p, "tensor_model_parallel", False)])
    replicated = sq([p.grad for p in unique.values() if not getattr(p, "tensor_model_parallel", False)])
    if tp_world() > 1:
        dist.all_reduce(sharded, group=tp_group())
    total = (sharded + replicated).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


def full_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the full (unsharded) model a tensor-parallel model is a shard of."""
    world = tp_world()
    return sum(p.numel() * (world if getattr(p, "tensor_model_parallel", False) else 1)
               for p in {id(p): p for p in model.parameters()}.values())
