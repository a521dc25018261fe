"""4x4 Sudoku, the demo's constraint task, as two evaluation tasks.

* ``sudoku4``: generate grids from scratch; ``valid`` (fraction of valid grids, primary) and
  ``distinct_valid`` (distinct valid grids: collapsing onto one valid grid scores high validity
  but low diversity).
* ``sudoku4-solve``: complete the held-out puzzles (``data.puzzle_clues`` given cells, grids never
  trained on; the puzzles of ``data_prep.sudoku``, cycled to the sample count); ``solved``
  (primary) and ``clue_violations`` (must stay 0: the sampler keeps given cells fixed).
"""

from __future__ import annotations

import math

from data_prep.sudoku import PUZZLE_SEED_OFFSET
from pipeline.errors import ProsecoError
from pipeline.evaluation.tasks.base import EvalTask, ModelInfo
from pipeline.tasks import sudoku


class Task(EvalTask):
    name = "sudoku4"
    primary = "valid"
    diversity = "distinct_valid"

    def __init__(self, cfg, options: dict, model: ModelInfo):
        super().__init__(cfg, options, model)
        if model.vocab_size != sudoku.VOCAB_SIZE or model.mask_id != sudoku.MASK_ID or model.seq_len != sudoku.SEQ_LEN:
            raise ProsecoError(f"task {self.name} needs a 4x4 Sudoku model (vocabulary {sudoku.VOCAB_SIZE}, mask id "
                               f"{sudoku.MASK_ID}, 16 cells); this one has vocabulary {model.vocab_size}, mask id "
                               f"{model.mask_id}, {model.seq_len} tokens")

    def score(self, tokens, conditioning):
        g = sudoku.score_generated(tokens)
        return {"valid": g["valid"], "distinct_valid": float(g["distinct_valid"])}

    def decode(self, tokens):
        return [sudoku.to_text(row).replace("\n", "/") for row in tokens]


class SolveTask(Task):
    name = "sudoku4-solve"
    primary = "solved"
    diversity = None

    def conditioning(self, n: int, seed: int):
        d = self.cfg.data
        _, held = sudoku.split(d.split_seed, d.holdout_fraction)
        puzzles, given = sudoku.make_puzzles(held, d.puzzle_clues, seed=d.split_seed + PUZZLE_SEED_OFFSET)
        reps = math.ceil(n / len(puzzles))
        return puzzles.repeat(reps, 1)[:n], given.repeat(reps, 1)[:n]

    def score(self, tokens, conditioning):
        puzzles, given = conditioning
        s = sudoku.score_solutions(tokens, puzzles, given)
        return {"solved": s["solved"], "clue_violations": float(s["clue_violations"])}


