"""Tasks: one module per task, each owning its data, layout, scoring and decoding; one registry.

* :mod:`pipeline.tasks.sudoku`: the 4x4 Sudoku demo task (``sudoku4``, ``sudoku4-solve``);
* :mod:`pipeline.tasks.sudoku9`: 9x9 Sudoku for the science suite (``sudoku9``, ``sudoku9-solve``);
* :mod:`pipeline.tasks.text`: unconditional text generation (``text``);
* :mod:`pipeline.tasks.qm9`: QM9 molecules as SMILES (``qm9``);
* :mod:`pipeline.tasks.gsm8k`: GSM8K-style maths word problems (``gsm8k``);
* :mod:`pipeline.tasks.markov`: a sparse second-order Markov chain with exact likelihood (``markov``).

The task API is :mod:`pipeline.tasks.base` (:class:`EvalTask`, :class:`ModelInfo`). The registry
maps a name (``data.task``, ``eval.tasks``) to ``module:Class``; modules are imported on first use,
so optional dependencies (RDKit, transformers) are only needed by the tasks that use them.
"""

from __future__ import annotations

import importlib

from pipeline.errors import ProsecoError
from pipeline.tasks.base import EvalTask, ModelInfo

TASKS = {
    "sudoku4": "pipeline.tasks.sudoku:GenerateTask",
    "sudoku4-solve": "pipeline.tasks.sudoku:SolveTask",
    "sudoku9": "pipeline.tasks.sudoku9:GenerateTask",
    "sudoku9-solve": "pipeline.tasks.sudoku9:SolveTask",
    "text": "pipeline.tasks.text:Task",
    "qm9": "pipeline.tasks.qm9:Task",
    "gsm8k": "pipeline.tasks.gsm8k:Task",
    "markov": "pipeline.tasks.markov:Task",
}


def check_names(names: list[str]) -> None:
    """Refuse, in one message, every name in ``names`` that is not a registered task."""
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ProsecoError(f"unknown evaluation task(s) {', '.join(unknown)}; known: {', '.join(sorted(TASKS))}")


def task_class(name: str) -> type[EvalTask]:
    """The :class:`EvalTask` subclass registered as ``name``."""
    if name not in TASKS:
        raise ProsecoError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    path, _, attr = TASKS[name].partition(":")
    try:
        module = importlib.import_module(path)
    except ImportError as exc:
        raise ProsecoError(f"task {name!r} needs a package that is not installed ({exc}); "
                           "pip install 'proseco-pipeline[eval]'") from None
    return getattr(module, attr)


__all__ = ["TASKS", "EvalTask", "ModelInfo", "check_names", "task_class"]
