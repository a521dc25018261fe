"""QM9 molecule generation (``--tasks qm9``): unconditional samples scored as SMILES with RDKit.

The model was trained on QM9 SMILES, one molecule per document (see :mod:`data_prep.qm9`:
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
  all of QM9 as bundled by the ``qm9pack`` package (130,831 molecules, read offline; see
  :mod:`data_prep.qm9`), i.e. novelty = "not a QM9 molecule", the usual definition. Give the
  train file of :func:`data_prep.qm9.write_qm9_corpus` for novelty w.r.t. the training split.
  The set is canonicalised once per process (7-14 s for QM9 on 2 cores) and cached.

A SMILES with whitespace inside is invalid: RDKit reads text after a space as the molecule's
*name*, so ``"CC O"`` would otherwise count as ethane.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from rdkit import Chem, rdBase
from rdkit.Chem import QED, rdMolDescriptors

from pipeline.errors import ProsecoError
from pipeline.evaluation.tasks.base import EvalTask, ModelInfo

OPTIONS = ("train_smiles",)  # other keys are ignored (the evaluator passes one dict to every task)
INCOMPLETE = "<mask>"  # stands for a position the sampler left masked; never parses
OUT_OF_VOCAB = "<oov>"  # an id the tokenizer lacks (a model vocabulary larger than the tokenizer's)

_TRAIN_CACHE: dict[tuple, tuple[frozenset[str], dict]] = {}


def _mol(smiles: str | None):
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
    return None if mol is None else Chem.MolToSmiles(mol)


def molecule_metrics(smiles_list: Iterable[str | None], train_set: Iterable[str] | None) -> dict[str, float]:
    """Validity, uniqueness, novelty, mean QED, mean ring count (and counts) of generated SMILES.

    ``train_set``: canonical SMILES of the training molecules (None: ``novelty`` is left out).
    """
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
            from data_prep.qm9 import SOURCE, read_qm9_smiles

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

    def __init__(self, cfg, options: dict, model: ModelInfo):
        super().__init__(cfg, options, model)
        tok = model.tokenizer
        if tok is None:
            raise ProsecoError("qm9 needs a model trained on text shards of SMILES (it has no tokenizer)")
        if tok.vocab_size > model.vocab_size:
            raise ProsecoError(f"qm9: the tokenizer has {tok.vocab_size} ids, "
                               f"the model only {model.vocab_size}")
        self.tokenizer = tok
        self.train_set, self.train_info = load_train_set(self.options.get("train_smiles") or None)

    def decode(self, tokens: torch.Tensor) -> list[str]:
        return [smiles_of_row(row.tolist(), self.tokenizer) for row in tokens]

    def score(self, tokens: torch.Tensor, conditioning=None) -> dict[str, float]:
        return molecule_metrics(self.decode(tokens), self.train_set)


__all__ = ["Task", "canonical", "load_train_set", "molecule_metrics", "smiles_of_row"]
