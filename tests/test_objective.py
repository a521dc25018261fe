"""The training objective (pipeline.diffusion.objective): MDLM and ProSeCo, Algorithm 1.

Hand-computable cases wherever possible; float64 models where near-exact equality is asserted.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import DiffusionConfig
from pipeline.diffusion.objective import (
    correction_term,
    corrector_input,
    denoiser_logits,
    mask_tokens,
    mdm_term,
    proseco_loss,
    sample_t,
)

MASK, V, L = 5, 6, 10


def data(batch: int = 3, seed: int = 3):
    """Clean x (tokens 0..4), a hand-fixed z_t (each row has masked and visible positions), t."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, MASK, (batch, L), generator=g)
    masked = torch.rand(batch, L, generator=g) < 0.5
    masked[:, 0], masked[:, 1] = True, False
    z_t = torch.where(masked, torch.full_like(x, MASK), x)
    t = torch.tensor([0.2, 0.5, 0.9][:batch] + [0.7] * max(0, batch - 3), dtype=torch.float64)
    return x, z_t, t


def grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


class Counting:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, tokens, t, valid):
        self.calls += 1
        return self.model(tokens, t, valid)


def nll_without_mask_token(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Independent -log p(x) with the mask logit removed, in float64."""
    logits = logits.double().clone()
    logits[..., MASK] = float("-inf")
    return -logits.log_softmax(-1).gather(-1, x[..., None]).squeeze(-1)


# ----------------------------------------------------------------------------- MDLM special case
def test_corrector_weight_zero_is_mdlm_loss_and_gradient(tiny_model):
    x, z_t, t = data()
    model_fn = Counting(tiny_model)
    terms = proseco_loss(model_fn, x, DiffusionConfig(corrector_weight=0.0), MASK, t=t, z_t=z_t)
    assert model_fn.calls == 1  # plain MDLM: one pass, no corrector pass
    terms.loss.backward()
    got = grads(tiny_model)

    # Hand-written MDLM: CE on masked positions, weighted by 1/t, summed, / number of tokens.
    nll = nll_without_mask_token(tiny_model(z_t), x)
    ref = (nll / t[:, None] * (z_t == MASK)).sum() / x.numel()
    ref.backward()
    want = grads(tiny_model)

    torch.testing.assert_close(terms.loss, ref.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(terms.mdm, ref.detach(), rtol=1e-12, atol=0)
    assert float(terms.correction) == 0.0 and math.isnan(terms.corrector_input_accuracy)
    for g, w in zip(got, want, strict=True):  # float64 end to end: equal up to summation order
        assert float((g - w).norm()) <= 1e-12 * float(w.norm())


def test_mdm_term_is_the_same_with_the_corrector_on(tiny_model):
    x, z_t, t = data()
    off = proseco_loss(tiny_model, x, DiffusionConfig(corrector_weight=0.0), MASK, t=t, z_t=z_t)
    on = proseco_loss(tiny_model, x, DiffusionConfig(), MASK, t=t, z_t=z_t)
    assert torch.equal(off.mdm, on.mdm)
    assert float(on.correction) > 0
    torch.testing.assert_close(on.loss.detach(), on.mdm + on.correction, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- weights 1/t
def test_mdm_term_is_ce_over_t_on_masked_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, L, V, dtype=torch.float64, generator=g)
    logits[1] = logits[0]  # identical content in both rows
    x = torch.randint(0, MASK, (1, L), generator=g).expand(2, L)
    z_t = torch.where(torch.arange(L) % 3 == 0, MASK, x)
    t = torch.tensor([0.2, 0.5], dtype=torch.float64)
    valid = torch.ones(2, L, dtype=torch.bool)
    per_token = mdm_term(logits, x, z_t, t, MASK, valid)
    ce = -logits.log_softmax(-1).gather(-1, x[..., None]).squeeze(-1)
    masked = z_t == MASK
    torch.testing.assert_close(per_token, ce / t[:, None] * masked, rtol=1e-12, atol=0)
    ratio = per_token[0][masked[0]] / per_token[1][masked[1]]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 2.5), rtol=1e-12, atol=0)


def test_whole_loss_scales_as_one_over_t(tiny_model):
    x, z_t, _ = data(batch=1)
    cfg = DiffusionConfig()
    lo = proseco_loss(tiny_model, x, cfg, MASK, t=torch.tensor([0.2], dtype=torch.float64), z_t=z_t)
    hi = proseco_loss(tiny_model, x, cfg, MASK, t=torch.tensor([0.5], dtype=torch.float64), z_t=z_t)
    assert float(lo.correction) > 0 and float(lo.mdm) > 0
    assert float(lo.mdm / hi.mdm) == pytest.approx(2.5, rel=1e-9)
    assert float(lo.correction / hi.correction) == pytest.approx(2.5, rel=1e-9)
    assert float(lo.loss.detach() / hi.loss.detach()) == pytest.approx(2.5, rel=1e-9)


# ----------------------------------------------------------------------------- positions covered
def test_mdm_term_only_sees_masked_positions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, L, V, dtype=torch.float64, generator=g)
    x = torch.randint(0, MASK, (1, L), generator=g)
    z_t = x.clone()
    z_t[0, [0, 4, 7]] = MASK
    t, valid = torch.tensor([0.4], dtype=torch.float64), torch.ones(1, L, dtype=torch.bool)
    base = mdm_term(logits, x, z_t, t, MASK, valid)
    visible = z_t != MASK
    assert torch.all(base[visible] == 0) and torch.all(base[~visible] > 0)
    bumped = logits.clone()
    bumped[0, 2] += torch.arange(V, dtype=torch.float64) * 3  # position 2 is visible
    assert torch.equal(mdm_term(bumped, x, z_t, t, MASK, valid), base)
    bumped[0, 4] += torch.arange(V, dtype=torch.float64) * 3  # position 4 is masked
    assert not torch.equal(mdm_term(bumped, x, z_t, t, MASK, valid), base)


def test_correction_term_sees_all_valid_positions_and_no_padding():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, L, V, dtype=torch.float64, generator=g)
    x = torch.randint(0, MASK, (1, L), generator=g)
    y = logits.argmax(-1)
    t = torch.tensor([0.4], dtype=torch.float64)
    valid = torch.ones(1, L, dtype=torch.bool)
    valid[0, 8:] = False
    base = correction_term(logits, x, y, t, valid)
    assert torch.all(base[valid] > 0) and torch.all(base[~valid] == 0)
    bumped = logits.clone()
    bumped[0, 9] += 5.0  # a padding position
    assert torch.equal(correction_term(bumped, x, y, t, valid), base)


def test_fully_visible_z_gives_zero_mdm_but_nonzero_correction(tiny_model):
    x, _, t = data()
    terms = proseco_loss(tiny_model, x, DiffusionConfig(), MASK, t=t, z_t=x.clone())
    assert float(terms.mdm) == 0.0 and float(terms.correction) > 0
    assert terms.masked_fraction == 0.0


def test_padding_is_ignored_end_to_end(tiny_model):
    x, z_t, t = data()
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[:, 7:] = False
    z_t = torch.where(valid, z_t, x)
    x2 = x.clone()
    x2[:, 7:] = (x[:, 7:] + 1) % MASK  # different content behind the padding
    cfg = DiffusionConfig()
    a = proseco_loss(tiny_model, x, cfg, MASK, t=t, z_t=z_t, valid=valid)
    a.loss.backward()
    ga = grads(tiny_model)
    b = proseco_loss(tiny_model, x2, cfg, MASK, t=t, z_t=torch.where(valid, z_t, x2), valid=valid)
    b.loss.backward()
    gb = grads(tiny_model)
    assert a.tokens == b.tokens == 21
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-12)
    for u, w in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, w, rtol=0, atol=1e-12)


def test_loss_on_pad_treats_pads_as_tokens(tiny_model):
    """diffusion.loss_on_pad (official QM9 compute_loss_on_pad_tokens): pads are masked, attended to and
    get loss like any token - the same loss as no padding mask at all, and not the padded loss."""
    x, z_t, t = data()
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[:, 7:] = False
    on = proseco_loss(tiny_model, x, DiffusionConfig(loss_on_pad=True), MASK, t=t, z_t=z_t, valid=valid)
    plain = proseco_loss(tiny_model, x, DiffusionConfig(), MASK, t=t, z_t=z_t)
    off = proseco_loss(tiny_model, x, DiffusionConfig(), MASK, t=t, z_t=z_t, valid=valid)
    assert on.tokens == x.numel()
    torch.testing.assert_close(on.loss, plain.loss, rtol=0, atol=1e-12)
    assert abs(float(on.loss) - float(off.loss)) > 1e-6
    gen = torch.Generator().manual_seed(0)
    masked = proseco_loss(tiny_model, x, DiffusionConfig(loss_on_pad=True), MASK, t=torch.ones(3, dtype=torch.float64),
                          valid=valid, generator=gen)
    assert masked.masked_fraction == 1.0  # pad positions are masked too at t = 1


# ----------------------------------------------------------------------------- stop-gradient on y
def test_no_gradient_flows_through_y(tiny_model):
    x, z_t, t = data()
    cfg = DiffusionConfig(mdm_weight=0.0, corrector_weight=1.0)
    terms = proseco_loss(tiny_model, x, cfg, MASK, t=t, z_t=z_t)
    terms.loss.backward()
    got = grads(tiny_model)

    with torch.no_grad():  # y as a constant
        y = denoiser_logits(tiny_model(z_t), MASK).argmax(-1)
    logits2 = denoiser_logits(tiny_model(y), MASK)
    ref = correction_term(logits2, x, y, t, torch.ones_like(x, dtype=torch.bool)).sum() / x.numel()
    ref.backward()
    want = grads(tiny_model)
    torch.testing.assert_close(terms.loss, ref.detach(), rtol=0, atol=1e-12)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- corrector input
def test_corrector_input_modes_on_hand_built_logits():
    logits = torch.tensor([[[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0], [1.0, 4.0, 0.0]]],
                          requires_grad=True)
    x = torch.tensor([[2, 0, 1, 0]])
    mask_id = 9  # only compared against z_t here
    z_t = torch.tensor([[9, 0, 1, 9]])  # positions 0 and 3 masked
    argmax = torch.tensor([[1, 0, 2, 1]])
    y = corrector_input(logits, x, z_t, mask_id, "model_outputs")
    assert torch.equal(y, argmax) and not y.requires_grad
    y = corrector_input(logits, x, z_t, mask_id, "masked_only")
    assert torch.equal(y, torch.tensor([[1, 0, 1, 1]])) and not y.requires_grad
    with pytest.raises(ValueError, match="corrector_input"):
        corrector_input(logits, x, z_t, mask_id, "sampled")


@pytest.mark.parametrize("mode", ["model_outputs", "masked_only"])
def test_second_pass_runs_on_y_of_the_chosen_mode(tiny_model, mode):
    x, z_t, t = data()
    seen = []

    def model_fn(tokens, t_, valid):
        seen.append(tokens.clone())
        return tiny_model(tokens, t_, valid)

    terms = proseco_loss(model_fn, x, DiffusionConfig(corrector_input=mode), MASK, t=t, z_t=z_t)
    assert len(seen) == 2 and torch.equal(seen[0], z_t)
    with torch.no_grad():
        argmax = denoiser_logits(tiny_model(z_t), MASK).argmax(-1)
    want = argmax if mode == "model_outputs" else torch.where(z_t == MASK, argmax, x)
    assert torch.equal(seen[1], want)
    assert terms.corrector_input_accuracy == pytest.approx(float((want == x).double().mean()), abs=1e-6)
    if mode == "model_outputs":
        assert not torch.equal(argmax[z_t != MASK], x[z_t != MASK])  # no carry-over: modes differ here


# ----------------------------------------------------------------------------- errors upweighted
def test_errors_upweighted_matches_formula_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0]]],
                          dtype=torch.float64)
    x = torch.tensor([[0, 2, 2, 1]])
    y = torch.tensor([[0, 1, 2, 0]])  # right at 0 and 2, wrong at 1 and 3
    t = torch.tensor([0.25], dtype=torch.float64)  # w = 4
    valid = torch.ones(1, 4, dtype=torch.bool)
    e = math.e
    p_x = [e**2 / (e**2 + 2), 1 / (2 + e), e**3 / (e**3 + 2), e / (2 * e + 1)]
    want_up = [-4 * p_x[0], -4 * math.log(p_x[1]), -4 * p_x[2], -4 * math.log(p_x[3])]
    want_plain = [-4 * math.log(p) for p in p_x]
    got_up = correction_term(logits, x, y, t, valid, errors_upweighted=True)[0].tolist()
    got_plain = correction_term(logits, x, y, t, valid, errors_upweighted=False)[0].tolist()
    assert got_up == pytest.approx(want_up, rel=1e-12)
    assert got_plain == pytest.approx(want_plain, rel=1e-12)
    valid[0, 3] = False
    assert correction_term(logits, x, y, t, valid, errors_upweighted=True)[0, 3] == 0


# ----------------------------------------------------------------------------- split backward
@pytest.mark.parametrize("corrector_input_mode, upweighted, corrector_weight", [
    ("model_outputs", False, 1.0), ("masked_only", True, 0.5), ("model_outputs", False, 0.0),
])
def test_split_backward_gives_the_same_gradient(tiny_model, corrector_input_mode, upweighted, corrector_weight):
    x, z_t, t = data()
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[2, 8:] = False
    z_t = torch.where(valid, z_t, x)
    cfg = DiffusionConfig(corrector_input=corrector_input_mode, errors_upweighted=upweighted,
                          corrector_weight=corrector_weight, mdm_weight=0.7)
    one = proseco_loss(tiny_model, x, cfg, MASK, t=t, z_t=z_t, valid=valid)
    one.loss.backward()
    g_one = grads(tiny_model)

    calls = []

    def backward(term):
        calls.append(float(term.detach()))
        term.backward()

    split = proseco_loss(tiny_model, x, cfg, MASK, t=t, z_t=z_t, valid=valid, backward=backward)
    g_split = grads(tiny_model)
    assert len(calls) == (2 if corrector_weight > 0 else 1)
    assert not split.loss.requires_grad
    assert torch.equal(one.mdm, split.mdm) and torch.equal(one.correction, split.correction)
    assert float(split.loss) == pytest.approx(float(one.loss.detach()), rel=1e-12)
    assert max(float((a - b).abs().max()) for a, b in zip(g_one, g_split, strict=True)) < 1e-12


# ----------------------------------------------------------------------------- t and z_t
def test_sample_t_is_antithetic_and_stratified():
    eps = 0.1
    for batch in (8, 1000):
        t = sample_t(batch, eps, antithetic=True, generator=torch.Generator().manual_seed(batch))
        assert t.shape == (batch,) and bool((t >= eps).all()) and bool((t <= 1).all())
        u = (t.double() - eps) / (1 - eps)
        assert torch.equal(torch.floor(u * batch).long(), torch.arange(batch))  # one draw per stratum
    t = sample_t(1000, eps, antithetic=False, generator=torch.Generator().manual_seed(0))
    assert bool((t >= eps).all()) and bool((t <= 1).all())
    strata = torch.floor((t.double() - eps) / (1 - eps) * 1000).long()
    assert not torch.equal(strata, torch.arange(1000))  # plain uniform draws are not stratified


def test_mask_tokens_rate_and_maskable():
    g = torch.Generator().manual_seed(0)
    n = 50_000
    x = torch.randint(0, MASK, (4, n), generator=g)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    z = mask_tokens(x, t, MASK, generator=g)
    masked = z == MASK
    assert torch.equal(z[~masked], x[~masked])
    rate = masked.double().mean(-1)
    torch.testing.assert_close(rate, t.double(), rtol=0, atol=0.01)

    maskable = torch.rand(4, n, generator=g) < 0.5
    z = mask_tokens(x, t, MASK, generator=g, maskable=maskable)
    masked = z == MASK
    assert not bool((masked & ~maskable).any())
    assert torch.equal(z[~maskable], x[~maskable])
    rate = (masked & maskable).sum(-1).double() / maskable.sum(-1)
    torch.testing.assert_close(rate, t.double(), rtol=0, atol=0.015)


# ----------------------------------------------------------------------------- zero-masking
def test_denoiser_logits_forbid_the_mask_token_only():
    logits = torch.randn(2, 3, V, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    out = denoiser_logits(logits, MASK)
    assert torch.equal(logits, before)  # not in place
    assert out.shape == logits.shape
    assert bool(torch.isneginf(out[..., MASK]).all())
    assert torch.equal(out[..., :MASK], logits[..., :MASK])


def test_denoiser_logits_keep_float64_values():
    logits = torch.randn(2, 3, V, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) / 3
    out = denoiser_logits(logits, MASK)
    assert out.dtype == torch.float64
    assert torch.equal(out[..., :MASK], logits[..., :MASK])


def test_the_correction_term_starts_at_corrector_start_step():
    """objective_at: plain MDM before diffusion.corrector_start_step, the configured objective after;
    the MDM steps of equal compute count the warm-up once and the rest mdm_step_ratio times."""
    import dataclasses

    from pipeline.config import load_config
    from pipeline.demo import mdm_steps
    from pipeline.diffusion.objective import objective_at
    from pipeline.plan import passes_of

    cfg = DiffusionConfig(corrector_weight=0.5, corrector_start_step=3, errors_upweighted=True)
    assert [objective_at(cfg, s).corrector_weight for s in range(5)] == [0.0, 0.0, 0.0, 0.5, 0.5]
    assert objective_at(cfg, 1) == dataclasses.replace(cfg, corrector_weight=0.0)  # nothing else changes
    full = load_config(None, ["diffusion.corrector_start_step=3", "demo.proseco_steps=10", "demo.mdm_step_ratio=2"])
    assert [passes_of(full, s) for s in (0, 2, 3)] == [1, 1, 2] and passes_of(full) == 2
    assert mdm_steps(full) == 3 + 2 * 7
    assert mdm_steps(dataclasses.replace(full, diffusion=dataclasses.replace(full.diffusion, corrector_start_step=50))) == 10
