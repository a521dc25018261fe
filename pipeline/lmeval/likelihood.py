"""The Monte Carlo masked-diffusion bound on log p(continuation | context), as LLaDA evaluates it.

LLaDA (Nie et al. 2025, Eq. 6 and its ``eval_llada.py``) scores a continuation x of n tokens after a
context c by the lower bound

    log p(x | c)  >=  E_l E_M [ (n / l) * sum_{i in M} log p_theta(x_i | c, x with M masked) ],

l uniform on {1, ..., n}, M a uniformly random set of l continuation positions; the context is never
masked. The estimate averages ``samples`` draws of (l, M). The draws of l are stratified over the
samples (one uniform offset u, then l_j = floor(((u + j / samples) mod 1) * n) + 1), which lowers the
variance as LLaDA's stratified ``_forward_process`` does; unlike LLaDA's, the strata span all of a
request's samples, not one batch, so the estimate does not depend on the batch size.

A factorised model (logits that do not depend on the input) makes every term exact in
expectation: E[(n / l) * sum_{i in M} log p(x_i)] = sum_i log p(x_i).
"""

from __future__ import annotations

import torch


def mc_masks(n: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """[samples, n] bool: which continuation positions each Monte Carlo sample masks (at least one).

    Sample j masks l_j = floor(((u + j / samples) mod 1) * n) + 1 positions, u ~ U[0, 1) drawn once,
    chosen by a uniform random permutation per sample; all randomness comes from ``generator``."""
    u = torch.rand((), generator=generator, dtype=torch.float64)
    frac = (u + torch.arange(samples, dtype=torch.float64) / samples) % 1.0
    counts = (frac * n).floor().long().clamp(0, n - 1) + 1
    order = torch.stack([torch.randperm(n, generator=generator) for _ in range(samples)]) if samples else \
        torch.zeros((0, n), dtype=torch.long)
    return order < counts[:, None]


def masked_rows(context: list[int], continuation: list[int], masks: torch.Tensor, mask_id: int) -> torch.Tensor:
    """[samples, len(context) + n] long: context, then the continuation with ``masks`` set to ``mask_id``."""
    cont = torch.tensor(continuation, dtype=torch.long).expand(masks.shape[0], -1)
    noisy = torch.where(masks, torch.full_like(cont, mask_id), cont)
    ctx = torch.tensor(context, dtype=torch.long).expand(masks.shape[0], -1)
    return torch.cat([ctx, noisy], dim=1)


def row_terms(log_probs: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, starts: torch.Tensor,
              mask_id: int) -> torch.Tensor:
    """One Monte Carlo term per row: (n / l) * sum over the row's masked positions of log p(target).

    ``log_probs`` [R, L, V] (log-softmax of the denoiser), ``rows`` [R, L] the noisy inputs,
    ``targets`` [R, L] the clean tokens, ``starts`` [R] where each row's continuation begins
    (n = L - start; l = the masked positions after it). float64 [R]."""
    pos = torch.arange(rows.shape[1], device=rows.device)
    masked = (rows == mask_id) & (pos[None, :] >= starts[:, None])
    picked = log_probs.gather(-1, targets[..., None]).squeeze(-1).double()
    total = torch.where(masked, picked, torch.zeros_like(picked)).sum(-1)
    n = (rows.shape[1] - starts).double()
    return total * n / masked.sum(-1).double()
