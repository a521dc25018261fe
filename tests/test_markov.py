"""The Markov-chain task (pipeline.tasks.markov): exact likelihood and entropy against hand
arithmetic and brute force, impossible sequences, the sampler, data preparation, registration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError, ProsecoError
from pipeline.tasks import ModelInfo, task_class
from pipeline.tasks import markov as M


def hand_chain() -> M.Chain:
    """Alphabet 3, length 4, tables written out by hand (rows sum to 1, zeros = disallowed)."""
    start = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    first = torch.tensor([[0.0, 0.6, 0.4], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    trans = torch.full((3, 3, 3), 1.0 / 3, dtype=torch.float64)
    trans[0, 1] = torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64)
    trans[1, 0] = torch.tensor([0.0, 0.1, 0.9], dtype=torch.float64)
    return M.Chain(start, first, trans, seq_len=4)


def loop_loglik(chain: M.Chain, seq: list[int]) -> float:
    """log P(seq) by looking up each table entry in a plain loop (independent of the vectorised code)."""
    p = float(chain.start[seq[0]]) * float(chain.first[seq[0], seq[1]])
    for t in range(2, len(seq)):
        p *= float(chain.trans[seq[t - 2], seq[t - 1], seq[t]])
    return math.log(p) if p > 0 else -math.inf


def test_loglik_of_a_hand_computed_sequence():
    chain = hand_chain()
    # P(0 1 0 2) = start[0] * first[0,1] * trans[0,1,0] * trans[1,0,2] = 0.5 * 0.6 * 0.25 * 0.9 = 0.0675
    ll = M.loglik(chain, torch.tensor([[0, 1, 0, 2]]))
    assert ll.dtype == torch.float64
    assert float(ll[0]) == pytest.approx(math.log(0.0675), abs=1e-12)
    # and the default chain agrees with table look-ups on its own samples
    big = M.default_chain()
    rows = M.sample(big, 5, seed=3)
    for row, value in zip(rows.tolist(), M.loglik(big, rows).tolist()):
        assert value == pytest.approx(loop_loglik(big, row), abs=1e-9)


def test_impossible_sequences_score_minus_inf():
    chain = hand_chain()
    bad = torch.tensor([[0, 1, 1, 0],   # trans[0,1,1] = 0: a disallowed transition
                        [0, 0, 1, 2],   # first[0,0] = 0
                        [0, 1, 3, 2],   # the mask id (3 for alphabet 3)
                        [0, 1, -1, 2],  # an id out of range
                        [0, 1, 0, 7]])
    assert torch.isneginf(M.loglik(chain, bad)).all()
    big = M.default_chain()
    row = M.sample(big, 1, seed=0)[0]
    a, b = int(row[10]), int(row[11])
    disallowed = int(torch.nonzero(big.trans[a, b] == 0)[0])
    for t, value in ((12, disallowed), (12, M.MASK_ID), (0, M.MASK_ID), (63, M.VOCAB_SIZE + 5)):
        broken = row.clone()
        broken[t] = value
        s = M.score(torch.stack([row, broken]))
        assert s["impossible"] == 0.5
        raw = float(M.loglik(big, row[None])[0]) / M.SEQ_LEN
        assert s["loglik"] == pytest.approx((raw + M.IMPOSSIBLE_LOGLIK) / 2, abs=1e-12)
        assert s["nll_gap"] == pytest.approx(-raw - s["entropy"], abs=1e-12)
        if value != disallowed:  # an invalid id zeroes the factors whose context holds it: t .. t + 2
            bad = min(3, M.SEQ_LEN - t)
            assert s["valid_transitions"] == pytest.approx((2 * M.SEQ_LEN - bad) / (2 * M.SEQ_LEN))


def test_score_by_hand_on_the_hand_chain():
    chain = hand_chain()
    tokens = torch.tensor([[0, 1, 0, 2], [0, 1, 0, 2], [0, 1, 1, 0]])
    s = M.score(tokens, chain)
    lp = math.log(0.0675) / 4
    assert s["loglik"] == pytest.approx((2 * lp + M.IMPOSSIBLE_LOGLIK) / 3, abs=1e-12)
    assert s["impossible"] == pytest.approx(1 / 3)
    assert s["nll_gap"] == pytest.approx(-lp - M.entropy_per_token(chain), abs=1e-12)
    assert s["distinct"] == pytest.approx(2 / 3)
    # graded: every factor of rows 1-2 is allowed, row 3 breaks one of four (trans[0, 1, 1] = 0)
    assert s["valid_transitions"] == pytest.approx(11 / 12)
    # per factor: rows 1-2 exact; row 3 = log of its three allowed factors + one floored factor
    row3 = math.log(chain.start[0] * chain.first[0, 1] * chain.trans[1, 1, 0]) + M.IMPOSSIBLE_LOGLIK
    assert s["token_loglik"] == pytest.approx((2 * 4 * lp + row3) / 12, abs=1e-12)
    # per-sample unigram entropy: rows 1-2 hold {0: 2, 1: 1, 2: 1}, row 3 {0: 2, 1: 2}
    h12 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert s["unigram_entropy"] == pytest.approx((2 * h12 + math.log(2)) / 3, abs=1e-12)
    all_bad = M.score(tokens[2:], chain)
    assert all_bad["loglik"] == M.IMPOSSIBLE_LOGLIK and math.isnan(all_bad["nll_gap"])


def test_floor_lies_below_every_allowed_probability():
    """Monotone primary: any possible sample scores above an impossible one."""
    c = M.default_chain()
    smallest = min(float(t[t > 0].min()) for t in (c.start, c.first, c.trans))
    assert M.IMPOSSIBLE_LOGLIK < math.log(smallest)
    assert smallest >= M.FLOOR_MIX / M.ALPHABET - 1e-12


def test_entropy_equals_brute_force_enumeration():
    for chain in (M.build_chain(alphabet=3, successors=2, seq_len=4, seed=11), hand_chain()):
        seqs = [list(s) for s in itertools.product(range(3), repeat=4)]  # all 81
        logp = [loop_loglik(chain, s) for s in seqs]
        probs = [math.exp(v) for v in logp]
        assert math.fsum(probs) == pytest.approx(1.0, abs=1e-12)
        brute = -math.fsum(p * v for p, v in zip(probs, logp) if p > 0) / 4
        assert M.entropy_per_token(chain) == pytest.approx(brute, abs=1e-12)
        exact = M.loglik(chain, torch.tensor(seqs))
        assert torch.allclose(exact, torch.tensor(logp, dtype=torch.float64), atol=1e-12)


def test_samples_mean_nll_matches_the_entropy():
    c = M.default_chain()
    x = M.sample(c, 20000, seed=7)
    nll = -M.loglik(c, x) / M.SEQ_LEN
    assert torch.isfinite(nll).all()
    h = M.entropy_per_token(c)
    assert 0.5 < h < math.log(M.SUCCESSORS)
    assert float(nll.mean()) == pytest.approx(h, abs=0.01)  # std err ~0.001
    s = M.score(x[:2000])
    assert s["impossible"] == 0.0 and s["distinct"] == 1.0 and abs(s["nll_gap"]) < 0.02
    assert s["unigram_entropy"] == pytest.approx(s["process_unigram_entropy"], abs=0.02)


def test_sampler_and_chain_are_deterministic_under_seeds():
    c = M.default_chain()
    assert torch.equal(M.sample(c, 50, seed=5), M.sample(c, 50, seed=5))
    assert not torch.equal(M.sample(c, 50, seed=5), M.sample(c, 50, seed=6))
    a, b = M.build_chain(seed=1), M.build_chain(seed=1)
    assert torch.equal(a.trans, b.trans) and a.fingerprint() == b.fingerprint()
    assert not torch.equal(a.trans, M.build_chain(seed=2).trans)
    assert c.fingerprint() == M.build_chain().fingerprint()


def test_chain_is_sparse_regular_and_mixes():
    c = M.default_chain()
    allowed = c.trans > 0
    assert (allowed.sum(dim=2) == M.SUCCESSORS).all()  # k successors per context
    assert (allowed.sum(dim=0) == M.SUCCESSORS).all()  # every pair (b, c) follows exactly k contexts
    assert torch.allclose(c.trans.sum(dim=2), torch.ones(M.ALPHABET, M.ALPHABET, dtype=torch.float64))
    mix = M.mixing_check(c)
    assert mix["strongly_connected"] and mix["steps_to_all_pairs"] <= 10
    # a chain that only repeats its last symbol never leaves (a, a): not strongly connected
    stuck = torch.zeros(2, 2, 2, dtype=torch.float64)
    stuck[:, 0, 0] = stuck[:, 1, 1] = 1.0
    eye = torch.eye(2, dtype=torch.float64)
    lonely = M.Chain(torch.tensor([0.5, 0.5], dtype=torch.float64), eye, stuck, seq_len=6)
    assert M.mixing_check(lonely) == {"strongly_connected": False, "steps_to_all_pairs": None}


def test_parallel_decoding_error_exact_and_by_simulation():
    c = M.default_chain()
    err = M.independent_pair_error(c)
    assert err == pytest.approx(0.366, abs=0.001)  # the module docstring's figure
    # Monte Carlo of the definition: a context from the process, then X_t and X_{t+1} drawn
    # independently from their exact marginals given it
    x = M.sample(c, 4000, seed=9)
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(2, M.SEQ_LEN - 1, (len(x),), generator=gen)
    a, b = x[torch.arange(len(x)), t - 2], x[torch.arange(len(x)), t - 1]
    q = torch.einsum("nc,ncd->nd", c.trans[a, b], c.trans[b])  # q(d) = sum_c P(c | a, b) P(d | b, c)
    cc = torch.multinomial(c.trans[a, b], 1, generator=gen).squeeze(1)
    dd = torch.multinomial(q, 1, generator=gen).squeeze(1)
    sim = float((c.trans[b, cc, dd] == 0).double().mean())
    assert sim == pytest.approx(err, abs=0.04)  # std err ~0.008
    deterministic = M.build_chain(alphabet=4, successors=1, seq_len=8, seed=3)  # one successor: no error
    assert M.independent_pair_error(deterministic) == pytest.approx(0.0, abs=1e-12)


def _cfg(*overrides: str):
    return load_config(overrides=["data.task=markov", "data.seq_len=64", "model.max_seq_len=64", *overrides])


def test_config_requires_sequences_of_64():
    assert _cfg().data.task == "markov"
    with pytest.raises(ConfigError, match="data.seq_len must be 64 for data.task=markov, got 32"):
        _cfg("data.seq_len=32")
    from pipeline.config.validate import _TASK_SEQ_LEN

    assert _TASK_SEQ_LEN["markov"] == M.SEQ_LEN


def test_prepare_and_load(tmp_path):
    cfg = _cfg("data.split_seed=5")
    manifest = M.prepare_data(cfg, tmp_path / "d")
    assert manifest["process_seed"] == M.PROCESS_SEED and manifest["successors"] == M.SUCCESSORS
    assert manifest["entropy_per_token"] == pytest.approx(M.entropy_per_token(M.default_chain()))
    again = M.prepare_data(cfg, tmp_path / "d")
    assert again["fingerprint"] == manifest["fingerprint"]
    data = M.load(tmp_path / "d")
    assert data["train"].dtype == torch.long and data["train"].shape == (M.N_TRAIN, M.SEQ_LEN)
    assert torch.equal(data["train"][:10], M.sample(M.default_chain(), 10, seed=5))
    assert torch.isfinite(M.loglik(M.default_chain(), data["heldout"])).all()
    assert not torch.equal(data["heldout"][:10], data["train"][:10])
    with pytest.raises(ProsecoError, match="different prepared data"):
        M.prepare_data(_cfg("data.split_seed=6"), tmp_path / "d")
    with pytest.raises(ProsecoError, match="handles 'markov' only"):
        M.prepare_data(load_config(), tmp_path / "e")


def test_eval_task_registration_and_layout():
    cls = task_class("markov")
    assert cls is M.Task and cls.primary == "token_loglik" and cls.higher_is_better and cls.diversity == "unigram_entropy"
    assert str(M.PROCESS_SEED) in cls.version and M.SUITE_TASKS[0] == "markov"
    cfg = _cfg()
    with pytest.raises(ProsecoError, match="needs a model of its layout"):
        cls(cfg, {}, ModelInfo(vocab_size=5, mask_id=4, seq_len=16))
    with pytest.raises(ProsecoError, match="needs a model of its layout"):
        cls(cfg, {}, ModelInfo(vocab_size=M.VOCAB_SIZE, mask_id=M.MASK_ID, seq_len=32))
    task = cls(cfg, {}, ModelInfo(vocab_size=M.VOCAB_SIZE, mask_id=M.MASK_ID, seq_len=M.SEQ_LEN))
    x = M.sample(M.default_chain(), 8, seed=1)
    x[0, 0] = M.MASK_ID
    metrics = task.score(x, None)
    assert metrics["impossible"] == pytest.approx(1 / 8) and {"loglik", "distinct"} <= set(metrics)
    texts = task.decode(x)
    assert texts[0][0] == "_" and len(texts[1]) == M.SEQ_LEN and set(texts[1]) <= set(M.SYMBOLS)


def test_posterior_marginals_equal_brute_force_conditioning():
    chain = M.build_chain(alphabet=3, successors=2, seq_len=4, seed=11)
    seqs = torch.tensor(list(itertools.product(range(3), repeat=4)))
    probs = M.loglik(chain, seqs).exp()
    for observed in ([3, 3, 3, 3], [seqs[40, 0], 3, 3, seqs[40, 3]], [3, seqs[40, 1], 3, 3]):
        obs = torch.tensor([observed])
        agree = ((seqs == obs) | (obs == 3)).all(dim=1)
        w = probs * agree
        brute = torch.stack([torch.stack([w[seqs[:, t] == s].sum() for s in range(3)]) for t in range(4)])
        assert torch.allclose(M.posterior_marginals(chain, obs)[0], brute / w.sum(), atol=1e-12)
    big = M.default_chain()
    x = M.sample(big, 3, seed=2)
    post = M.posterior_marginals(big, x)  # everything observed: point masses on the tokens
    assert torch.allclose(post, torch.nn.functional.one_hot(x, M.ALPHABET).double(), atol=1e-12)


def test_oracle_decoding_is_exact_one_token_per_step_and_fails_in_one_step():
    chain = M.build_chain(alphabet=3, successors=2, seq_len=4, seed=11)
    x = M.oracle_decode(chain, 6000, steps=4, seed=1)
    seqs = torch.tensor(list(itertools.product(range(3), repeat=4)))
    probs = M.loglik(chain, seqs).exp()
    freq = ((x[:, None, :] == seqs[None]).all(dim=2)).double().mean(dim=0)
    assert torch.isfinite(M.loglik(chain, x)).all()
    assert float((freq - probs).abs().max()) < 0.02  # max std err ~0.0065
    one_step = M.oracle_decode(M.default_chain(), 200, steps=1, seed=1)
    assert M.score(one_step)["impossible"] > 0.99  # one step, exact marginals: almost always impossible
    assert M.score(one_step)["loglik"] < M.IMPOSSIBLE_LOGLIK + 0.2
    process = M.score(M.sample(M.default_chain(), 200, seed=4))  # the process: -H = -0.977 per token
    assert process["loglik"] == pytest.approx(process["token_loglik"], abs=1e-12) and process["impossible"] == 0.0
    assert process["token_loglik"] > -1.1
    assert torch.equal(M.oracle_decode(chain, 5, steps=2, seed=3), M.oracle_decode(chain, 5, steps=2, seed=3))
