"""A second, deliberately plain implementation of the official samplers' control flow, for tests.

Written from the semantics of the paper (arXiv 2602.11590) and its public code (official ``_diffusion_sample`` with its logit
cache, ``_corrector_denoise``, ReMDM's ``_ddpm_caching_update`` and LLaDA's ``generate``): one sample
at a time, Python loops over positions, the official cache structure (the corrector loop always runs
S iterations and pays an NFE only when its input changed; the LLaDA path breaks at the fixed point and
calls the predictor every step). It shares only the random streams (``Noise``, drawn in the same
order) with the code under test, so equal tokens and NFE mean equal control flow.
"""

from __future__ import annotations

import math

import torch

from pipeline.diffusion.decoding import Noise


def probs_of(logits_row: torch.Tensor, p: float, rule: str = "official") -> torch.Tensor:
    """Nucleus probabilities of one position in vocabulary order (unnormalised kept mass): the
    tokens sorted by descending probability, ties by index; official keeps those whose cumulative
    mass is <= p (the first always), minimal those whose mass before them is < p."""
    probs = torch.softmax(logits_row.double(), -1)
    if p >= 1.0:
        return probs
    order = sorted(range(len(probs)), key=lambda i: (-float(probs[i]), i))
    kept, cum = torch.zeros_like(probs), 0.0
    for rank, i in enumerate(order):
        before, cum = cum, cum + float(probs[i])
        if (rank == 0 or cum <= p) if rule == "official" else before < p:
            kept[i] = probs[i]
    return kept


def draw(logits_row, u: float, p: float, rule: str = "official") -> int:
    """Inverse-CDF draw over the kept tokens in vocabulary order; never a token without mass."""
    probs = probs_of(logits_row, p, rule).tolist()
    target, cum = u * sum(probs), 0.0
    for i, q in enumerate(probs):
        cum += q
        if q > 0 and cum > target:
            return i
    return max(i for i, q in enumerate(probs) if q > 0)


def _f(model, tokens, mask_id):
    out = model(tokens[None], torch.ones(1), None)[0].clone().double()
    out[:, mask_id] = -math.inf
    return out


def schedule_sample(model, cfg, seq_len: int, mask_id: int, seed: int):
    """Ancestral or ReMDM (+ corrector) for one sample: (tokens, predictor NFE, corrector NFE)."""
    noise = Noise([seed], "cpu")
    z = torch.full((seq_len,), mask_id)
    S = cfg.corrector_steps
    cache, cache_from_corrector = None, False
    nfe_p = nfe_c = 0
    conf = torch.full((seq_len,), -math.inf, dtype=torch.bfloat16)
    grid = torch.linspace(1.0, 0.0, cfg.steps + 1, dtype=torch.float64).tolist()
    for i in range(cfg.steps):
        t, s = grid[i], grid[i + 1]
        if cache is None:
            logits, cache_from_corrector = _f(model, z, mask_id), False
            nfe_p += 1
        else:
            logits = cache
        if S > 0 and (i + 1) % cfg.corrector_every == 0 and i + 1 >= cfg.corrector_start:
            top = logits.argmax(-1)
            # predictor logits carry decoded tokens over (SUBS); cached corrector logits do not
            y = torch.tensor([int(top[l]) if (z[l] == mask_id or cache_from_corrector) else int(z[l])
                              for l in range(seq_len)])
            u = noise.uniform(S, seq_len)[0] if cfg.corrector_mode == "sample" else None
            c_cache = None
            for j in range(S):
                if c_cache is None:
                    c_logits = _f(model, y, mask_id)
                    nfe_c += 1
                else:
                    c_logits = c_cache
                y_new = _corrector_update(c_logits, y, cfg, None if u is None else u[j])
                c_cache = c_logits if torch.equal(y_new, y) else None
                y = y_new
            for l in range(seq_len):
                if z[l] != mask_id:
                    z[l] = y[l]
            logits, cache_from_corrector = c_logits, True
        z_new, conf = _step(cfg, logits, z, t, s, mask_id, noise, conf)
        cache = logits if torch.equal(z_new, z) else None
        z = z_new
    return z, nfe_p, nfe_c


def _corrector_update(c_logits, y, cfg, u):
    top = c_logits.argmax(-1)
    if cfg.corrector_mode == "argmax":
        return top.clone()
    if cfg.corrector_mode == "sample":
        return torch.tensor([draw(c_logits[l], float(u[l]), cfg.nucleus_p, cfg.nucleus_rule) for l in range(len(y))])
    scored = []
    for l in range(len(y)):
        if top[l] != y[l]:
            pr = probs_of(c_logits[l], cfg.nucleus_p, cfg.nucleus_rule)
            scored.append((-float(pr[top[l]] / pr.sum()), l))
    y = y.clone()
    for _, l in sorted(scored)[:cfg.corrector_top_k]:
        y[l] = top[l]
    return y


def _step(cfg, logits, z, t, s, mask_id, noise, conf):
    """One unmasking step, position by position."""
    u = noise.uniform(2, len(z))[0]
    p, rule, eta = cfg.nucleus_p, cfg.nucleus_rule, cfg.remdm_eta
    out, conf = z.clone(), conf.clone()
    alpha_t, alpha_s = 1.0 - t, 1.0 - s
    sigma_max = min(1.0, (1.0 - alpha_s) / alpha_t) if alpha_t > 0 else 1.0
    if cfg.name == "ancestral":
        sigma, p_unmask = [0.0] * len(z), (t - s) / t
    elif cfg.remdm_strategy == "loop":
        t_on, t_off, a_on = cfg.remdm_t_on, cfg.remdm_t_off, cfg.remdm_alpha_on
        if t > t_on or t <= t_off or s == 0:  # the last step unmasks everything
            if t > t_on and s > 0:
                mt, ms = 1 - (1 - t) * a_on / (1 - t_on), 1 - (1 - s) * a_on / (1 - t_on)
            else:
                mt, ms = t * (1 - a_on) / t_off, s * (1 - a_on) / t_off
            sigma, p_unmask = [0.0] * len(z), (mt - ms) / mt
        else:
            sigma, p_unmask = [eta] * len(z), eta * a_on / (1 - a_on)
    else:
        if cfg.remdm_strategy == "cap":
            sigma = [min(eta, sigma_max)] * len(z)
        elif cfg.remdm_strategy == "rescale":
            sigma = [eta * sigma_max] * len(z)
        else:
            finite = [float(c) for c in conf.double() if math.isfinite(float(c))]
            norm = sum(math.exp(c) for c in finite)
            sigma = [math.exp(float(c)) / norm * sigma_max if math.isfinite(float(c)) else 0.0 for c in conf.double()]
        p_unmask = None
    for l in range(len(z)):
        if z[l] == mask_id:
            pu = p_unmask if p_unmask is not None else (alpha_s - alpha_t) / (1 - alpha_t)
            if cfg.name == "remdm" and cfg.remdm_strategy in ("cap", "rescale"):
                pu = (alpha_s - (1 - sigma[l]) * alpha_t) / (1 - alpha_t)
            if float(u[0, l]) < pu:
                out[l] = draw(logits[l], float(u[1, l]), p, rule)
                if cfg.name == "remdm" and cfg.remdm_strategy == "conf":
                    pr = probs_of(logits[l], p, rule)
                    conf[l] = -float(pr[out[l]] / pr.sum())
        elif float(u[0, l]) < sigma[l]:
            out[l] = mask_id
            conf[l] = -math.inf
    return out, conf


def block_sample(model, prompt: torch.Tensor, gen_length: int, cfg, mask_id: int, eos_id: int | None = None):
    """LLaDA ``generate`` (greedy) for one sample: (tokens, predictor NFE, corrector NFE)."""
    P = len(prompt)
    x = torch.cat([prompt, torch.full((gen_length,), mask_id)])
    size = cfg.block_size if cfg.block_size > 0 else gen_length
    n_blocks = gen_length // size
    per_block = cfg.steps // n_blocks
    nfe_p = nfe_c = 0
    for b in range(n_blocks):
        bs, be = P + b * size, P + (b + 1) * size
        count = sum(int(x[l] == mask_id) for l in range(bs, be))
        ks = [count // per_block + (1 if j < count % per_block else 0) for j in range(per_block)]
        step = 0
        while True:
            logits = _f(model, x, mask_id)
            nfe_p += 1
            if cfg.corrector_steps > 0 and (step + 1) % cfg.corrector_every == 0:
                top = logits.argmax(-1)
                y = x.clone()
                for l in range(P, len(x)):
                    if not (l < be and x[l] != mask_id):
                        y[l] = top[l]
                for _ in range(cfg.corrector_steps):
                    nfe_c += 1
                    c_logits = _f(model, y, mask_id)
                    new = c_logits.argmax(-1)
                    if torch.equal(new[P:be], y[P:be]):
                        break
                    y[P:be] = new[P:be]
                logits[P:be] = c_logits[P:be]
                for l in range(P, be):
                    if x[l] != mask_id:
                        x[l] = new[l]
            cands = []
            for l in range(bs, be):
                if x[l] == mask_id:
                    tok = int(logits[l].argmax())
                    cands.append((float(torch.softmax(logits[l].double(), -1)[tok]), l, tok))
            cands.sort(key=lambda c: (-c[0], c[1]))
            if cfg.threshold > 0:
                chosen = [c for c in cands if c[0] >= cfg.threshold] or cands[:1]
            else:
                chosen = cands[:ks[step]]
            for _, l, tok in chosen:
                x[l] = tok
            step += 1
            if not any(int(x[l]) == mask_id for l in range(bs, be)):
                break
        if cfg.eos_stop and int(x[be - 1]) == eos_id:
            x[x == mask_id] = eos_id
            break
    return x, nfe_p, nfe_c
