"""QM9 molecules as a task: the SMILES corpus (reading qm9pack, writing train / held-out files) and
unconditional generation scored as SMILES with RDKit (``--tasks qm9``).

**Data.** QM9 SMILES as a plain-text corpus: one molecule per line, a train file and a held-out file.

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

    python -m pipeline.tasks.qm9 data/qm9/qm9.txt     # -> qm9.txt (train) + qm9.heldout.txt
    proseco prep tokenizer --config text prep.inputs=[data/qm9/qm9.txt] prep.doc_split=line ...
    proseco prep shards    --config text prep.inputs=[data/qm9/qm9.txt] prep.doc_split=line prep.mode=pad ...

Give ``prep.inputs`` the train *file*: a folder input would pick up the held-out file too. With a
512-id BPE tokenizer a QM9 SMILES is 11.5 tokens on average, 22 at most, so ``data.seq_len=32``
holds bos + SMILES + eos in pad mode (checked: ``prep tokenizer`` 1 s, ``prep shards`` 17 s on 2 cores).
Train with ``diffusion.loss_on_pad=true``, the official QM9 recipe (``compute_loss_on_pad_tokens``):
pads are masked and predicted like any token, so the model learns where a molecule ends and its
samples (which fill every position) are drawn in the regime it was trained in. The sampler reads the
rule from the model's config: with ``loss_on_pad=false`` it never emits a pad.

**Evaluation.** Unconditional samples scored as SMILES with RDKit.

The model was trained on QM9 SMILES, one molecule per document (see :func:`write_qm9_corpus`:
``prep.doc_split=line``, best with ``prep.mode=pad`` so a sequence is ``bos SMILES eos pad...``).
Each generated row is decoded to one SMILES string (:func:`smiles_of_row`) and scored:

* ``validity``: the fraction of samples that RDKit parses into a non-empty molecule (primary);
* ``uniqueness``: distinct canonical SMILES among the valid / valid (diversity);
* ``novelty``: valid distinct molecules not in the training set / valid distinct;
* ``qed``: mean QED of the valid samples; ``rings``: their mean ring count (SSSR);
* extras: ``connected`` (fraction of the valid that are one fragment, i.e. no ``.``), the counts
  ``samples``, ``valid``, ``unique``, ``novel``.

Ratios with an empty denominator (no valid sample) are 0.0; the counts say why.

Options (keys of the options dict; unknown keys are ignored):

* ``train_smiles``: a text file, one SMILES per line, the training set for ``novelty`` (the
  evaluator fills it from ``eval.qm9_train_smiles``). Default (unset or ""):
  all of QM9 as bundled by the ``qm9pack`` package (130,831 molecules, read offline), i.e.
  novelty = "not a QM9 molecule", the usual definition. Give the train file of :func:`write_qm9_corpus` for novelty w.r.t. the training split.
  The set is canonicalised once per process (7-14 s for QM9 on 2 cores) and cached.

A SMILES with whitespace inside is invalid: RDKit reads text after a space as the molecule's
*name*, so ``"CC O"`` would otherwise count as ethane.

RDKit is imported on first use, so the corpus can be written without it (unless ``canonicalize``).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import random
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

import torch

from pipeline.errors import ProsecoError
from pipeline.io import atomic_write
from pipeline.tasks.base import EvalTask, ModelInfo

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


# ------------------------------------------------------------------------------------ evaluation
OPTIONS = ("train_smiles",)  # other keys are ignored (the evaluator passes one dict to every task)
INCOMPLETE = "<mask>"  # stands for a position the sampler left masked; never parses
OUT_OF_VOCAB = "<oov>"  # an id the tokenizer lacks (a model vocabulary larger than the tokenizer's)

_TRAIN_CACHE: dict[tuple, tuple[frozenset[str], dict]] = {}


def _rdkit():
    """RDKit's ``Chem``, ``rdBase``, ``QED`` and ``rdMolDescriptors``, imported on first use."""
    try:
        from rdkit import Chem, rdBase
        from rdkit.Chem import QED, rdMolDescriptors
    except ImportError:
        raise ProsecoError("qm9 scores SMILES with RDKit, which is not installed: "
                           "pip install 'proseco-pipeline[eval]'") from None
    return Chem, rdBase, QED, rdMolDescriptors


def _mol(smiles: str | None):
    Chem, rdBase, _, _ = _rdkit()
    if not smiles or any(ch.isspace() for ch in smiles):
        return None
    with rdBase.BlockLogs():  # invalid samples are expected; keep RDKit's parse errors off stderr
        mol = Chem.MolFromSmiles(smiles)
    if mol is None or mol.GetNumAtoms() == 0:
        return None
    return mol


def canonical(smiles: str | None) -> str | None:
    """RDKit's canonical SMILES of ``smiles`` (surrounding whitespace stripped); None if it does not
    parse, is empty, or has whitespace inside."""
    mol = _mol(smiles.strip() if smiles else smiles)
    return None if mol is None else _rdkit()[0].MolToSmiles(mol)


def molecule_metrics(smiles_list: Iterable[str | None], train_set: Iterable[str] | None) -> dict[str, float]:
    """Validity, uniqueness, novelty, mean QED, mean ring count (and counts) of generated SMILES.

    ``train_set``: canonical SMILES of the training molecules (None: ``novelty`` is left out).
    """
    Chem, rdBase, QED, rdMolDescriptors = _rdkit()
    smiles_list = list(smiles_list)
    train = train_set if train_set is None or isinstance(train_set, (set, frozenset)) else set(train_set)
    valid_canon: list[str] = []
    qeds: list[float] = []
    rings: list[int] = []
    connected = 0
    for smiles in smiles_list:
        mol = _mol(smiles.strip() if smiles else smiles)
        if mol is None:
            continue
        valid_canon.append(Chem.MolToSmiles(mol))
        with rdBase.BlockLogs():
            qeds.append(float(QED.qed(mol)))
        rings.append(int(rdMolDescriptors.CalcNumRings(mol)))
        connected += len(Chem.GetMolFrags(mol)) == 1
    n, n_valid = len(smiles_list), len(valid_canon)
    unique = set(valid_canon)
    out = {
        "validity": n_valid / n if n else 0.0,
        "uniqueness": len(unique) / n_valid if n_valid else 0.0,
        "qed": sum(qeds) / n_valid if n_valid else 0.0,
        "rings": sum(rings) / n_valid if n_valid else 0.0,
        "connected": connected / n_valid if n_valid else 0.0,
        "samples": float(n),
        "valid": float(n_valid),
        "unique": float(len(unique)),
    }
    if train is not None:
        novel = len(unique - train)
        out["novelty"] = novel / len(unique) if unique else 0.0
        out["novel"] = float(novel)
    return out


def smiles_of_row(ids: Iterable[int], tokenizer) -> str:
    """One generated row -> a SMILES string: leading bos skipped, cut at the first eos, pad or later
    bos, whitespace stripped. A position still masked becomes ``<mask>``, an id outside the tokenizer's
    vocabulary ``<oov>`` (either makes the sample invalid)."""
    ids = [int(i) for i in ids]
    bos, mask = tokenizer.bos_id, tokenizer.mask_id
    stops = {tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id}
    start = 0
    while start < len(ids) and ids[start] == bos:
        start += 1
    size = tokenizer.vocab_size
    pieces: list[str] = []
    segment: list[int] = []
    for i in ids[start:]:
        if i in stops:
            break
        if i == mask or not 0 <= i < size:
            pieces.extend([tokenizer.decode(segment), INCOMPLETE if i == mask else OUT_OF_VOCAB])
            segment = []
        else:
            segment.append(i)
    pieces.append(tokenizer.decode(segment))
    return "".join(pieces).strip()


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return ("file", str(path.resolve()), st.st_size, st.st_mtime_ns)


def load_train_set(path: str | os.PathLike | None = None) -> tuple[frozenset[str], dict]:
    """Canonical SMILES of the training set and a summary: from the text file ``path`` (one SMILES
    a line; blank lines ignored, unparseable ones counted), or QM9 from qm9pack when ``path`` is None.
    Cached per process."""
    if path is None:
        key: tuple = ("qm9pack",)
    else:
        p = Path(path)
        if not p.is_file():
            raise ProsecoError(f"qm9 option train_smiles: {p} is not a file")
        key = _file_key(p)
    if key not in _TRAIN_CACHE:
        if path is None:
            lines, source = read_qm9_smiles(), SOURCE
        else:
            try:
                lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
            except (OSError, UnicodeDecodeError) as exc:
                raise ProsecoError(f"qm9 option train_smiles: cannot read {path} ({exc})") from exc
            lines, source = [line for line in lines if line], str(path)
        canon = [canonical(s) for s in lines]
        train = frozenset(c for c in canon if c is not None)
        info = {"source": source, "lines": len(lines), "invalid": sum(c is None for c in canon),
                "molecules": len(train)}
        if not train:
            raise ProsecoError(f"qm9: the training set from {source} holds no valid SMILES")
        _TRAIN_CACHE[key] = (train, info)
    return _TRAIN_CACHE[key]


class Task(EvalTask):
    name = "qm9"
    primary = "validity"
    higher_is_better = True
    diversity = "uniqueness"
    eval_options: ClassVar[dict[str, str]] = {"train_smiles": "qm9_train_smiles"}

    def __init__(self, cfg, options: dict, model: ModelInfo):
        super().__init__(cfg, options, model)
        _rdkit()
        self.tokenizer = self.text_tokenizer("text shards of SMILES")
        self.train_set, self.train_info = load_train_set(self.options.get("train_smiles") or None)

    def decode(self, tokens: torch.Tensor) -> list[str]:
        return [smiles_of_row(row.tolist(), self.tokenizer) for row in tokens]

    def score(self, tokens: torch.Tensor, conditioning=None) -> dict[str, float]:
        return molecule_metrics(self.decode(tokens), self.train_set)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m pipeline.tasks.qm9",
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


__all__ = ["QM9_MOLECULES", "Task", "canonical", "heldout_path_for", "load_train_set", "molecule_metrics",
           "qm9pack_data_dir", "read_qm9_smiles", "smiles_of_row", "write_qm9_corpus"]
