"""Evaluation task registry: name -> ``module[:Class]`` of an :class:`~pipeline.evaluation.tasks.base.EvalTask`
subclass (default class name ``Task``). Modules are imported on first use, so optional dependencies (RDKit,
transformers) are only needed by the tasks that use them."""

from __future__ import annotations

import importlib

from pipeline.errors import ProsecoError
from pipeline.evaluation.tasks.base import EvalTask, ModelInfo

TASKS = {
    "sudoku4": "pipeline.evaluation.tasks.sudoku",
    "sudoku4-solve": "pipeline.evaluation.tasks.sudoku:SolveTask",
    "text": "pipeline.evaluation.tasks.text",
    "qm9": "pipeline.evaluation.tasks.qm9",
    "gsm8k": "pipeline.evaluation.tasks.gsm8k",
}


def task_class(name: str) -> type[EvalTask]:
    if name not in TASKS:
        raise ProsecoError(f"unknown evaluation task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    path, _, attr = TASKS[name].partition(":")
    try:
        module = importlib.import_module(path)
    except ImportError as exc:
        raise ProsecoError(f"evaluation task {name!r} needs a package that is not installed ({exc}); "
                           "pip install 'proseco-pipeline[eval]'") from None
    return getattr(module, attr or "Task")


__all__ = ["TASKS", "EvalTask", "ModelInfo", "task_class"]
