"""A small single-process trainer for in-memory datasets (the demo and the science test).

It reads top to bottom: build optimizer -> loop (batch, loss, backward, clip, step, EMA) ->
return. The distributed engine (DDP / FSDP / DeepSpeed / Megatron, checkpoints, resume) builds
on the same pieces: :func:`make_optimizer`, :func:`lr_at` and :func:`pipeline.diffusion.objective.proseco_loss`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from pipeline.config import Config, DiffusionConfig, OptimConfig
from pipeline.diffusion.objective import proseco_loss


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
    """Exponential moving average of the weights (used for evaluation)."""

    def __init__(self, model: nn.Module, decay: float, shadow: nn.Module | None = None):
        """``shadow``: a module of ``model``'s structure to hold the average (default: a deep copy;
        modules that hold process groups cannot be deep-copied and pass a fresh instance)."""
        self.decay = decay
        if shadow is None:
            shadow = copy.deepcopy(model)
        else:
            shadow.load_state_dict(model.state_dict())
        self.shadow = shadow.eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            # FSDP2 parameters are DTensor shards: gather the full tensor (a collective - every rank
            # calls update) into the unsharded shadow, built from the model before it was sharded.
            src = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
            s.lerp_(src, 1.0 - self.decay)


@dataclass
class TrainResult:
    model: nn.Module  # the EMA weights when EMA is on, else the trained weights
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


def train_in_memory(model: nn.Module, data: torch.Tensor, cfg: Config, diffusion: DiffusionConfig,
                    mask_id: int, *, steps: int | None = None, desc: str = "train",
                    progress: bool = True) -> TrainResult:
    """Train on rows of ``data`` [N, L] sampled with replacement from a seeded generator (run.seed),
    with the optimizer of ``cfg.optim`` and a history row every ``cfg.log.every`` steps."""
    optim, run, log = cfg.optim, cfg.run, cfg.log
    steps = optim.steps if steps is None else steps
    gen = torch.Generator().manual_seed(run.seed)
    torch.manual_seed(run.seed)  # dropout
    optimizer = make_optimizer(model, optim)
    ema = EMA(model, optim.ema) if optim.ema > 0 else None
    model.train()
    history, start = [], time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=1.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, optim)
        x = data[torch.randint(len(data), (optim.batch_size,), generator=gen)]
        optimizer.zero_grad(set_to_none=True)
        terms = proseco_loss(
            lambda z, t, valid: model(z, t, valid), x, diffusion, mask_id, generator=gen,
            backward=(lambda loss: loss.backward()) if diffusion.split_backward else None,
        )
        if not diffusion.split_backward:
            terms.loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip if optim.grad_clip > 0 else 1e30)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        if step % log.every == 0 or step == steps - 1:
            row = {"step": step, "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                   **terms.as_dict()}
            history.append(row)
            bar.set_postfix(mdm=f"{row['mdm']:.3f}", sc=f"{row['correction']:.3f}")
    model.eval()
    final = ema.shadow if ema is not None else model
    return TrainResult(final, history, time.perf_counter() - start, steps)
