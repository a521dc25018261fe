"""The 9x9 Sudoku task (pipeline.tasks.sudoku9): scoring, solver, generator, puzzles, data folder, eval tasks.

Expected values come from hand-made grids and an independent, deliberately naive checker and
solver written here (plain lists, no bitmasks), not from the code under test.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ProsecoError
from pipeline.tasks import ModelInfo, task_class
from pipeline.tasks import sudoku9 as S

# A valid grid; r1c1, r1c4, r2c1, r2c4 hold 3 7 / 7 3: swapping them keeps every row, column and box valid.
VALID = """
389 761 452
764 325 891
521 948 736
613 489 275
492 517 368
875 632 914
946 853 127
138 276 549
257 194 683
"""
# VALID with 43 cells emptied by hand (at least two per row, column and box; r2c4 and r4c2 stay
# given: without them two more swappable rectangles make four solutions).
HAND_PUZZLE = """
3.. 7.1 .5.
.6. 32. 8.1
5.1 ..8 ..6
.13 4.. 2.5
49. ... .68
8.5 ..2 9..
9.. 8.. 1.7
.3. .7. .4.
2.7 1.4 ..3
"""


def grid(text: str) -> torch.Tensor:
    """Nine lines of digits 1..9 ('.' = mask) -> LongTensor[81] of token ids."""
    cells = [S.MASK_ID if ch == "." else int(ch) - 1 for ch in text if not ch.isspace()]
    assert len(cells) == 81
    return torch.tensor(cells, dtype=torch.long)


def naive_units(cells: list[int]) -> list[list[int]]:
    """The 9 rows, 9 columns and 9 boxes of ``cells`` as plain lists (independent of the code under test)."""
    rows = [cells[9 * r: 9 * r + 9] for r in range(9)]
    cols = [[cells[9 * r + c] for r in range(9)] for c in range(9)]
    boxes = [[cells[9 * (3 * b + r) + 3 * s + c] for r in range(3) for c in range(3)]
             for b in range(3) for s in range(3)]
    return rows + cols + boxes


def naive_valid(cells: list[int]) -> bool:
    """Every row, column and box holds the tokens 0..8 once."""
    return all(sorted(g) == list(range(9)) for g in naive_units(cells))


def naive_count(cells: list[int], limit: int = 2) -> int:
    """Solutions of a puzzle (MASK_ID = empty), up to ``limit``: plain backtracking, first empty cell on."""
    if S.MASK_ID not in cells:
        return 1
    i = cells.index(S.MASK_ID)
    r, c = divmod(i, 9)
    used = {cells[9 * r + k] for k in range(9)} | {cells[9 * k + c] for k in range(9)}
    used |= {cells[9 * (r - r % 3 + a) + c - c % 3 + b] for a in range(3) for b in range(3)}
    total = 0
    for d in range(9):
        if d not in used and total < limit:
            cells[i] = d
            total += naive_count(cells, limit - total)
    cells[i] = S.MASK_ID
    return total


def info(vocab=S.VOCAB_SIZE, mask=S.MASK_ID, seq_len=S.SEQ_LEN) -> ModelInfo:
    return ModelInfo(vocab_size=vocab, mask_id=mask, seq_len=seq_len)


def cfg(*overrides: str):
    return load_config(overrides=["data.task=sudoku9", "data.seq_len=81", "model.max_seq_len=81", *overrides])


# ----------------------------------------------------------------------------- scoring
def test_layout_and_registry():
    assert (S.VOCAB_SIZE, S.MASK_ID, S.SEQ_LEN, S.MASK_ID) == (10, 9, 81, S.VOCAB_SIZE - 1)
    assert S.SUITE_TASKS == ("sudoku9", "sudoku9-solve")
    assert task_class("sudoku9") is S.GenerateTask and task_class("sudoku9-solve") is S.SolveTask


def test_hand_grid_is_valid_and_broken_grids_are_not():
    good = grid(VALID)
    assert naive_valid(good.tolist())
    swapped, masked, out_of_range, negative = good.clone(), good.clone(), good.clone(), good.clone()
    swapped[[9, 10]] = swapped[[10, 9]]  # two cells of row 2: the row stays a permutation, columns break
    masked[40] = S.MASK_ID
    out_of_range[80] = 12
    negative[0] = -1
    latin = torch.tensor([(r + c) % 9 for r in range(9) for c in range(9)])  # rows, columns fine; boxes not
    bands = good.view(9, 9)[[0, 3, 2, 1, 4, 5, 6, 7, 8]].reshape(-1)  # rows 2 and 4 swapped: boxes break
    batch = torch.stack([good, swapped, masked, out_of_range, negative, latin, bands])
    expected = [True] + [False] * 6
    assert [naive_valid(row) for row in batch.tolist()] == expected
    assert S.is_valid(batch).tolist() == expected
    scores = S.score_generated(torch.stack([good, good, swapped, masked]))
    # constraints: swapped breaks columns 1 and 2 (25 of 27 units hold), masked breaks r5, c5, box 5 (24)
    assert scores == {"valid": 0.5, "constraints": pytest.approx((2 + 25 / 27 + 24 / 27) / 4), "distinct_valid": 1,
                      "distinct": 3, "n": 4}


def naive_units_held(cells: list[int]) -> int:
    """How many of the 27 rows, columns and boxes hold the tokens 0..8 once."""
    return sum(sorted(g) == list(range(9)) for g in naive_units(cells))


def test_constraints_grade_how_close_a_grid_comes():
    good = grid(VALID)
    one_off = good.clone()
    one_off[0] = 7  # r1c1 3 -> 8: row 1, column 1 and box 1 now hold two 8s (and no 3)
    rect = good.clone()  # r1c1 <-> r1c4 (3, 7): row 1 still holds 1-9; columns 1 and 4, boxes 1 and 2 break
    rect[[0, 3]] = rect[[3, 0]]
    hand = {"valid": (good, 27), "one digit changed": (one_off, 24), "swap across boxes": (rect, 23),
            "empty": (torch.full((81,), S.MASK_ID), 0), "all ones": (torch.zeros(81, dtype=torch.long), 0)}
    for name, (g, held) in hand.items():
        assert naive_units_held(g.tolist()) == held, name
        assert S.constraints(g[None]).item() == pytest.approx(held / 27), name
    gen = torch.Generator().manual_seed(0)  # random damage to the valid grid, checked against the plain count
    batch = good.repeat(200, 1)
    for row in batch:
        cells = torch.randint(0, 81, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen)
        row[cells] = torch.randint(0, 10, (len(cells),), generator=gen)
    want = torch.tensor([naive_units_held(r) / 27 for r in batch.tolist()])
    assert torch.allclose(S.constraints(batch), want) and len(set(want.tolist())) > 5
    assert torch.equal(S.is_valid(batch), S.constraints(batch) == 1)
    with pytest.raises(ValueError, match="expected grids of shape"):
        S.constraints(good)


def test_score_solutions_counts_a_rewritten_clue():
    puzzle, solution = grid(HAND_PUZZLE), grid(VALID)
    given = puzzle != S.MASK_ID
    swapped = solution.clone()  # the other filling of the r1/r2 x c1/c4 rectangle: valid, but r1c1 is a clue
    swapped[[0, 3, 9, 12]] = swapped[[3, 0, 12, 9]]
    assert naive_valid(swapped.tolist()) and bool(given[0])
    unfinished = solution.clone()
    unfinished[1] = S.MASK_ID  # r1c2 is not a clue
    s = S.score_solutions(torch.stack([solution, swapped, unfinished, solution]),
                          puzzle.repeat(4, 1), given.repeat(4, 1))
    assert s == {"solved": 0.5, "constraints": pytest.approx((3 + 24 / 27) / 4), "clue_violations": 0.25, "n": 4}


def test_to_text():
    text = S.to_text(grid(HAND_PUZZLE))
    assert text.splitlines()[0] == "3..|7.1|.5." and len(text.splitlines()) == 9
    with pytest.raises(ValueError):
        S.to_text(torch.zeros(80, dtype=torch.long))


# ----------------------------------------------------------------------------- solver
def test_solver_finds_the_solution_of_a_hand_puzzle():
    puzzle = grid(HAND_PUZZLE)
    assert int((puzzle != S.MASK_ID).sum()) == 38
    assert torch.equal(torch.where(puzzle == S.MASK_ID, grid(VALID), puzzle), grid(VALID))  # the clues agree
    assert naive_count(puzzle.tolist()) == 1
    count, solution = S.count_solutions(puzzle)
    assert count == 1 and torch.equal(solution, grid(VALID))


def test_solver_counts_two_for_a_swappable_rectangle():
    puzzle = grid(VALID)
    puzzle[[0, 3, 9, 12]] = S.MASK_ID  # r1c1 r1c4 r2c1 r2c4: 3 7 / 7 3 or 7 3 / 3 7
    assert naive_count(puzzle.tolist(), limit=3) == 2
    assert S.count_solutions(puzzle)[0] == 2
    assert S.count_solutions(puzzle, limit=5)[0] == 2
    contradiction = grid(VALID)
    contradiction[1] = contradiction[0]  # two 3s in row 1
    assert S.count_solutions(contradiction) == (0, None)
    with pytest.raises(ValueError):
        S.count_solutions(torch.full((81,), 10))


# ----------------------------------------------------------------------------- generator and puzzles
def test_generator_is_deterministic_and_valid():
    a, b, c = S.generate_grids(64, 3), S.generate_grids(64, 3), S.generate_grids(64, 4)
    assert a.shape == (64, 81) and torch.equal(a, b)
    assert not torch.equal(a, c) and len(torch.unique(torch.cat([a, c]), dim=0)) == 128
    assert all(naive_valid(row) for row in a.tolist())
    counts = torch.stack([(a == d).sum(dim=0) for d in range(9)])  # every digit appears in every cell
    assert bool((counts > 0).all())


@pytest.mark.slow
def test_puzzles_are_unique_and_reach_their_clue_count():
    grids = S.generate_grids(6, 11)
    for i, g in enumerate(grids):
        puzzle = S.dig_puzzle(g, 32, seed=i)
        given = puzzle != S.MASK_ID
        assert int(given.sum()) == 32 and torch.equal(puzzle[given], g[given])
        assert naive_count(puzzle.tolist()) == 1  # independent check of uniqueness
        count, solution = S.count_solutions(puzzle)
        assert count == 1 and torch.equal(solution, g)
    assert torch.equal(S.dig_puzzle(grids[0], 32, seed=0), S.dig_puzzle(grids[0], 32, seed=0))
    assert not torch.equal(S.dig_puzzle(grids[0], 32, seed=0), S.dig_puzzle(grids[0], 32, seed=1))
    # 6 clues cannot be unique (17 is the minimum): the closest unique puzzle is kept.
    minimal = S.dig_puzzle(grids[0], 6, seed=0)
    assert 17 <= int((minimal != S.MASK_ID).sum()) < 32 and S.count_solutions(minimal)[0] == 1
    with pytest.raises(ValueError, match="complete valid grid"):
        S.dig_puzzle(grid(HAND_PUZZLE), 30, seed=0)


@pytest.mark.slow
def test_heldout_puzzles_are_unique_disjoint_from_train_and_cycled(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "NUM_TRAIN", 500)
    monkeypatch.setattr(S, "NUM_HELDOUT", 40)
    c = cfg("data.split_seed=5", "data.puzzle_clues=30")
    manifest = S.prepare_data(c, tmp_path / "d")
    assert S.prepare_data(c, tmp_path / "d") == manifest  # idempotent
    data = S.load(tmp_path / "d")
    train, held, puzzles, given = data["train"], data["heldout_grids"], data["puzzles"], data["puzzle_given"]
    assert train.dtype == torch.long and train.shape == (500, 81) and held.shape == puzzles.shape == (40, 81)
    assert manifest["counts"] == {"train": 500, "heldout_grids": 40, "puzzles": 40}
    assert manifest["actual_clues"] == {"min": 30, "max": 30, "mean": 30.0} and manifest["num_train"] == 500
    assert not {tuple(r) for r in train.tolist()} & {tuple(r) for r in held.tolist()}
    assert torch.equal(given, puzzles != S.MASK_ID) and torch.equal(puzzles[given], held[given])
    for p, g in zip(puzzles, held):
        count, solution = S.count_solutions(p)
        assert count == 1 and torch.equal(solution, g)
    task = task_class("sudoku9-solve")(c, {}, info())
    cond_puzzles, cond_given = task.conditioning(100, seed=0)  # regenerated from cfg.data, no file
    assert torch.equal(cond_puzzles[:40], puzzles) and torch.equal(cond_puzzles[80:], puzzles[:20])
    assert torch.equal(cond_given[40:80], given)
    scores = task.score(torch.cat([held, held, held[:20]]), (cond_puzzles, cond_given))
    assert scores == {"solved": 1.0, "constraints": 1.0, "clue_violations": 0.0}
    with pytest.raises(ProsecoError, match="different prepared data"):
        S.prepare_data(cfg("data.split_seed=6", "data.puzzle_clues=30"), tmp_path / "d")


# ----------------------------------------------------------------------------- tasks and config
def test_eval_tasks_refuse_another_layout():
    c = cfg()
    for name in S.SUITE_TASKS:
        task_class(name)(c, {}, info())
        for bad in (info(vocab=5, mask=4, seq_len=16), info(seq_len=80), info(vocab=11)):
            with pytest.raises(ProsecoError, match="needs a 9x9 Sudoku model"):
                task_class(name)(c, {}, bad)
    gen = task_class("sudoku9")(c, {}, info())
    assert gen.score(grid(VALID)[None], None) == {"valid": 1.0, "constraints": 1.0, "distinct_valid": 1.0}
    assert (gen.graded, task_class("sudoku9-solve").graded) == ("constraints", "constraints")
    assert gen.decode(grid(VALID)[None])[0].startswith("389|761|452/764|")


def test_config_and_prepare_refuse_bad_settings(tmp_path):
    with pytest.raises(ProsecoError, match="data.seq_len must be 81 for data.task=sudoku9"):
        load_config(overrides=["data.task=sudoku9", "data.seq_len=64", "model.max_seq_len=81"])
    with pytest.raises(ProsecoError, match="data.puzzle_clues must be < 81"):
        cfg("data.puzzle_clues=81")
    c = cfg()
    c.data.seq_len = 16
    with pytest.raises(ProsecoError, match="data.seq_len=16"):
        S.prepare_data(c, tmp_path / "x")
    c = cfg()
    c.data.task = "sudoku4"
    with pytest.raises(ProsecoError, match="handles 'sudoku9' only"):
        S.prepare_data(c, tmp_path / "x")
    assert not (tmp_path / "x").exists()
