"""``proseco ckpt``: inspect and convert training checkpoints, and read their weights.

* ``export`` (:func:`pipeline.artifact.export`) turns a checkpoint into a self-contained export
  folder; it reads the weights through :func:`weight_sets` here.
* ``universal``: DeepSpeed ZeRO files are tied to the data-parallel size and ZeRO stage that wrote
  them; DeepSpeed's universal-checkpoint conversion (``ds_to_universal``) turns them into a
  per-parameter layout any topology can load. The converted files go next to the originals
  (``deepspeed_universal/``) and a resume under another layout picks them up.
* ``info``: step, topology, backend files and the code version of a checkpoint.

A PATH may be a checkpoint folder (``.../checkpoints/step_XXXXXXXX``), a run folder or its
``checkpoints/`` folder (then the latest complete checkpoint is used).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from pipeline.checkpoint.manager import MARKER, CheckpointManager, file_entries, rewrite_meta
from pipeline.errors import ProsecoError
from pipeline.io import atomic_folder


def resolve(path: str | os.PathLike) -> Path:
    """A complete checkpoint folder from a checkpoint, checkpoints/ or run folder path."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    if path.is_dir() and path.name.startswith("step_"):
        raise ProsecoError(f"{path} is not a complete checkpoint (no {MARKER} marker): its save was interrupted")
    run = path.parent if path.name == "checkpoints" else path
    latest = CheckpointManager(run).latest() if (run / "checkpoints").is_dir() else None
    if latest is None:
        raise ProsecoError(f"no complete checkpoint at {path} (give a checkpoint folder "
                           "runs/NAME/checkpoints/step_XXXXXXXX or a run folder)")
    return latest


def checkpoint_meta(ckpt: Path, verify: bool = True) -> dict:
    """A complete checkpoint's ``meta.json`` (step, config, topology, model sizes, data identity,
    file checksums); with ``verify``, after every file passed its recorded size and sha256 check."""
    manager = CheckpointManager(ckpt.parent.parent)
    meta = manager.read_meta(ckpt)
    if verify:
        manager.verify(ckpt, meta)
    return meta


def _fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in state.items()}


def weight_sets(ckpt: Path, meta: dict, wanted: tuple[str, ...] = ("raw", "ema")) -> dict[str, dict[str, torch.Tensor]]:
    """``{"raw": ..., "ema": ...}``: the Backbone state dicts in fp32 of any backend's checkpoint
    (``ema`` only when the run kept EMA weights); ``wanted`` limits what is read."""
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    sets = {"ema": _fp32(state["ema"])} if "ema" in wanted and "ema" in state else {}
    if "raw" not in wanted:
        return sets
    if meta.get("topology", {}).get("backend", "torch") != "deepspeed":
        return {"raw": _fp32(state["model"]), **sets}
    from pipeline.engines.deepspeed_engine import DS_TAG, import_deepspeed

    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {"raw": _fp32(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)), **sets}


def full_weights(ckpt: Path, weights: str = "auto", meta: dict | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(Backbone state dict in fp32, "ema" | "raw") of any backend's checkpoint.

    ``weights``: ``ema`` (refused when the run had no EMA), ``raw`` (the trained weights), or
    ``auto`` (EMA when present). ``meta``: the checkpoint's verified meta, when already read."""
    meta = meta if meta is not None else checkpoint_meta(ckpt)
    if weights in ("auto", "ema"):
        sets = weight_sets(ckpt, meta, ("ema",))
        if "ema" in sets:
            return sets["ema"], "ema"
        if weights == "ema":
            raise ProsecoError(f"{ckpt} has no EMA weights (optim.ema was 0); use --weights raw")
    return weight_sets(ckpt, meta, ("raw",))["raw"], "raw"


def export_hf(path: str | os.PathLike, out: str | os.PathLike | None = None, weights: str = "auto",
              force: bool = False) -> Path:
    """``proseco ckpt export --format hf``: a folder ``transformers`` loads. Hugging Face backbones:
    :func:`pipeline.checkpoint.hf_export.export_hf_backbone` (the model's own class)."""
    from pipeline.checkpoint.hf_export import export_hf_backbone

    ckpt = resolve(path).resolve()
    meta = checkpoint_meta(ckpt)
    if not meta.get("config", {}).get("model", {}).get("init"):
        raise ProsecoError(f"{ckpt} holds the native model; --format hf exports Hugging Face backbones "
                           "(model.init=hf:PATH) only so far")
    return export_hf_backbone(ckpt, meta, out, weights, force)


def universal(path: str | os.PathLike, force: bool = False) -> Path:
    """Convert a DeepSpeed checkpoint's ZeRO files to DeepSpeed's universal format, in place."""
    from pipeline.engines.deepspeed_engine import DS_TAG, UNIVERSAL_TAG, import_deepspeed

    ckpt = resolve(path)
    meta = checkpoint_meta(ckpt)
    backend = meta.get("topology", {}).get("backend")
    if backend != "deepspeed":
        raise ProsecoError(f"{ckpt} was written by backend {backend}, not deepspeed: its full-state format "
                           "already resumes under any data- or tensor-parallel layout, nothing to convert")
    out = ckpt / UNIVERSAL_TAG
    if out.exists() and not force:
        raise ProsecoError(f"{out} exists already; pass --force to convert again")
    import_deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    # the converted files get checksums like every other file; old ones leave meta.json before they go
    files = {k: v for k, v in meta["files"].items() if not k.startswith(f"{UNIVERSAL_TAG}/")}
    if files != meta["files"]:
        rewrite_meta(ckpt, {**meta, "files": files})
    with atomic_folder(out) as tmp:
        tmp.rmdir()  # the converter creates its output folder itself
        args = argparse.Namespace(input_folder=str(ckpt / DS_TAG), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        ds_to_universal.main(args)
    new = sorted(p.relative_to(ckpt).as_posix() for p in out.rglob("*") if p.is_file())
    rewrite_meta(ckpt, {**meta, "files": {**files, **file_entries(ckpt, new)}})
    return out


def info(path: str | os.PathLike) -> str:
    ckpt = resolve(path)
    meta = checkpoint_meta(ckpt)
    topo = meta.get("topology", {})
    code = meta.get("code") or {}
    files = meta.get("files", {})
    size = sum(f["size"] for f in files.values())
    by_size = sum("sha256" not in f for f in files.values())
    how = "all checked against their sha256" if not by_size else (
        f"verified: {len(files) - by_size} by sha256, {by_size} by size only (saved before every file had a checksum)")
    lines = [f"checkpoint {ckpt}", f"  step {meta['step']}",
             "  topology " + ", ".join(f"{k} {v}" for k, v in topo.items()),
             f"  files {len(files)} ({size / 2**20:.1f} MiB), {how}",
             f"  code {code.get('git_sha') or '?'}{' (dirty)' if code.get('dirty') else ''}"]
    if (ckpt / "deepspeed_universal").is_dir():
        lines.append("  DeepSpeed universal files: yes (resumes under any dp / ZeRO stage)")
    return "\n".join(lines)
