"""Training backends behind one interface (:class:`pipeline.engines.base.Engine`).

``parallel.backend``: ``torch`` (single process / DDP / FSDP2), ``deepspeed`` (ZeRO 0-3) or
``megatron`` (megatron-core tensor parallelism x data parallelism). Each module imports its
library lazily, so the torch backend never needs DeepSpeed or megatron-core installed.
"""

from __future__ import annotations

import torch

from pipeline.config import Config
from pipeline.engines.base import Engine


def build_engine(cfg: Config, vocab: int, device: torch.device, rank: int, world: int) -> Engine:
    backend = cfg.parallel.backend
    if backend == "torch":
        from pipeline.engines.torch_engine import TorchEngine

        return TorchEngine(cfg, vocab, device, rank, world)
    if backend == "deepspeed":
        from pipeline.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, vocab, device, rank, world)
    if backend == "megatron":
        from pipeline.engines.megatron_engine import MegatronEngine

        return MegatronEngine(cfg, vocab, device, rank, world)
    raise ValueError(f"unknown backend {backend!r}")  # config validation rules this out


__all__ = ["Engine", "build_engine"]
