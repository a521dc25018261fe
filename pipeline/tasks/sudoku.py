"""4x4 Sudoku: the demo task, small enough to enumerate and to score exactly.

Why Sudoku: validity is a hard global constraint (rows, columns and boxes must each be a
permutation of 1..4), so a sampler that commits to a wrong token early cannot recover
without a corrector. That is exactly the failure mode ProSeCo's self-correction targets,
and with only 288 valid grids, "fraction valid" and "number of distinct grids" are exact
metrics rather than proxies.

This module is the whole task: the layout (16 cells in row-major order; digit ``d`` in 1..4 is
token id ``d - 1``; the mask token is id 4), the data (the seeded train / held-out split of the
288 grids and the held-out puzzles, written by ``proseco prep sudoku`` as a folder of arrays,
see :mod:`pipeline.tasks.arrays`), the scoring and the decoding, and its two evaluation tasks:

* ``sudoku4``: generate grids from scratch; ``valid`` (fraction of valid grids, primary) and
  ``distinct_valid`` (distinct valid grids: collapsing onto one valid grid scores high validity
  but low diversity).
* ``sudoku4-solve``: complete the held-out puzzles (``data.puzzle_clues`` given cells, grids never
  trained on, cycled to the sample count); ``solved`` (primary) and ``clue_violations`` (must
  stay 0: the sampler keeps given cells fixed).

Everything is pure and deterministic (seeded ``torch.Generator``s only).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.errors import ProsecoError
from pipeline.tasks import arrays
from pipeline.tasks.base import EvalTask, ModelInfo

NAME = "sudoku4"
VOCAB_SIZE = 5
MASK_ID = 4
SEQ_LEN = 16
NUM_DIGITS = 4
NUM_GRIDS = 288
# The science suite's interface (pipeline/science.py): the evaluation tasks it sweeps (the first one's
# primary metric is the headline NFE ratio), and how the training log names the rows of the data.
SUITE_TASKS = ("sudoku4", "sudoku4-solve")
DATA_NAME = "4x4 Sudoku grids"


def _groups() -> torch.Tensor:
    """Cell indices of the 12 constraint groups: 4 rows, 4 columns, 4 2x2 boxes -> [12, 4]."""
    rows = [[4 * r + c for c in range(4)] for r in range(4)]
    cols = [[4 * r + c for r in range(4)] for c in range(4)]
    boxes = [
        [4 * (br + dr) + (bc + dc) for dr in range(2) for dc in range(2)] for br in (0, 2) for bc in (0, 2)
    ]
    return torch.tensor(rows + cols + boxes, dtype=torch.long)


_GROUPS = _groups()


def is_valid(grids: torch.Tensor) -> torch.Tensor:
    """Which rows of ``grids`` [N, 16] are complete, valid Sudoku grids -> BoolTensor[N].

    A grid holding the mask id (or any id outside 0..3) is invalid: an unfinished sample must
    never count as a success.
    """
    grids = torch.as_tensor(grids)
    if grids.dim() != 2 or grids.shape[1] != SEQ_LEN:
        raise ValueError(f"expected grids of shape [N, {SEQ_LEN}], got {tuple(grids.shape)}")
    grids = grids.long()
    in_range = ((grids >= 0) & (grids < NUM_DIGITS)).all(dim=1)
    safe = grids.clamp(0, NUM_DIGITS - 1)  # out-of-range rows are already rejected by in_range
    cells = safe[:, _GROUPS]  # [N, 12, 4]
    counts = torch.nn.functional.one_hot(cells, NUM_DIGITS).sum(dim=2)  # [N, 12, 4 digits]
    return in_range & (counts == 1).all(dim=2).all(dim=1)


def _no_repeats(partial: torch.Tensor) -> torch.Tensor:
    """Rows of ``partial`` [N, 16] (unfilled cells = MASK_ID) with no digit repeated in any group."""
    counts = torch.nn.functional.one_hot(partial[:, _GROUPS], NUM_DIGITS + 1).sum(dim=2)  # [N, 12, 5]
    return (counts[:, :, :NUM_DIGITS] <= 1).all(dim=2).all(dim=1)


@functools.lru_cache(maxsize=1)
def _all_grids_cached() -> torch.Tensor:
    # Every row of a valid grid is a permutation of 0..3: extend row by row with the 24
    # permutations, pruning prefixes that already repeat a digit in a column or box. Cheap and
    # needs no hand-written search (the full 24^4 product would also work, but takes seconds).
    perms = torch.tensor(list(itertools.permutations(range(NUM_DIGITS))), dtype=torch.long)  # [24, 4]
    prefixes = perms
    for _ in range(3):
        a, b = torch.meshgrid(torch.arange(len(prefixes)), torch.arange(len(perms)), indexing="ij")
        prefixes = torch.cat([prefixes[a.reshape(-1)], perms[b.reshape(-1)]], dim=1)
        padded = torch.full((len(prefixes), SEQ_LEN), MASK_ID, dtype=torch.long)
        padded[:, : prefixes.shape[1]] = prefixes
        prefixes = prefixes[_no_repeats(padded)]
    grids = prefixes[is_valid(prefixes)]
    # Sort lexicographically explicitly, rather than relying on the construction order.
    keys = torch.zeros(len(grids), dtype=torch.long)
    for c in range(SEQ_LEN):
        keys = keys * NUM_DIGITS + grids[:, c]
    grids = grids[torch.argsort(keys)]
    assert grids.shape == (NUM_GRIDS, SEQ_LEN), f"expected {NUM_GRIDS} grids, found {len(grids)}"
    return grids


def all_grids() -> torch.Tensor:
    """Every valid 4x4 grid, sorted lexicographically -> LongTensor[288, 16] (ids 0..3)."""
    return _all_grids_cached().clone()  # clone: callers may mutate; the cache must not change


def split(seed: int, holdout_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, held-out) split of the 288 grids by a seeded permutation.

    Held-out grids are never trained on, so infilling them measures generalisation rather
    than recall. Each part is returned in lexicographic order (the permutation only decides
    membership), which keeps the files byte-stable and easy to diff.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    grids = all_grids()
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(NUM_GRIDS, generator=gen)
    n_held = round(NUM_GRIDS * holdout_fraction)
    held_idx, _ = torch.sort(perm[:n_held])
    train_idx, _ = torch.sort(perm[n_held:])
    return grids[train_idx], grids[held_idx]


def make_puzzles(
    grids: torch.Tensor, clues: int, seed: int, n: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Puzzles from ``grids`` [G, 16]: keep ``clues`` random cells per puzzle, mask the rest.

    Returns ``(puzzles, given)``: puzzles [N, 16] with MASK_ID in hidden cells, and the bool
    mask of given cells. ``n=None`` makes one puzzle per grid; otherwise ``n`` puzzles cycle over
    the grids, each drawing its own cells (so repeats of a grid get different clues).
    """
    grids = torch.as_tensor(grids).long()
    if grids.dim() != 2 or grids.shape[1] != SEQ_LEN:
        raise ValueError(f"expected grids of shape [G, {SEQ_LEN}], got {tuple(grids.shape)}")
    if not 0 <= clues <= SEQ_LEN:
        raise ValueError(f"clues must be in 0..{SEQ_LEN}, got {clues}")
    n_out = len(grids) if n is None else int(n)
    if n_out < 0 or (n_out > 0 and len(grids) == 0):
        raise ValueError(f"cannot make {n_out} puzzles from {len(grids)} grids")
    source = grids[torch.arange(n_out) % max(len(grids), 1)] if n_out else grids[:0]
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.rand(n_out, SEQ_LEN, generator=gen).argsort(dim=1)  # a random cell order per row
    given = torch.zeros(n_out, SEQ_LEN, dtype=torch.bool)
    given.scatter_(1, order[:, :clues], True)
    puzzles = torch.where(given, source, torch.full_like(source, MASK_ID))
    return puzzles, given


def _count_distinct(rows: torch.Tensor) -> int:
    return int(torch.unique(rows, dim=0).shape[0]) if len(rows) else 0


def score_generated(samples: torch.Tensor) -> dict:
    """Unconditional-generation metrics: validity and diversity of ``samples`` [N, 16].

    ``distinct_valid`` guards against the trivial way to a high ``valid``: collapsing onto a
    few memorised grids.
    """
    samples = torch.as_tensor(samples).long()
    valid = is_valid(samples)
    n = len(samples)
    return {
        "valid": float(valid.float().mean()) if n else 0.0,
        "distinct_valid": _count_distinct(samples[valid]),
        "distinct": _count_distinct(samples),
        "n": n,
    }


def score_solutions(solutions: torch.Tensor, puzzles: torch.Tensor, given: torch.Tensor) -> dict:
    """Infilling metrics: does each solution complete its puzzle into a valid grid?

    Any valid grid agreeing with the clues counts (a puzzle may have several solutions).
    ``clue_violations`` should be 0 for a correct sampler: givens are never masked, so a
    sampler or corrector that rewrites one is buggy, not merely weak.
    """
    solutions = torch.as_tensor(solutions).long()
    puzzles = torch.as_tensor(puzzles).long()
    given = torch.as_tensor(given).bool()
    if not solutions.shape == puzzles.shape == given.shape:
        raise ValueError(
            f"shape mismatch: solutions {tuple(solutions.shape)}, puzzles {tuple(puzzles.shape)}, "
            f"given {tuple(given.shape)}"
        )
    n = len(solutions)
    violated = ((solutions != puzzles) & given).any(dim=1)
    solved = is_valid(solutions) & ~violated
    return {
        "solved": float(solved.float().mean()) if n else 0.0,
        "clue_violations": float(violated.float().mean()) if n else 0.0,
        "distinct_solved": _count_distinct(solutions[solved]),
        "n": n,
    }


def to_text(grid: torch.Tensor | Sequence[int]) -> str:
    """A 4x4 grid as text: digits 1..4, ``.`` for the mask, ``?`` for any other id."""
    cells = [int(x) for x in torch.as_tensor(grid).reshape(-1).tolist()]
    if len(cells) != SEQ_LEN:
        raise ValueError(f"expected {SEQ_LEN} cells, got {len(cells)}")

    def ch(x: int) -> str:
        if 0 <= x < NUM_DIGITS:
            return str(x + 1)
        return "." if x == MASK_ID else "?"

    lines = []
    for r in range(4):
        row = [ch(x) for x in cells[4 * r : 4 * r + 4]]
        lines.append(f"{row[0]} {row[1]} | {row[2]} {row[3]}")
        if r == 1:
            lines.append("----+----")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ data
FORMAT_VERSION = 1
FILES = ("train.npy", "heldout_grids.npy", "puzzles.npy", "puzzle_given.npy")
# Puzzle cells are drawn with a seed derived from split_seed, so one number pins the dataset
# while the split and the cell choice still use different random streams.
PUZZLE_SEED_OFFSET = 1


def puzzle_seed(split_seed: int) -> int:
    """The seed of the held-out puzzles' clue cells for a dataset split with ``split_seed``."""
    return int(split_seed) + PUZZLE_SEED_OFFSET


def heldout_puzzles(split_seed: int, holdout_fraction: float, clues: int,
                    n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The puzzles of the held-out grids: ``(puzzles, given)`` as :func:`make_puzzles` makes them
    (``n=None``: one per held-out grid, the prepared files; else ``n`` cycling over the grids)."""
    _, held = split(split_seed, holdout_fraction)
    return make_puzzles(held, clues, seed=puzzle_seed(split_seed), n=n)


def _check_settings(holdout_fraction: float, clues: int, split_seed: int) -> None:
    # Checked here too (not only in the config) because prepare() is a public entry point.
    if isinstance(holdout_fraction, bool) or not isinstance(holdout_fraction, (int, float)):
        raise ProsecoError(f"data.holdout_fraction must be a number, got {holdout_fraction!r}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ProsecoError(f"data.holdout_fraction must be in [0, 1), got {holdout_fraction}")
    if isinstance(clues, bool) or not isinstance(clues, int) or not 0 <= clues <= SEQ_LEN:
        raise ProsecoError(f"data.puzzle_clues must be an integer in 0..{SEQ_LEN}, got {clues!r}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int):
        raise ProsecoError(f"data.split_seed must be an integer, got {split_seed!r}")


def _prepare(out_dir: str | os.PathLike, holdout_fraction: float, clues: int, split_seed: int) -> tuple[dict, bool]:
    """Like :func:`prepare`, also saying whether files were written (False: already there)."""
    _check_settings(holdout_fraction, clues, split_seed)
    train, held = split(split_seed, float(holdout_fraction))
    puzzles, given = make_puzzles(held, clues, seed=puzzle_seed(split_seed))
    settings = {"format": FORMAT_VERSION, "task": NAME, "vocab_size": VOCAB_SIZE, "mask_id": MASK_ID,
                "seq_len": SEQ_LEN, "holdout_fraction": float(holdout_fraction), "clues": int(clues),
                "split_seed": int(split_seed), "puzzle_seed": puzzle_seed(split_seed)}
    blobs, manifest = arrays.build(
        dict(zip(FILES, (train.numpy().astype(np.uint8), held.numpy().astype(np.uint8),
                         puzzles.numpy().astype(np.uint8), given.numpy().astype(np.bool_)))),
        settings, {"train": len(train), "heldout_grids": len(held), "puzzles": len(puzzles)})
    return arrays.write(out_dir, blobs, manifest, shown=("task", "holdout_fraction", "clues", "split_seed"))


def prepare(out_dir: str | os.PathLike, *, holdout_fraction: float, clues: int, split_seed: int) -> dict:
    """Write the Sudoku dataset into ``out_dir`` and return its manifest.

    Files: ``train.npy`` (uint8 [N_train, 16], training grids), ``heldout_grids.npy`` (grids never
    trained on), ``puzzles.npy`` (held-out grids with hidden cells set to MASK_ID),
    ``puzzle_given.npy`` (bool: which puzzle cells are clues), ``manifest.json``. Idempotent: the
    same settings again return the folder's manifest and rewrite nothing; a folder holding different
    prepared data, or unknown files, raises :class:`ProsecoError` rather than being overwritten.
    """
    return _prepare(out_dir, holdout_fraction, clues, split_seed)[0]


def prepare_data(cfg: Any, out_dir: str | os.PathLike) -> dict:
    """:func:`prepare` with the settings of ``cfg.data`` (holdout_fraction, puzzle_clues,
    split_seed): the science suite's entry point (pipeline/science.py); returns the manifest."""
    d = cfg.data
    return prepare(out_dir, holdout_fraction=d.holdout_fraction, clues=d.puzzle_clues, split_seed=d.split_seed)


def load(out_dir: str | os.PathLike) -> dict:
    """Load a prepared folder, verifying every file's sha256 against the manifest.

    Returns ``train``, ``heldout_grids``, ``puzzles`` (torch.long), ``puzzle_given``
    (torch.bool) and ``manifest``.
    """
    return arrays.load(out_dir, NAME, FILES)


def main(cfg: Any, out_dir: str) -> int:
    """``proseco prep sudoku``: prepare ``cfg.data`` (a :class:`pipeline.config.Config`) into ``out_dir``."""
    data = cfg.data
    if data.task != NAME:
        raise ProsecoError(f"data.task={data.task!r}: this preparer handles {NAME!r} only")
    if data.seq_len != SEQ_LEN:
        raise ProsecoError(f"data.seq_len={data.seq_len} but {NAME} grids have {SEQ_LEN} cells")
    manifest, wrote = _prepare(out_dir, holdout_fraction=data.holdout_fraction, clues=data.puzzle_clues,
                               split_seed=data.split_seed)
    counts = manifest["counts"]
    verb = "wrote" if wrote else "already prepared (unchanged)"
    print(
        f"{manifest['task']}: {verb} {out_dir}\n"
        f"  train grids {counts['train']}, held-out grids {counts['heldout_grids']}, "
        f"puzzles {counts['puzzles']} with {manifest['clues']} clues\n"
        f"  split_seed {manifest['split_seed']}, fingerprint {manifest['fingerprint'][:16]}"
    )
    return 0


# ------------------------------------------------------------------------------------ evaluation
class GenerateTask(EvalTask):
    """``sudoku4``: grids generated from scratch, scored by validity and distinct valid grids."""

    name = NAME
    vocab_size = VOCAB_SIZE
    seq_len = SEQ_LEN
    primary = "valid"
    diversity = "distinct_valid"
    layout = "a 4x4 Sudoku model"  # what a model of another layout is told it needs
    score_grids = staticmethod(score_generated)  # a grid size's own scorer and text form
    grid_text = staticmethod(to_text)

    def __init__(self, cfg, options: dict, model: ModelInfo):
        super().__init__(cfg, options, model)
        self.check_layout(self.layout)

    def score(self, tokens, conditioning):
        g = self.score_grids(tokens)
        graded = {self.graded: g[self.graded]} if self.graded else {}
        return {"valid": g["valid"], **graded, "distinct_valid": float(g["distinct_valid"])}

    def decode(self, tokens):
        return [self.grid_text(row).replace("\n", "/") for row in tokens]


class SolveTask(GenerateTask):
    """``sudoku4-solve``: the held-out puzzles (cycled to the sample count), scored by solved puzzles."""

    name = "sudoku4-solve"
    primary = "solved"
    diversity = None

    def conditioning(self, n: int, seed: int):
        d = self.cfg.data
        puzzles, given = heldout_puzzles(d.split_seed, d.holdout_fraction, d.puzzle_clues)
        reps = math.ceil(n / len(puzzles))
        return puzzles.repeat(reps, 1)[:n], given.repeat(reps, 1)[:n]

    def score(self, tokens, conditioning):
        puzzles, given = conditioning
        s = score_solutions(tokens, puzzles, given)
        return {"solved": s["solved"], "clue_violations": float(s["clue_violations"])}
