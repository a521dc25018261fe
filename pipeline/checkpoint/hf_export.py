"""``proseco ckpt export --format hf`` for Hugging Face backbones (``model.init=hf:PATH``).

The checkpoint's weights (EMA or raw, as ``--weights`` says) go into the transformers model's own
class with ``save_pretrained``, its config keeping what the adaptation changed: the vocabulary with
the mask row, ``mask_token_id`` and ``is_causal: false``. The tokenizer the SFT shards were made
with (``hf_tokenizer/`` next to them) is saved with it when it is there. ``model.init=hf:OUT``
loads the folder back as a backbone (bidirectional again: transformers' SDPA path reads the
attention modules' ``is_causal``, which a plain ``from_pretrained`` leaves causal when no
attention mask is passed, so load it through :func:`pipeline.model.hf.build`, or pass
``attn_implementation="eager"`` and an attention mask).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.errors import ProsecoError
from pipeline.io import atomic_folder


def export_hf_backbone(ckpt: Path, meta: dict, out: str | os.PathLike | None, weights: str = "auto",
                       force: bool = False) -> Path:
    """Write the HF-backbone checkpoint ``ckpt`` (its ``meta``) as a transformers folder; returns it."""
    from pipeline.artifact import _checkpoint_data, _shards_folder
    from pipeline.checkpoint.tools import full_weights
    from pipeline.config import config_from_dict
    from pipeline.model import hf

    cfg = config_from_dict(meta["config"])
    out = Path(out) if out else ckpt.parent.parent / "exports" / f"{ckpt.name}_hf"
    if out.exists() and not force:
        raise ProsecoError(f"{out} exists; pass --force to replace it or --out to choose another folder")
    state, _ = full_weights(ckpt, weights, meta)
    backbone = hf.build(cfg.model.init, pretrained=False)
    try:
        backbone.load_state_dict(state)
    except RuntimeError as exc:
        raise ProsecoError(f"{ckpt}: weights do not fit {cfg.model.init} ({str(exc).splitlines()[0]})") from exc
    tokenizer = None
    try:
        tokenizer = _shards_folder(ckpt, _checkpoint_data(meta)) / "hf_tokenizer"
    except ProsecoError:
        pass
    if out.exists():
        shutil.rmtree(out)
    with atomic_folder(out) as tmp:
        backbone.model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None and tokenizer.is_dir():
            for file in tokenizer.iterdir():
                shutil.copy2(file, tmp / file.name)
    return out
