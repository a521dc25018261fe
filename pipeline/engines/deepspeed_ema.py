"""EMA of DeepSpeed's fp32 master weights, kept where DeepSpeed keeps them.

DeepSpeed's optimizer owns fp32 master weights: under ZeRO-1/2 (and its bf16 optimizer) each rank
holds a *fragment* of each parameter's flattened fp32 copy, under ZeRO-3 each rank holds its
*partition*; without ZeRO and without bf16 the module's fp32 weights are the master weights.
:class:`MasterEMA` averages exactly those local fp32 pieces after every optimizer step, so:

* the average is of the fp32 master weights, not of bf16 module weights (bf16 rounding of each
  step's weights would otherwise enter the average);
* the update never communicates (ZeRO-3 used to all-gather the whole model every step), and each
  rank holds only its share of the average (plus, as before, the fp32 ``shadow`` module).

The full average is assembled only when it is needed - validation and checkpoints
(:meth:`MasterEMA.materialize`, a collective over the data-parallel group, the same reduction
DeepSpeed uses for ``safe_get_full_fp32_param``) - into the fp32 ``shadow`` module, which is what
is validated, saved (``state.pt["ema"]``, full Backbone names) and exported. A resume hands the
saved full average back with :meth:`MasterEMA.load_full`, which keeps this rank's pieces.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _zero3(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def local_master(p: nn.Parameter) -> torch.Tensor:
    """This rank's piece of parameter ``p``'s fp32 master weights (a flat view into DeepSpeed's
    optimizer, possibly empty), or ``p`` itself where no optimizer copy exists."""
    if _zero3(p):
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p)
    mapping = getattr(p, "_hp_mapping", False)
    if mapping is False:  # no ZeRO partitioning, no bf16 optimizer: the fp32 module weights are the masters
        if p.dtype != torch.float32:
            raise RuntimeError(f"DeepSpeed parameter of dtype {p.dtype} without fp32 master weights")
        return p.detach()
    if mapping is None:  # none of this parameter lives in this rank's partition
        return torch.empty(0, dtype=torch.float32, device=p.device)
    return mapping.get_hp_fragment()


class MasterEMA:
    """``avg <- decay * avg + (1 - decay) * master`` on this rank's pieces of the master weights;
    ``shadow``: an fp32 module of the model's structure that :meth:`materialize` fills."""

    def __init__(self, module: nn.Module, decay: float, shadow: nn.Module):
        self.decay = decay
        self.params = list(module.named_parameters())
        self.avg = [local_master(p).detach().float().clone() for _, p in self.params]
        self.shadow = shadow.float().eval().requires_grad_(False)
        self._sharded = any(_zero3(p) or getattr(p, "_hp_mapping", False) is not False for _, p in self.params)

    @torch.no_grad()
    def update(self) -> None:
        for avg, (_, p) in zip(self.avg, self.params):
            avg.lerp_(local_master(p).float(), 1.0 - self.decay)

    @torch.no_grad()
    def full(self) -> dict[str, torch.Tensor]:
        """``{name: full fp32 average}`` on every rank (a collective when the masters are sharded)."""
        out = {}
        for avg, (name, p) in zip(self.avg, self.params):
            if _zero3(p):  # equal flat partitions in rank order, padded at the end
                group = p._z3_optimizer._get_param_partition_group(p)
                buf = torch.empty(avg.numel() * dist.get_world_size(group), dtype=torch.float32, device=avg.device)
                dist.all_gather_into_tensor(buf, avg.contiguous(), group=group)
                out[name] = buf[:p.ds_numel].view(p.ds_shape)
            elif self._sharded:  # each rank's fragment at its offset, the rest zeros: a sum assembles it
                buf = torch.zeros(p.numel(), dtype=torch.float32, device=avg.device)
                if p._hp_mapping is not None:
                    address = p._hp_mapping.lp_fragment_address
                    buf.narrow(0, address.start, address.numel).copy_(avg)
                dist.all_reduce(buf, group=p._dp_group)
                out[name] = buf.view(p.shape)
            else:
                out[name] = avg.clone()
        return out

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        """Fill ``shadow`` with the full average (a collective) and return it."""
        shadow_params = dict(self.shadow.named_parameters())
        for name, value in self.full().items():
            shadow_params[name].copy_(value)
        return self.shadow

    @torch.no_grad()
    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Take a saved full average (Backbone names): ``shadow`` gets it all, each rank keeps its pieces."""
        self.shadow.load_state_dict(full)
        for avg, (name, p) in zip(self.avg, self.params):
            flat = full[name].detach().float().flatten().to(avg.device)
            if _zero3(p):
                start = avg.numel() * dist.get_rank(p._z3_optimizer._get_param_partition_group(p))
                piece = flat[start:start + avg.numel()]
                avg.zero_()[:piece.numel()].copy_(piece)
            elif self._sharded:
                if p._hp_mapping is not None:
                    address = p._hp_mapping.lp_fragment_address
                    avg.copy_(flat.narrow(0, address.start, address.numel))
            else:
                avg.copy_(flat.view_as(avg))
