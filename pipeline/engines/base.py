"""What the train loop needs from a backend, and the pieces the backends share.

An :class:`Engine` owns the model, its optimizer and its EMA weights, and knows how to run one
forward / backward / optimizer step and how to write and read its part of a checkpoint. The train
loop (:mod:`pipeline.train`) owns everything else - data, masking seeds, lr schedule, counters,
logging, stop handling - and is the same for every backend.

The optimizer step of every engine is: gradients of ``grad_accum`` micro-steps, each with one or
two backwards (pass 1 and pass 2 of the split ProSeCo backward), reduced across data-parallel
ranks once, clipped to ``optim.grad_clip`` by their global norm, then AdamW, then EMA.

Checkpoint layout shared by all engines (inside ``step_XXXXXXXX/``): ``state.pt`` from rank 0 holds
the *full, unsharded* model (``"model"``, Backbone parameter names), the optimizer state in
``torch.optim.AdamW.state_dict()`` format over the Backbone's parameter order (``"optimizer"``) and
the EMA weights (``"ema"``), except for DeepSpeed, whose model and optimizer live in DeepSpeed's
own files under ``deepspeed/``. Because the torch and megatron engines store the same full format,
their checkpoints move freely between single process, DDP, FSDP2 and any tensor-parallel size.
With ``checkpoint.format: sharded`` the torch and megatron engines write ``dcp/`` instead of
``state.pt``'s model / optimizer / EMA (:mod:`pipeline.checkpoint.sharded`: every rank its part),
which also reshards on load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.config import Config

STATE_FILE = "state.pt"


class Engine:
    """The interface the train loop drives; see the module docstring."""

    name = "?"
    model: nn.Module  # the local module (unwrapped; sharded for FSDP2 / megatron / ZeRO-3)
    data_rank: int = 0  # which slice of the data (and which masking seeds) this process trains on
    data_world: int = 1  # how many distinct data slices there are (= data-parallel size)
    eval_collective: bool = False  # eval_model's forward runs collectives: all ranks must call it together

    def forward(self, z: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, sync: bool) -> torch.Tensor:
        """Training forward; ``sync``: the backward that follows is the step's last (reduce gradients)."""
        raise NotImplementedError

    optimizer: torch.optim.Optimizer

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of an already ``1/grad_accum``-scaled loss."""
        loss.backward()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    ema = None  # pipeline.optim.EMA, or None when optim.ema == 0

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients by their global norm; returns the norm before clipping."""
        return nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def step(self) -> float:
        """Clip, optimizer step, EMA update; returns the gradient norm before clipping."""
        clip = self.cfg.optim.grad_clip
        norm = self.clip_grad_norm(clip if clip > 0 else 1e30)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return float(norm)

    def saved_ema(self, state: dict, folder: Path) -> dict:
        """The EMA weights of a checkpoint's ``state.pt``; a run with EMA on cannot resume without them."""
        if "ema" not in state:
            from pipeline.errors import ProsecoError

            raise ProsecoError(f"{folder} has no EMA weights but optim.ema={self.cfg.optim.ema}; "
                               "resume with optim.ema=0 or start a new run")
        return state["ema"]

    @property
    def eval_model(self) -> nn.Module:
        """The weights to validate and export: the EMA when on, else the trained model."""
        return self.ema.shadow if self.ema is not None else self.model

    @property
    def topology(self) -> dict:
        """``{"backend", "dp", "tp", "zero_stage"}``, stored in every checkpoint's metadata."""
        raise NotImplementedError

    def save(self, folder: Path, rank: int) -> dict:
        """Write this engine's files into ``folder`` (a collective: every rank calls it); returns
        ``{relative path: {"size", "sha256"}}`` of the files this rank hashed after writing them
        (:func:`pipeline.io.save_torch`; others are hashed by the checkpoint manager)."""
        raise NotImplementedError

    def load(self, folder: Path, saved_topology: dict) -> None:
        """Restore from a checkpoint folder written by :meth:`save` (possibly of another layout)."""
        raise NotImplementedError

    def sharded_state(self) -> dict:
        """``{"model", "optimizer"[, "ema"]}`` as this rank holds them, for a sharded checkpoint
        (:mod:`pipeline.checkpoint.sharded`): tensors DCP writes, and fills in place on load."""
        from pipeline.errors import ProsecoError

        raise ProsecoError(f"backend {self.name} has no sharded checkpoint format (set checkpoint.format=full)")

    def load_sharded_state(self, state: dict) -> None:
        """Take back a :meth:`sharded_state` that DCP has filled from a checkpoint."""
        raise NotImplementedError

    def close(self) -> None:
        """Tear down what the engine set up (parallel state); the process group stays."""


def build_backbone(cfg: Config, vocab: int, device: torch.device) -> nn.Module:
    """The full model, seeded by ``run.seed``: identical initial weights on every rank (a Hugging
    Face backbone, ``model.init=hf:PATH``, loads the same pretrained weights on every rank)."""
    from pipeline.model import Backbone, hf

    torch.manual_seed(cfg.run.seed)
    if hf.is_hf(cfg.model.init):
        return hf.build(cfg.model.init).to(device)
    return Backbone(cfg.model, vocab_size=vocab).to(device)


def checkpoint_blocks(blocks: nn.ModuleList) -> None:
    """Activation checkpointing: recompute each block's activations in the backward."""
    import functools

    import torch.utils.checkpoint

    for block in blocks:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def compile_blocks(blocks: nn.ModuleList) -> None:
    """``torch.compile`` each transformer block's forward in place (parameter and state-dict names stay
    the Backbone's; module hooks such as FSDP2's run around it). The compiled function calls the
    block's current forward, so when activation checkpointing wrapped it, dynamo traces the
    ``torch.utils.checkpoint`` call itself (compiling ``checkpoint`` directly, or the module's
    ``_call_impl`` around it, would leave it eager: ``checkpoint`` is dynamo-disabled as an entry point).
    Blocks share their code: the first forward compiles one graph for all."""
    for block in blocks:
        block.forward = torch.compile(_calling(block.forward))


def _calling(forward):
    """A plain function that calls ``forward``: an entry point dynamo traces into."""

    def call(*args, **kwargs):
        return forward(*args, **kwargs)

    return call


def autocast(cfg: Config, device: torch.device):
    """The context each training forward runs under: bfloat16 autocast on ``device``'s type (CUDA or
    CPU) when ``parallel.bf16``, else a no-op. Weights, gradients and optimizer states stay fp32."""
    import contextlib

    if not cfg.parallel.bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in ``optimizer.state_dict()``'s id order."""
    names: dict[nn.Parameter, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(p, name)
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def optim_by_id(by_name: dict, order: list[str] | None = None) -> dict:
    """An optimizer state keyed by parameter name -> ``optimizer.state_dict()`` format (integer ids
    in parameter-group order; ``order`` fixes the id order when group lists may differ)."""
    ids: dict[str, int] = {name: i for i, name in enumerate(order or [])}
    groups = []
    for group in by_name["param_groups"]:
        groups.append({**group, "params": [ids.setdefault(name, len(ids)) for name in group["params"]]})
    return {"state": {ids[name]: v for name, v in by_name["state"].items()}, "param_groups": groups}


def optim_by_name(names: list[str], by_id: dict) -> dict:
    """The inverse of :func:`optim_by_id` given the names in id order."""
    return {"state": {names[i]: v for i, v in by_id["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in by_id["param_groups"]]}


def load_state_file(folder: Path, device: torch.device | str = "cpu") -> dict:
    """``state.pt`` of a checkpoint folder (``weights_only``)."""
    return torch.load(folder / STATE_FILE, map_location=device, weights_only=True)
