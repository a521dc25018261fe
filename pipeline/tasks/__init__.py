"""Built-in synthetic tasks: small, exactly scorable problems for demos and science tests.

Each task module exposes its token layout (``VOCAB_SIZE``, ``MASK_ID``, ``SEQ_LEN``,
``TASK_INFO``) plus generators and exact scorers, so training and sampling can be checked
end to end on a laptop before any corpus data exists.
"""

from __future__ import annotations

from types import ModuleType

from pipeline.tasks import sudoku
from pipeline.tasks.sudoku import TASK_INFO as SUDOKU4_INFO
from pipeline.tasks.sudoku import TaskInfo

TASKS: dict[str, ModuleType] = {"sudoku4": sudoku}


def get_task(name: str) -> ModuleType:
    """The task module registered as ``name`` (``data.task`` in the config)."""
    try:
        return TASKS[name]
    except KeyError:
        from pipeline.errors import ProsecoError  # lazy: keep the pure task code import-light

        raise ProsecoError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}") from None


__all__ = ["SUDOKU4_INFO", "TASKS", "TaskInfo", "get_task", "sudoku"]
