"""A synthetic language with an exact likelihood: a seeded, sparse second-order Markov chain.

Why this task (issue 13): the 4x4 Sudoku caps a sequence at 16 tokens; here sequences have
``SEQ_LEN = 64`` tokens and every sample is scored exactly by its probability under the true
process - no judge model. The process: symbols ``0..ALPHABET-1`` (token ids; the mask is id
``ALPHABET``); ``X1 ~ start``, ``X2 | X1 ~ first[X1]``, ``Xt | X(t-2), X(t-1) ~ trans[X(t-2), X(t-1)]``.
Every context allows only ``SUCCESSORS`` (k) of the ``ALPHABET`` (A) symbols, with random
probabilities; all tables are built from ``PROCESS_SEED`` alone (:func:`build_chain`).

Why independent parallel unmasking provably hurts. A masked diffusion model unmasks the tokens of
one step independently, each from its own marginal. Take two adjacent positions t, t+1 decoded in
the same step after a context (a, b), with even *perfect* marginals p(c) = trans[a, b, c] and
q(d) = sum_c' p(c') trans[b, c', d]. The pair is possible only if d is a successor of (b, c), so
it is impossible with probability ``1 - sum_c p(c) q(succ(b, c)) >= 1 - sum_c p(c)^2 - sum_{c' != c}
p(c) p(c') trans[b, c', succ(b, c)]``: whenever two successors c != c' of (a, b) have different
successor sets (each of size k, so neither contains the other), this is strictly positive. With k = 3 of A = 8 it is
about a third (:func:`independent_pair_error` computes it exactly over the process: 0.37 for the default chain).
A sampler with T < L steps decodes on the order of L/T adjacent pairs together, so plain MDM
needs about L steps for possible sequences, and a corrector that revisits decoded tokens
(ProSeCo, arXiv 2602.11590, Algorithms 2-3) can repair exactly these local contradictions.

Construction (so that every context is reachable and the chain mixes): for each most-recent
symbol b the successor sets of the contexts (a, b), a = 0..A-1, are k-wide windows of a random
cyclic order of the alphabet, starting at a random permutation of the a's. Every pair (b, c) is
then the successor of exactly k contexts (a, b): the graph on the A^2 context pairs is k-regular
in and out, and :func:`mixing_check` verifies it is strongly connected and primitive (after a few
steps every context has positive probability), so samples are diverse. Probabilities are
Dirichlet(1) draws mixed with the uniform over the k successors (``FLOOR_MIX``), so none is tiny.

Metrics of n samples (:func:`score`, float64): ``token_loglik`` (primary, higher is better), the mean
over all tokens of log p(token | its context) under the true chain, each impossible factor (a
disallowed transition, a mask or out-of-range id) counting ``IMPOSSIBLE_LOGLIK`` instead of -inf;
``loglik``, the same per sample but with an impossible sample counting ``IMPOSSIBLE_LOGLIK`` for
every token. Both are the exact likelihood per token wherever a sample is possible. The floor,
log(1e-6), lies below the log-probability of every allowed transition (each is >= FLOOR_MIX / A,
about 0.03), so replacing an impossible factor by any allowed one always raises both. Why the
per-factor one is primary: at 64 tokens a small model's samples are nearly all impossible somewhere
(then ``loglik`` is the floor for every method and says nothing), while ``token_loglik`` still
counts how many transitions are wrong and how likely the rest are. A sampler that collapses onto
the likeliest sequences also scores high on both; the other metrics show it:
``impossible`` (fraction with probability 0: a disallowed transition, a mask id, an id out of
range), ``valid_transitions`` (graded: the fraction of all positions whose token is allowed after
its context - it shows a model's progress long before whole samples become possible), ``nll_gap`` (mean NLL per token of the possible samples minus the process entropy per
token: negative = too-likely samples, positive = unlikely ones; null when no sample is possible),
``entropy`` (the exact process entropy per token, :func:`entropy_per_token`), ``distinct``
(distinct sequences / samples; ~1.0 for the process) and ``unigram_entropy`` (the task's diversity
metric: the paper's per-sample unigram entropy, averaged) beside ``process_unigram_entropy`` (the
same on a fixed-seed sample of ``REFERENCE_SAMPLES`` process sequences, 2.02 nats). Why unigram
entropy: a corrector loop that rewrites samples into repetitive, too-likely sequences keeps every
sample distinct (``distinct`` ~1.0) while their unigram entropy falls far below the process's,
measured on an MDM model's corrector loop here (2.02 -> 0.84, docs/science.md).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.errors import ProsecoError
from pipeline.tasks import arrays
from pipeline.tasks.base import EvalTask, ModelInfo

NAME = "markov"
ALPHABET = 8  # symbols 0..7 (24 was tried first: a 4-layer model learned too little of it in 40 CPU minutes)
ORDER = 2  # the chain is second order (the tables below); recorded in the manifest and version
SUCCESSORS = 3  # k: allowed next symbols per context
PROCESS_SEED = 20260213  # fixes the start distribution and the transition tables
FLOOR_MIX = 0.25  # weight of the uniform over the k successors in every probability vector
VOCAB_SIZE = ALPHABET + 1
MASK_ID = VOCAB_SIZE - 1
SEQ_LEN = 64
SUITE_TASKS = ("markov",)
IMPOSSIBLE_LOGLIK = math.log(1e-6)  # per-token score of an impossible sample in ``loglik``
N_TRAIN = 32768
N_HELDOUT = 2048
REFERENCE_SAMPLES = 4096
SYMBOLS = "abcdefghijklmnopqrstuvwxyz"
assert ALPHABET <= len(SYMBOLS), "to_text writes one letter per symbol"


@dataclass(frozen=True)
class Chain:
    """A second-order chain: ``start`` [A], ``first`` [A, A] (X2 | X1), ``trans`` [A, A, A]
    (X_t | X_{t-2}, X_{t-1}), all float64 with rows summing to 1; sequences of ``seq_len``."""

    start: torch.Tensor
    first: torch.Tensor
    trans: torch.Tensor
    seq_len: int

    @property
    def alphabet(self) -> int:
        return int(self.start.shape[0])

    def fingerprint(self) -> str:
        """sha256 of the tables' float64 bytes and the length: identifies the process exactly."""
        h = hashlib.sha256(str(self.seq_len).encode())
        for table in (self.start, self.first, self.trans):
            h.update(table.numpy().tobytes())
        return h.hexdigest()


def _dirichlet_rows(rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``rows`` probability vectors over k outcomes: Dirichlet(1) (normalised exponentials)
    mixed with the uniform, weight ``FLOOR_MIX``, so every entry is >= FLOOR_MIX / k."""
    e = -torch.log(torch.rand(rows, k, generator=gen, dtype=torch.float64).clamp_min(1e-300))
    return (1.0 - FLOOR_MIX) * e / e.sum(dim=1, keepdim=True) + FLOOR_MIX / k


def _sparse_rows(alphabet: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[A, A] rows over the next symbol for the A contexts sharing one most-recent symbol:
    context i allows the k symbols of a window of a random cyclic order, starting at a random
    position; every symbol is allowed by exactly k contexts."""
    order = torch.randperm(alphabet, generator=gen)
    starts = torch.randperm(alphabet, generator=gen)
    allowed = order[(starts[:, None] + torch.arange(k)[None, :]) % alphabet]  # [A, k]
    rows = torch.zeros(alphabet, alphabet, dtype=torch.float64)
    rows.scatter_(1, allowed, _dirichlet_rows(alphabet, k, gen))
    return rows


def build_chain(alphabet: int = ALPHABET, successors: int = SUCCESSORS, seq_len: int = SEQ_LEN,
                seed: int = PROCESS_SEED) -> Chain:
    """The chain of these sizes, built deterministically from ``seed`` (the task uses the defaults)."""
    if alphabet < 2 or not 1 <= successors <= alphabet or seq_len < 2:
        raise ValueError(f"need alphabet >= 2, 1 <= successors <= alphabet, seq_len >= 2; got "
                         f"{alphabet}, {successors}, {seq_len}")
    gen = torch.Generator().manual_seed(int(seed))
    start = _dirichlet_rows(1, alphabet, gen)[0]
    first = _sparse_rows(alphabet, successors, gen)
    trans = torch.zeros(alphabet, alphabet, alphabet, dtype=torch.float64)
    for b in range(alphabet):  # contexts (a, b) with most recent symbol b
        trans[:, b, :] = _sparse_rows(alphabet, successors, gen)
    return Chain(start, first, trans, int(seq_len))


@functools.lru_cache(maxsize=1)
def default_chain() -> Chain:
    """The task's process (module constants)."""
    return build_chain()


def sample(chain: Chain, n: int, seed: int) -> torch.Tensor:
    """``n`` sequences [n, seq_len] (torch.long) drawn from ``chain`` by inverse-CDF sampling
    with a ``torch.Generator`` seeded by ``seed`` (deterministic, independent of threads)."""
    gen = torch.Generator().manual_seed(int(seed))
    u = torch.rand(n, chain.seq_len, generator=gen, dtype=torch.float64)
    A = chain.alphabet

    def draw(probs: torch.Tensor, col: int) -> torch.Tensor:
        cdf = probs.cumsum(dim=-1)
        return (cdf < u[:, col : col + 1] * cdf[..., -1:]).sum(dim=-1).clamp_max(A - 1)

    out = torch.empty(n, chain.seq_len, dtype=torch.long)
    out[:, 0] = draw(chain.start.expand(n, A), 0)
    out[:, 1] = draw(chain.first[out[:, 0]], 1)
    for t in range(2, chain.seq_len):
        out[:, t] = draw(chain.trans[out[:, t - 2], out[:, t - 1]], t)
    return out


def factors(chain: Chain, tokens: torch.Tensor) -> torch.Tensor:
    """[n, seq_len] float64: the probability of each token given its context under ``chain``
    (start, first, then the order-2 transition); 0 for a disallowed transition and wherever a token
    of the factor's context is a mask id or out of range."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2 or tokens.shape[1] != chain.seq_len:
        raise ValueError(f"expected tokens of shape [n, {chain.seq_len}], got {tuple(tokens.shape)}")
    tokens = tokens.long()
    ok = (tokens >= 0) & (tokens < chain.alphabet)
    x = tokens.clamp(0, chain.alphabet - 1)  # factors touching an out-of-range id are zeroed below
    probs = torch.cat([chain.start[x[:, :1]], chain.first[x[:, 0], x[:, 1]][:, None],
                       chain.trans[x[:, :-2], x[:, 1:-1], x[:, 2:]]], dim=1)
    context_ok = ok.clone()
    context_ok[:, 1:] &= ok[:, :-1]
    context_ok[:, 2:] &= ok[:, :-2]
    return torch.where(context_ok, probs, torch.zeros_like(probs))


def loglik(chain: Chain, tokens: torch.Tensor) -> torch.Tensor:
    """Exact log-probability (nats, float64) of each row of ``tokens`` [n, seq_len] under
    ``chain``: -inf for a sequence with a disallowed transition, a mask id or an id out of range."""
    return torch.log(factors(chain, tokens)).sum(dim=1)  # log(0) = -inf marks an impossible row


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the probability vectors along the last dimension (0 log 0 = 0)."""
    return -torch.where(probs > 0, probs * torch.log(probs), torch.zeros_like(probs)).sum(dim=-1)


def pair_marginals(chain: Chain) -> list[torch.Tensor]:
    """P(X_{t-1} = a, X_t = b) [A, A] for t = 2..seq_len (index 0 is positions 1-2), exactly."""
    m = chain.start[:, None] * chain.first
    out = [m]
    for _ in range(chain.seq_len - 2):
        m = torch.einsum("ab,abc->bc", m, chain.trans)
        out.append(m)
    return out


def entropy_per_token(chain: Chain) -> float:
    """The process's exact entropy per token (nats): (H(X1) + H(X2|X1) + sum_{t>=3}
    H(X_t | X_{t-2}, X_{t-1})) / L, each conditional entropy averaged over the exact pair marginal."""
    h_trans = _entropy(chain.trans)  # [A, A]: entropy of each context's next symbol
    total = _entropy(chain.start) + (chain.start * _entropy(chain.first)).sum()
    total = total + sum((m * h_trans).sum() for m in pair_marginals(chain)[:-1])
    return float(total) / chain.seq_len


def independent_pair_error(chain: Chain) -> float:
    """Probability that two adjacent tokens drawn independently from their exact marginals given
    the two tokens before them form an impossible triple, averaged over positions t = 3..L-1 and the
    process's contexts: the error one step of parallel unmasking makes per adjacent pair."""
    q = torch.einsum("abc,bcd->abd", chain.trans, chain.trans)  # marginal of X_{t+1} given (a, b)
    allowed = (chain.trans > 0).double()  # [b, c, d]
    possible = torch.einsum("abc,abd,bcd->ab", chain.trans, q, allowed)
    marg = pair_marginals(chain)[:-2]  # contexts of positions t = 3..L-1
    return float(sum((m * (1.0 - possible)).sum() for m in marg) / len(marg))


def posterior_marginals(chain: Chain, observed: torch.Tensor) -> torch.Tensor:
    """Exact P(X_t = s | the observed tokens) [n, L, A] (float64) for ``observed`` [n, L] with
    ``MASK_ID`` (any id outside the alphabet) at hidden positions: forward-backward over the
    context pairs. This is the perfect denoiser of a masked diffusion model, the upper bound of
    what any trained network can predict; a row whose observed tokens are impossible is all NaN."""
    observed = torch.as_tensor(observed).long()
    n, L, A = observed.shape[0], chain.seq_len, chain.alphabet
    if observed.dim() != 2 or observed.shape[1] != L:
        raise ValueError(f"expected observed of shape [n, {L}], got {tuple(observed.shape)}")
    known = (observed >= 0) & (observed < A)
    ok = torch.ones(n, L, A, dtype=torch.float64)  # evidence: 1 where a symbol agrees with the observation
    ok[known] = torch.nn.functional.one_hot(observed[known], A).double()

    def norm(x: torch.Tensor) -> torch.Tensor:  # rescale per row (the posterior is a ratio)
        return x / x.sum(dim=(1, 2), keepdim=True)

    fwd = [norm(chain.start[None, :, None] * chain.first[None] * ok[:, 0, :, None] * ok[:, 1, None, :])]
    for t in range(2, L):  # fwd[i]: pair (X_i, X_{i+1}) (0-based) with the evidence up to i + 1
        fwd.append(norm(torch.einsum("nab,abc->nbc", fwd[-1], chain.trans) * ok[:, t, None, :]))
    out = torch.empty(n, L, A, dtype=torch.float64)
    back = torch.ones(n, A, A, dtype=torch.float64)  # the evidence after i + 1, given the pair
    for i in range(L - 2, -1, -1):
        post = norm(fwd[i] * back)
        out[:, i + 1] = post.sum(dim=1)
        if i == 0:
            out[:, 0] = post.sum(dim=2)
        back = norm(torch.einsum("abc,nc,nbc->nab", chain.trans, ok[:, i + 1], back))
    return out


def oracle_decode(chain: Chain, n: int, steps: int, seed: int) -> torch.Tensor:
    """``n`` sequences decoded like a masked diffusion model with the perfect denoiser
    (:func:`posterior_marginals`): a random order per sequence cut into ``steps`` equal groups, each
    group's tokens drawn independently from their exact posteriors in one step. With ``steps = L``
    this samples the process exactly; fewer steps show the cost of parallel unmasking that no
    network can avoid without correction. Once a row is impossible its posterior is undefined and
    its remaining tokens are drawn uniformly (it stays impossible). Measured on the default chain
    (100 sequences each, +-0.05): impossible fraction 1.0 at 8 steps, 0.87 at 16, 0.57 at 24, 0.47
    at 32, 0.39 at 40, 0.33 at 48, 0.0 at 64."""
    L, A = chain.seq_len, chain.alphabet
    if not 1 <= steps <= L:
        raise ValueError(f"steps must be in 1..{L}, got {steps}")
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.rand(n, L, generator=gen).argsort(dim=1)
    x = torch.full((n, L), A, dtype=torch.long)  # A: hidden
    for k in range(steps):
        probs = torch.nan_to_num(posterior_marginals(chain, x), nan=1.0 / A)
        draw = torch.multinomial(probs.reshape(-1, A), 1, generator=gen).reshape(n, L)
        group = torch.zeros(n, L, dtype=torch.bool)
        group.scatter_(1, order[:, L * k // steps : L * (k + 1) // steps], True)
        x = torch.where(group, draw, x)
    return x


def mixing_check(chain: Chain) -> dict:
    """How well the chain mixes over context pairs: ``strongly_connected`` (every pair reaches
    every pair) and ``steps_to_all_pairs`` (first position t whose pair marginal (X_{t-1}, X_t) is
    positive everywhere, None if never within the sequence)."""
    A = chain.alphabet
    adj = torch.zeros(A * A, A * A, dtype=torch.bool)
    a, b, c = torch.nonzero(chain.trans > 0, as_tuple=True)
    adj[a * A + b, b * A + c] = True
    reach = adj | torch.eye(A * A, dtype=torch.bool)
    for _ in range(max(1, math.ceil(math.log2(A * A)))):  # transitive closure by squaring
        reach = reach | ((reach.double() @ reach.double()) > 0)
    first_full = next((t for t, m in enumerate(pair_marginals(chain), start=2) if bool((m > 0).all())), None)
    return {"strongly_connected": bool(reach.all()), "steps_to_all_pairs": first_full}


@functools.lru_cache(maxsize=1)
def _process_stats() -> dict:
    chain = default_chain()
    ref = sample(chain, REFERENCE_SAMPLES, seed=PROCESS_SEED + 1)
    return {"entropy": entropy_per_token(chain), "process_unigram_entropy": unigram_entropy(ref),
            "independent_pair_error": independent_pair_error(chain), **mixing_check(chain)}


def unigram_entropy(tokens: torch.Tensor, vocab: int = VOCAB_SIZE) -> float:
    """Per sample, the entropy (nats) of the empirical distribution of its ids, averaged over
    samples (the paper's / MDLM's entropy; ids outside 0..vocab-1 share one extra bin)."""
    tokens = torch.as_tensor(tokens).long()
    if len(tokens) == 0:
        return 0.0
    ids = torch.where((tokens >= 0) & (tokens < vocab), tokens, torch.full_like(tokens, vocab))
    counts = torch.nn.functional.one_hot(ids, vocab + 1).sum(dim=1).double()
    return float(_entropy(counts / tokens.shape[1]).mean())


def score(tokens: torch.Tensor, chain: Chain | None = None) -> dict[str, float]:
    """The task's metrics of the samples ``tokens`` [n, L] (see the module docstring)."""
    chain = default_chain() if chain is None else chain
    tokens = torch.as_tensor(tokens).long()
    n, L = len(tokens), chain.seq_len
    if n == 0:
        raise ValueError("no samples to score")
    per_position = factors(chain, tokens)
    raw = torch.log(per_position).sum(dim=1) / L  # per token
    possible = torch.isfinite(raw)
    stats = _process_stats() if chain is default_chain() else {
        "entropy": entropy_per_token(chain), "process_unigram_entropy": math.nan}
    return {
        "token_loglik": float(torch.log(per_position).clamp_min(IMPOSSIBLE_LOGLIK).mean()),
        "loglik": float(torch.where(possible, raw, torch.full_like(raw, IMPOSSIBLE_LOGLIK)).mean()),
        "impossible": float((~possible).double().mean()),
        "valid_transitions": float((per_position > 0).double().mean()),
        "nll_gap": float(-raw[possible].mean()) - stats["entropy"] if bool(possible.any()) else math.nan,
        "entropy": stats["entropy"],
        "distinct": int(torch.unique(tokens, dim=0).shape[0]) / n,
        "unigram_entropy": unigram_entropy(tokens, chain.alphabet + 1),
        "process_unigram_entropy": stats["process_unigram_entropy"],
    }


def to_text(row: torch.Tensor) -> str:
    """A sequence as letters (symbol i -> the i-th letter), ``_`` for the mask, ``?`` for other ids."""
    def ch(x: int) -> str:
        if 0 <= x < ALPHABET:
            return SYMBOLS[x]
        return "_" if x == MASK_ID else "?"
    return "".join(ch(int(x)) for x in torch.as_tensor(row).reshape(-1).tolist())


# ------------------------------------------------------------------------------------ data
FORMAT_VERSION = 1
FILES = ("train.npy", "heldout.npy", "start.npy", "first.npy", "trans.npy")
HELDOUT_SEED_OFFSET = 1  # the held-out set's seed is split_seed + 1: a stream of its own


def process_settings() -> dict:
    """The constants that define the process and its layout (manifest, scorer version)."""
    return {"alphabet": ALPHABET, "order": ORDER, "successors": SUCCESSORS, "process_seed": PROCESS_SEED,
            "floor_mix": FLOOR_MIX, "seq_len": SEQ_LEN, "vocab_size": VOCAB_SIZE, "mask_id": MASK_ID}


def prepare_data(cfg: Any, out_dir: str | os.PathLike) -> dict:
    """Write the task's arrays folder (:mod:`pipeline.tasks.arrays`) into ``out_dir``; return its manifest.

    Files: ``train.npy`` (uint8 [N_TRAIN, 64]) and ``heldout.npy`` (uint8 [N_HELDOUT, 64]), sequences
    of the chain drawn with seeds ``data.split_seed`` and ``data.split_seed + 1``; ``start.npy``,
    ``first.npy``, ``trans.npy`` (float64), the process itself, so the folder says exactly what it
    was sampled from. The manifest records the process constants, its exact entropy per token, the
    parallel-decoding pair error and the mixing check. Idempotent; a folder holding other data is
    refused (see :func:`pipeline.tasks.arrays.write`).
    """
    data = cfg.data
    if data.task != NAME:
        raise ProsecoError(f"data.task={data.task!r}: this preparer handles {NAME!r} only")
    if data.seq_len != SEQ_LEN:
        raise ProsecoError(f"data.seq_len={data.seq_len} but {NAME} sequences have {SEQ_LEN} tokens")
    seed = data.split_seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ProsecoError(f"data.split_seed must be an integer, got {seed!r}")
    chain, stats = default_chain(), _process_stats()
    train = sample(chain, N_TRAIN, seed)
    held = sample(chain, N_HELDOUT, seed + HELDOUT_SEED_OFFSET)
    settings = {"format": FORMAT_VERSION, "task": NAME, **process_settings(), "split_seed": int(seed),
                "heldout_seed": int(seed) + HELDOUT_SEED_OFFSET, "chain_sha256": chain.fingerprint(),
                "entropy_per_token": stats["entropy"], "independent_pair_error": stats["independent_pair_error"],
                "strongly_connected": stats["strongly_connected"], "steps_to_all_pairs": stats["steps_to_all_pairs"]}
    tables = (chain.start.numpy(), chain.first.numpy(), chain.trans.numpy())
    blobs, manifest = arrays.build(
        dict(zip(FILES, (train.numpy().astype(np.uint8), held.numpy().astype(np.uint8), *tables))),
        settings, {"train": N_TRAIN, "heldout": N_HELDOUT})
    return arrays.write(out_dir, blobs, manifest, shown=("task", "split_seed", "process_seed"))[0]


def load(out_dir: str | os.PathLike) -> dict:
    """A prepared folder, every file's sha256 verified: ``train``, ``heldout`` (torch.long [N, 64]),
    ``start``, ``first``, ``trans`` (the tables, as stored) and ``manifest``. Refuses a folder whose
    process differs from this module's (other constants, an older version)."""
    out = arrays.load(out_dir, NAME, FILES)
    manifest = out["manifest"]
    if manifest.get("chain_sha256") != default_chain().fingerprint():
        raise ProsecoError(f"{out_dir} was sampled from another {NAME} process (process_seed "
                           f"{manifest.get('process_seed')!r}); re-run data prep into a new folder")
    return out


# ------------------------------------------------------------------------------------ evaluation
class Task(EvalTask):
    """``markov``: sequences generated from scratch, scored exactly under the true chain."""

    name = NAME
    vocab_size = VOCAB_SIZE
    seq_len = SEQ_LEN
    version = f"3-a{ALPHABET}-o{ORDER}-k{SUCCESSORS}-s{PROCESS_SEED}-f{FLOOR_MIX}-L{SEQ_LEN}"
    primary = "token_loglik"
    higher_is_better = True
    diversity = "unigram_entropy"  # distinct sequences stay ~1.0 even for samplers that collapse

    def __init__(self, cfg, options: dict, model: ModelInfo):
        super().__init__(cfg, options, model)
        if self.options:
            raise ProsecoError(f"task {NAME} takes no options, got {', '.join(sorted(self.options))}")
        self.check_layout("a model of its layout")

    def score(self, tokens, conditioning):
        return score(tokens)

    def decode(self, tokens):
        return [to_text(row) for row in tokens]
