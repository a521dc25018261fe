"""Tensor-parallel (Megatron-style) version of :class:`pipeline.model.transformer.Backbone`.

Design
------
* **Real megatron-core layers.** Every sharded matmul is a ``megatron.core.tensor_parallel``
  ``ColumnParallelLinear`` / ``RowParallelLinear`` over ``parallel_state``'s tensor-parallel (TP)
  group; the activations' collectives are megatron's (the column layer all-reduces its input
  gradient, the row layer all-reduces its output, ``copy_to`` / ``reduce_from`` / ``gather_from``
  region mappings elsewhere).
* **What is sharded** (Backbone parameter name -> split dim of the full tensor, :func:`partition_dim`):

  ====================================  ===========  ===========================================
  ``blocks.i.attn.qkv.weight``          0 (by head)  column-parallel, each rank owns heads/tp heads
  ``blocks.i.attn.proj.weight``         1            row-parallel (input = this rank's heads)
  ``blocks.i.mlp.0.weight`` / ``.bias``  0            column-parallel
  ``blocks.i.mlp.2.weight``             1            row-parallel; ``mlp.2.bias`` is replicated and
                                                     added once, after the all-reduce
  ``head.weight``                       0            column-parallel over the vocabulary; logits are
                                                     gathered so every rank returns [B, L, V]
  ====================================  ===========  ===========================================

  Everything else (embedding, ``pos_embed``, LayerNorms, time MLP, adaLN linears, ``final_adaln``)
  is a plain replicated torch module with Backbone's name, so parameters map by name.
* **qkv head layout.** Backbone's ``qkv`` output (rows of its weight) is laid out as
  ``(3, heads, head_dim)``: all q rows, then all k rows, then all v rows. A rank must own *its heads'*
  q, k and v rows, so its shard is ``W.view(3, heads, head_dim, hidden)[:, r*hl:(r+1)*hl]`` (``hl =
  heads / tp``), i.e. three separate row blocks, not one contiguous chunk. The local qkv output then
  has the same ``(3, hl, head_dim)`` layout and the attention code is Backbone's with ``hl`` heads;
  the local attention output ``(hl, head_dim)`` is exactly this rank's contiguous column block of
  ``proj``'s input, so ``proj`` is a plain dim-1 chunk. :func:`shard_tensor` / :func:`unshard_tensors`
  implement this (and work unchanged for Adam's ``exp_avg`` / ``exp_avg_sq``, which have the
  parameter's shape).
* **Replicated parameters need no TP gradient all-reduce.** Every replicated op runs on every TP rank
  on identical inputs: the row layers all-reduce their outputs and the head gathers the logits, so
  the forward activations outside the parallel regions are identical; in backward the column layers
  all-reduce their input gradients (megatron's ``allreduce_dgrad``), so the gradients flowing into
  the replicated region are identical too. Hence the replicated parameters' gradients are identical on
  every TP rank (bitwise, tested). This holds because sequence parallelism is off (with it, megatron
  must all-reduce LayerNorm gradients).
* **Tied embeddings** are supported at any TP size: the head's weight is this rank's row block of the
  replicated ``embed.weight``, taken after megatron's ``copy_to_tensor_model_parallel_region`` (identity
  forward, all-reduce backward), so the head's per-rank gradient rows are summed into the full
  ``embed.weight`` gradient on every rank (the embedding-lookup part is already replicated).
  ``head.weight`` then is not a TPBackbone parameter; :func:`shard_full_state` drops Backbone's alias
  and :func:`gather_full_state` restores it.
* **Dropout** (``model.dropout > 0``) works at tp > 1 provided every rank of a TP group has the same
  torch RNG state (seed them identically, e.g. ``seed + 1000 * dp_rank``): the residual dropouts run in
  the replicated region, draw the same masks on every TP rank and so keep it replicated. The
  attention-probability dropout runs inside the TP region (this rank's heads); there a seed drawn from
  the shared generator plus the TP rank seeds a *forked* generator (:func:`_tp_region_rng`), so
  heads on different ranks get independent masks and the shared RNG stream stays in step across the
  group. (megatron's ``CudaRNGStatesTracker`` does the same on CUDA but hard-codes CUDA, so it is not
  used.) At tp = 1 no fork happens and dropout draws exactly what Backbone draws.
* **Data parallelism** is the caller's: parallel_state also builds the DP group (:func:`dp_group`);
  all-reduce / DDP-wrap over it. Gradients of all parameters (sharded and replicated) are then
  consistent and :func:`clip_grad_norm_tp` computes the global norm over the TP group.
* **Devices / dtype.** Parameters are created on CPU (``use_cpu_initialization``; megatron's own init
  is skipped, see ``init``) and moved to ``device`` (default: the current CUDA device when CUDA is
  available, else CPU). On CUDA the model runs under ``torch.autocast(dtype=torch.bfloat16)`` like
  Backbone; megatron's linear autograd function is ``custom_fwd``-decorated (for CUDA only, so CPU autocast
  is switched off inside ``forward``: fp32 on CPU, as the trainer's ``bf16`` option). On CPU the logits gather
  uses a zero-padded all-reduce (megatron's all-gather helpers allocate on
  ``torch.cuda.current_device()``); on CUDA it is megatron's ``gather_from_tensor_model_parallel_region``.

Not supported: sequence parallelism, megatron's RNG tracker, pipeline parallelism, megatron's own
DDP / distributed optimizer / ``dist_checkpointing`` (checkpoints go through the full Backbone layout:
:func:`gather_full_state` / :func:`shard_full_state`).
"""

from __future__ import annotations

import contextlib
import re
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.config.validate import check_tensor_parallel as check_tp_config
from pipeline.errors import ProsecoError
from pipeline.model.transformer import Backbone, apply_rotary, rotary_tables, timestep_embedding

with warnings.catch_warnings():
    # megatron-core's import warns that Transformer Engine / Apex are missing (local fallbacks are used)
    # and emits torch.jit deprecation warnings; none of it concerns the layers used here.
    warnings.simplefilter("ignore")
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_tensor_model_parallel_region,
    )

__all__ = [
    "TPBackbone",
    "check_tp_config",
    "clip_grad_norm_tp",
    "destroy_model_parallel",
    "dp_group",
    "full_parameter_count",
    "gather_full_state",
    "init_model_parallel",
    "partition_dim",
    "shard_full_state",
    "shard_tensor",
    "tp_group",
    "tp_rank",
    "tp_world",
    "unshard_tensors",
]

# Use megatron's all-gather for the logits even on CPU (tests only: it needs torch.cuda.current_device
# patched to return the CPU there). On CUDA it is always used.
_NATIVE_GATHER_ON_CPU = False


# --------------------------------------------------------------------------------------------------
# parallel_state wrappers


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


def destroy_model_parallel() -> None:
    """Tear down megatron's groups (the default process group is left alone)."""
    parallel_state.destroy_model_parallel()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_world() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def dp_group():
    return parallel_state.get_data_parallel_group()


# --------------------------------------------------------------------------------------------------
# Shard layout (pure functions of names and config)

_COLUMN = re.compile(r"(^|\.)(blocks\.\d+\.attn\.qkv\.weight|blocks\.\d+\.mlp\.0\.(weight|bias)|head\.weight)$")
_ROW = re.compile(r"(^|\.)(blocks\.\d+\.attn\.proj\.weight|blocks\.\d+\.mlp\.2\.weight)$")
_QKV = re.compile(r"(^|\.)blocks\.\d+\.attn\.qkv\.weight$")


def partition_dim(name: str) -> int | None:
    """Dim along which the full tensor of Backbone parameter ``name`` is split over TP (None = replicated).

    ``attn.qkv.weight`` is split along dim 0 *by head* (see the module docstring), not contiguously.
    """
    if _COLUMN.search(name):
        return 0
    if _ROW.search(name):
        return 1
    return None


def _mlp_inner(cfg: ModelConfig) -> int:
    return int(cfg.hidden * cfg.mlp_ratio)


def shard_tensor(name: str, full: torch.Tensor, cfg: ModelConfig, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's part of the full tensor (a parameter or a same-shaped optimizer state) named ``name``.

    Always returns a new contiguous tensor.
    """
    full = full.detach()
    dim = partition_dim(name)
    if dim is None or tp_size == 1:
        return full.clone()
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} outside [0, {tp_size})")
    if _QKV.search(name):
        hd, hl = cfg.hidden // cfg.heads, cfg.heads // tp_size
        if full.shape[0] != 3 * cfg.heads * hd or cfg.heads % tp_size:
            raise ValueError(f"{name}: shape {tuple(full.shape)} does not fit heads={cfg.heads}, tp={tp_size}")
        rows = full.reshape(3, cfg.heads, hd, *full.shape[1:])[:, tp_rank * hl:(tp_rank + 1) * hl]
        return rows.reshape(3 * hl * hd, *full.shape[1:]).clone()
    if full.shape[dim] % tp_size:
        raise ValueError(f"{name}: dim {dim} of shape {tuple(full.shape)} is not divisible by tp={tp_size}")
    return full.chunk(tp_size, dim=dim)[tp_rank].clone()


def unshard_tensors(name: str, shards: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the full tensor from all ranks' shards (in TP-rank order)."""
    dim = partition_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0].detach().clone()
    if _QKV.search(name):
        hd = cfg.hidden // cfg.heads
        hl = cfg.heads // len(shards)
        parts = [s.detach().reshape(3, hl, hd, *s.shape[1:]) for s in shards]
        return torch.cat(parts, dim=1).reshape(3 * cfg.heads * hd, *shards[0].shape[1:])
    return torch.cat([s.detach() for s in shards], dim=dim)


def shard_full_state(full_sd: dict, cfg: ModelConfig, vocab: int, tp_rank: int, tp_size: int) -> dict:
    """A full Backbone-layout ``{name: tensor}`` dict (state dict or per-parameter optimizer state) ->
    this rank's TPBackbone-layout dict. With tied embeddings Backbone's ``head.weight`` alias is dropped."""
    check_tp_config(cfg, vocab, tp_size)
    out = {}
    for name, value in full_sd.items():
        if cfg.tie_embeddings and re.search(r"(^|\.)head\.weight$", name):
            continue
        out[name] = shard_tensor(name, value, cfg, tp_rank, tp_size) if torch.is_tensor(value) else value
    return out


def gather_full_state(local_sd: dict, cfg: ModelConfig, vocab: int, *, alias_tied_head: bool = True) -> dict:
    """Collective over the TP group: this rank's ``{name: tensor}`` dict -> the full Backbone-layout dict
    (returned on every TP rank); the exact inverse of :func:`shard_full_state`.

    Every TP rank must pass the same names. Non-tensor entries (megatron's ``_extra_state`` = None) are
    dropped. With tied embeddings and ``alias_tied_head`` (the default, for model state dicts) the result
    gets ``head.weight`` = ``embed.weight`` as Backbone's state dict has; pass False for optimizer state
    (Backbone's ``named_parameters()`` lists the tied weight once, as ``embed.weight``).
    Tensors keep their device; under NCCL CPU tensors travel through the current CUDA device.
    """
    world = tp_world()
    check_tp_config(cfg, vocab, world)
    group = tp_group()
    names = [n for n, v in local_sd.items() if torch.is_tensor(v)]
    gathered = {}
    for name in sorted(names):  # one order on every rank, whatever the dicts' insertion order
        local = local_sd[name].detach()
        if partition_dim(name) is None or world == 1:
            gathered[name] = local.clone()
            continue
        comm = local.contiguous()
        if dist.get_backend(group) == "nccl" and not comm.is_cuda:
            comm = comm.to(torch.device("cuda", torch.cuda.current_device()))
        shards = [torch.empty_like(comm) for _ in range(world)]
        dist.all_gather(shards, comm, group=group)
        gathered[name] = unshard_tensors(name, shards, cfg).to(local.device)
    out = {name: gathered[name] for name in names}
    if cfg.tie_embeddings and alias_tied_head and "embed.weight" in out and "head.weight" not in out:
        out["head.weight"] = out["embed.weight"]
    return out


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


# --------------------------------------------------------------------------------------------------
# The model


@contextlib.contextmanager
def _tp_region_rng(device: torch.device):
    """Per-TP-rank RNG for dropout inside the TP region (see the module docstring).

    Draws one seed from the shared generator (so the shared stream advances identically on every TP
    rank), then runs the body under a forked generator of ``device`` seeded with (seed, TP rank).
    """
    seed = int(torch.randint(0, 2**62, (1,)))
    seed = (seed + 0x9E3779B97F4A7C15 * (tp_rank() + 1)) % 2**63
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.cuda.default_generators[index].manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield


def _mark_parallel(param: torch.Tensor, dim: int) -> None:
    # megatron sets these only when it initialises the weight itself (perform_initialization=True).
    if not hasattr(param, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(param, True, dim, 1)


def _init_stub(_weight):  # megatron's init is skipped (perform_initialization=False)
    raise AssertionError("unreachable")


class TPAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float, config: ModelParallelConfig, tp: int):
        super().__init__()
        self.heads = heads // tp  # this rank's heads
        self.head_dim = hidden // heads
        self.dropout = dropout
        self.tp = tp
        self.qkv = ColumnParallelLinear(hidden, 3 * hidden, config=config, init_method=_init_stub, bias=False,
                                        gather_output=False, tp_group=tp_group())
        self.proj = RowParallelLinear(hidden, hidden, config=config, init_method=_init_stub, bias=False,
                                      input_is_parallel=True, skip_bias_add=False, tp_group=tp_group())
        _mark_parallel(self.qkv.weight, 0)
        _mark_parallel(self.proj.weight, 1)

    def forward(self, x, cos, sin, attn_mask):
        b, seq, _ = x.shape
        qkv, _ = self.qkv(x)
        q, k, v = qkv.view(b, seq, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        p = self.dropout if self.training else 0.0
        ctx = _tp_region_rng(x.device) if p > 0 and self.tp > 1 else contextlib.nullcontext()
        with ctx:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        out, _ = self.proj(out.transpose(1, 2).reshape(b, seq, self.heads * self.head_dim))
        return out


class TPMLP(nn.Module):
    """Backbone's ``nn.Sequential(Linear, GELU, Linear)`` with the same child names 0, 1, 2."""

    def __init__(self, hidden: int, inner: int, config: ModelParallelConfig):
        super().__init__()
        fc1 = ColumnParallelLinear(hidden, inner, config=config, init_method=_init_stub, bias=True,
                                   gather_output=False, tp_group=tp_group())
        fc2 = RowParallelLinear(inner, hidden, config=config, init_method=_init_stub, bias=True,
                                input_is_parallel=True, skip_bias_add=False, tp_group=tp_group())
        _mark_parallel(fc1.weight, 0)
        _mark_parallel(fc2.weight, 1)
        self.add_module("0", fc1)
        self.add_module("1", nn.GELU(approximate="tanh"))
        self.add_module("2", fc2)

    def forward(self, x):
        x, _ = self._modules["0"](x)
        x = self._modules["1"](x)
        x, _ = self._modules["2"](x)  # bias added once, after the all-reduce
        return x


class TPBlock(nn.Module):
    """:class:`pipeline.model.transformer.Block` with tensor-parallel attention and MLP."""

    def __init__(self, cfg: ModelConfig, config: ModelParallelConfig, tp: int):
        super().__init__()
        h = cfg.hidden
        self.norm1 = nn.LayerNorm(h, elementwise_affine=not cfg.time_conditioning)
        self.attn = TPAttention(h, cfg.heads, cfg.dropout, config, tp)
        self.norm2 = nn.LayerNorm(h, elementwise_affine=not cfg.time_conditioning)
        self.mlp = TPMLP(h, _mlp_inner(cfg), config)
        self.drop = nn.Dropout(cfg.dropout)
        self.adaln = nn.Linear(cfg.cond_dim, 6 * h) if cfg.time_conditioning else None

    def forward(self, x, cos, sin, attn_mask, cond):
        if self.adaln is None:
            x = x + self.drop(self.attn(self.norm1(x), cos, sin, attn_mask))
            return x + self.drop(self.mlp(self.norm2(x)))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(cond)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.drop(self.attn(self.norm1(x) * (1 + scale1) + shift1, cos, sin, attn_mask))
        return x + gate2 * self.drop(self.mlp(self.norm2(x) * (1 + scale2) + shift2))


class _PadAllReduce(torch.autograd.Function):
    """CPU logits gather: zero-pad this rank's vocabulary block to the full width and all-reduce
    over the TP group (exact: every entry is one value plus zeros). The padded tensor is made inside
    the function, so the output is a fresh tensor the loss may modify in place (megatron's
    ``reduce_from`` region returns its input, which autograd then forbids writing to)."""

    @staticmethod
    def forward(ctx, local, rank: int, size: int):
        v = local.shape[-1]
        ctx.block = (rank * v, (rank + 1) * v)
        full = F.pad(local, (rank * v, (size - 1 - rank) * v))
        dist.all_reduce(full, group=tp_group())
        return full

    @staticmethod
    def backward(ctx, grad):
        lo, hi = ctx.block
        return grad[..., lo:hi], None, None


class TPBackbone(nn.Module):
    """Tensor-parallel :class:`Backbone`: ``logits = model(tokens, t=None, valid=None)`` -> [B, L, V] on every
    TP rank. Needs :func:`init_model_parallel` first.

    ``init="backbone"`` (default) builds a full Backbone from the current torch RNG (on CPU, consuming the
    RNG exactly as ``Backbone(cfg, vocab_size)`` does, so the same seed gives the same weights) and loads
    this rank's shard; ``init="empty"`` leaves the sharded weights uninitialised, for loading a state dict.
    ``device`` defaults to the current CUDA device when CUDA is available, else CPU.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int | None = None, *, init: str = "backbone",
                 device: torch.device | str | None = None):
        super().__init__()
        vocab_size = vocab_size if vocab_size is not None else cfg.vocab_size
        if vocab_size is None:
            raise ValueError("model vocab size unknown: set model.vocab_size or pass it from the data")
        if init not in ("backbone", "empty"):
            raise ValueError(f"init must be 'backbone' or 'empty', not {init!r}")
        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("TPBackbone needs megatron's parallel state: call init_model_parallel(tp) first")
        tp = tp_world()
        check_tp_config(cfg, vocab_size, tp)
        self.cfg, self.vocab_size, self.tp = cfg, vocab_size, tp
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"

        full_sd = None
        if init == "backbone":
            with torch.device("cpu"):
                full_sd = Backbone(cfg, vocab_size).state_dict()
        config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                     perform_initialization=False, gradient_accumulation_fusion=False,
                                     sequence_parallel=False, params_dtype=torch.float32)
        # The replicated modules' default inits must not move the torch RNG (see the class docstring).
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            h = cfg.hidden
            self.embed = nn.Embedding(vocab_size, h)
            self.pos_embed = nn.Parameter(torch.zeros(cfg.max_seq_len, h)) if cfg.learned_positions else None
            self.time_mlp = None
            if cfg.time_conditioning:
                self.time_mlp = nn.Sequential(
                    nn.Linear(cfg.cond_dim, cfg.cond_dim), nn.SiLU(), nn.Linear(cfg.cond_dim, cfg.cond_dim)
                )
            self.blocks = nn.ModuleList(TPBlock(cfg, config, tp) for _ in range(cfg.layers))
            self.final_norm = nn.LayerNorm(h, elementwise_affine=not cfg.time_conditioning)
            self.final_adaln = nn.Linear(cfg.cond_dim, 2 * h) if cfg.time_conditioning else None
            # Vocab-parallel head; with tied embeddings its weight is a row block of embed.weight (forward).
            self.head = ColumnParallelLinear(h, vocab_size, config=config, init_method=_init_stub, bias=False,
                                             gather_output=False, skip_weight_param_allocation=cfg.tie_embeddings,
                                             tp_group=tp_group())
            if self.head.weight is not None:
                _mark_parallel(self.head.weight, 0)
            cos, sin = rotary_tables(cfg.max_seq_len, h // cfg.heads, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if full_sd is not None:
            self.load_state_dict(shard_full_state(full_sd, cfg, vocab_size, tp_rank(), tp))
        self.to(device)

    def _head_weight(self) -> torch.Tensor:
        if not self.cfg.tie_embeddings:
            return self.head.weight
        rows = self.vocab_size // self.tp
        r = tp_rank()
        # identity forward / all-reduce backward: every rank's head-gradient rows reach embed.weight.grad
        return copy_to_tensor_model_parallel_region(self.embed.weight, group=tp_group())[r * rows:(r + 1) * rows]

    def _gather_vocab(self, local: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return local
        if local.is_cuda or _NATIVE_GATHER_ON_CPU:
            return gather_from_tensor_model_parallel_region(local, group=tp_group())  # all-gather fwd, split bwd
        # CPU: megatron's all-gather allocates on torch.cuda.current_device(). Zero-pad this rank's block
        # to the full vocabulary and all-reduce (exact: every entry is one value plus zeros); the
        # backward of reduce_from is the identity and F.pad's slices out this rank's block.
        return _PadAllReduce.apply(local, tp_rank(), self.tp)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor | None = None, valid: torch.Tensor | None = None):
        if tokens.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # megatron's linear autograd function is custom_fwd/custom_bwd for CUDA only: under CPU
            # autocast its backward would multiply a bf16 gradient by an fp32 weight. Run fp32 on CPU.
            with torch.autocast("cpu", enabled=False):
                return self._forward(tokens, t, valid)
        return self._forward(tokens, t, valid)

    def _forward(self, tokens, t, valid):
        seq = tokens.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed[:seq]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        attn_mask = None
        if valid is not None:
            valid = valid.to(torch.bool)
            attn_mask = (valid | ~valid.any(-1, keepdim=True))[:, None, None, :]
        cond = None
        if self.time_mlp is not None:
            if t is None:
                raise ValueError("this model is time-conditioned: pass t")
            cond = F.silu(self.time_mlp(timestep_embedding(t, self.cfg.cond_dim).to(x.dtype)))
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask, cond)
        x = self.final_norm(x)
        if self.final_adaln is not None:
            shift, scale = self.final_adaln(cond)[:, None].chunk(2, dim=-1)
            x = x * (1 + scale) + shift
        local, _ = self.head(x, weight=self._head_weight() if self.cfg.tie_embeddings else None)
        return self._gather_vocab(local)


def full_parameter_count(model: TPBackbone) -> int:
    """Parameters of the full (unsharded) model a TPBackbone is a shard of."""
    total = 0
    for p in model.parameters():
        total += p.numel() * (model.tp if getattr(p, "tensor_model_parallel", False) else 1)
    return total

