"""The samplers against a plain re-implementation of the official control flow (tests/official_reference.py):
identical tokens and identical NFE, per sample, on random tiny networks, with nfe_cache=official."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.config import SamplerConfig
from pipeline.diffusion.sampling import sample
from tests import official_reference as ref

MASK, V, L = 7, 8, 12


def random_net(seed: int, scale: float = 3.0):
    """A deterministic float64 network whose every position reads every other (mixing over positions)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(V, 16, generator=g, dtype=torch.float64)
    mix = torch.randn(L, L, generator=g, dtype=torch.float64) / L ** 0.5
    pos = torch.randn(L, 16, generator=g, dtype=torch.float64)
    out = torch.randn(16, V, generator=g, dtype=torch.float64) * scale / 4

    def fn(tokens, t, valid):
        n = tokens.shape[1]
        h = torch.tanh(emb[tokens] + pos[:n])
        h = torch.tanh(torch.einsum("ij,bjd->bid", mix[:n, :n], h) + h)
        return h @ out
    return fn


def ours(fn, cfg, seeds, **kw):
    out = sample(fn, cfg, seq_len=kw.pop("seq_len", L), mask_id=MASK, seeds=seeds, **kw)
    return out.tokens, out.nfe_predictor.tolist(), out.nfe_corrector.tolist()


SCHEDULES = [
    {"name": "ancestral", "steps": 8, "corrector_steps": 3, "corrector_every": 1},
    {"name": "ancestral", "steps": 10, "corrector_steps": 4, "corrector_every": 2, "corrector_start": 4},
    {"name": "ancestral", "steps": 6, "corrector_steps": 2, "corrector_every": 3, "nucleus_p": 0.8},
    {"name": "ancestral", "steps": 8, "corrector_steps": 3, "nucleus_p": 0.7, "nucleus_rule": "minimal"},
    {"name": "ancestral", "steps": 8, "corrector_steps": 3, "corrector_mode": "select_top_k", "corrector_top_k": 2, "nucleus_p": 0.9},
    {"name": "ancestral", "steps": 8, "corrector_steps": 3, "corrector_mode": "sample", "nucleus_p": 0.9},
    {"name": "ancestral", "steps": 16, "corrector_steps": 0},
    {"name": "remdm", "steps": 10, "remdm_strategy": "cap", "remdm_eta": 0.3},
    {"name": "remdm", "steps": 10, "remdm_strategy": "rescale", "remdm_eta": 0.7},
    {"name": "remdm", "steps": 10, "remdm_strategy": "conf", "nucleus_p": 0.9},
    {"name": "remdm", "steps": 12, "remdm_strategy": "loop", "remdm_eta": 0.2, "remdm_t_on": 0.6, "remdm_t_off": 0.2,
         "remdm_alpha_on": 0.7},
    {"name": "remdm", "steps": 8, "remdm_strategy": "cap", "remdm_eta": 0.4, "corrector_steps": 2, "corrector_every": 2},
]


@pytest.mark.parametrize("settings", SCHEDULES, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_schedule_samplers_match_the_official_control_flow(settings):
    cfg = SamplerConfig(**settings)
    seeds = [11, 12, 13, 14]
    for net in range(3):
        fn = random_net(net)
        tokens, nfe_p, nfe_c = ours(fn, cfg, seeds, batch=len(seeds))
        for b, seed in enumerate(seeds):
            r_tokens, r_p, r_c = ref.schedule_sample(fn, cfg, L, MASK, seed)
            assert tokens[b].tolist() == r_tokens.tolist(), (net, seed)
            assert (nfe_p[b], nfe_c[b]) == (r_p, r_c), (net, seed)


BLOCKS = [  # (prompt length, settings); gen length L - prompt
    (4, {"steps": 4, "block_size": 4, "corrector_steps": 3, "corrector_every": 1}),
    (4, {"steps": 8, "block_size": 4, "corrector_steps": 4, "corrector_every": 2}),
    (2, {"steps": 10, "block_size": 5, "corrector_steps": 2, "corrector_every": 3}),  # blocks end before their steps
    (0, {"steps": 6, "block_size": 4, "corrector_steps": 3, "corrector_every": 1}),
    (4, {"steps": 4, "block_size": 4, "corrector_steps": 2, "threshold": 0.5}),
    (3, {"steps": 3, "block_size": 3, "corrector_steps": 0, "threshold": 0.3}),
    (4, {"steps": 8, "block_size": 2, "corrector_steps": 2, "corrector_every": 1, "eos_stop": True}),
]


@pytest.mark.parametrize("prompt_len, settings", BLOCKS, ids=lambda x: str(x))
def test_prompted_blocks_match_llada_generate(prompt_len, settings):
    cfg = SamplerConfig(name="confidence", temperature=0.0, **settings)
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.full((5, L), MASK)
    prompt[:, :prompt_len] = torch.randint(0, MASK, (5, prompt_len), generator=g)
    fixed = torch.zeros(5, L, dtype=torch.bool)
    fixed[:, :prompt_len] = True
    eos = 3 if cfg.eos_stop else None
    stopped = 0
    for net in range(4):
        fn = random_net(100 + net)
        tokens, nfe_p, nfe_c = ours(fn, cfg, list(range(5)), prompt=prompt, fixed=fixed, eos_id=eos)
        for b in range(5):
            r_tokens, r_p, r_c = ref.block_sample(fn, prompt[b, :prompt_len], L - prompt_len, cfg, MASK, eos)
            assert tokens[b].tolist() == r_tokens.tolist(), (net, b)
            assert (nfe_p[b], nfe_c[b]) == (r_p, r_c), (net, b)
            stopped += int(cfg.eos_stop and r_p < cfg.steps)
    assert not cfg.eos_stop or stopped > 0  # the early stop was exercised


def test_prompted_blocks_commit_per_block_from_the_prompt_end():
    """The issue's case: 4-token prompt, blocks of 4, T=6 over 8 generated tokens: 2 per step, none in the prompt."""
    cfg = SamplerConfig(name="confidence", temperature=0.0, steps=4, block_size=4, corrector_steps=2)
    fn = random_net(5)
    prompt = torch.full((1, L), MASK)
    prompt[0, :4] = torch.tensor([1, 2, 3, 4])
    fixed = torch.zeros(1, L, dtype=torch.bool)
    fixed[0, :4] = True
    seen = []

    def spy(tokens, t, valid):
        seen.append(tokens.clone())
        return fn(tokens, t, valid)
    sample(spy, cfg, seq_len=L, mask_id=MASK, prompt=prompt, fixed=fixed, seeds=[0])
    predictor_inputs = [x for x in seen if bool((x == MASK).any())] + [None]
    masks = [int((x == MASK).sum()) for x in predictor_inputs[:-1]]
    assert masks == [8, 6, 4, 2]  # blocks [4, 8) and [8, 12), two steps each, two tokens per step


@pytest.mark.parametrize("settings", [{"steps": 32, "corrector_steps": 2}, {"steps": 32, "corrector_steps": 4}])
def test_official_nfe_rule_reuses_corrector_logits(settings):
    """official <= exact on every sample, and strictly fewer in total (the cached corrector logits)."""
    fn = random_net(9)
    seeds = list(range(12))
    official = sample(fn, SamplerConfig(**settings), seq_len=L, mask_id=MASK, batch=12, seeds=seeds)
    exact = sample(fn, SamplerConfig(nfe_cache="exact", **settings), seq_len=L, mask_id=MASK, batch=12, seeds=seeds)
    assert bool((official.nfe_predictor <= exact.nfe_predictor).all())
    assert int(official.nfe.sum()) < int(exact.nfe.sum())


def test_remdm_conf_and_loop_differ_from_cap():
    fn, seeds = random_net(3), list(range(8))
    base = SamplerConfig(name="remdm", steps=12, remdm_eta=0.3)
    runs = {s: ours(fn, dataclasses.replace(base, remdm_strategy=s), seeds, batch=8)[0]
            for s in ("cap", "conf", "loop")}
    assert not torch.equal(runs["cap"], runs["conf"]) and not torch.equal(runs["cap"], runs["loop"])


def test_pads_follow_the_models_training_rule():
    """loss_on_pad=False: the model never saw a pad as a target, so none is sampled and prompt pads are
    hidden from attention; loss_on_pad=True (official QM9): a pad is an ordinary token."""
    pad = 2
    fn = random_net(4, scale=0.0)  # uniform logits: every token, pad included, equally likely
    seen_valid = []

    def spy(tokens, t, valid):
        seen_valid.append(valid)
        return fn(tokens, t, valid)
    cfg = SamplerConfig(name="ancestral", steps=4)
    prompt = torch.full((6, L), MASK)
    prompt[:, -1] = pad
    fixed = prompt != MASK
    hidden = sample(spy, cfg, seq_len=L, mask_id=MASK, prompt=prompt, fixed=fixed, pad_id=pad, loss_on_pad=False)
    assert not bool((hidden.tokens[:, :-1] == pad).any())
    assert all(v is not None and not bool(v[:, -1].any()) for v in seen_valid)
    seen_valid.clear()
    open_ = sample(spy, cfg, seq_len=L, mask_id=MASK, prompt=prompt, fixed=fixed, pad_id=pad, loss_on_pad=True)
    assert bool((open_.tokens[:, :-1] == pad).any()) and all(v is None for v in seen_valid)
