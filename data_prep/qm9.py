"""QM9 SMILES as a plain-text corpus: one molecule per line, a train file and a held-out file.

The molecules come from the PyPI package ``qm9pack`` (MIT licence, by R. Ramakrishnan, an author of
QM9), which *bundles* the dataset: ``qm9pack/data/qm9_part{1,2,3}.csv`` (~225 MB unpacked, a
~104 MB wheel), 130,831 molecules (QM9's 133,885 minus the 3,054 whose geometry did not converge),
in ``Index`` order, one ``SMILES`` column (Kekule form, no stereo marks, at most 28 characters,
alphabet ``#()+-12345=CFHNO[]``; every one parses with RDKit). Nothing
is downloaded at run time.

The CSV files are read directly (``csv`` module, no pandas): ``import qm9pack`` itself fails with
setuptools >= 81, because its ``__init__`` imports ``pkg_resources``, which is gone there. The
package is only *located* (:func:`importlib.util.find_spec` does not execute it).

Use::

    python -m data_prep.qm9 data/qm9/qm9.txt     # -> qm9.txt (train) + qm9.heldout.txt
    proseco prep tokenizer --config text prep.inputs=[data/qm9/qm9.txt] prep.doc_split=line ...
    proseco prep shards    --config text prep.inputs=[data/qm9/qm9.txt] prep.doc_split=line prep.mode=pad ...

Give ``prep.inputs`` the train *file*: a folder input would pick up the held-out file too. With a
512-id BPE tokenizer a QM9 SMILES is 11.5 tokens on average, 22 at most, so ``data.seq_len=32``
holds bos + SMILES + eos in pad mode (checked: ``prep tokenizer`` 1 s, ``prep shards`` 17 s on 2 cores).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import random
import sys
from pathlib import Path

from pipeline.errors import ProsecoError
from pipeline.io import atomic_write

QM9_PARTS = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
QM9_MOLECULES = 130_831  # rows in qm9pack 1.0.3
SOURCE = "qm9pack (PyPI), qm9pack/data/qm9_part{1,2,3}.csv, column SMILES"


def qm9pack_data_dir() -> Path:
    """The folder of qm9pack's bundled CSV files (found without importing the package)."""
    try:
        spec = importlib.util.find_spec("qm9pack")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ProsecoError("the QM9 molecules come from the qm9pack package, which is not installed: "
                           "pip install 'qm9pack==1.0.3'")
    data = Path(locations[0]) / "data"
    missing = [name for name in QM9_PARTS if not (data / name).is_file()]
    if missing:
        raise ProsecoError(f"qm9pack at {locations[0]} lacks its data files ({', '.join(missing)}); "
                           "reinstall it: pip install --force-reinstall 'qm9pack==1.0.3'")
    return data


def read_qm9_smiles() -> list[str]:
    """The SMILES of every QM9 molecule in qm9pack, in the dataset's ``Index`` order (~1 s)."""
    data = qm9pack_data_dir()
    limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # the coordinate columns are long; only SMILES is kept
    smiles: list[str] = []
    try:
        for name in QM9_PARTS:
            with open(data / name, newline="", encoding="utf-8") as f:
                reader = csv.reader(f)
                header = next(reader, [])
                if "SMILES" not in header:
                    raise ProsecoError(f"{data / name} has no SMILES column (header: {header[:6]}...)")
                column = header.index("SMILES")
                for row in reader:
                    if len(row) > column and row[column].strip():
                        smiles.append(row[column].strip())
    finally:
        csv.field_size_limit(limit)
    return smiles


def _write_lines(path: Path, lines: list[str]) -> str:
    data = "".join(f"{line}\n" for line in lines).encode()
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def heldout_path_for(out_path: str | os.PathLike) -> Path:
    """``data/qm9/qm9.txt`` -> ``data/qm9/qm9.heldout.txt``."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.heldout{out.suffix or '.txt'}")


def write_qm9_corpus(
    out_path: str | os.PathLike,
    *,
    split_seed: int = 1234,
    holdout_fraction: float = 0.1,
    heldout_path: str | os.PathLike | None = None,
    canonicalize: bool = False,
    overwrite: bool = False,
    smiles: list[str] | None = None,
) -> dict:
    """Write QM9's SMILES, one per line, to ``out_path`` (train) and ``heldout_path`` (held out).

    ``heldout_path`` defaults to :func:`heldout_path_for` (``qm9.txt`` -> ``qm9.heldout.txt``).
    ``holdout_fraction`` of the molecules (rounded down), drawn with ``random.Random(split_seed)``,
    go to the held-out file; both files keep the dataset order. ``canonicalize`` rewrites each
    SMILES as RDKit's canonical form and drops duplicates (first kept) *before* the split, so no
    molecule is on both sides (needs rdkit; without it the raw qm9pack strings are written: all
    distinct, but 87 pairs are one molecule in two Kekule spellings, e.g. ``CC1=CN=CC=N1`` and
    ``CC1=NC=CN=C1``). ``smiles`` replaces the qm9pack
    molecules (tests). Existing files are kept unless ``overwrite``. Returns a summary dict.
    """
    if isinstance(holdout_fraction, bool) or not isinstance(holdout_fraction, (int, float)) \
            or not 0.0 <= holdout_fraction < 1.0:
        raise ProsecoError(f"holdout_fraction must be in [0, 1), got {holdout_fraction!r}")
    out = Path(out_path)
    held = Path(heldout_path) if heldout_path is not None else heldout_path_for(out)
    if out.resolve() == held.resolve():
        raise ProsecoError(f"the train and held-out files are the same path ({out})")
    existing = [str(p) for p in (out, held) if p.exists()]
    if existing and not overwrite:
        raise ProsecoError(f"{', '.join(existing)} already exist(s); choose another path, or replace them "
                           "(overwrite=True, --force)")
    source = SOURCE if smiles is None else "given list"
    molecules = read_qm9_smiles() if smiles is None else [s.strip() for s in smiles if s.strip()]
    dropped = 0
    if canonicalize:
        from pipeline.evaluation.tasks.qm9 import canonical  # needs rdkit

        seen: set[str] = set()
        unique = []
        for s in molecules:
            c = canonical(s)
            if c is None or c in seen:
                dropped += 1
                continue
            seen.add(c)
            unique.append(c)
        molecules = unique
    if not molecules:
        raise ProsecoError("no molecules to write")
    n_held = int(len(molecules) * holdout_fraction)
    held_idx = set(random.Random(split_seed).sample(range(len(molecules)), n_held))
    train = [s for i, s in enumerate(molecules) if i not in held_idx]
    heldout = [s for i, s in enumerate(molecules) if i in held_idx]
    for path in (out, held):
        path.parent.mkdir(parents=True, exist_ok=True)
    return {
        "source": source,
        "molecules": len(molecules),
        "dropped": dropped,  # invalid or duplicate canonical SMILES (canonicalize only)
        "canonical": bool(canonicalize),
        "split_seed": split_seed,
        "holdout_fraction": float(holdout_fraction),
        "train": {"path": str(out), "molecules": len(train), "sha256": _write_lines(out, train)},
        "heldout": {"path": str(held), "molecules": len(heldout), "sha256": _write_lines(held, heldout)},
        "max_chars": max(len(s) for s in molecules),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m data_prep.qm9",
                                     description="Write QM9 SMILES (qm9pack) as train + held-out text files.")
    parser.add_argument("out_path", help="the train file, e.g. data/qm9/qm9.txt")
    parser.add_argument("--heldout-path", default=None)
    parser.add_argument("--split-seed", type=int, default=1234)
    parser.add_argument("--holdout-fraction", type=float, default=0.1)
    parser.add_argument("--canonicalize", action="store_true",
                        help="RDKit canonical SMILES, duplicates dropped")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    try:
        info = write_qm9_corpus(args.out_path, heldout_path=args.heldout_path, split_seed=args.split_seed,
                                holdout_fraction=args.holdout_fraction, canonicalize=args.canonicalize,
                                overwrite=args.force)
    except ProsecoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["QM9_MOLECULES", "heldout_path_for", "qm9pack_data_dir", "read_qm9_smiles", "write_qm9_corpus"]
