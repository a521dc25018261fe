"""Samplers (pipeline.diffusion.sampling): invariants of the unmasking policies, the ProSeCo
corrector loop (Alg. 2-3), NFE accounting, batch independence and input checks.

Most tests run a small randomly initialised float64 backbone; the NFE / fixed-point tests use
hand-written model functions whose argmax is a known function of the input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import pytest
import torch

from pipeline.config import SamplerConfig
from pipeline.diffusion import sampling
from pipeline.diffusion.sampling import (
    POLICIES,
    Noise,
    ancestral_step,
    categorical,
    nucleus_log_probs,
    sample,
)
from pipeline.errors import ProsecoError

MASK, V, L = 5, 6, 10


# ----------------------------------------------------------------------------- helpers
class CountingModel:
    """``model_fn(tokens, t, valid) -> logits`` that counts calls and rows and keeps its inputs."""

    def __init__(self, fn):
        self.fn, self.calls, self.rows, self.inputs = fn, 0, 0, []

    def __call__(self, tokens, t, valid):
        self.calls += 1
        self.rows += tokens.shape[0]
        self.inputs.append(tokens.clone())
        return self.fn(tokens, t, valid)


def backbone_fn(model):
    return lambda tokens, t, valid: model(tokens)


def peaked(target: torch.Tensor) -> torch.Tensor:
    """Logits [B, L, V] with a clear maximum (+10 vs -10) on ``target`` [B, L]."""
    logits = torch.full((*target.shape, V), -10.0, dtype=torch.float64)
    return logits.scatter(-1, target.contiguous()[..., None], 10.0)


def per_row_target(tokens: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return values.expand_as(tokens)


def always_one(tokens, t, valid):
    return peaked(torch.ones_like(tokens))


def two_then_one(tokens, t, valid):
    """argmax 2 on inputs that still hold a mask (predictor inputs), 1 on clean inputs."""
    has_mask = (tokens == MASK).any(-1, keepdim=True)
    return peaked(per_row_target(tokens, torch.where(has_mask, 2, 1)))


def oscillating(tokens, t, valid):
    """argmax 3 everywhere if position 0 holds 4, else 4: y never reaches a fixed point."""
    return peaked(per_row_target(tokens, torch.where(tokens[:, :1] == 4, 3, 4)))


def clue_or_oscillating(tokens, t, valid):
    """Rows whose position 0 holds 0 behave like ``always_one``, the others like ``oscillating``."""
    flip = torch.where(tokens[:, :1] == 4, 3, 4)
    return peaked(per_row_target(tokens, torch.where(tokens[:, :1] == 0, 1, flip)))


@dataclass
class Trace:
    """What the sampler fed the network and what each corrector loop did, full batch each time."""

    calls: list = field(default_factory=list)  # (kind, tokens [B, L], rows computed [B])
    loops: list = field(default_factory=list)  # (z before, z after, fixed)

    def inputs(self, kind: str) -> list[torch.Tensor]:
        return [tokens for k, tokens, _ in self.calls if k == kind]

    def reset(self):
        self.calls.clear()
        self.loops.clear()


@pytest.fixture
def trace(monkeypatch) -> Trace:
    tr = Trace()
    call, loop = sampling.Denoiser.__call__, sampling.corrector_loop

    def traced_call(self, tokens, t, rows, kind, previous, inplace=False):
        computed = torch.ones_like(rows) if previous is None else rows.clone()
        tr.calls.append((kind, tokens.clone(), computed))
        return call(self, tokens, t, rows, kind, previous, inplace)

    def traced_loop(denoise, logits, z, t, rows, update, guess, mask_id, cfg, noise):
        z_out, logits_out = loop(denoise, logits, z, t, rows, update, guess, mask_id, cfg, noise)
        tr.loops.append((z.clone(), z_out.clone(), ~update | ~rows[:, None]))
        return z_out, logits_out

    monkeypatch.setattr(sampling.Denoiser, "__call__", traced_call)
    monkeypatch.setattr(sampling, "corrector_loop", traced_loop)
    return tr


def config(name: str, steps: int = 8, corrector_steps: int = 0, **kw) -> SamplerConfig:
    if name == "remdm":
        kw.setdefault("remdm_eta", 0.5)  # large enough that re-masking actually happens here
    return SamplerConfig(name=name, steps=steps, corrector_steps=corrector_steps, **kw)


def infill_problem(batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, MASK, (batch, L), generator=g)
    fixed = torch.rand(batch, L, generator=g) < 0.4
    fixed[:, 0], fixed[:, 1] = True, False
    return prompt, fixed


# ----------------------------------------------------------------------------- clues and decoded tokens
@pytest.mark.parametrize("corrector_steps", [0, 3])
@pytest.mark.parametrize("name", POLICIES)
def test_prompt_positions_never_change(tiny_model, trace, name, corrector_steps):
    prompt, fixed = infill_problem()
    out = sample(backbone_fn(tiny_model), config(name, corrector_steps=corrector_steps), seq_len=L,
                 mask_id=MASK, prompt=prompt, fixed=fixed, seeds=[1, 2, 3, 4])
    assert torch.equal(out.tokens[fixed], prompt[fixed])
    first = trace.inputs("predictor")[0]
    assert bool((first[~fixed] == MASK).all())  # non-fixed prompt tokens are not given away
    for _, tokens, _ in trace.calls:
        assert torch.equal(tokens[fixed], prompt[fixed])
    assert len(trace.loops) == (config(name).steps if corrector_steps else 0)


@pytest.mark.parametrize("name", ["ancestral", "confidence"])
def test_decoded_tokens_never_change_without_corrector(tiny_model, trace, name):
    for seed in range(3):
        trace.reset()
        out = sample(backbone_fn(tiny_model), config(name, steps=12), seq_len=L, mask_id=MASK, batch=3,
                     seeds=[seed, seed + 10, seed + 20])
        states = [*trace.inputs("predictor"), out.tokens]
        # once per step; LLaDA's block ends when it has no mask (10 positions, one per step)
        assert len(states) == (12 if name == "ancestral" else L) + 1
        for before, after in pairwise(states):
            decoded = before != MASK
            assert torch.equal(after[decoded], before[decoded])


def test_remdm_only_remasks_decoded_tokens(tiny_model, trace):
    remasked = 0
    for seed in range(3):
        trace.reset()
        out = sample(backbone_fn(tiny_model), config("remdm", steps=12), seq_len=L, mask_id=MASK, batch=3,
                     seeds=[seed, seed + 10, seed + 20])
        states = [*trace.inputs("predictor"), out.tokens]
        for before, after in pairwise(states):
            decoded = before != MASK
            kept, masked_again = after == before, after == MASK
            assert bool((kept | masked_again)[decoded].all())
            remasked += int((masked_again & decoded).sum())
    assert remasked > 0  # the check above is not vacuous


@pytest.mark.parametrize("name", POLICIES)
def test_corrector_only_rewrites_decoded_positions(tiny_model, trace, name):
    rewritten = 0
    for seed in range(3):
        trace.reset()
        prompt, fixed = infill_problem(batch=3, seed=seed)
        sample(backbone_fn(tiny_model), config(name, steps=8, corrector_steps=3), seq_len=L, mask_id=MASK,
               prompt=prompt, fixed=fixed, seeds=[seed, seed + 10, seed + 20])
        # a loop after every step (LLaDA's block may end before its 8 steps when it has fewer masks)
        assert len(trace.loops) == (8 if name != "confidence" else len(trace.inputs("predictor")))
        for z_in, z_out, fixed_ in trace.loops:
            assert torch.equal(z_out == MASK, z_in == MASK)  # the loop never fills a masked position
            assert torch.equal(z_out[fixed_], z_in[fixed_])
            rewritten += int((z_out != z_in).sum())
        for y in trace.inputs("corrector"):
            assert not bool((y == MASK).any())
        if name != "remdm":  # the predictors' mask set only shrinks
            predictor = trace.inputs("predictor")
            for before, after in pairwise(predictor):
                assert not bool(((after == MASK) & (before != MASK)).any())
    assert rewritten > 0  # the corrector did rewrite decoded tokens


# ----------------------------------------------------------------------------- NFE and the fixed point
@pytest.mark.parametrize("model_fn, corrector_steps, every, start, per_loop, loops", [
    (two_then_one, 8, 1, 0, 2, 4),  # one pass changes y, the next detects the fixed point
    (always_one, 8, 1, 0, 1, 4),  # already at the fixed point: the checking pass only
    (two_then_one, 1, 1, 0, 1, 4),  # S caps the loop
    (oscillating, 5, 1, 0, 5, 4),  # never converges: exactly S passes
    (two_then_one, 8, 2, 0, 2, 2),  # omega = 2: loops after steps 2 and 4
    (two_then_one, 8, 1, 3, 2, 2),  # corrector_start = 3: loops after steps 3 and 4
])
def test_corrector_nfe_is_exact(model_fn, corrector_steps, every, start, per_loop, loops):
    counter = CountingModel(model_fn)
    cfg = SamplerConfig(name="confidence", steps=4, temperature=0.0, corrector_steps=corrector_steps,
                        corrector_every=every, corrector_start=start)
    out = sample(counter, cfg, seq_len=8, mask_id=MASK, batch=2, seeds=[0, 1])
    assert out.nfe_predictor.tolist() == [4, 4]
    assert out.nfe_corrector.tolist() == [per_loop * loops] * 2
    assert out.calls == counter.calls == 4 + per_loop * loops
    if model_fn is not oscillating:
        assert bool((out.tokens == 1).all())


def test_fixed_point_exit_is_per_row():
    counter = CountingModel(clue_or_oscillating)
    prompt = torch.full((2, 8), MASK)
    prompt[0, 0] = 0  # row 0 has a clue and sits at its fixed point; row 1 oscillates
    cfg = SamplerConfig(name="confidence", steps=4, temperature=0.0, corrector_steps=3)
    out = sample(counter, cfg, seq_len=8, mask_id=MASK, prompt=prompt, seeds=[0, 1])
    assert out.nfe_predictor.tolist() == [4, 4]
    assert out.nfe_corrector.tolist() == [4 * 1, 4 * 3]
    assert out.calls == counter.calls == 4 + 4 * 3  # passes 2 and 3 run on row 1 alone
    assert counter.rows == int(out.nfe.sum()) == 24
    assert out.tokens[0].tolist() == [0] + [1] * 7


@pytest.mark.parametrize("corrector_steps", [0, 2])
@pytest.mark.parametrize("name", POLICIES)
def test_reported_nfe_equals_model_calls(tiny_model, name, corrector_steps):
    counter = CountingModel(backbone_fn(tiny_model))
    out = sample(counter, config(name, steps=14, corrector_steps=corrector_steps), seq_len=L, mask_id=MASK,
                 batch=4, seeds=[5, 6, 7, 8])
    assert int(out.nfe.sum()) == counter.rows
    assert out.calls == counter.calls
    assert all(len(tokens) > 0 for tokens in counter.inputs)  # no empty calls
    assert bool((out.nfe_predictor >= 1).all()) and bool((out.nfe_predictor <= 14).all())
    if corrector_steps == 0:
        assert bool((out.nfe_corrector == 0).all())
    else:
        assert bool((out.nfe_corrector >= 14).all()) and bool((out.nfe_corrector <= 14 * 2).all())


def test_unchanged_rows_are_not_recomputed(tiny_model, trace):
    """Without the corrector a row's predictor NFE = 1 + the number of steps after which its z changed."""
    out = sample(backbone_fn(tiny_model), config("ancestral", steps=30), seq_len=L, mask_id=MASK, batch=4,
                 seeds=[1, 2, 3, 4])
    z = torch.stack(trace.inputs("predictor"))  # [steps, B, L]
    expected = 1 + (z[1:] != z[:-1]).any(-1).sum(0)
    assert out.nfe_predictor.tolist() == expected.tolist()
    assert bool((out.nfe_predictor < 30).all())  # T > L: some steps unmask nothing


def test_time_conditioned_model_is_recomputed_every_step(tiny_model):
    out = sample(backbone_fn(tiny_model), config("ancestral", steps=30), seq_len=L, mask_id=MASK, batch=3,
                 seeds=[1, 2, 3], time_conditioned=True)
    assert out.nfe_predictor.tolist() == [30, 30, 30]


@pytest.mark.parametrize("name", ["ancestral", "remdm"])
def test_logit_cache_is_a_pure_optimisation_without_corrector(tiny_model, name):
    """A t-independent model gives the same samples whether logits may be reused or not."""
    fn, cfg = backbone_fn(tiny_model), config(name, steps=20)
    cached = sample(fn, cfg, seq_len=L, mask_id=MASK, batch=6, seeds=list(range(6)))
    fresh = sample(fn, cfg, seq_len=L, mask_id=MASK, batch=6, seeds=list(range(6)), time_conditioned=True)
    assert torch.equal(cached.tokens, fresh.tokens)
    assert int(cached.nfe_predictor.sum()) < int(fresh.nfe_predictor.sum())


@pytest.mark.parametrize("name", POLICIES)
def test_exact_logit_cache_is_a_pure_optimisation_with_corrector(tiny_model, name):
    """nfe_cache=exact never reuses logits computed on other tokens (official reuses the corrector's)."""
    fn, cfg = backbone_fn(tiny_model), config(name, steps=20, corrector_steps=2, nfe_cache="exact")
    cached = sample(fn, cfg, seq_len=L, mask_id=MASK, batch=6, seeds=list(range(6)))
    fresh = sample(fn, cfg, seq_len=L, mask_id=MASK, batch=6, seeds=list(range(6)), time_conditioned=True)
    assert torch.equal(cached.tokens, fresh.tokens)


# ----------------------------------------------------------------------------- batch independence, seeds
@pytest.mark.parametrize("name", POLICIES)
def test_batched_output_equals_per_example_output(tiny_model, name):
    seeds = [101, 102, 103, 104, 105, 106]
    cfg = config(name, steps=12, corrector_steps=2)
    fn = backbone_fn(tiny_model)
    prompt, fixed = infill_problem(batch=6, seed=7)
    fixed[3:] = False  # three infilling rows, three unconditional rows
    batched = sample(fn, cfg, seq_len=L, mask_id=MASK, prompt=prompt, fixed=fixed, seeds=seeds)
    for i, seed in enumerate(seeds):
        alone = sample(fn, cfg, seq_len=L, mask_id=MASK, prompt=prompt[i:i + 1], fixed=fixed[i:i + 1],
                       seeds=[seed])
        assert torch.equal(alone.tokens[0], batched.tokens[i])
        assert int(alone.nfe_predictor[0]) == int(batched.nfe_predictor[i])
        assert int(alone.nfe_corrector[0]) == int(batched.nfe_corrector[i])


@pytest.mark.parametrize("kw", [{"name": "ancestral", "corrector_steps": 2, "nucleus_p": 0.8},
                                {"name": "ancestral", "corrector_steps": 2, "corrector_mode": "select_top_k"},
                                {"name": "confidence", "corrector_steps": 2}, {"name": "confidence", "temperature": 0.5},
                                {"name": "remdm", "remdm_strategy": "conf", "nucleus_p": 0.9}])
def test_output_does_not_depend_on_the_block_size_of_the_vocabulary_wide_work(tiny_model, monkeypatch, kw):
    """over_rows cuts its rows into blocks (cache-sized on CPU, one per step on a GPU): one row
    per block and every row in one block give the same tokens and NFE."""
    from pipeline.diffusion import decoding

    fn, prompt, fixed = backbone_fn(tiny_model), *infill_problem(batch=6, seed=3)
    outs = []
    for elements in (1, decoding.BLOCK_ELEMENTS_ACCELERATOR):
        monkeypatch.setattr(decoding, "BLOCK_ELEMENTS", elements)
        outs.append(sample(fn, config(steps=10, **kw), seq_len=L, mask_id=MASK, prompt=prompt, fixed=fixed))
    assert torch.equal(outs[0].tokens, outs[1].tokens) and torch.equal(outs[0].nfe, outs[1].nfe)


@pytest.mark.parametrize("name", POLICIES)
def test_same_seeds_same_output_different_seeds_different(tiny_model, name):
    fn = backbone_fn(tiny_model)
    cfg = config(name, steps=6)
    a = sample(fn, cfg, seq_len=L, mask_id=MASK, batch=4, seeds=[1, 2, 3, 4])
    b = sample(fn, cfg, seq_len=L, mask_id=MASK, batch=4, seeds=[1, 2, 3, 4])
    c = sample(fn, cfg, seq_len=L, mask_id=MASK, batch=4, seeds=[5, 6, 7, 8])
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    default = sample(fn, cfg, seq_len=L, mask_id=MASK, batch=4)  # seeds from cfg.seed
    assert torch.equal(default.tokens, sample(fn, cfg, seq_len=L, mask_id=MASK, batch=4,
                                              seeds=[0, 1, 2, 3]).tokens)


# ----------------------------------------------------------------------------- termination
@pytest.mark.parametrize("name", POLICIES)
def test_no_mask_left_for_any_number_of_steps(tiny_model, name):
    fn = backbone_fn(tiny_model)
    for steps in (1, 2, 3, 10, 17):
        for corrector_steps in (0, 2):
            out = sample(fn, config(name, steps=steps, corrector_steps=corrector_steps), seq_len=L,
                         mask_id=MASK, batch=3, seeds=[steps, steps + 1, steps + 2])
            assert out.tokens.shape == (3, L)
            assert bool((out.tokens >= 0).all()) and bool((out.tokens < MASK).all())


# ----------------------------------------------------------------------------- semi-AR blocks
@pytest.mark.parametrize("corrector_steps", [0, 2])
def test_confidence_blocks_decode_left_to_right(tiny_model, trace, corrector_steps):
    cfg = SamplerConfig(name="confidence", steps=6, block_size=4, corrector_steps=corrector_steps)
    out = sample(backbone_fn(tiny_model), cfg, seq_len=L, mask_id=MASK, batch=3, seeds=[1, 2, 3])
    block_of = torch.arange(L) // 4  # blocks [0, 4), [4, 8), [8, 10); 2 steps per block
    states = trace.inputs("predictor")
    assert len(states) == 6
    for i, z in enumerate(states):
        current = i // 2
        assert bool((z[:, block_of < current] != MASK).all())  # earlier blocks complete
        assert bool((z[:, block_of > current] == MASK).all())  # later blocks untouched
    for z in [*states, out.tokens]:  # block j is complete before block j + 1 starts
        for j in range(2):
            if bool((z[:, block_of == j + 1] != MASK).any()):
                assert bool((z[:, block_of == j] != MASK).all())


def test_confidence_blocks_need_steps_multiple_of_blocks(tiny_model):
    fn = backbone_fn(tiny_model)
    with pytest.raises(ProsecoError, match="multiple of the number of blocks"):
        sample(fn, SamplerConfig(name="confidence", steps=7, block_size=4), seq_len=L, mask_id=MASK, batch=1)
    out = sample(fn, SamplerConfig(name="confidence", steps=3, block_size=4), seq_len=L, mask_id=MASK, batch=1)
    assert not bool((out.tokens == MASK).any())


# ----------------------------------------------------------------------------- bad input
def _never_called(tokens, t, valid):
    raise AssertionError("the model must not run on invalid input")


@pytest.mark.parametrize("cfg, seq_len, match", [
    (SamplerConfig(name="gibbs"), L, "unknown sampler"),
    (SamplerConfig(corrector_steps=-1), L, "corrector_steps"),
    (SamplerConfig(corrector_every=0), L, "omega"),
    (SamplerConfig(steps=0), L, "steps"),
    (SamplerConfig(), 13, "max_seq_len"),
])
def test_bad_input_is_a_proseco_error(cfg, seq_len, match):
    with pytest.raises(ProsecoError, match=match):
        sample(_never_called, cfg, seq_len=seq_len, mask_id=MASK, batch=2, max_seq_len=12)


def test_missing_batch_and_prompt_is_a_proseco_error():
    with pytest.raises(ProsecoError, match="batch or prompt"):
        sample(_never_called, SamplerConfig(), seq_len=L, mask_id=MASK)


# ----------------------------------------------------------------------------- small pure pieces
def test_nucleus_official_rule_keeps_mass_up_to_p_and_the_top_token():
    """Official (ProSeCo / ReMDM code): sorted tokens with cumulative mass <= p, the top one always."""
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]], dtype=torch.float64)
    out = nucleus_log_probs(probs.log(), 0.75, float64=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.exp(), torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]], dtype=torch.float64),
                               rtol=1e-12, atol=1e-15)
    assert bool(torch.isneginf(out[0, [0, 2]]).all())
    for p in (0.35, 0.5):  # cumulative 0.4 then 0.7: only the top token (kept even when 0.4 > p)
        torch.testing.assert_close(nucleus_log_probs(probs.log(), p).exp(),
                                   torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(nucleus_log_probs(probs.log(), 1.0, float64=True), probs.log())
    exact = torch.tensor([[0.25, 0.5, 0.25]], dtype=torch.float64)  # the top token alone has mass p
    assert nucleus_log_probs(exact.log(), 0.5).exp().tolist() == [[0.0, 1.0, 0.0]]
    assert nucleus_log_probs(probs.log().float(), 0.5, float64=False).dtype == torch.float32


def test_nucleus_minimal_rule_keeps_the_smallest_set_with_mass_p():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]], dtype=torch.float64)
    torch.testing.assert_close(nucleus_log_probs(probs.log(), 0.5, rule="minimal").exp(),
                               torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]], dtype=torch.float64), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(nucleus_log_probs(probs.log(), 0.35, rule="minimal").exp(),
                               torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64))


def test_nucleus_rules_differ_on_random_distributions():
    """The two rules are not the same thing (the issue measured 1992 of 2000 differing at p=0.9)."""
    logits = torch.randn(2000, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    official = torch.isfinite(nucleus_log_probs(logits, 0.9))
    minimal = torch.isfinite(nucleus_log_probs(logits, 0.9, rule="minimal"))
    assert bool((official <= minimal).all())  # official keeps a subset
    assert int((official != minimal).any(-1).sum()) > 1500


def test_categorical_inverts_the_cdf():
    logits = torch.tensor([0.1, 0.4, 0.2, 0.3, 0.0], dtype=torch.float64).log().expand(5, 5)  # last: p = 0
    u = torch.tensor([0.05, 0.3, 0.6, 0.95, 1.0 - 1e-16], dtype=torch.float64)
    assert categorical(logits, u[:, None]).tolist() == [0, 1, 2, 3, 3]


def test_categorical_never_draws_a_zero_probability_token():
    logits = torch.tensor([0.0, 0.5, 0.3, 0.2], dtype=torch.float64).log().expand(3, 4)  # first: p = 0
    u = torch.tensor([[0.0], [0.5], [1.0 - 1e-16]], dtype=torch.float64)
    assert categorical(logits, u).tolist() == [1, 2, 3]  # intervals [0, .5), [.5, .8), [.8, 1)


def test_categorical_with_nucleus_samples_only_the_top_set():
    # official p = 0.85 and minimal p = 0.6 both keep {0.5, 0.3}, renormalised to 5/8, 3/8
    logits = torch.tensor([0.0, 0.5, 0.3, 0.2], dtype=torch.float64).log().expand(4, 4)
    u = torch.tensor([[0.0], [0.62], [0.63], [1.0 - 1e-16]], dtype=torch.float64)
    assert categorical(logits, u, p=0.85).tolist() == [1, 1, 2, 2]
    assert categorical(logits, u, p=0.6, rule="minimal").tolist() == [1, 1, 2, 2]
    assert categorical(logits, u, p=0.6).tolist() == [1, 1, 1, 1]  # official: 0.5 + 0.3 > 0.6


def test_split_logits_read_like_the_merged_tensor_and_settle_only_what_is_kept():
    """The row cache's SplitLogits (sequences 1 and 3 recomputed) against a merged tensor built by
    hand: every reader sees the same rows, and settling writes only the kept fresh sequences."""
    from pipeline.diffusion.decoding import SplitLogits, argmax_at, over_rows

    gen = torch.Generator().manual_seed(0)
    base, fresh = torch.randn(4, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    hand = base.clone()
    hand[1], hand[3] = fresh[0], fresh[1]
    split = SplitLogits(base.clone(), fresh, torch.tensor([1, 3]))
    assert torch.equal(split.merged(), hand) and split.shape == hand.shape
    for where in (torch.rand(4, 5, generator=gen) < 0.5, torch.ones(4, 5, dtype=torch.bool),
                  torch.zeros(4, 5, dtype=torch.bool), torch.eye(4, 5, dtype=torch.bool)):
        assert torch.equal(over_rows(lambda r: r * 2, split, where), hand[where] * 2)
        assert torch.equal(argmax_at(split, where), hand[where].argmax(-1))
    assert torch.equal(split.take(torch.tensor([16, 0, 5, 19, 7])), hand.reshape(20, 7)[[16, 0, 5, 19, 7]])
    keep = torch.tensor([True, False, True, True])  # sequence 3 keeps its fresh logits, 1 will be recomputed
    settled = split.settle(keep)
    assert torch.equal(settled[3], fresh[1]) and torch.equal(settled[1], base[1]) and torch.equal(settled[0], base[0])


@pytest.mark.parametrize("vocab", [1024, 1100, 8192])
def test_row_argmax_is_torch_argmax(vocab):
    """The chunked CPU argmax returns torch.argmax's index: random rows, maxima tied across
    chunks and inside one (the first wins), a max in the ragged last chunk, all -inf rows, a NaN
    (argmax counts it as the maximum), bfloat16 and 3-D input."""
    from pipeline.diffusion.decoding import row_argmax

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, vocab, generator=gen)
    x[1, [700, 3, 900]] = 50.0  # tie across chunks: 3 is first
    x[2, [130, 129]] = 50.0  # tie inside one chunk
    x[3, -1] = 50.0  # the ragged tail (vocab 1100) or the last column
    x[4] = float("-inf")
    x[5, 17] = float("nan")
    x[6, :] = 0.0  # all tied: index 0
    x[7, 1000:] = 99.0  # a run of ties spanning a chunk boundary
    for t in (x, x.to(torch.bfloat16), x.double(), x.reshape(4, 10, vocab)):
        assert torch.equal(row_argmax(t), t.argmax(-1)), t.dtype


@pytest.mark.parametrize("vocab", [1024, 3000, 8192])
def test_two_level_cdf_inversion_is_the_running_sum(vocab):
    """categorical inverts the CDF in two levels (chunk masses, then one chunk's running sum):
    the same token as the plain one-level inversion, written out here, for random u; u = 0 and
    u -> 1 land on tokens with mass; stratified u over a known distribution draws each token
    in proportion to its probability."""
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(64, vocab, generator=gen, dtype=torch.float64) * torch.linspace(0.3, 12, 64)[:, None]
    logits[:8, vocab // 3:] = float("-inf")  # mass in the first chunks only
    logits[8:16, : vocab - 5] = float("-inf")  # mass in the ragged tail only
    logits[:, 777] = float("-inf")
    u = torch.rand(64, 1, generator=gen, dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    cdf = probs.cumsum(-1)
    plain = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)  # u < 1: never past the end
    assert torch.equal(categorical(logits, u), plain)
    for edge in (0.0, 1.0, 1.0 - 1e-16):
        got = categorical(logits, torch.full((64, 1), edge, dtype=torch.float64))
        assert bool((probs.gather(1, got[:, None]) > 0).all()), edge
    # stratified u: token v is drawn for the u in its CDF interval, n * p_v of them (+-1)
    n = 20_000
    target = torch.softmax(torch.randn(vocab, generator=gen, dtype=torch.float64) * 2, -1)
    draws = categorical(target.log().expand(n, vocab), ((torch.arange(n) + 0.5) / n).double()[:, None])
    counts = torch.bincount(draws, minlength=vocab).double()
    assert float((counts - n * target).abs().max()) <= 1.0 + 1e-9


def _sorted_keep(probs: torch.Tensor, p: float, rule: str) -> torch.Tensor:
    """The nucleus by its definition: a full stable sort (ties by index) and a running sum."""
    order = probs.sort(dim=-1, descending=True, stable=True)
    cum = order.values.cumsum(-1)
    keep = cum <= p if rule == "official" else (cum - order.values) < p
    keep[:, 0] = True
    return torch.zeros_like(keep).scatter_(1, order.indices, keep)


@pytest.mark.parametrize("rule", ["official", "minimal"])
def test_nucleus_keep_equals_the_sorted_definition(rule):
    """The binned nucleus (no vocabulary sort) keeps exactly the set a full sort keeps: flat rows
    (nucleus of thousands), peaked ones, a top token above p, tied values inside the straddling
    bin, masked (-inf) tokens, probabilities spread over far more than the bins' 32 octaves."""
    from pipeline.diffusion.decoding import nucleus_keep
    from tests.official_reference import draw

    gen = torch.Generator().manual_seed(3)
    scale = torch.cat([torch.full((60,), 8.0), torch.full((60,), 0.3), torch.full((60,), 3.0),
                       torch.full((20,), 60.0)])
    logits = torch.randn(200, 3000, generator=gen) * scale[:, None]
    logits[60:80, 100:400] = 1.5  # 300 tied values, in the middle of a flat row's nucleus
    logits[80:90] = logits[80:90].round()  # many ties everywhere
    logits[90:100, 5] = 30.0  # the top token alone holds more than p
    logits[:, -1] = float("-inf")  # the mask token
    probs = torch.softmax(logits.double(), -1)
    small = torch.softmax(logits[:, -300:].double(), -1)  # a vocabulary the sort path handles
    for p in (0.1, 0.5, 0.9, 0.99):
        assert torch.equal(nucleus_keep(probs, p, rule), _sorted_keep(probs, p, rule)), p
        assert torch.equal(nucleus_keep(small, p, rule), _sorted_keep(small, p, rule)), p
    assert 2000 < int(nucleus_keep(probs, 0.9, rule)[60:90].sum(-1).min())  # flat rows: wide nuclei
    assert int(nucleus_keep(probs, 0.9, rule)[90:100].sum()) == 10  # only the top token
    u = torch.rand(200, 1, generator=gen, dtype=torch.float64)
    u[::17] = 1.0 - 1e-16
    u[1::23] = 1.0  # the CDF's far end: the last kept token, never one without mass
    got = categorical(logits, u, p=0.9, rule=rule)
    assert got[::7].tolist() == [draw(logits[i], float(u[i]), 0.9, rule) for i in range(0, 200, 7)]
    assert bool(nucleus_keep(probs, 0.9, rule).gather(1, got[:, None]).all())


def test_ancestral_step_unmasking_probability():
    n = 20_000
    logits = torch.zeros(1, n, V)
    logits[..., MASK] = float("-inf")
    z = torch.full((1, n), MASK)
    z[0, :100] = 4  # already decoded
    for t, s, rate in [(1.0, 0.5, 0.5), (0.5, 0.4, 0.2), (0.3, 0.0, 1.0)]:
        out = ancestral_step(logits, z, t, s, MASK, Noise([123], "cpu"))
        assert torch.equal(out[0, :100], z[0, :100])
        opened = out[0, 100:] != MASK
        assert float(opened.double().mean()) == pytest.approx(rate, abs=0.015)
        drawn = out[0, 100:][opened]
        assert bool((drawn < MASK).all())
        if rate == 0.5:  # uniform over the five real tokens
            freq = torch.bincount(drawn, minlength=MASK).double() / len(drawn)
            torch.testing.assert_close(freq, torch.full((MASK,), 0.2, dtype=torch.float64), rtol=0, atol=0.02)
