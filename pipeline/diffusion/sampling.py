"""Batched samplers for masked diffusion models, with ProSeCo's corrector loop (Algorithms 2-3).

One loop, three unmasking policies:

* ``ancestral``  MDLM posterior sampling: a masked position unmasks with probability
  (t - s) / t to a token drawn from x_theta (nucleus ``p``, float64 Gumbel-max); decoded tokens
  are carried over.
* ``confidence`` LLaDA low-confidence unmasking: per step, the k masked positions whose
  predicted token is most probable are committed; optional semi-autoregressive blocks.
* ``remdm``      ReMDM remasking baseline (cap / rescale): decoded tokens are re-masked with
  probability sigma_t and re-predicted later. Training-free; the paper's main baseline.

The ProSeCo corrector loop (Alg. 2, the highlighted lines) runs every ``omega`` unmasking steps
from ``corrector_start`` on: y <- argmax at every position; then at most ``S`` times
y <- argmax x_theta(y), stopping at the argmax fixed point; the already-decoded positions of z
take y (masked positions stay masked; prompt/clue positions never change); the corrector's
logits drive the next unmasking step.

NFE accounting is exact and per sample: every row passed through the network counts one NFE
for that row, as ``predictor`` or ``corrector``. A row whose input has not changed since its
logits were computed is not recomputed and costs nothing (MDLM's cached sampler; the fixed-point
exit of the corrector). Randomness is drawn per sample from its own seed, so a sample does not
depend on which other samples share its batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.config import SamplerConfig
from pipeline.diffusion.objective import denoiser_logits
from pipeline.errors import ProsecoError

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
POLICIES = ("ancestral", "confidence", "remdm")


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
    """Runs the network on the rows that need it and counts NFE per row."""

    def __init__(self, model_fn: ModelFn, mask_id: int, batch: int, device):
        self.model_fn, self.mask_id = model_fn, mask_id
        self.nfe = {k: torch.zeros(batch, dtype=torch.long, device=device) for k in ("predictor", "corrector")}
        self.calls = 0

    def __call__(self, tokens: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, kind: str,
                 previous: torch.Tensor | None) -> torch.Tensor:
        """Logits (mask logit -inf) for ``rows``; other rows keep ``previous``."""
        if previous is None or bool(rows.all()):
            self.calls += 1
            self.nfe[kind] += 1
            return denoiser_logits(self.model_fn(tokens, t, None), self.mask_id, inplace=True)
        if not bool(rows.any()):
            return previous
        idx = rows.nonzero().squeeze(1)
        fresh = denoiser_logits(self.model_fn(tokens[idx], t[idx], None), self.mask_id, inplace=True)
        self.calls += 1
        self.nfe[kind][idx] += 1
        return previous.index_put((idx,), fresh)


class Noise:
    """Per-sample random streams: row b draws from its own generator seeded with seeds[b].

    Every row draws the same amount at every step whatever its state, so a sample's stream,
    and hence the sample, does not depend on the rest of the batch."""

    def __init__(self, seeds: list[int], device):
        self.gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.device = device

    def uniform(self, *shape: int) -> torch.Tensor:
        """float64 U[0, 1) of shape [B, *shape]."""
        return torch.stack([torch.rand(shape, generator=g, dtype=torch.float64, device=self.device)
                            for g in self.gens])


def nucleus_log_probs(logits: torch.Tensor, p: float, float64: bool = True) -> torch.Tensor:
    """Log-probabilities restricted to the smallest set of tokens with mass >= p, renormalised."""
    logp = torch.log_softmax(logits.double() if float64 else logits.float(), dim=-1)
    if p >= 1.0:
        return logp
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
    sorted_logp = sorted_logp.masked_fill(mass_before >= p, float("-inf"))
    return torch.log_softmax(torch.empty_like(logp).scatter_(-1, order, sorted_logp), dim=-1)


def categorical(logits: torch.Tensor, u: torch.Tensor, p: float = 1.0, float64: bool = True) -> torch.Tensor:
    """One draw per row of ``logits`` [N, V] (nucleus ``p``) by inverting the CDF at ``u`` [N].

    Exact categorical sampling; computed in float64 by default, since lower precision lowers
    the effective temperature (Zheng et al. 2024, the fix ReMDM made to MDLM's sampler). With a
    nucleus the CDF is built in sorted order, so no scatter back and no second softmax."""
    probs = torch.softmax(logits.double() if float64 else logits.float(), dim=-1)
    order = None
    if p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        probs = probs * ((probs.cumsum(-1) - probs) < p)  # the smallest top set with mass >= p
    cdf = probs.cumsum(-1)
    target = (u.to(cdf.dtype) * cdf[:, -1:]).contiguous()
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=logits.shape[-1] - 1)  # never a p=0 token
    return (idx if order is None else order.gather(-1, idx)).squeeze(-1)


def _draw_where(where: torch.Tensor, logits: torch.Tensor, u: torch.Tensor, z: torch.Tensor,
                p: float, float64: bool) -> torch.Tensor:
    """z with a token drawn from ``logits`` at the positions ``where`` (only those are computed)."""
    if not bool(where.any()):
        return z
    drawn = categorical(logits[where], u[where][:, None], p, float64)
    return z.masked_scatter(where, drawn)


# ----------------------------------------------------------------------------- unmasking policies
def ancestral_step(logits, z, t: float, s: float, mask_id: int, noise: Noise, p: float = 1.0,
                   float64: bool = True):
    """MDLM posterior q(z_s | z_t, x_theta): a masked position unmasks w.p. (t - s) / t to a
    token v ~ x_theta (so token v w.p. x_theta(v)(t - s)/t, stay masked w.p. s/t); decoded
    tokens are carried over. Tokens are drawn only where a position unmasks."""
    u = noise.uniform(2, z.shape[1])
    unmask = (z == mask_id) & (u[:, 0] < (t - s) / t)
    return _draw_where(unmask, logits, u[:, 1], z, p, float64)


def remdm_step(logits, z, t: float, s: float, mask_id: int, noise: Noise, fixed, strategy: str, eta: float,
               p: float = 1.0, float64: bool = True):
    """ReMDM posterior (Wang et al. 2025) with alpha = 1 - t: decoded tokens re-mask w.p. sigma_t,
    masked ones unmask w.p. (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t)."""
    alpha_t, alpha_s = 1.0 - t, 1.0 - s
    sigma_max = min(1.0, (1.0 - alpha_s) / alpha_t) if alpha_t > 0 else 1.0
    sigma = min(eta, sigma_max) if strategy == "cap" else eta * sigma_max
    p_unmask = (alpha_s - (1.0 - sigma) * alpha_t) / (1.0 - alpha_t)
    u = noise.uniform(2, z.shape[1])
    masked = z == mask_id
    remask = ~masked & ~fixed & (u[:, 0] < sigma)
    z = _draw_where(masked & (u[:, 0] < p_unmask), logits, u[:, 1], z, p, float64)
    return z.masked_fill(remask, mask_id)


def confidence_step(logits, z, mask_id: int, noise: Noise, temperature: float, candidates, k,
                    p: float = 1.0, float64: bool = True):
    """LLaDA low-confidence unmasking: commit the k[b] most confident masked ``candidates``.

    The token is the argmax (temperature 0) or a draw from softmax(logits / temperature); its
    confidence is its probability under softmax(logits), as in LLaDA's ``low_confidence``."""
    u = noise.uniform(z.shape[1])
    open_ = candidates & (z == mask_id)
    rows = logits[open_]  # only masked candidates are scored: [n, V]
    if temperature == 0:
        token = rows.argmax(-1)
    else:
        token = categorical(rows / temperature, u[open_][:, None], p, float64)
    # log p(token) = logit - logsumexp: a ranking needs no float64 softmax over the vocabulary
    score = rows.gather(-1, token[:, None]).squeeze(-1) - torch.logsumexp(rows, dim=-1)
    confidence = torch.full(z.shape, float("-inf"), dtype=score.dtype, device=z.device).masked_scatter(open_, score)
    token = z.masked_scatter(open_, token)
    rank = confidence.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)
    commit = (rank < k[:, None]) & open_
    return torch.where(commit, token, z)


# ----------------------------------------------------------------------------- the loop
def corrector_loop(denoise: Denoiser, logits, z, t, fixed, mask_id, max_passes: int):
    """Alg. 2, highlighted lines: y <- argmax; repeat y <- argmax f(y) until fixed point or S passes."""
    y = torch.where(z == mask_id, logits.argmax(-1), z)  # decoded positions start as themselves
    active = torch.ones(len(z), dtype=torch.bool, device=z.device)
    for _ in range(max_passes):
        logits = denoise(y, t, active, "corrector", logits)
        y_new = torch.where(fixed, z, logits.argmax(-1))
        active = active & (y_new != y).any(-1)  # a row at its fixed point stops (its check pass counted)
        y = y_new
        if not bool(active.any()):
            break
    z = torch.where((z != mask_id) & ~fixed, y, z)  # overwrite already-decoded positions only
    return z, logits


def sample_seeds(seed: int, start: int, n: int) -> list[int]:
    """Per-sample seeds for samples ``start .. start + n - 1`` of a run seeded with ``seed``, so a
    sample's randomness depends on its index, not on how the run was cut into batches."""
    return [seed * 1_000_003 + start + i for i in range(n)]


@torch.no_grad()
def sample(model_fn: ModelFn, cfg: SamplerConfig, *, seq_len: int, mask_id: int, batch: int | None = None,
           prompt: torch.Tensor | None = None, fixed: torch.Tensor | None = None,
           seeds: list[int] | None = None, time_conditioned: bool = False, max_seq_len: int | None = None,
           device=None) -> SampleOutput:
    """Generate ``batch`` sequences (or infill ``prompt`` where ``fixed`` is False).

    ``seeds``: one seed per sample (default ``sample_seeds(cfg.seed, 0, batch)``); a sample depends only on
    its seed, the model and ``cfg``. ``time_conditioned``: the model reads t, so logits are never
    reused across steps.
    """
    check_sampler(cfg, seq_len, max_seq_len)
    if prompt is None:
        if batch is None:
            raise ProsecoError("sample(): give batch or prompt")
        prompt = torch.full((batch, seq_len), mask_id, dtype=torch.long, device=device)
        fixed = torch.zeros_like(prompt, dtype=torch.bool)
    if fixed is None:
        fixed = prompt != mask_id
    batch, device = prompt.shape[0], prompt.device
    seeds = seeds if seeds is not None else sample_seeds(cfg.seed, 0, batch)
    noise, denoise = Noise(seeds, device), Denoiser(model_fn, mask_id, batch, device)

    z = torch.where(fixed, prompt, torch.full_like(prompt, mask_id))
    steps = cfg.steps
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    blocks = _blocks(cfg, seq_len, steps, device)
    pred, pred_input = None, None  # the predictor's logits and the z they were computed on
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        t_vec = torch.full((batch,), t, device=device)
        stale = torch.ones(batch, dtype=torch.bool, device=device) if (pred is None or time_conditioned) \
            else (z != pred_input).any(-1)
        pred, pred_input = denoise(z, t_vec, stale, "predictor", pred), z
        logits, k = pred, i + 1
        if cfg.corrector_steps > 0 and k % cfg.corrector_every == 0 and k >= cfg.corrector_start:
            z, logits = corrector_loop(denoise, logits, z, t_vec, fixed, mask_id, cfg.corrector_steps)
        p, f64 = cfg.nucleus_p, cfg.float64
        if cfg.name == "ancestral":
            z = ancestral_step(logits, z, t, s, mask_id, noise, p, f64)
        elif cfg.name == "remdm":
            z = remdm_step(logits, z, t, s, mask_id, noise, fixed, cfg.remdm_strategy, cfg.remdm_eta, p, f64)
        else:
            z = confidence_step(logits, z, mask_id, noise, cfg.temperature, *blocks.step(i, z, mask_id), p, f64)
    assert not bool((z == mask_id).any()), "sampler left masked positions"  # guaranteed by s = 0 at the end
    return SampleOutput(z, denoise.nfe["predictor"], denoise.nfe["corrector"], denoise.calls)


class _blocks:
    """Semi-autoregressive schedule for the confidence sampler (LLaDA ``get_num_transfer_tokens``)."""

    def __init__(self, cfg: SamplerConfig, seq_len: int, steps: int, device):
        size = cfg.block_size if cfg.name == "confidence" and cfg.block_size > 0 else seq_len
        self.n_blocks = -(-seq_len // size)
        self.size, self.per_block, self.device = size, max(steps // self.n_blocks, 1), device
        self.seq_len = seq_len

    def step(self, i: int, z: torch.Tensor, mask_id: int):
        block, j = divmod(i, self.per_block)
        pos = torch.arange(self.seq_len, device=self.device)
        candidates = ((pos >= block * self.size) & (pos < (block + 1) * self.size))[None].expand_as(z)
        if j == 0:
            self.start_masked = ((z == mask_id) & candidates).sum(-1)
        base, rest = self.start_masked // self.per_block, self.start_masked % self.per_block
        k = base + (j < rest).long()
        if j == self.per_block - 1:  # the block's last step commits whatever is still masked in it
            k = torch.full_like(k, self.seq_len)
        return candidates, k


def check_sampler(cfg: SamplerConfig, seq_len: int, max_seq_len: int | None) -> None:
    """User errors a model cannot run, raised before any work."""
    if cfg.name not in POLICIES:
        raise ProsecoError(f"unknown sampler {cfg.name!r}; choose one of {', '.join(POLICIES)}")
    if cfg.steps < 1:
        raise ProsecoError(f"sampler.steps must be >= 1, got {cfg.steps}")
    if cfg.corrector_steps < 0:
        raise ProsecoError(f"sampler.corrector_steps (S) must be >= 0, got {cfg.corrector_steps}")
    if cfg.corrector_every < 1:
        raise ProsecoError(f"sampler.corrector_every (omega) must be >= 1, got {cfg.corrector_every}")
    if max_seq_len is not None and seq_len > max_seq_len:
        raise ProsecoError(f"sequence length {seq_len} is longer than the model's max_seq_len {max_seq_len}")
    if cfg.name == "confidence" and cfg.block_size > 0:
        n_blocks = -(-seq_len // cfg.block_size)
        if cfg.steps % n_blocks:
            raise ProsecoError(f"sampler.steps ({cfg.steps}) must be a multiple of the number of blocks "
                               f"({n_blocks} = ceil({seq_len} / sampler.block_size {cfg.block_size}))")
