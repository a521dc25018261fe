"""LLaDA's semi-autoregressive block decoding with the ProSeCo corrector (official ``llada/generate.py``).

Every sequence runs its own schedule (a batch is only a vectorised set of independent samplers):
its prompt is its leading run of fixed positions; blocks of ``block_size`` (0 = one block) start
at the prompt end; a block's steps commit k masked positions each (``k`` split as evenly as possible
over ``steps / number of blocks`` steps, earlier steps taking the remainder, as LLaDA's
``get_num_transfer_tokens``), or every position above ``threshold`` (at least one), until the block
has no mask - a block with fewer masks than steps ends early. omega counts steps within the block;
the corrector's region is ``[prompt end, block end)``: positions after the prompt start as the
argmax (later blocks included, frozen at that first guess), committed tokens of the region as
themselves; the loop updates and tests its fixed point on the region only, and its committed tokens
take the result. With ``eos_stop``, a sequence whose finished block ends with EOS is filled with EOS
and stops. Position-fixed tokens after the prompt (infilling clues) never change.
"""

from __future__ import annotations

import torch

from pipeline.config import SamplerConfig
from pipeline.diffusion import sampling
from pipeline.diffusion.decoding import Noise, confidence_step
from pipeline.errors import ProsecoError


class _Schedule:
    """Per-row block position and top-k schedule."""

    def __init__(self, cfg: SamplerConfig, z, fixed, mask_id: int):
        n = z.shape[1]
        self.mask_id, self.pos = mask_id, torch.arange(n, device=z.device)
        self.prompt_end = fixed.long().cumprod(1).sum(1)  # [B]
        gen = n - self.prompt_end
        self.size = torch.full_like(gen, cfg.block_size) if cfg.block_size > 0 else gen.clamp_min(1)
        n_blocks = (-(-gen // self.size)).clamp_min(1)
        bad = (cfg.steps % n_blocks != 0) & (gen > 0)
        if bool(bad.any()):
            n, g = int(n_blocks[bad][0]), int(gen[bad][0])
            raise ProsecoError(f"sampler.steps ({cfg.steps}) must be a multiple of the number of blocks ({n} = "
                               f"ceil({g} positions after the prompt / sampler.block_size {cfg.block_size}))")
        self.per_block = (cfg.steps // n_blocks).clamp_min(1)
        self.block = torch.zeros_like(gen)
        self.step = torch.zeros_like(gen)  # steps taken in the current block
        self.done = gen <= 0
        self.base = torch.zeros_like(gen)
        self.rest = torch.zeros_like(gen)
        self.start(z, ~self.done)

    def bounds(self):
        start = self.prompt_end + self.block * self.size
        return start, torch.minimum(start + self.size, torch.full_like(start, len(self.pos)))

    def in_block(self):
        start, end = self.bounds()
        return (self.pos >= start[:, None]) & (self.pos < end[:, None])

    def start(self, z, rows):
        """Rows ``rows`` begin their current block: its masked count is split over its steps."""
        count = ((z == self.mask_id) & self.in_block()).sum(-1)
        self.base = torch.where(rows, count // self.per_block, self.base)
        self.rest = torch.where(rows, count % self.per_block, self.rest)
        self.step = torch.where(rows, 0, self.step)

    def k(self):
        return self.base + (self.step < self.rest).long()


def sample_blocks(denoise: sampling.Denoiser, noise: Noise, cfg: SamplerConfig, z, fixed, mask_id: int,
                  time_conditioned: bool, eos_id: int | None):
    """Decode ``z`` block by block (module docstring); returns the tokens."""
    sched = _Schedule(cfg, z, fixed, mask_id)
    pos, official = sched.pos, cfg.nfe_cache == "official"
    taken = torch.zeros_like(sched.step)  # steps taken in all blocks (for corrector_start)
    free = (~fixed).sum(-1).clamp_min(1)
    cache, cache_input = None, None
    while not bool(sched.done.all()):
        act = ~sched.done
        t_vec = ((z == mask_id).sum(-1) / free).to(torch.get_default_dtype())  # the row's mask rate
        if official or cache is None or time_conditioned:
            stale = act
        else:
            stale = act & (z != cache_input).any(-1)
        pred = denoise(z, t_vec, stale, "predictor", cache, inplace=True)
        logits, z_pred = pred, z
        _, end = sched.bounds()
        run = act & sampling.corrector_due(cfg, taken + 1, sched.step + 1)
        if bool(run.any()):
            after_prompt = (pos >= sched.prompt_end[:, None]) & run[:, None]
            region = after_prompt & (pos < end[:, None])
            guess = after_prompt & ~(region & (z != mask_id)) & ~fixed
            z, logits = sampling.corrector_loop(denoise, logits, z, t_vec, run, region & ~fixed, guess, mask_id, cfg, noise)
        in_block = sched.in_block()
        z = confidence_step(logits, z, mask_id, noise, cfg.temperature, in_block & act[:, None], sched.k(),
                            cfg.nucleus_p, cfg.float64, cfg.nucleus_rule, cfg.threshold)
        cache, cache_input = pred, z_pred
        sched.step += act.long()
        taken += act.long()
        finished = act & ~((z == mask_id) & in_block).any(-1)
        if not bool(finished.any()):
            continue
        if cfg.eos_stop:
            ends_eos = finished & (z.gather(1, (end - 1).clamp_min(0)[:, None]).squeeze(1) == eos_id)
            z = torch.where(ends_eos[:, None] & (z == mask_id), eos_id, z)
            sched.done |= ends_eos
            finished &= ~ends_eos
        sched.block += finished.long()
        start, _ = sched.bounds()
        sched.done |= finished & (start >= len(pos))
        sched.start(z, finished & ~sched.done)
    return z
