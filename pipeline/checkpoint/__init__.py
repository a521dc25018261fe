"""Checkpoints: the single-file model format (``model_file``) and the training engine's
resumable checkpoint folders (``manager``).

The model-file API is re-exported here so ``from pipeline.checkpoint import load_model`` keeps working.
"""

from __future__ import annotations

from pipeline.checkpoint.model_file import (
    FORMAT,
    load_model,
    model_config_mismatch,
    read_model_file,
    save_model,
)

__all__ = ["FORMAT", "load_model", "model_config_mismatch", "read_model_file", "save_model"]
