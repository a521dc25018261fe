"""One unmasking step of each policy, and the draws they share (paper Alg. 2-3, ReMDM, LLaDA).

Pure functions on a batch: ``logits`` [B, L, V] (mask logit -inf), the current tokens ``z`` [B, L],
per-sample uniform draws from :class:`Noise`. Tokens are drawn only where a position changes, and
only those rows of ``logits`` are touched, so a step costs O(changed rows x V), not O(B x L x V).
The vocabulary-wide work (float64 softmax, nucleus, CDF) runs on blocks of rows small enough
to stay in cache (:func:`over_rows`); every row is computed alone, so the blocks change no result.

Nucleus rules (``rule``): ``official`` - the official ProSeCo/ReMDM code: keep the sorted tokens
whose cumulative mass is <= p, the most likely token always kept; ``minimal`` - the smallest top
set whose mass is >= p. Both renormalise.
"""

from __future__ import annotations

import torch

NUCLEUS_RULES = ("official", "minimal")
BLOCK_ELEMENTS = 1 << 18  # CPU: rows x V per block of vocabulary-wide work, 2 MiB in float64 (stays in cache)
# a GPU gains nothing from cache-sized blocks and pays ~20 kernel launches and a few host syncs per
# block (a launch-bound loop there): one block per step up to 128 MiB per float64 temporary
BLOCK_ELEMENTS_ACCELERATOR = 1 << 24
NUCLEUS_SUBBINS_LOG2 = 6  # nucleus bins: 2**6 per octave of probability...
NUCLEUS_BINS = 2048  # ...over 32 octaves below the top token (the rest share the last bin)
NUCLEUS_SORT_MAX = 512  # up to this vocabulary a full sort is cheaper than the bins
LOG2_E = 1.4426950408889634  # 1 / ln 2
VOCAB_CHUNK = 128  # on CPU, row_argmax and the CDF inversion reduce wide rows chunk by chunk of this many tokens


class SplitLogits:
    """Logits [B, L, V] of a batch whose sequences come from two tensors: ``fresh`` [n, L, V] for
    the sequences ``rows`` [n] (indices into B, ascending) just recomputed, ``base`` [B, L, V] for
    the others. The sampler's row cache (a sequence keeps its logits while nothing in it changed)
    would otherwise copy every recomputed sequence into the cache at every step: 130 MB at batch
    64 x 64 tokens x vocab 8192, as much time as the whole nucleus. Read through :func:`over_rows`
    (which gathers only the rows a step uses) or :meth:`merged`."""

    def __init__(self, base: torch.Tensor, fresh: torch.Tensor, rows: torch.Tensor):
        self.base, self.fresh, self.rows = base, fresh, rows
        self.shape, self.dtype, self.device = base.shape, base.dtype, base.device
        self.slot = torch.full((base.shape[0],), -1, dtype=torch.long, device=base.device)
        self.slot[rows] = torch.arange(len(rows), device=base.device)  # sequence -> its row in fresh, or -1

    def merged(self) -> torch.Tensor:
        """One new tensor holding every sequence's logits (a copy of both parts)."""
        return self.base.index_put((self.rows,), self.fresh)

    def settle(self, keep: torch.Tensor) -> torch.Tensor:
        """``base``, with the fresh sequences that ``keep`` [B] (bool) names written into it, in
        place: the caller drops this object and keeps only those sequences' logits."""
        moved = keep[self.rows]
        if bool(moved.any()):
            self.base[self.rows[moved]] = self.fresh[moved]
        return self.base

    def take(self, positions: torch.Tensor) -> torch.Tensor:
        """The logits rows [n, V] at the flat positions ``positions`` [n] (index into B x L)."""
        length, vocab = self.shape[-2], self.shape[-1]
        base, fresh = self.base.reshape(-1, vocab), self.fresh.reshape(-1, vocab)
        slot = self.slot[positions // length]
        inside = slot * length + positions % length  # the position in fresh (meaningless where slot < 0)
        new = slot >= 0
        if bool(new.all()):
            return fresh.index_select(0, inside)
        if not bool(new.any()):
            return base.index_select(0, positions)
        out = torch.empty(len(positions), vocab, dtype=self.dtype, device=self.device)
        new_at, old_at = new.nonzero().squeeze(1), (~new).nonzero().squeeze(1)
        out.index_copy_(0, new_at, fresh.index_select(0, inside[new_at]))
        return out.index_copy_(0, old_at, base.index_select(0, positions[old_at]))


def over_rows(fn, logits: torch.Tensor | SplitLogits, where: torch.Tensor, *per_position: torch.Tensor):
    """``fn(rows [n, V], *values [n])`` (a tensor or a tuple of them) on the rows of ``logits``
    [..., V] (or a :class:`SplitLogits`) at ``where`` [...], in ``where``'s row-major order (as
    ``logits[where]``), block by block of about BLOCK_ELEMENTS (BLOCK_ELEMENTS_ACCELERATOR off the
    CPU): neither the [n, V] gather nor its float64 copies are ever materialised whole."""
    vocab = logits.shape[-1]
    step = max(1, (BLOCK_ELEMENTS if logits.device.type == "cpu" else BLOCK_ELEMENTS_ACCELERATOR) // vocab)
    if isinstance(logits, SplitLogits):
        idx = where.reshape(-1).nonzero().squeeze(1)
        n, values = len(idx), [v.reshape(-1)[idx] for v in per_position]
        def block(i): return logits.take(idx[i:i + step])
        return _blocks(fn, block, n, step, values, logits.base.reshape(-1, vocab))
    flat = logits.reshape(-1, vocab)
    if bool(where.all()):  # every row: the blocks are views, nothing is gathered
        n, values = flat.shape[0], [v.reshape(-1) for v in per_position]
        def block(i): return flat[i:i + step]
    else:
        idx = where.reshape(-1).nonzero().squeeze(1)
        n, values = len(idx), [v.reshape(-1)[idx] for v in per_position]
        def block(i): return flat.index_select(0, idx[i:i + step])  # 5x faster than flat[idx] on CPU
    return _blocks(fn, block, n, step, values, flat)


def _blocks(fn, block, n: int, step: int, values: list[torch.Tensor], flat: torch.Tensor):
    """``fn`` over ``block(i)`` for i = 0, step, ... < n with the matching ``values``, concatenated."""
    parts = [fn(block(i), *(v[i:i + step] for v in values)) for i in range(0, n, step)]
    if not parts:  # no row: fn's own empty output
        return fn(flat[:0], *(v[:0] for v in values))
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(column) for column in zip(*parts))
    return torch.cat(parts)


def _chunked(x: torch.Tensor) -> bool:
    """Whether the rows of ``x`` take the chunked CPU paths (row_argmax, the CDF inversion): on CPU
    and at least 8 chunks wide. A GPU does each in one kernel, where the chunks would only add launches."""
    return x.device.type == "cpu" and x.shape[-1] >= 8 * VOCAB_CHUNK


def _per_chunk(rows: torch.Tensor, reduce) -> torch.Tensor:
    """``reduce(chunk, -1)`` of every chunk of VOCAB_CHUNK tokens of ``rows`` [N, V] (``torch.amax``,
    ``torch.sum``), the ragged last chunk included: [N, ceil(V / VOCAB_CHUNK)]."""
    vocab = rows.shape[-1]
    whole = vocab // VOCAB_CHUNK * VOCAB_CHUNK
    out = reduce(rows[:, :whole].unflatten(1, (whole // VOCAB_CHUNK, VOCAB_CHUNK)), -1)
    return torch.cat([out, reduce(rows[:, whole:], -1, keepdim=True)], 1) if whole < vocab else out


def _chunk_columns(start: torch.Tensor, vocab: int) -> torch.Tensor:
    """The columns [N, VOCAB_CHUNK] of the chunk starting at column ``start`` [N, 1] of each row;
    past the vocabulary's end (the ragged last chunk) they repeat its last column."""
    return (start + torch.arange(VOCAB_CHUNK, device=start.device)).clamp_(max=vocab - 1)


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` (the first index of the maximum, NaN counting as the maximum), 2.7-5x faster
    on CPU at vocabulary widths: torch's CPU argmax over a long last dimension runs at a fraction
    of the vectorised ``amax``. So: the maximum of each chunk of VOCAB_CHUNK tokens (``amax``),
    the first chunk holding the row's maximum, and the argmax within that chunk only. The first
    chunk holding it holds its first occurrence, so ties resolve as ``argmax``'s (a repeated last
    column is never first). Other devices and narrow rows call ``argmax`` itself."""
    if not _chunked(x):
        return x.argmax(-1)
    rows = x.reshape(-1, x.shape[-1])
    start = _per_chunk(rows, torch.amax).argmax(-1, keepdim=True) * VOCAB_CHUNK
    return (start + rows.gather(1, _chunk_columns(start, x.shape[-1])).argmax(-1, keepdim=True)).reshape(x.shape[:-1])


def argmax_at(logits: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """argmax of the rows of ``logits`` [..., V] at ``where`` [...], as ``logits[where].argmax(-1)``.
    A selection of at least half the rows runs over the whole tensor where it lies (gathering
    the rows would copy them, and costs more than the rows it skips); a sparse one gathers."""
    if 2 * int(where.sum()) >= where.numel() and not isinstance(logits, SplitLogits):
        return row_argmax(logits)[where]
    return over_rows(row_argmax, logits, where)


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


def nucleus_keep(probs: torch.Tensor, p: float, rule: str) -> torch.Tensor:
    """Which tokens of ``probs`` [N, V] (float64 or float32, >= 0; rows need not be normalised:
    masses are compared with p x the row's total) the nucleus of mass ``p`` keeps.

    The definition is the sorted one (descending probability, ties by index): ``official`` keeps
    the tokens whose cumulative mass up to and including them is <= p, the top one always;
    ``minimal`` keeps those whose mass strictly before them is < p. Computed without sorting the
    vocabulary: tokens are binned by the leading bits of their float pattern (positive floats order
    like their bit patterns, so bins are ordered by probability, 2**NUCLEUS_SUBBINS_LOG2 per
    octave), the bin
    masses give every bin that lies wholly inside or outside the nucleus, and only the one bin
    that straddles the boundary is sorted. Same set as a full sort, up to the rounding of the sums.
    Vocabularies up to NUCLEUS_SORT_MAX are sorted whole (cheaper there than the bins)."""
    n, vocab = probs.shape
    if vocab <= NUCLEUS_SORT_MAX:  # the definition itself: a stable sort and a running sum
        order = probs.sort(dim=-1, descending=True, stable=True)
        upto = order.values.cumsum(-1)
        limit = upto[:, -1:] * p
        inside = upto <= limit if rule == "official" else (upto - order.values) < limit
        inside[:, 0] = True
        return torch.zeros_like(inside).scatter_(1, order.indices, inside)
    # the bins come from the float32 pattern even for float64 probs: rounding to float32 keeps the
    # order (ties may merge, which only moves tokens into one bin); 32-bit passes, in place, cost
    # half the bytes and no fresh allocations (whose page faults cost as much as the passes)
    bins = probs.to(torch.float32, copy=True).view(torch.int32).bitwise_right_shift_(23 - NUCLEUS_SUBBINS_LOG2)
    bins = torch.sub(bins.amax(-1, keepdim=True), bins, out=bins).clamp_(max=NUCLEUS_BINS - 1)  # 0: the top's bin
    mass = torch.zeros(n, NUCLEUS_BINS, dtype=probs.dtype, device=probs.device).scatter_add_(1, bins.long(), probs)
    cum = mass.cumsum(-1)
    limit = cum[:, -1:] * p
    boundary = ((cum <= limit) if rule == "official" else (cum < limit)).sum(-1, keepdim=True)  # bins before: kept
    edge = boundary.to(bins.dtype)
    keep = bins < edge
    before = (cum - mass).gather(1, boundary.clamp(max=NUCLEUS_BINS - 1)).squeeze(1)  # mass of kept bins
    rows, cols = (bins == edge).nonzero(as_tuple=True)  # the straddling bin, row by row
    if len(rows):
        values = probs[rows, cols]
        order = values.sort(descending=True, stable=True).indices  # ties keep index order...
        order = order[rows[order].sort(stable=True).indices]  # ...within each row
        rows, cols, values = rows[order], cols[order], values[order]
        counts = torch.bincount(rows, minlength=n)
        rank = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]  # within its row
        grid = torch.zeros(n, int(counts.max()), dtype=probs.dtype, device=probs.device)
        upto = (before[:, None] + grid.index_put_((rows, rank), values).cumsum(1))[rows, rank]  # mass up to it
        inside = upto <= limit[rows, 0] if rule == "official" else (upto - values) < limit[rows, 0]
        if rule == "official":  # the top token is kept even when its mass alone exceeds p
            inside |= (boundary.squeeze(1)[rows] == 0) & (rank == 0)
        keep[rows[inside], cols[inside]] = True
    return keep


def nucleus_log_probs(logits: torch.Tensor, p: float, float64: bool = True, rule: str = "official") -> torch.Tensor:
    """Log-probabilities restricted to the nucleus of mass ``p`` (``rule``), renormalised."""
    logp = torch.log_softmax(logits.double() if float64 else logits.float(), dim=-1)
    if p >= 1.0:
        return logp
    flat = logp.reshape(-1, logp.shape[-1])
    keep = nucleus_keep(flat.exp(), p, rule)
    return torch.log_softmax(flat.masked_fill(~keep, float("-inf")), dim=-1).reshape(logp.shape)


def _exp_weights(logits: torch.Tensor, float64: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp(logits - max), max [N, 1]) in a fresh float64 (or float32) tensor: the unnormalised
    softmax. Sampling never needs the normalisation pass: a CDF is inverted at u x its total.
    exp(d) is computed as exp2(d log2 e): within a few ulps of exp, and about twice as fast on CPU
    (where this is the sampler's largest cost)."""
    top = logits.amax(-1, keepdim=True)  # in the logits' own dtype (exact; half the bytes)
    weights = logits.to(torch.float64 if float64 else torch.float32, copy=True)
    top = top.to(weights.dtype)
    return weights.sub_(top).mul_(LOG2_E).exp2_(), top


def categorical(logits: torch.Tensor, u: torch.Tensor, p: float = 1.0, float64: bool = True,
                rule: str = "official") -> torch.Tensor:
    """One draw per row of ``logits`` [N, V] (nucleus ``p``) by inverting the CDF at ``u`` [N, 1].

    Exact categorical sampling; float64 by default, since lower precision lowers the effective
    temperature (Zheng et al. 2024, the fix ReMDM made to MDLM's sampler). The CDF runs in
    vocabulary order over the kept tokens (the nucleus only zeroes the others), so no sort is
    needed; the official code draws from the same distribution by the Gumbel-max trick."""
    return _draw(logits, u, p, float64, rule, score=False)[0]


def categorical_scored(logits: torch.Tensor, u: torch.Tensor, p: float = 1.0, float64: bool = True,
                       rule: str = "official") -> tuple[torch.Tensor, torch.Tensor]:
    """(``categorical``'s draw, its float64 log-probability under the full softmax(logits)) from
    one exponentiation of the rows: LLaDA's confidence of a sampled token costs no second pass."""
    return _draw(logits, u, p, float64, rule, score=True)


def _draw(logits, u, p: float, float64: bool, rule: str, score: bool):
    """The draw of :func:`categorical`, and its log-probability when ``score`` (else None)."""
    weights, top = _exp_weights(logits, float64)
    log_total = weights.sum(-1).log().double() if score else None
    if p < 1.0:
        weights.mul_(nucleus_keep(weights, p, rule))
    token = _invert_cdf(weights, u)
    logp = logits.gather(-1, token).squeeze(-1).double() - top.squeeze(-1).double() - log_total if score else None
    return token.squeeze(-1), logp


def _invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Position [N, 1] of the first entry of cumsum(``probs``) above ``u`` x total mass: never a
    token without mass (the target stays below the total, u = 1 and rounding included).

    Wide rows on CPU are inverted in two levels, which skips the vocabulary-wide running sum (a
    slow, sequential pass there): the masses of chunks of VOCAB_CHUNK tokens (a vectorised sum), the
    first chunk whose cumulative mass passes the target, then the running sum inside that chunk
    only. The same position as the one-level inversion up to the rounding of the sums."""
    if not _chunked(probs):
        cdf = probs.cumsum(-1)
        return torch.searchsorted(cdf, _below(u.to(cdf.dtype) * cdf[:, -1:], cdf[:, -1:]), right=True)
    chunk_cdf = torch.nn.functional.pad(_per_chunk(probs, torch.sum).cumsum(-1), (1, 0))  # mass before each chunk; total
    target = _below(u.to(chunk_cdf.dtype) * chunk_cdf[:, -1:], chunk_cdf[:, -1:])
    chunk = torch.searchsorted(chunk_cdf, target, right=True) - 1  # a chunk with mass: it passes target
    start = chunk * VOCAB_CHUNK
    columns = _chunk_columns(start, probs.shape[-1])
    past_end = torch.arange(VOCAB_CHUNK, device=probs.device) >= probs.shape[-1] - start  # repeated columns
    weights = probs.gather(1, columns).masked_fill_(past_end, 0.0)
    inner = weights.cumsum(-1).add_(chunk_cdf.gather(1, chunk))
    # rounding can leave the chunk's own running sum at or below the target: its last token with mass
    return columns.gather(1, torch.searchsorted(inner, _below(target, inner[:, -1:]), right=True))


def _below(target: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``target`` [N, 1] kept strictly below ``total``, so the inversion lands on a token with mass."""
    return torch.minimum(target, torch.nextafter(total, torch.zeros_like(total))).contiguous()


def draw_where(where: torch.Tensor, logits: torch.Tensor, u: torch.Tensor, z: torch.Tensor,
               p: float, float64: bool, rule: str = "official") -> torch.Tensor:
    """z with a token drawn from ``logits`` at the positions ``where`` (only those are computed)."""
    if not bool(where.any()):
        return z
    drawn = over_rows(lambda rows, u_: categorical(rows, u_[:, None], p, float64, rule), logits, where, u)
    return z.masked_scatter(where, drawn)


def chosen_prob(logits: torch.Tensor, where: torch.Tensor, token: torch.Tensor, p: float, float64: bool,
                rule: str) -> torch.Tensor:
    """Probability of ``token`` [B, L] under nucleus-renormalised softmax(logits), at ``where`` only ([n])."""
    def prob(rows, tok):
        logp = nucleus_log_probs(rows, p, float64, rule) if p < 1.0 else torch.log_softmax(rows.double(), -1)
        return logp.gather(-1, tok[:, None]).squeeze(-1).exp()

    return over_rows(prob, logits, where, token)


# ----------------------------------------------------------------------------- MDLM / ReMDM
def ancestral_step(logits, z, t: float, s: float, mask_id: int, noise: Noise, p: float = 1.0,
                   float64: bool = True, rule: str = "official"):
    """MDLM posterior q(z_s | z_t, x_theta): a masked position unmasks w.p. (t - s) / t to a
    token v ~ x_theta (so token v w.p. x_theta(v)(t - s)/t, stay masked w.p. s/t); decoded
    tokens are carried over. Tokens are drawn only where a position unmasks."""
    u = noise.uniform(2, z.shape[1])
    unmask = (z == mask_id) & (u[:, 0] < (t - s) / t)
    return draw_where(unmask, logits, u[:, 1], z, p, float64, rule)


def remdm_sigma(strategy: str, t: float, s: float, eta: float, conf: torch.Tensor | None = None):
    """ReMDM remasking probability sigma_t (scalar, or [B, L] for ``conf``) with alpha = 1 - t.

    cap: min(eta, sigma_max); rescale: eta * sigma_max; conf: sigma_max * softmax over positions
    of the confidence score (higher for tokens decoded with less probability; 0 on masks)."""
    alpha_t, alpha_s = 1.0 - t, 1.0 - s
    sigma_max = min(1.0, (1.0 - alpha_s) / alpha_t) if alpha_t > 0 else 1.0
    if strategy == "cap":
        return min(eta, sigma_max)
    if strategy == "rescale":
        return eta * sigma_max
    weights = torch.softmax(conf.double(), dim=-1).nan_to_num_(0.0)  # all -inf (nothing decoded) -> 0
    return weights * sigma_max


def loop_schedule(t: float, s: float, t_on: float, t_off: float, alpha_on: float):
    """ReMDM-loop's phases: (mask probability at t, at s) of the MDLM phases, or None inside
    [t_off, t_on) where alpha is held at ``alpha_on`` and tokens are remasked. The last step (s = 0)
    is an MDLM step that unmasks every remaining position (the official code ends with a separate
    noise-removal pass instead)."""
    if t > t_on and s > 0:
        return 1.0 - (1.0 - t) * alpha_on / (1.0 - t_on), 1.0 - (1.0 - s) * alpha_on / (1.0 - t_on)
    if t <= t_off or s == 0:
        return t * (1.0 - alpha_on) / t_off, s * (1.0 - alpha_on) / t_off
    return None


def remdm_step(logits, z, t: float, s: float, mask_id: int, noise: Noise, fixed, strategy: str, eta: float,
               p: float = 1.0, float64: bool = True, rule: str = "official", conf=None,
               loop: tuple[float, float, float] = (0.55, 0.05, 0.9)):
    """ReMDM posterior (Wang et al. 2025), alpha = 1 - t: decoded tokens re-mask w.p. sigma_t and
    masked ones unmask w.p. (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t).

    ``conf`` [B, L] (strategy ``conf``): the confidence score, -p(token) when a token is decoded
    and -inf on masks, kept in bfloat16 as the official code does; returned updated.
    ``loop`` = (t_on, t_off, alpha_on) (strategy ``loop``): MDLM with a rescaled schedule outside
    [t_off, t_on), a fixed alpha_on with remasking probability eta inside it.
    Returns (z, conf)."""
    u = noise.uniform(2, z.shape[1])
    masked = z == mask_id
    if strategy == "loop":
        phase = loop_schedule(t, s, *loop)
        if phase is not None:  # plain MDLM step on the rescaled schedule
            mc_t, mc_s = phase
            return draw_where(masked & (u[:, 0] < (mc_t - mc_s) / mc_t), logits, u[:, 1], z, p, float64, rule), conf
        alpha = loop[2]
        sigma, p_unmask = eta, eta * alpha / (1.0 - alpha)
    else:
        alpha_t, alpha_s = 1.0 - t, 1.0 - s
        sigma = remdm_sigma(strategy, t, s, eta, conf)
        p_unmask = (alpha_s - (1.0 - sigma) * alpha_t) / (1.0 - alpha_t)
        if strategy == "conf":
            sigma = sigma.masked_fill(masked, 0.0)
            p_unmask = (alpha_s - alpha_t) / (1.0 - alpha_t)  # sigma is 0 on masked positions
    remask = ~masked & ~fixed & (u[:, 0] < sigma)
    unmask = masked & (u[:, 0] < p_unmask)
    z = draw_where(unmask, logits, u[:, 1], z, p, float64, rule)
    if strategy == "conf":
        conf = conf.clone()
        if bool(unmask.any()):
            conf[unmask] = (-chosen_prob(logits, unmask, z, p, float64, rule)).to(conf.dtype)
        conf[remask] = float("-inf")
    return z.masked_fill(remask, mask_id), conf


# ----------------------------------------------------------------------------- LLaDA
def confidence_step(logits, z, mask_id: int, noise: Noise, temperature: float, candidates, k,
                    p: float = 1.0, float64: bool = True, rule: str = "official", threshold: float = 0.0):
    """LLaDA low-confidence unmasking among the masked ``candidates`` [B, L].

    Top-k (``threshold`` 0): commit the k[b] most confident. Threshold (Fast-dLLM): commit every
    candidate whose confidence is >= ``threshold``, and always the most confident one.
    The token is the argmax (temperature 0) or a draw from softmax(logits / temperature); its
    confidence is its probability under softmax(logits), as in LLaDA's ``low_confidence``."""
    u = noise.uniform(z.shape[1])
    open_ = candidates & (z == mask_id)

    def draw_and_score(rows, u_):  # only masked candidates are drawn and scored: rows [n, V]
        if temperature == 1:  # one exponentiation serves the draw and the score
            return categorical_scored(rows, u_[:, None], p, float64, rule)
        token = row_argmax(rows) if temperature == 0 else categorical(rows / temperature, u_[:, None], p, float64, rule)
        # log p(token) = logit - logsumexp: a ranking needs no float64 softmax over the vocabulary
        return token, rows.gather(-1, token[:, None]).squeeze(-1).double() - torch.logsumexp(rows.double(), dim=-1)

    token, score = over_rows(draw_and_score, logits, open_, u)
    confidence = torch.full(z.shape, float("-inf"), dtype=score.dtype, device=z.device).masked_scatter(open_, score)
    token = z.masked_scatter(open_, token)
    if threshold > 0:
        best = torch.zeros_like(open_).scatter_(1, confidence.argmax(-1, keepdim=True), True)
        commit = open_ & ((confidence >= torch.log(torch.tensor(threshold, dtype=torch.float64))) | best)
    else:
        rank = confidence.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)
        commit = (rank < k[:, None]) & open_
    return torch.where(commit, token, z)
