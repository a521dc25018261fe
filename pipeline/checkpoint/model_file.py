"""Model files for sampling: weights plus the config they were trained with.

This is the single-file format of the demo and of ``proseco sample``. The training engine's
resumable checkpoints (optimizer, RNG and loader state, sharded backends) are their own format;
``proseco ckpt export`` turns one into an export folder (safetensors + config), which
:func:`load_model` reads as well. Loading uses ``torch.load(weights_only=True)`` / safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pipeline.config import Config, config_from_dict, to_dict
from pipeline.errors import ProsecoError
from pipeline.model import Backbone

FORMAT = "proseco-model/1"


def save_model(path: str | os.PathLike, model: nn.Module, cfg: Config, vocab_size: int, mask_id: int,
               **extra) -> None:
    """Write atomically: a temporary file renamed into place, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "config": to_dict(cfg), "vocab_size": vocab_size, "mask_id": mask_id,
                "state_dict": model.state_dict(), **extra}, tmp)
    os.replace(tmp, path)


def read_model_file(path: str | os.PathLike) -> dict:
    """A model file, or an export folder written by ``proseco ckpt export`` (same dict)."""
    path = Path(path)
    if path.is_dir():
        from pipeline.checkpoint.tools import read_export

        return read_export(path)
    if not path.is_file():
        raise ProsecoError(f"no model file at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise ProsecoError(f"{path} is not a readable model file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ProsecoError(f"{path} is not a {FORMAT} file")
    return blob


def model_config_mismatch(saved: dict, wanted: dict) -> list[str]:
    """Dotted keys whose values differ between two model sections (vocab_size None = from data)."""
    return [f"model.{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in wanted.items()
            if saved.get(k) != v and not (k == "vocab_size" and v is None)]


def load_model(path: str | os.PathLike, cfg: Config | None = None) -> tuple[nn.Module, Config, dict]:
    """(model in eval mode, the config it was trained with, the raw file dict).

    With ``cfg``, its model section must match the checkpoint's; a mismatch is a user error
    that names every differing key rather than a shape error from ``load_state_dict``."""
    blob = read_model_file(path)
    saved_cfg = config_from_dict(blob["config"])
    if cfg is not None:
        diff = model_config_mismatch(to_dict(saved_cfg)["model"], to_dict(cfg)["model"])
        if diff:
            raise ProsecoError(f"{path} was trained with another model config: " + "; ".join(diff))
    model = Backbone(saved_cfg.model, vocab_size=blob["vocab_size"])
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise ProsecoError(f"{path}: weights do not fit the model its config describes ({exc})") from exc
    return model.eval(), saved_cfg, blob
