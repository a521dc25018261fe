"""9x9 Sudoku: a long-sequence task (81 cells) with exact scores, for the science suite (issue 13).

Why: on 4x4 Sudoku an MDM can never spend more than 16 NFE, which caps the NFE saving that
ProSeCo's self-correction can show (paper, Sec. 5: the corrector fixes tokens that parallel
unmasking committed wrongly; the gain is largest where many tokens are decoded per step under
hard global constraints). 81 cells under 27 all-different constraints make such mistakes common.

This module is the whole task:

* layout: 81 cells in row-major order, digit ``d`` in 1..9 is token ``d - 1``, the mask is id 9;
* data: complete grids from an in-project seeded generator (:func:`generate_grids`), and puzzles
  with a unique solution dug from grids never trained on (:func:`dig_puzzle`), checked by an exact
  solver that counts solutions up to 2 (:func:`count_solutions`); written by :func:`prepare_data`
  as a folder of arrays (:mod:`pipeline.tasks.arrays`);
* scoring and decoding; and two evaluation tasks:

  - ``sudoku9``: generate grids from scratch; ``valid`` (fraction of complete valid grids,
    primary) and ``distinct_valid`` (distinct valid grids: diversity beside quality);
  - ``sudoku9-solve``: complete the held-out puzzles (cycled to the sample count); ``solved``
    (primary) and ``clue_violations`` (must stay 0: the sampler keeps given cells fixed).

Everything is deterministic under ``data.split_seed``: the training grids, the held-out grids and
the digging order of each puzzle use separate random streams derived from it, so an evaluation
regenerates its puzzles from the config alone (no file paths at eval time).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import numpy as np
import torch

from pipeline.errors import ProsecoError
from pipeline.tasks import arrays, sudoku

NAME = "sudoku9"
VOCAB_SIZE = 10
MASK_ID = 9
SEQ_LEN = 81
NUM_DIGITS = 9
SUITE_TASKS = ("sudoku9", "sudoku9-solve")
NUM_TRAIN = 20000  # training grids (prep time measured: see prepare_data)
NUM_HELDOUT = 200  # held-out grids, one puzzle each
FULL = (1 << NUM_DIGITS) - 1  # candidate bitmask: bit d set = digit (token) d still possible


def _units() -> np.ndarray:
    """Cell indices of the 27 constraint groups (9 rows, 9 columns, 9 3x3 boxes) -> int [27, 9]."""
    cell = np.arange(SEQ_LEN).reshape(9, 9)
    boxes = cell.reshape(3, 3, 3, 3).transpose(0, 2, 1, 3).reshape(9, 9)  # [band, stack] blocks
    return np.concatenate([cell, cell.T, boxes])


UNITS = _units()
# The 20 peers of each cell: the other cells sharing a row, column or box with it.
PEERS = np.array([sorted(set(UNITS[(UNITS == c).any(axis=1)].ravel()) - {c}) for c in range(SEQ_LEN)])
_UNIT_LISTS = UNITS.tolist()
_PEER_LISTS = PEERS.tolist()
_POP = np.array([m.bit_count() for m in range(FULL + 1)], dtype=np.int8)
_POP_LIST = _POP.tolist()
# _KTH[m, k]: the k-th lowest set bit (a digit) of the candidate mask m.
_KTH = np.array([([d for d in range(NUM_DIGITS) if m >> d & 1] + [0] * NUM_DIGITS)[:NUM_DIGITS]
                 for m in range(FULL + 1)], dtype=np.int64)


def is_valid(grids: torch.Tensor) -> torch.Tensor:
    """Which rows of ``grids`` [N, 81] are complete valid grids -> BoolTensor[N].

    Every row, column and box must hold each of the tokens 0..8 once; a row holding the mask id
    or any other id outside 0..8 is invalid (an unfinished sample never counts as a success).
    """
    return _units_ok(grids).all(dim=1)  # every cell lies in a unit: all units held => all cells are digits


def _units_ok(grids: torch.Tensor) -> torch.Tensor:
    """Which of the 27 units of each row of ``grids`` [N, 81] hold each of the tokens 0..8 once -> Bool [N, 27].

    A cell outside 0..8 (the mask) contributes no bit, so its units fail. Nine powers of two (or
    zeros) sum to 0b111111111 only when they are the nine distinct powers: a sum with a repeat
    carries and has fewer than nine bits set.
    """
    grids = torch.as_tensor(grids).long()
    if grids.dim() != 2 or grids.shape[1] != SEQ_LEN:
        raise ValueError(f"expected grids of shape [N, {SEQ_LEN}], got {tuple(grids.shape)}")
    bits = torch.where((grids >= 0) & (grids < NUM_DIGITS), 1 << grids.clamp(0, NUM_DIGITS - 1), 0)
    return bits[:, torch.from_numpy(UNITS)].sum(dim=2) == FULL


def constraints(grids: torch.Tensor) -> torch.Tensor:
    """The graded score of each row of ``grids`` [N, 81]: the fraction of its 27 units (rows, columns,
    boxes) that hold each digit once -> FloatTensor[N] (1 exactly for a valid grid, 0 for an empty one).

    Validity is all-or-nothing, and a weak sampler can score 0 valid grids at every setting; this
    measures how close it comes, so that quality-vs-NFE still has a slope to compare.
    """
    return _units_ok(grids).float().mean(dim=1)


# ------------------------------------------------------------------------------------ solver
def _propagate(cand: list[int], queue: list[int]) -> bool:
    """Constraint propagation in place on candidate bitmasks ``cand`` (81 ints); False on a contradiction.

    ``queue``: cells fixed to one digit whose digit must still be removed from their peers. Repeats
    two rules to a fixed point: a fixed cell's digit leaves its peers (naked single), and a digit
    that only one cell of a group can hold is fixed there (hidden single).
    """
    while True:
        while queue:
            c = queue.pop()
            bit = cand[c]
            for p in _PEER_LISTS[c]:
                m = cand[p]
                if m & bit:
                    m ^= bit
                    if not m:
                        return False
                    cand[p] = m
                    if not m & (m - 1):
                        queue.append(p)
        for unit in _UNIT_LISTS:
            once = twice = 0
            for c in unit:
                m = cand[c]
                twice |= once & m
                once |= m
            if once != FULL:
                return False  # some digit has no place left in this group
            only = once & ~twice
            if only:
                for c in unit:
                    m = cand[c] & only
                    if m and m != cand[c]:
                        if m & (m - 1):
                            return False  # one cell is the only place of two digits
                        cand[c] = m
                        queue.append(c)
        if not queue:
            return True


def _search(cand: list[int], limit: int, found: list[list[int]]) -> int:
    """Solutions (up to ``limit``) below a propagated state: branch on a cell with fewest candidates."""
    best, fewest = -1, NUM_DIGITS + 1
    for c, m in enumerate(cand):
        n = _POP_LIST[m]
        if 1 < n < fewest:
            best, fewest = c, n
            if n == 2:
                break
    if best < 0:
        found.append(cand)
        return 1
    total, m = 0, cand[best]
    while m and total < limit:
        bit = m & -m
        m ^= bit
        child = cand.copy()
        child[best] = bit
        if _propagate(child, [best]):
            total += _search(child, limit - total, found)
    return total


def _candidates(cells: list[int]) -> tuple[list[int], list[int]]:
    """(candidate masks, clue cells) of a puzzle given as 81 token ids (MASK_ID = empty)."""
    cand = [1 << t if t != MASK_ID else FULL for t in cells]
    return cand, [c for c, t in enumerate(cells) if t != MASK_ID]


def count_solutions(puzzle: torch.Tensor | list[int], limit: int = 2) -> tuple[int, torch.Tensor | None]:
    """(number of solutions counted up to ``limit``, the first solution found or None) of ``puzzle``.

    ``puzzle``: 81 token ids, MASK_ID for empty cells. Exact: constraint propagation plus
    backtracking, so ``limit=2`` tells a unique puzzle (1) from an ambiguous one (2).
    """
    cells = [int(t) for t in torch.as_tensor(puzzle).reshape(-1).tolist()]
    if len(cells) != SEQ_LEN or not all(0 <= t <= MASK_ID for t in cells):
        raise ValueError(f"expected {SEQ_LEN} token ids in 0..{MASK_ID}")
    cand, clues = _candidates(cells)
    found: list[list[int]] = []
    count = _search(cand, limit, found) if _propagate(cand, clues) else 0
    if not found:
        return count, None
    return count, torch.tensor([m.bit_length() - 1 for m in found[0]], dtype=torch.long)


# ------------------------------------------------------------------------------------ generator
def _seed(split_seed: int, stream: int, *rest: int) -> np.random.SeedSequence:
    """The seed of one random stream (0 train grids, 1 held-out grids, 2 digging) of a dataset."""
    return np.random.SeedSequence([int(split_seed), stream, *rest])


def _fill(rng: np.random.Generator, batch: int) -> np.ndarray:
    """``batch`` attempts at a random complete grid -> int [batch, 81], rows with a dead end set to -1.

    Fills one cell per step in every grid at once: the cell with the fewest candidates (ties
    broken at random), given a digit drawn uniformly from its candidates, which then leaves the
    cell's peers. Without backtracking an attempt can reach a cell with no candidate left; such
    rows are returned as -1 and redrawn by the caller.
    """
    rows = np.arange(batch)[:, None]
    cand = np.full((batch, SEQ_LEN), FULL, dtype=np.int64)
    grid = np.full((batch, SEQ_LEN), -1, dtype=np.int64)
    dead = np.zeros(batch, dtype=bool)
    for _ in range(SEQ_LEN):
        count = np.where(grid < 0, _POP[cand], NUM_DIGITS + 1) + rng.random((batch, SEQ_LEN))
        cell = count.argmin(axis=1)
        mask = cand[rows[:, 0], cell]
        dead |= mask == 0
        pick = (rng.random(batch) * np.maximum(_POP[mask], 1)).astype(np.int64)
        digit = _KTH[mask, pick]
        grid[rows[:, 0], cell] = digit
        cand[rows, PEERS[cell]] &= ~(1 << digit)[:, None]
    grid[dead] = -1
    return grid


def generate_grids(n: int, seed: np.random.SeedSequence | int) -> torch.Tensor:
    """``n`` random complete grids -> LongTensor [n, 81] (tokens 0..8), deterministic under ``seed``.

    Uniform-ish, not exactly uniform: a randomised greedy fill (:func:`_fill`) with failed attempts
    redrawn. Every grid is checked with :func:`is_valid`; repeated grids are redrawn too.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    kept: list[np.ndarray] = []
    seen: set[bytes] = set()
    while len(kept) < n:
        batch = _fill(rng, max(64, int(1.3 * (n - len(kept)))))
        ok = is_valid(torch.from_numpy(np.where(batch < 0, MASK_ID, batch))).numpy()
        for row in batch[ok]:
            key = row.astype(np.uint8).tobytes()
            if key not in seen and len(kept) < n:
                seen.add(key)
                kept.append(row)
    return torch.from_numpy(np.stack(kept) if kept else np.zeros((0, SEQ_LEN), dtype=np.int64))


# ------------------------------------------------------------------------------------ puzzles
def _still_unique(cells: list[int], c: int, value: int) -> bool:
    """Whether the unique puzzle ``cells`` stays unique with cell ``c`` (holding ``value``) emptied:
    true when no solution puts another digit in ``c``."""
    cand, clues = _candidates(cells)
    cand[c] = FULL & ~(1 << value)
    clues.remove(c)
    return not (_propagate(cand, clues) and _search(cand, 1, []))


def dig_puzzle(grid: torch.Tensor, clues: int, seed: np.random.SeedSequence | int) -> torch.Tensor:
    """A puzzle with a unique solution (``grid``) and ``clues`` givens where reachable -> LongTensor [81].

    Cells are tried in a seeded random order; a cell is emptied only if the puzzle keeps its
    unique solution, until ``clues`` givens are left. When the order runs out first (every further
    removal would admit a second solution; below 17 clues this always happens), the result is the
    closest unique puzzle, with more givens than ``clues``: count them.
    """
    grid = torch.as_tensor(grid).reshape(-1)
    if grid.shape != (SEQ_LEN,) or not bool(is_valid(grid[None])):
        raise ValueError("dig_puzzle needs a complete valid grid of 81 tokens")
    cells = [int(t) for t in grid.tolist()]
    left = SEQ_LEN
    for c in np.random.default_rng(seed).permutation(SEQ_LEN).tolist():
        if left <= clues:
            break
        if _still_unique(cells, c, cells[c]):
            cells[c] = MASK_ID
            left -= 1
    return torch.tensor(cells, dtype=torch.long)


def heldout_grids(split_seed: int, count: int | None = None) -> torch.Tensor:
    """The held-out grids of a dataset (NUM_HELDOUT unless ``count``): a random stream of their own,
    never trained on (:func:`build_data` checks it)."""
    return generate_grids(NUM_HELDOUT if count is None else count, _seed(split_seed, 1))


@functools.lru_cache(maxsize=4)
def _heldout_puzzles(split_seed: int, clues: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    grids = heldout_grids(split_seed, count)
    puzzles = torch.stack([dig_puzzle(g, clues, _seed(split_seed, 2, i)) for i, g in enumerate(grids)])
    return puzzles, puzzles != MASK_ID


def heldout_puzzles(split_seed: int, clues: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(puzzles, given)`` of the held-out grids: LongTensor [NUM_HELDOUT, 81] with MASK_ID in the
    cells to fill, and the bool mask of the givens. Cached, returned as copies."""
    puzzles, given = _heldout_puzzles(int(split_seed), int(clues), NUM_HELDOUT)
    return puzzles.clone(), given.clone()


# ------------------------------------------------------------------------------------ scoring
def _distinct(rows: torch.Tensor) -> int:
    """Number of distinct rows of ``rows`` [N, L]."""
    return 0 if len(rows) == 0 else len(torch.unique(rows, dim=0))


def score_generated(samples: torch.Tensor) -> dict:
    """``valid`` (fraction of complete valid grids), ``constraints`` (mean :func:`constraints`),
    ``distinct_valid`` and ``distinct`` of ``samples`` [N, 81]: a sampler that collapses onto a few
    grids shows it in ``distinct_valid``."""
    samples = torch.as_tensor(samples).long()
    ok, mean = is_valid(samples), (lambda x: x.float().mean().item() if len(samples) else 0.0)
    return {"valid": mean(ok), "constraints": mean(constraints(samples)),
            "distinct_valid": _distinct(samples[ok]), "distinct": _distinct(samples), "n": len(samples)}


def score_solutions(solutions: torch.Tensor, puzzles: torch.Tensor, given: torch.Tensor) -> dict:
    """``solved``: fraction of ``solutions`` that are valid grids keeping every given of their puzzle
    (the puzzles are unique, so this is the puzzle's solution); ``constraints``: mean
    :func:`constraints`; ``clue_violations``: fraction that
    rewrote a given (a sampler bug, not a weakness: givens are never masked). All [N, 81]."""
    solutions, puzzles = torch.as_tensor(solutions).long(), torch.as_tensor(puzzles).long()
    given = torch.as_tensor(given).bool()
    if solutions.shape != puzzles.shape or solutions.shape != given.shape:
        named = {"solutions": solutions, "puzzles": puzzles, "given": given}
        raise ValueError("shapes differ: " + ", ".join(f"{k} {tuple(t.shape)}" for k, t in named.items()))
    rewrote = (given & (solutions != puzzles)).any(dim=1)
    solved = is_valid(solutions) & ~rewrote
    frac = (lambda x: x.float().mean().item()) if len(solutions) else (lambda x: 0.0)
    return {"solved": frac(solved), "constraints": frac(constraints(solutions)), "clue_violations": frac(rewrote),
            "n": len(solutions)}


def to_text(grid: torch.Tensor | list[int]) -> str:
    """A grid as nine lines of digits 1..9 (``.`` the mask, ``?`` another id), boxes split by ``|``."""
    cells = [int(t) for t in torch.as_tensor(grid).reshape(-1).tolist()]
    if len(cells) != SEQ_LEN:
        raise ValueError(f"expected {SEQ_LEN} cells, got {len(cells)}")
    chars = [str(t + 1) if 0 <= t < NUM_DIGITS else "." if t == MASK_ID else "?" for t in cells]
    return "\n".join("|".join("".join(chars[9 * r + 3 * b: 9 * r + 3 * b + 3]) for b in range(3))
                     for r in range(9))


# ------------------------------------------------------------------------------------ data
FORMAT_VERSION = 1
FILES = ("train.npy", "heldout_grids.npy", "puzzles.npy", "puzzle_given.npy")


def _check_data(data: Any) -> tuple[int, int]:
    """(split_seed, clues) of ``cfg.data``, refused in one line when they cannot make this task's data."""
    if data.task != NAME:
        raise ProsecoError(f"data.task={data.task!r}: this preparer handles {NAME!r} only")
    if data.seq_len != SEQ_LEN:
        raise ProsecoError(f"data.seq_len={data.seq_len} but {NAME} grids have {SEQ_LEN} cells; "
                           f"set data.seq_len={SEQ_LEN}")
    seed, clues = data.split_seed, data.puzzle_clues
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ProsecoError(f"data.split_seed must be an integer >= 0, got {seed!r}")
    if isinstance(clues, bool) or not isinstance(clues, int) or not 0 <= clues < SEQ_LEN:
        raise ProsecoError(f"data.puzzle_clues must be an integer in 0..{SEQ_LEN - 1}, got {clues!r}")
    return seed, clues


def build_data(split_seed: int, clues: int) -> dict[str, torch.Tensor]:
    """The dataset of ``split_seed``: ``train`` (NUM_TRAIN grids), ``heldout_grids``, ``puzzles`` (one
    unique-solution puzzle per held-out grid) and ``puzzle_given``; refuses held-out grids seen in
    training."""
    train, held = generate_grids(NUM_TRAIN, _seed(split_seed, 0)), heldout_grids(split_seed)
    seen = {bytes(row) for row in train.to(torch.uint8).numpy()}
    overlap = sum(bytes(row) in seen for row in held.to(torch.uint8).numpy())
    if overlap:
        raise ProsecoError(f"data.split_seed={split_seed}: {overlap} held-out grid(s) are also training "
                           "grids; choose another split_seed")
    puzzles, given = heldout_puzzles(split_seed, clues)
    return {"train": train, "heldout_grids": held, "puzzles": puzzles, "puzzle_given": given}


def prepare_data(cfg: Any, out_dir: str | os.PathLike) -> dict:
    """Write the task's arrays folder for ``cfg.data`` (task, seq_len, split_seed, puzzle_clues) into
    ``out_dir`` and return its manifest; idempotent (the same settings rewrite nothing).

    Files: ``train.npy`` (uint8 [NUM_TRAIN, 81]), ``heldout_grids.npy`` (never trained on),
    ``puzzles.npy`` (MASK_ID in the cells to fill), ``puzzle_given.npy`` (bool). The manifest records
    the counts and the actual clue counts (digging may stop above ``puzzle_clues``). Measured on one
    shared core: 6-8 s in all (the 20000 training grids about 5 s; the 200 puzzles 0.8-1.4 s at 30-50
    clues, about 8 s at the fewest clues reachable).
    """
    return _prepare(cfg, out_dir)[0]


def _prepare(cfg: Any, out_dir: str | os.PathLike) -> tuple[dict, bool]:
    split_seed, clues = _check_data(cfg.data)
    data = build_data(split_seed, clues)
    actual = data["puzzle_given"].sum(dim=1)
    actual_clues = {"min": int(actual.min()), "max": int(actual.max()),
                    "mean": round(float(actual.float().mean()), 3)}
    settings = {"format": FORMAT_VERSION, "task": NAME, "vocab_size": VOCAB_SIZE, "mask_id": MASK_ID,
                "seq_len": SEQ_LEN, "split_seed": split_seed, "clues": clues, "num_train": NUM_TRAIN,
                "num_heldout": NUM_HELDOUT, "actual_clues": actual_clues}
    files = {f"{key}.npy": t.numpy().astype(np.bool_ if t.dtype == torch.bool else np.uint8)
             for key, t in data.items()}
    counts = {key: len(t) for key, t in data.items() if key != "puzzle_given"}
    blobs, manifest = arrays.build(files, settings, counts)
    return arrays.write(out_dir, blobs, manifest, shown=("task", "split_seed", "clues"))


def load(out_dir: str | os.PathLike) -> dict:
    """A prepared folder, every file's sha256 verified: ``train``, ``heldout_grids``, ``puzzles``
    (torch.long), ``puzzle_given`` (torch.bool) and ``manifest``."""
    return arrays.load(out_dir, NAME, FILES)


# ------------------------------------------------------------------------------------ evaluation
class GenerateTask(sudoku.GenerateTask):
    """``sudoku9``: grids generated from scratch, scored by validity and distinct valid grids (the
    4x4 task's evaluation with this module's layout, scorer and text form), and graded by
    ``constraints`` (version 2 added it)."""

    name = NAME
    vocab_size = VOCAB_SIZE
    seq_len = SEQ_LEN
    version = 2
    graded = "constraints"
    layout = "a 9x9 Sudoku model"
    score_grids = staticmethod(score_generated)
    grid_text = staticmethod(to_text)


class SolveTask(GenerateTask):
    """``sudoku9-solve``: the held-out puzzles of ``cfg.data`` (regenerated, cycled to ``n``), scored
    by ``solved`` and graded by ``constraints``; ``clue_violations`` must stay 0."""

    name = "sudoku9-solve"
    primary = "solved"
    diversity = None

    def conditioning(self, n: int, seed: int):
        split_seed, clues = _check_data(self.cfg.data)
        puzzles, given = heldout_puzzles(split_seed, clues)
        reps = math.ceil(n / len(puzzles))
        return puzzles.repeat(reps, 1)[:n], given.repeat(reps, 1)[:n]

    def score(self, tokens, conditioning):
        s = score_solutions(tokens, *conditioning)
        return {"solved": s["solved"], "constraints": s["constraints"], "clue_violations": s["clue_violations"]}
