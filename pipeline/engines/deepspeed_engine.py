"""``parallel.backend=deepspeed``: ZeRO stage 0-3 through ``deepspeed.initialize``.

The DeepSpeed config is generated from ours (:func:`deepspeed_config`) - there is no JSON file to
drift. The optimizer is our torch AdamW (:func:`pipeline.optim.make_optimizer`, same parameter
groups as the torch backend) handed to DeepSpeed as a client optimizer, so nothing is JIT-compiled
for it (DeepSpeed's FusedAdam / CPUAdam would build C++ ops at start-up).

Gradient accumulation: each *backward* is one DeepSpeed micro-step. The split ProSeCo backward
(pass 1, then pass 2) runs two backwards per micro-batch, so DeepSpeed's
``gradient_accumulation_steps`` is ``optim.grad_accum x backwards_per_micro_batch`` and
``engine.step()`` follows every backward; DeepSpeed reduces, clips (``gradient_clipping``) and steps
the optimizer at the accumulation boundary only. Losses arrive already divided by ``grad_accum``
and go in with ``scale_wrt_gas=False``, so gradients equal the torch backend's.

bf16 (``parallel.bf16``): DeepSpeed's bf16 mode (bf16 weights and activations, fp32 master weights in
the ZeRO optimizer); logits are cast to fp32 before the loss.

EMA (:class:`pipeline.engines.deepspeed_ema.MasterEMA`): the average of DeepSpeed's fp32 master
weights, each rank averaging its own fragment / partition of them after every optimizer step (no
communication, no bf16 rounding); the full average is assembled into an fp32 shadow module (copied
from the model before ``deepspeed.initialize``) only to validate or save it.

Checkpoints: ``engine.save_checkpoint`` writes DeepSpeed's own files (model, ZeRO-partitioned
optimizer) to ``deepspeed/`` inside the checkpoint folder; rank 0 adds the EMA to ``state.pt``.
A ZeRO checkpoint is tied to its data-parallel size and stage; to resume under another layout,
convert it once with ``proseco ckpt universal`` (DeepSpeed's universal checkpoint) and resume.
``proseco ckpt export`` consolidates it (``zero_to_fp32``) without DeepSpeed at load time.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from pipeline.config import Config
from pipeline.engines.base import (
    STATE_FILE,
    Engine,
    build_backbone,
    checkpoint_blocks,
    load_state_file,
)
from pipeline.engines.deepspeed_ema import MasterEMA
from pipeline.errors import ProsecoError
from pipeline.io import save_torch
from pipeline.optim import make_optimizer

DS_TAG = "deepspeed"  # DeepSpeed's files: <checkpoint>/deepspeed/
UNIVERSAL_TAG = "deepspeed_universal"  # written by `proseco ckpt universal`


def import_deepspeed():
    """``import deepspeed`` with the CPU accelerator picked explicitly when there is no CUDA."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise ProsecoError(f"parallel.backend=deepspeed needs DeepSpeed ({exc}); install it with "
                           "`pip install 'proseco-pipeline[deepspeed]'` (or `make venv`)") from None
    return deepspeed


def backwards_per_micro(cfg: Config) -> int:
    d = cfg.diffusion
    return 2 if d.split_backward and d.corrector_weight > 0 else 1


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed config for ``cfg`` (see the module docstring for the accumulation rule)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.optim.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum * backwards_per_micro(cfg),
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": bool(cfg.parallel.bf16)},
        "zero_allow_untested_optimizer": True,  # our torch AdamW as the client optimizer
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class _Float32Logits(nn.Module):
    """Calls the DeepSpeed engine and returns fp32 logits (bf16 mode computes in bf16)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, z, t=None, valid=None):
        return self.inner(z, t, valid).float()


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, cfg: Config, vocab: int, device: torch.device, rank: int, world: int):
        deepspeed = import_deepspeed()
        for key, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", 0)):
            os.environ.setdefault(key, str(value))  # one process started without a launcher
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.data_rank, self.data_world = rank, world
        module = build_backbone(cfg, vocab, device)
        if cfg.parallel.activation_checkpointing:
            checkpoint_blocks(module.blocks)
        shadow = copy.deepcopy(module) if cfg.optim.ema > 0 else None  # whole, before ZeRO-3 partitions it
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=make_optimizer(module, cfg.optim), config=deepspeed_config(cfg))
        self.model = self.ds.module
        self.ema = MasterEMA(self.model, cfg.optim.ema, shadow) if shadow is not None else None
        self._zero3 = cfg.parallel.zero_stage == 3

    def forward(self, z, t, valid, sync):
        return self.ds(z, t, valid).float()

    def backward(self, loss):
        self.ds.backward(loss, scale_wrt_gas=False)
        self.ds.step()  # a no-op for the optimizer until the accumulation boundary

    def zero_grad(self):
        pass  # DeepSpeed clears gradients itself after each optimizer step

    def step(self) -> float:
        if self.ds.micro_steps % self.ds.gradient_accumulation_steps():  # a train-loop bug, not user input
            raise RuntimeError(f"DeepSpeed is mid-accumulation at micro-step {self.ds.micro_steps}")
        if self.ema is not None:
            self.ema.update()
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def eval_model(self) -> nn.Module:
        """The EMA assembled from every rank's share (a collective: all ranks ask for it together,
        at validation), or the DeepSpeed model itself."""
        return self.ema.materialize() if self.ema is not None else _Float32Logits(self.ds)

    @property
    def eval_collective(self) -> bool:
        return self.ema is None and self._zero3  # ZeRO-3 forwards all-gather the weights

    @property
    def topology(self):
        return {"backend": "deepspeed", "dp": self.world, "tp": 1, "zero_stage": self.cfg.parallel.zero_stage}

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self, folder: Path, rank: int) -> dict:
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        # the info ds_to_universal needs (`proseco ckpt universal`)
        info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        self.ds.save_checkpoint(str(folder), tag=DS_TAG, client_state=info, save_latest=False)
        ema = self.ema.materialize().state_dict() if self.ema is not None else None  # a collective
        if rank != 0:
            return {}  # DeepSpeed's own files are hashed by the checkpoint manager
        return {STATE_FILE: save_torch({"ema": ema} if ema is not None else {},
                                       folder / STATE_FILE)}

    def load(self, folder: Path, saved_topology: dict) -> None:
        universal = saved_topology != self.topology
        tag = UNIVERSAL_TAG if universal else DS_TAG
        if universal:
            if not (folder / UNIVERSAL_TAG).is_dir():
                raise ProsecoError(
                    f"cannot resume from {folder}: its DeepSpeed ZeRO files were saved with dp="
                    f"{saved_topology.get('dp')}, zero_stage={saved_topology.get('zero_stage')} and this run has "
                    f"dp={self.world}, zero_stage={self.cfg.parallel.zero_stage}. Convert it once, then rerun: "
                    f"proseco ckpt universal {folder}")
            self.ds._config.load_universal_checkpoint = True
        path, _ = self.ds.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if path is None:
            raise ProsecoError(f"DeepSpeed found no checkpoint under {folder / tag}")
        if self.ema is not None:
            state = load_state_file(folder, self.device)
            self.ema.load_full(self.saved_ema(state, folder))
