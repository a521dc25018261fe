"""Batched samplers for masked diffusion models, with ProSeCo's corrector loop (Algorithms 2-3).

Three unmasking policies (one step each in :mod:`pipeline.diffusion.decoding`):

* ``ancestral``  MDLM posterior sampling over T steps of t = 1 -> 0 (official ``_diffusion_sample``).
* ``remdm``      ReMDM remasking (cap / rescale / conf / loop), the paper's training-free baseline.
* ``confidence`` LLaDA's semi-autoregressive blocks (official ``llada/generate.py``): blocks start at
  the end of the prompt (the leading run of fixed positions); per block, each step commits the k most
  confident masked positions of the block (or every one above ``threshold``, at least one) until the
  block has no mask; optional early stop once a block ends with EOS.

The ProSeCo corrector loop runs every ``omega`` steps (counted within the block for ``confidence``)
from step ``corrector_start`` on: y takes the argmax of the current logits where it is a guess and
keeps the committed tokens; then at most S passes y <- update(f(y)) on the update region, stopping at
the fixed point; the committed positions of the region take y; the corrector's logits drive the next
unmasking. Region: every non-fixed position (ancestral, remdm), or ``[prompt end, block end)`` with
later blocks frozen at their first argmax (confidence). Update (``corrector_mode``): ``argmax``;
``sample`` (a draw from the nucleus, official ``corrector_sampling=sample``); ``select_top_k`` (only
the ``corrector_top_k`` most confident positions whose argmax differs from y change per pass).

NFE (per sample: every row through the network is one NFE of that row, ``predictor`` or
``corrector``); ``nfe_cache`` says when a predictor call is free:

* ``official`` - as the official code counts: ancestral/remdm keep the logits used by the last
  unmasking step (the corrector's after a loop) while that step changed no token; the LLaDA path
  calls the predictor at every step. A corrector pass whose input did not change is free.
* ``exact`` - a row is recomputed whenever its tokens differ from the ones its cached predictor
  logits were computed on (never reuses corrector logits for the predictor).

Padding: with ``pad_id`` and ``loss_on_pad=False`` (the model never saw pads as targets or keys) the
sampler never emits a pad and hides pads of the prompt from attention; with ``loss_on_pad=True`` (the
official QM9 recipe) a pad is an ordinary token. Randomness is drawn per sample from its own seed, so a
sample does not depend on which other samples share its batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.config import SamplerConfig
from pipeline.diffusion.decoding import (  # noqa: F401  (re-exported: the sampler's public pieces)
    NUCLEUS_RULES,
    Noise,
    SplitLogits,
    ancestral_step,
    argmax_at,
    categorical,
    chosen_prob,
    confidence_step,
    draw_where,
    nucleus_log_probs,
    over_rows,
    remdm_step,
)
from pipeline.diffusion.objective import denoiser_logits
from pipeline.errors import ProsecoError

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
POLICIES = ("ancestral", "confidence", "remdm")
CORRECTOR_MODES = ("argmax", "sample", "select_top_k")
REMDM_STRATEGIES = ("cap", "rescale", "conf", "loop")
NFE_CACHE_RULES = ("official", "exact")


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B, L] long, no mask id left
    nfe_predictor: torch.Tensor  # [B] network evaluations spent unmasking
    nfe_corrector: torch.Tensor  # [B] network evaluations spent in corrector loops
    calls: int  # batched network calls actually made

    @property
    def nfe(self) -> torch.Tensor:
        return self.nfe_predictor + self.nfe_corrector

    def summary(self) -> dict[str, float]:
        return {
            "nfe": float(self.nfe.float().mean()),
            "nfe_predictor": float(self.nfe_predictor.float().mean()),
            "nfe_corrector": float(self.nfe_corrector.float().mean()),
            "calls": self.calls,
        }


class Denoiser:
    """Runs the network on the rows that need it and counts NFE per row.

    ``pad_id`` (a model trained without loss on pads): its logit is -inf too, and pads in the
    input are hidden from attention (``valid``), as in training."""

    def __init__(self, model_fn: ModelFn, mask_id: int, batch: int, device, pad_id: int | None = None):
        self.model_fn, self.mask_id, self.pad_id = model_fn, mask_id, pad_id
        self.nfe = {k: torch.zeros(batch, dtype=torch.long, device=device) for k in ("predictor", "corrector")}
        self.calls = 0

    def _run(self, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        valid = None
        if self.pad_id is not None:
            valid = tokens != self.pad_id
            valid = None if bool(valid.all()) else valid
        logits = denoiser_logits(self.model_fn(tokens, t, valid), self.mask_id, inplace=True)
        if self.pad_id is not None:
            logits[..., self.pad_id] = float("-inf")
        self.calls += 1
        return logits

    def __call__(self, tokens: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, kind: str,
                 previous: torch.Tensor | SplitLogits | None, inplace: bool = False) -> torch.Tensor | SplitLogits:
        """Logits (mask logit -inf) for ``rows``; other rows keep ``previous``. ``inplace``: the
        caller owns ``previous`` and no longer needs it, so the result may reuse its storage: on
        CPU a :class:`SplitLogits` over it and the new rows (no copy of the new rows), on a GPU
        ``previous`` with the new rows copied in (one kernel). Otherwise a new tensor."""
        if previous is None or bool(rows.all()):
            self.nfe[kind] += 1
            return self._run(tokens, t)
        if not bool(rows.any()):
            return previous
        idx = rows.nonzero().squeeze(1)
        fresh = self._run(tokens[idx], t[idx])
        self.nfe[kind][idx] += 1
        if inplace and fresh.device.type != "cpu":  # one copy kernel; a SplitLogits read adds launches and syncs
            previous[idx] = fresh
            return previous
        if inplace:
            base = previous.settle(~rows) if isinstance(previous, SplitLogits) else previous
            return SplitLogits(base, fresh, idx)
        if isinstance(previous, SplitLogits):
            return previous.merged().index_put_((idx,), fresh)  # merged() is already a new tensor
        return previous.index_put((idx,), fresh)


# ----------------------------------------------------------------------------- the corrector loop
def _corrector_update(logits, y, update, stale, cfg: SamplerConfig, u):
    """One corrector pass's new y from its logits: changes only ``update`` positions. Rows that are
    not ``stale`` (same logits as the pass before) are at their fixed point in the deterministic
    modes and are left alone, so only the update positions of changed rows pay the vocabulary-wide
    work."""
    p, f64, rule = cfg.nucleus_p, cfg.float64, cfg.nucleus_rule
    if cfg.corrector_mode == "sample":
        return draw_where(update, logits, u, y, p, f64, rule)
    where = stale[:, None] & update
    if not bool(where.any()):
        return y.clone()
    top = y.masked_scatter(where, argmax_at(logits, where))
    if cfg.corrector_mode == "argmax":
        return top
    differs = where & (top != y)  # select_top_k: among positions whose argmax differs, the k surest
    score = torch.full(y.shape, float("-inf"), dtype=torch.float64, device=y.device)
    if bool(differs.any()):
        score[differs] = chosen_prob(logits, differs, top, p, f64, rule).double()
    rank = score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)
    return torch.where(differs & (rank < cfg.corrector_top_k), top, y)


def corrector_loop(denoise: Denoiser, logits, z, t, rows, update, guess, mask_id, cfg: SamplerConfig,
                   noise: Noise):
    """Alg. 2, highlighted lines, for the sequences ``rows`` [B].

    y = argmax(logits) where ``guess`` [B, L], z elsewhere; then at most S passes
    y <- update(f(y)) on ``update`` [B, L], a row stopping at its fixed point (the pass that finds it
    is counted; a pass whose input is unchanged is free); the committed (non-mask) positions of
    ``update`` take y. Returns (z, the corrector's logits; ``logits`` for the other rows)."""
    y = z.masked_scatter(guess, argmax_at(logits, guess))
    u = noise.uniform(cfg.corrector_steps, z.shape[1]) if cfg.corrector_mode == "sample" else None
    stale, out = rows.clone(), logits
    for j in range(cfg.corrector_steps):
        out = denoise(y, t, stale, "corrector", out, inplace=out is not logits)
        y_new = _corrector_update(out, y, update, stale, cfg, None if u is None else u[:, j])
        stale = rows & (y_new != y).any(-1)
        y = y_new
        if cfg.corrector_mode != "sample" and not bool(stale.any()):
            break
    return torch.where(update & (z != mask_id), y, z), out


def sample_seeds(seed: int, start: int, n: int) -> list[int]:
    """Per-sample seeds for samples ``start .. start + n - 1`` of a run seeded with ``seed``, so a
    sample's randomness depends on its index, not on how the run was cut into batches."""
    return [seed * 1_000_003 + start + i for i in range(n)]


@torch.no_grad()
def sample(model_fn: ModelFn, cfg: SamplerConfig, *, seq_len: int, mask_id: int, batch: int | None = None,
           prompt: torch.Tensor | None = None, fixed: torch.Tensor | None = None,
           seeds: list[int] | None = None, time_conditioned: bool = False, max_seq_len: int | None = None,
           device=None, pad_id: int | None = None, loss_on_pad: bool = True,
           eos_id: int | None = None) -> SampleOutput:
    """Generate ``batch`` sequences (or infill ``prompt`` where ``fixed`` is False).

    ``seeds``: one seed per sample (default ``sample_seeds(cfg.seed, 0, batch)``); a sample depends only on
    its seed, the model and ``cfg``. ``time_conditioned``: the model reads t, so logits are never
    reused across steps. ``pad_id`` / ``loss_on_pad``: the model's padding rule (its
    ``diffusion.loss_on_pad``). ``eos_id``: needed by ``cfg.eos_stop``.
    """
    check_sampler(cfg, seq_len, max_seq_len)
    if cfg.eos_stop and eos_id is None:
        raise ProsecoError("sampler.eos_stop needs the tokenizer's EOS id; this task has none")
    if prompt is None:
        if batch is None:
            raise ProsecoError("sample(): give batch or prompt")
        prompt = torch.full((batch, seq_len), mask_id, dtype=torch.long, device=device)
        fixed = torch.zeros_like(prompt, dtype=torch.bool)
    if fixed is None:
        fixed = prompt != mask_id
    batch, device = prompt.shape[0], prompt.device
    seeds = seeds if seeds is not None else sample_seeds(cfg.seed, 0, batch)
    noise = Noise(seeds, device)
    denoise = Denoiser(model_fn, mask_id, batch, device, None if loss_on_pad else pad_id)
    z = torch.where(fixed, prompt, torch.full_like(prompt, mask_id))
    if cfg.name == "confidence":
        from pipeline.diffusion.blocks import sample_blocks

        z = sample_blocks(denoise, noise, cfg, z, fixed, mask_id, time_conditioned, eos_id)
    else:
        z = _sample_schedule(denoise, noise, cfg, z, fixed, mask_id, time_conditioned)
    assert not bool((z == mask_id).any()), "sampler left masked positions"
    return SampleOutput(z, denoise.nfe["predictor"], denoise.nfe["corrector"], denoise.calls)


def corrector_due(cfg: SamplerConfig, k: int | torch.Tensor, step: int | torch.Tensor):
    """Whether a corrector loop runs after the predictor of unmasking step ``step`` (1-based, counted
    within the block for ``confidence``), ``k`` being the global 1-based step."""
    return (cfg.corrector_steps > 0) & (step % cfg.corrector_every == 0) & (k >= cfg.corrector_start)


def _sample_schedule(denoise, noise, cfg: SamplerConfig, z, fixed, mask_id, time_conditioned):
    """Ancestral / ReMDM: T steps of t = 1 -> 0 (the last one, s = 0, unmasks every position)."""
    batch, device = z.shape[0], z.device
    official = cfg.nfe_cache == "official"
    ts = torch.linspace(1.0, 0.0, cfg.steps + 1, dtype=torch.float64).tolist()
    every = torch.ones(batch, dtype=torch.bool, device=device)
    cache, cache_input = None, None  # logits kept across steps, and (exact) the tokens they were computed on
    fresh_ok = torch.zeros(batch, dtype=torch.bool, device=device)  # official: the row's cache is usable
    from_corrector = torch.zeros(batch, dtype=torch.bool, device=device)  # official: cache holds f(y)
    conf = torch.full(z.shape, float("-inf"), dtype=torch.bfloat16, device=device)
    loop = (cfg.remdm_t_on, cfg.remdm_t_off, cfg.remdm_alpha_on)
    p, f64, rule = cfg.nucleus_p, cfg.float64, cfg.nucleus_rule
    for i in range(cfg.steps):
        t, s = ts[i], ts[i + 1]
        t_vec = torch.full((batch,), t, device=device)
        if cache is None or time_conditioned:
            stale = every
        else:
            stale = ~fresh_ok if official else (z != cache_input).any(-1)
        pred = denoise(z, t_vec, stale, "predictor", cache, inplace=True)
        from_corrector &= ~stale
        logits, z_pred = pred, z
        if corrector_due(cfg, i + 1, i + 1):
            update = ~fixed
            guess = ((z == mask_id) | from_corrector[:, None]) & update
            z, logits = corrector_loop(denoise, logits, z, t_vec, every, update, guess, mask_id, cfg, noise)
            from_corrector[:] = official  # exact: the cache keeps the predictor's logits
        if cfg.name == "ancestral":
            z_next = ancestral_step(logits, z, t, s, mask_id, noise, p, f64, rule)
        else:
            z_next, conf = remdm_step(logits, z, t, s, mask_id, noise, fixed, cfg.remdm_strategy, cfg.remdm_eta,
                                      p, f64, rule, conf, loop)
        if official:
            cache, fresh_ok = logits, (z_next == z).all(-1)
        else:
            cache, cache_input = pred, z_pred
        z = z_next
    return z


def check_sampler(cfg: SamplerConfig, seq_len: int, max_seq_len: int | None) -> None:
    """User errors a model cannot run, raised before any work."""
    choices = {"": ("name", POLICIES), "corrector_mode": ("corrector_mode", CORRECTOR_MODES),
               "remdm_strategy": ("remdm_strategy", REMDM_STRATEGIES), "nfe_cache": ("nfe_cache", NFE_CACHE_RULES),
               "nucleus_rule": ("nucleus_rule", NUCLEUS_RULES)}
    for key, allowed in choices.values():
        if getattr(cfg, key) not in allowed:
            what = "sampler" if key == "name" else f"sampler.{key}"
            raise ProsecoError(f"unknown {what} {getattr(cfg, key)!r}; choose one of {', '.join(allowed)}")
    if cfg.steps < 1:
        raise ProsecoError(f"sampler.steps must be >= 1, got {cfg.steps}")
    if cfg.corrector_steps < 0:
        raise ProsecoError(f"sampler.corrector_steps (S) must be >= 0, got {cfg.corrector_steps}")
    if cfg.corrector_every < 1:
        raise ProsecoError(f"sampler.corrector_every (omega) must be >= 1, got {cfg.corrector_every}")
    if cfg.corrector_mode == "select_top_k" and cfg.corrector_top_k < 1:
        raise ProsecoError(f"sampler.corrector_top_k must be >= 1 with select_top_k, got {cfg.corrector_top_k}")
    if cfg.name == "confidence" and cfg.corrector_mode != "argmax":
        raise ProsecoError("the confidence sampler's corrector is argmax only (as LLaDA's); "
                           f"got sampler.corrector_mode={cfg.corrector_mode}")
    if not 0.0 <= cfg.threshold < 1.0:
        raise ProsecoError(f"sampler.threshold must be in [0, 1) (0 = top-k schedule), got {cfg.threshold}")
    if cfg.name == "remdm" and cfg.remdm_strategy == "loop" and not (
            0.0 < cfg.remdm_t_off < cfg.remdm_t_on < 1.0 and 0.0 < cfg.remdm_alpha_on < 1.0):
        raise ProsecoError("ReMDM loop needs 0 < remdm_t_off < remdm_t_on < 1 and 0 < remdm_alpha_on < 1")
    if max_seq_len is not None and seq_len > max_seq_len:
        raise ProsecoError(f"sequence length {seq_len} is longer than the model's max_seq_len {max_seq_len}")
