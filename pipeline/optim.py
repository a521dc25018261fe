"""Optimizer, learning-rate schedule and the weight EMA: the pieces every engine shares.

Every backend (:mod:`pipeline.engines`: torch, DeepSpeed, megatron-core) builds its optimizer with
:func:`make_optimizer`, takes its learning rate from :func:`lr_at` (set by the train loop before
each step) and keeps its evaluation weights in one :class:`EMA`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from pipeline.config import OptimConfig


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings (1-D or embedding tables)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warmup to ``lr``, then constant or cosine decay to ``min_lr_ratio * lr``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a model's weights, held in a frozen ``shadow`` module (the
    weights that are validated and exported when ``optim.ema > 0``)."""

    def __init__(self, model: nn.Module, decay: float, shadow: nn.Module | None = None):
        """``shadow``: a module of ``model``'s structure to hold the average (default: a deep copy;
        modules that hold process groups cannot be deep-copied and pass a fresh instance). DeepSpeed
        keeps its own EMA of its fp32 master weights (:mod:`pipeline.engines.deepspeed_ema`)."""
        self.decay = decay
        if shadow is None:
            shadow = copy.deepcopy(model)
        else:
            shadow.load_state_dict(model.state_dict())
        self.shadow = shadow.eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``shadow <- decay * shadow + (1 - decay) * model``, parameter by parameter.

        FSDP2: a shadow sharded like the model averages shard by shard (no communication); an
        unsharded shadow of a sharded model gets each parameter's full tensor (a collective)."""
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            src = p.detach()
            if isinstance(src, DTensor) and not isinstance(s, DTensor):
                src = src.full_tensor()
            s.lerp_(src.to(s.dtype), 1.0 - self.decay)
