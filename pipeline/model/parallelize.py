"""Megatron-style tensor parallelism applied to the one :class:`pipeline.model.transformer.Backbone`.

:func:`apply_tensor_parallel` swaps the backbone's planned ``nn.Linear`` modules
(:data:`pipeline.model.tensor_parallel.BACKBONE_PLAN`) for megatron-core ``ColumnParallelLinear`` /
``RowParallelLinear`` layers holding this rank's shard of their weights; the forward stays
Backbone's (attention reads its head count from ``qkv``'s local width).

* **Collectives are megatron's**: the column layers all-reduce their input gradient, the row layers
  all-reduce their output, the vocab-parallel head gathers the logits so every rank returns [B, L, V].
* **Replicated parameters need no TP gradient all-reduce.** Every replicated op runs on every TP rank
  on identical inputs (the row layers all-reduce, the head gathers), and in backward the column
  layers all-reduce their input gradients, so replicated gradients are identical on every TP rank
  (bitwise, tested). This holds because sequence parallelism is off.
* **Tied embeddings**: the head's weight is this rank's row block of the replicated ``embed.weight``,
  taken after megatron's ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce
  backward), so every rank's head-gradient rows reach the full ``embed.weight`` gradient.
* **Dropout** at tp > 1 needs the same torch RNG state on every rank of a TP group: the residual
  dropouts run in the replicated region and draw the same masks. The attention dropout runs on this
  rank's heads: a seed drawn from the shared generator plus the TP rank seeds a *forked* generator
  (:func:`tp_region_rng`), so ranks get independent masks and the shared stream stays in step
  (megatron's ``CudaRNGStatesTracker`` does this on CUDA only). At tp = 1 no fork happens.
* **Devices / dtype.** megatron's linear autograd function is ``custom_fwd`` for CUDA only, so under
  CPU autocast the parallel layers run in fp32 (autocast off inside them). On CPU the logits gather
  is a zero-padded all-reduce (megatron's all-gather allocates on ``torch.cuda.current_device()``).

Not supported: sequence parallelism, pipeline parallelism, megatron's DDP / distributed optimizer /
``dist_checkpointing`` (checkpoints go through the full Backbone state, see tensor_parallel).
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.model import tensor_parallel as tpp
from pipeline.model.transformer import Backbone

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron-core's import warnings (no Transformer Engine / Apex)
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_tensor_model_parallel_region,
    )

# Use megatron's all-gather for the logits even on CPU (tests only: it needs torch.cuda.current_device
# patched to return the CPU there). On CUDA it is always used.
NATIVE_GATHER_ON_CPU = False
_NO_PARALLEL_STATE = "tensor parallelism needs megatron's parallel state: call init_model_parallel(tp) first"


@contextlib.contextmanager
def tp_region_rng(device: torch.device, tp_rank: int):
    """Per-TP-rank RNG for dropout inside the TP region (see the module docstring).

    Draws one seed from the shared generator (so the shared stream advances identically on every TP
    rank), then runs the body under a forked generator of ``device`` seeded with (seed, ``tp_rank``).
    """
    seed = int(torch.randint(0, 2**62, (1,)))
    seed = (seed + 0x9E3779B97F4A7C15 * (tp_rank + 1)) % 2**63
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.cuda.default_generators[index].manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield


def _run_megatron(forward, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Call a megatron layer's forward and return its output (not the ``(output, bias)`` pair); fp32
    under CPU autocast, where megatron's CUDA-only ``custom_fwd`` would mix bf16 and fp32 in backward."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return forward(x.float(), **kwargs)[0]
    return forward(x, **kwargs)[0]


class ColumnLinear(ColumnParallelLinear):
    """megatron-core's column-parallel linear with ``nn.Linear``'s contract (returns the output only)."""

    def forward(self, x):
        return _run_megatron(super().forward, x)


class RowLinear(RowParallelLinear):
    """megatron-core's row-parallel linear with ``nn.Linear``'s contract; the bias is added once,
    after the all-reduce."""

    def forward(self, x):
        return _run_megatron(super().forward, x)


class _PadAllReduce(torch.autograd.Function):
    """CPU logits gather: zero-pad this rank's vocabulary block to the full width and all-reduce
    over the TP group (exact: every entry is one value plus zeros). The output is a fresh tensor
    the loss may modify in place."""

    @staticmethod
    def forward(ctx, local, rank: int, size: int, group):
        v = local.shape[-1]
        ctx.block = (rank * v, (rank + 1) * v)
        full = F.pad(local, (rank * v, (size - 1 - rank) * v))
        dist.all_reduce(full, group=group)
        return full

    @staticmethod
    def backward(ctx, grad):
        lo, hi = ctx.block
        return grad[..., lo:hi], None, None, None


class VocabHead(ColumnParallelLinear):
    """The output head, column-parallel over the vocabulary; returns all logits on every rank.

    With tied embeddings it owns no weight and uses this rank's rows of ``embed``'s (kept outside
    the module tree so the state dict holds the embedding once, under ``embed.weight``).
    """

    def __init__(self, *args, embed: nn.Embedding | None, **kwargs):
        super().__init__(*args, skip_weight_param_allocation=embed is not None, **kwargs)
        object.__setattr__(self, "tied_embed", embed)
        self.tp_rank, self.tp_size = dist.get_rank(self.tp_group), dist.get_world_size(self.tp_group)

    def _tied_weight(self) -> torch.Tensor | None:
        if self.tied_embed is None:
            return None
        rows = self.output_size_per_partition
        # identity forward / all-reduce backward: every rank's head-gradient rows reach embed.weight.grad
        full = copy_to_tensor_model_parallel_region(self.tied_embed.weight, group=self.tp_group)
        return full[self.tp_rank * rows:(self.tp_rank + 1) * rows]

    def forward(self, x):
        local = _run_megatron(super().forward, x, weight=self._tied_weight())
        if self.tp_size == 1:
            return local
        if local.is_cuda or NATIVE_GATHER_ON_CPU:
            return gather_from_tensor_model_parallel_region(local, group=self.tp_group)
        return _PadAllReduce.apply(local, self.tp_rank, self.tp_size, self.tp_group)


def _init_stub(_weight):  # megatron's init is skipped (perform_initialization=False)
    raise AssertionError("unreachable")


def _parallel_layer(name: str, linear: nn.Linear, plan: dict[str, tpp.Style], model: nn.Module,
                    config: ModelParallelConfig, group) -> nn.Module:
    """The megatron layer that replaces ``linear`` by ``plan``, holding this rank's shard of its weights."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"the tensor-parallel plan matches {name!r}, a {type(linear).__name__}, "
                        "not an nn.Linear")
    style, rank, size = tpp.plan_style(name, plan), dist.get_rank(group), dist.get_world_size(group)
    shape = {"input_size": linear.in_features, "output_size": linear.out_features, "config": config,
             "init_method": _init_stub, "bias": linear.bias is not None, "tp_group": group}
    if isinstance(style, tpp.VocabParallel):
        tied = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is linear.weight]
        layer = VocabHead(**shape, gather_output=False, embed=tied[0] if tied else None)
    elif isinstance(style, tpp.ColumnParallel):
        layer = ColumnLinear(**shape, gather_output=False)
    else:
        layer = RowLinear(**shape, input_is_parallel=True, skip_bias_add=False)
    with torch.no_grad():
        for leaf, param in layer.named_parameters(recurse=False):
            param.copy_(tpp.shard_tensor(f"{name}.{leaf}", getattr(linear, leaf), rank, size, plan))
            split = tpp.param_split(f"{name}.{leaf}", plan)
            if split is not None and not hasattr(param, "tensor_model_parallel"):
                # megatron sets these only when it initialises the weight itself
                set_tensor_model_parallel_attributes(param, True, split[0], 1)
    return layer.to(linear.weight.device)


def apply_tensor_parallel(model: nn.Module, plan: dict[str, tpp.Style] | None = None,
                          tp_group=None) -> nn.Module:
    """Swap ``model``'s planned linear layers (in place) for megatron-core parallel layers over
    ``tp_group`` (default: megatron's TP group), each holding this rank's shard of the weights it
    replaces; returns ``model``. Draws nothing from the torch RNG. Every plan entry must match."""
    plan = tpp.BACKBONE_PLAN if plan is None else plan
    if tp_group is None:
        if not tpp.model_parallel_is_initialized():
            raise RuntimeError(_NO_PARALLEL_STATE)
        tp_group = tpp.tp_group()
    size = dist.get_world_size(tp_group)
    config = ModelParallelConfig(tensor_model_parallel_size=size, use_cpu_initialization=True,
                                 perform_initialization=False, gradient_accumulation_fusion=False,
                                 sequence_parallel=False, params_dtype=torch.float32)
    targets = [(name, module) for name, module in model.named_modules() if tpp.plan_pattern(name, plan)]
    missing = sorted(set(plan) - {tpp.plan_pattern(name, plan) for name, _ in targets})
    if missing:
        raise ValueError(f"tensor-parallel plan entries match no module of {type(model).__name__}: "
                         + ", ".join(missing))
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        for name, module in targets:
            parent, _, child = name.rpartition(".")
            layer = _parallel_layer(name, module, plan, model, config, tp_group)
            setattr(model.get_submodule(parent), child, layer)
    if size > 1:  # attention dropout on this rank's heads draws from a per-rank generator
        for module in model.modules():
            if hasattr(module, "dropout_rng"):
                module.dropout_rng = functools.partial(tp_region_rng, tp_rank=dist.get_rank(tp_group))
    return model


def tensor_parallel_backbone(cfg: ModelConfig, vocab_size: int,
                             device: torch.device | str | None = None) -> Backbone:
    """``Backbone(cfg, vocab_size)`` built on CPU from the current torch RNG (drawing exactly what it
    draws: the same seed gives the same full weights at any TP size), with the Backbone plan applied
    over megatron's TP group, on ``device`` (default: the current CUDA device if any, else CPU).
    Needs :func:`pipeline.model.tensor_parallel.init_model_parallel` first."""
    if not tpp.model_parallel_is_initialized():
        raise RuntimeError(_NO_PARALLEL_STATE)
    tpp.check_tp_config(cfg, vocab_size, tpp.tp_world())
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    with torch.device("cpu"):
        model = Backbone(cfg, vocab_size)
    return apply_tensor_parallel(model).to(device)
