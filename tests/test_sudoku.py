"""The 4x4 Sudoku demo task (pipeline.tasks.sudoku): layout, scoring, file preparation and its registration."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pipeline.config import Config
from pipeline.errors import ProsecoError
from pipeline.tasks import sudoku as S
from pipeline.tasks import task_class


def grid(text: str) -> torch.Tensor:
    """'1234 3412 ...' (digits 1..4, '.' = mask) -> LongTensor[16] of token ids."""
    cells = [S.MASK_ID if ch == "." else int(ch) - 1 for ch in text if not ch.isspace()]
    assert len(cells) == 16
    return torch.tensor(cells, dtype=torch.long)


def stack(*texts: str) -> torch.Tensor:
    return torch.stack([grid(t) for t in texts])


VALID_A = "1234 3412 2143 4321"
VALID_B = "1234 3412 4321 2143"  # differs from A only in rows 2-3
ROW_DUP = "1313 2424 3131 4242"  # columns and boxes fine, rows repeat
COL_DUP = "1234 3412 1234 3412"  # rows and boxes fine, columns repeat
BOX_DUP = "1234 2341 3412 4123"  # a Latin square: rows and columns fine, boxes repeat


def _groups_ok(g: torch.Tensor) -> tuple[bool, bool, bool]:
    """(rows ok, columns ok, boxes ok), computed independently of the code under test."""
    m = g.reshape(4, 4).tolist()

    def perm(xs):
        return sorted(xs) == [0, 1, 2, 3]

    rows = all(perm(r) for r in m)
    cols = all(perm([m[r][c] for r in range(4)]) for c in range(4))
    boxes = all(perm([m[r][c] for r in (br, br + 1) for c in (bc, bc + 1)]) for br in (0, 2) for bc in (0, 2))
    return rows, cols, boxes


# ----------------------------------------------------------------------------- task


def test_task_info_and_registry():
    assert (S.VOCAB_SIZE, S.MASK_ID, S.SEQ_LEN) == (5, 4, 16)
    assert S.NAME == "sudoku4"
    assert task_class("sudoku4") is S.GenerateTask and task_class("sudoku4-solve") is S.SolveTask
    assert S.GenerateTask.vocab_size == S.SolveTask.vocab_size == S.VOCAB_SIZE
    with pytest.raises(ProsecoError, match="unknown task 'sudoku16'"):
        task_class("sudoku16")


def test_valid_hand_grids():
    assert S.is_valid(stack(VALID_A, VALID_B)).tolist() == [True, True]


@pytest.mark.parametrize(
    ("text", "broken"),
    [(ROW_DUP, (False, True, True)), (COL_DUP, (True, False, True)), (BOX_DUP, (True, True, False))],
    ids=["row-duplicate", "column-duplicate", "box-duplicate"],
)
def test_each_constraint_is_checked(text, broken):
    g = grid(text)
    assert _groups_ok(g) == broken  # each case breaks exactly one kind of group
    assert S.is_valid(g[None]).tolist() == [False]


def test_mask_and_out_of_range_ids_are_invalid():
    bad = stack(VALID_A, VALID_A, VALID_A, VALID_A)
    bad[1, 5] = S.MASK_ID
    bad[2, 0] = 7
    bad[3, 15] = -1
    assert S.is_valid(bad).tolist() == [True, False, False, False]
    assert S.is_valid(torch.zeros(0, 16, dtype=torch.long)).shape == (0,)
    with pytest.raises(ValueError):
        S.is_valid(torch.zeros(3, 9, dtype=torch.long))


def test_all_grids():
    grids = S.all_grids()
    assert grids.shape == (288, 16) and grids.dtype == torch.long
    assert S.is_valid(grids).all()
    assert torch.unique(grids, dim=0).shape[0] == 288
    as_lists = grids.tolist()
    assert as_lists == sorted(as_lists)  # lexicographic order
    assert all(_groups_ok(g) == (True, True, True) for g in grids)
    assert grid(VALID_A).tolist() in as_lists and grid(VALID_B).tolist() in as_lists
    assert (grids[:, :4] == torch.tensor([0, 1, 2, 3])).all(dim=1).sum() == 288 // 24  # symmetry
    grids[0, 0] = 3  # callers get a copy: the cache stays intact
    assert S.all_grids()[0, 0] == 0


def test_split_deterministic_disjoint_and_complete():
    train, held = S.split(1234, 0.2)
    assert (len(train), len(held)) == (288 - 58, 58)
    train2, held2 = S.split(1234, 0.2)
    assert torch.equal(train, train2) and torch.equal(held, held2)
    rows_t = {tuple(r) for r in train.tolist()}
    rows_h = {tuple(r) for r in held.tolist()}
    assert not rows_t & rows_h
    assert rows_t | rows_h == {tuple(r) for r in S.all_grids().tolist()}
    _, held_other = S.split(1235, 0.2)
    assert {tuple(r) for r in held_other.tolist()} != rows_h
    assert len(S.split(0, 0.0)[1]) == 0
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            S.split(0, bad)


@pytest.mark.parametrize("clues", [0, 6, 16])
def test_make_puzzles_keeps_exactly_the_clues(clues):
    _, held = S.split(1234, 0.2)
    puzzles, given = S.make_puzzles(held, clues, seed=7)
    assert puzzles.shape == given.shape == held.shape and given.dtype == torch.bool
    assert (given.sum(dim=1) == clues).all()
    assert torch.equal(puzzles[given], held[given])
    assert (puzzles[~given] == S.MASK_ID).all()
    again, given_again = S.make_puzzles(held, clues, seed=7)
    assert torch.equal(again, puzzles) and torch.equal(given_again, given)


def test_make_puzzles_cycles_with_fresh_cells():
    grids = stack(VALID_A, VALID_B)
    puzzles, given = S.make_puzzles(grids, 6, seed=0, n=40)
    assert puzzles.shape == (40, 16)
    source = grids[torch.arange(40) % 2]
    assert torch.equal(puzzles[given], source[given])
    assert torch.unique(given, dim=0).shape[0] > 2  # repeats of a grid draw different cells
    _, other = S.make_puzzles(grids, 6, seed=1, n=40)
    assert not torch.equal(other, given)
    with pytest.raises(ValueError):
        S.make_puzzles(grids, 17, seed=0)


def test_score_generated():
    samples = stack(VALID_A, VALID_A, VALID_B, ROW_DUP, "1234 3412 2143 432.")
    out = S.score_generated(samples)
    assert out == {"valid": pytest.approx(3 / 5), "distinct_valid": 2, "distinct": 4, "n": 5}
    assert S.score_generated(torch.zeros(0, 16, dtype=torch.long))["n"] == 0


def test_score_solutions():
    a, b = grid(VALID_A), grid(VALID_B)
    given = (a == b) & (torch.arange(16) < 6)  # clues shared by A and B: both are solutions
    puzzle = torch.where(given, a, torch.full_like(a, S.MASK_ID))
    violating = S.all_grids()[-1]  # valid, but first row 4321 disagrees with the given cells
    assert S.is_valid(violating[None]) and ((violating != a) & given).any()
    unfinished = puzzle.clone()
    solutions = torch.stack([a, b, a, grid(COL_DUP), violating, unfinished])
    puzzles = puzzle.expand(6, 16)
    givens = given.expand(6, 16)
    out = S.score_solutions(solutions, puzzles, givens)
    assert out == {
        "solved": pytest.approx(3 / 6),
        "clue_violations": pytest.approx(1 / 6),
        "distinct_solved": 2,
        "n": 6,
    }
    with pytest.raises(ValueError):
        S.score_solutions(solutions[:2], puzzles, givens)


def test_to_text():
    assert S.to_text(grid("1234 3412 2143 432.")) == ("1 2 | 3 4\n3 4 | 1 2\n----+----\n2 1 | 4 3\n4 3 | 2 .")
    assert S.to_text([0] * 15 + [9]).endswith("1 1 | 1 ?")


# ----------------------------------------------------------------------------- data prep

SETTINGS = {"holdout_fraction": 0.2, "clues": 6, "split_seed": 1234}


def test_prepare_load_round_trip(tmp_path):
    out = tmp_path / "data"
    manifest = S.prepare(out, **SETTINGS)
    assert sorted(os.listdir(out)) == sorted([*S.FILES, "manifest.json"])
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary folder left behind
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["task"] == "sudoku4" and manifest["vocab_size"] == 5 and manifest["mask_id"] == 4
    assert manifest["seq_len"] == 16 and manifest["clues"] == 6 and manifest["split_seed"] == 1234
    assert manifest["counts"] == {"train": 230, "heldout_grids": 58, "puzzles": 58}
    assert len(manifest["fingerprint"]) == 64
    assert np.load(out / "train.npy").dtype == np.uint8
    assert np.load(out / "puzzle_given.npy").dtype == np.bool_

    data = S.load(out)
    train, held = S.split(1234, 0.2)
    puzzles, given = S.make_puzzles(held, 6, seed=1234 + S.PUZZLE_SEED_OFFSET)
    assert all(torch.equal(a, b) for a, b in zip(S.heldout_puzzles(1234, 0.2, 6), (puzzles, given), strict=True))
    assert data["train"].dtype == torch.long and torch.equal(data["train"], train)
    assert torch.equal(data["heldout_grids"], held)
    assert torch.equal(data["puzzles"], puzzles) and data["puzzles"].dtype == torch.long
    assert data["puzzle_given"].dtype == torch.bool and torch.equal(data["puzzle_given"], given)
    assert data["manifest"] == manifest
    assert S.score_solutions(data["heldout_grids"], data["puzzles"], data["puzzle_given"])["solved"] == 1.0


def test_prepare_is_idempotent_and_deterministic(tmp_path):
    out = tmp_path / "data"
    first = S.prepare(out, **SETTINGS)
    stats = {name: os.stat(out / name) for name in os.listdir(out)}
    again = S.prepare(out, **SETTINGS)
    assert again == first
    for name, st in stats.items():  # nothing rewritten
        assert os.stat(out / name).st_ino == st.st_ino and os.stat(out / name).st_mtime_ns == st.st_mtime_ns
    other = S.prepare(tmp_path / "elsewhere", **SETTINGS)
    assert other["fingerprint"] == first["fingerprint"]


def test_prepare_refuses_different_data(tmp_path):
    out = tmp_path / "data"
    S.prepare(out, **SETTINGS)
    with pytest.raises(ProsecoError, match="different prepared data.*new output folder"):
        S.prepare(out, **{**SETTINGS, "clues": 5})
    with pytest.raises(ProsecoError, match="different prepared data"):
        S.prepare(out, **{**SETTINGS, "split_seed": 1})


def test_prepare_refuses_unknown_folder_but_accepts_empty_one(tmp_path):
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "notes.txt").write_text("keep me")
    with pytest.raises(ProsecoError, match="not empty"):
        S.prepare(unknown, **SETTINGS)
    assert os.listdir(unknown) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert S.prepare(empty, **SETTINGS)["counts"]["train"] == 230
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ProsecoError, match="not a folder"):
        S.prepare(a_file, **SETTINGS)


def test_corrupted_or_missing_file_detected(tmp_path):
    out = tmp_path / "data"
    S.prepare(out, **SETTINGS)
    path = out / "puzzles.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ProsecoError, match="puzzles.npy sha256 does not match"):
        S.load(out)
    with pytest.raises(ProsecoError, match="puzzles.npy"):  # prepare does not trust it either
        S.prepare(out, **SETTINGS)
    (out / "train.npy").unlink()
    with pytest.raises(ProsecoError, match="puzzles.npy sha256.*train.npy is missing"):
        S.load(out)  # every bad file is named at once
    with pytest.raises(ProsecoError, match="manifest.json"):
        S.load(tmp_path / "nowhere")


def test_prepare_rejects_bad_settings(tmp_path):
    with pytest.raises(ProsecoError, match="puzzle_clues"):
        S.prepare(tmp_path / "d", **{**SETTINGS, "clues": 17})
    with pytest.raises(ProsecoError, match="holdout_fraction"):
        S.prepare(tmp_path / "d", **{**SETTINGS, "holdout_fraction": 1.0})
    assert not (tmp_path / "d").exists()


def test_main_prints_summary(tmp_path, capsys):
    cfg = Config()
    out = tmp_path / "data"
    assert S.main(cfg, str(out)) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and str(out) in text and "230" in text and "58" in text
    assert S.main(cfg, str(out)) == 0
    assert "already prepared" in capsys.readouterr().out
    cfg.data.task = "owt"
    with pytest.raises(ProsecoError, match="data.task"):
        S.main(cfg, str(tmp_path / "other"))
