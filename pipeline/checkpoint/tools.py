"""``proseco ckpt``: inspect, export and convert training checkpoints.

* ``export``: one consolidated ``model.safetensors`` (EMA weights by default, the weights used for
  evaluation) plus ``model.json`` (format, vocabulary, mask id, step, the training config),
  ``config.yaml`` and ``SHA256SUMS`` (checked before every load; ``sha256sum -c`` checks it by
  hand), written to a temporary folder and renamed into place. Loading it needs torch and
  safetensors only - no DeepSpeed, no megatron-core: :func:`pipeline.checkpoint.load_model` reads
  an export folder the same way as a model file.
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
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from pipeline.checkpoint.manager import MARKER, CheckpointManager, file_entries, rewrite_meta
from pipeline.config import config_from_dict, dump_yaml
from pipeline.errors import ProsecoError
from pipeline.io import SUMS_FILE, atomic_write, check_sums, default_file_mode, write_sums

EXPORT_FORMAT = "proseco-export/1"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_META = "model.json"


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


def _meta(ckpt: Path) -> dict:
    manager = CheckpointManager(ckpt.parent.parent)
    meta = manager.read_meta(ckpt)
    manager.verify(ckpt, meta)
    return meta


def full_weights(ckpt: Path, weights: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
    """(Backbone state dict in fp32, "ema" | "raw") of any backend's checkpoint.

    ``weights``: ``ema`` (refused when the run had no EMA), ``raw`` (the trained weights), or
    ``auto`` (EMA when present)."""
    meta = _meta(ckpt)
    backend = meta.get("topology", {}).get("backend", "torch")
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    if weights in ("auto", "ema") and "ema" in state:
        return {k: v.float() for k, v in state["ema"].items()}, "ema"
    if weights == "ema":
        raise ProsecoError(f"{ckpt} has no EMA weights (optim.ema was 0); use --weights raw")
    if backend != "deepspeed":
        return {k: v.float() for k, v in state["model"].items()}, "raw"
    from pipeline.engines.deepspeed_engine import DS_TAG, import_deepspeed

    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
    return {k: v.float() for k, v in sd.items()}, "raw"


def export(path: str | os.PathLike, out: str | os.PathLike | None = None, weights: str = "auto",
           force: bool = False) -> Path:
    """Write the export folder (default ``RUN/exports/step_XXXXXXXX``); returns it."""
    from safetensors.torch import save_file

    ckpt = resolve(path)
    meta = _meta(ckpt)
    if "model" not in meta:
        raise ProsecoError(f"{ckpt} predates exportable checkpoints (no vocabulary / mask id in meta.json)")
    out = Path(out) if out else ckpt.parent.parent / "exports" / ckpt.name
    if out.exists() and not force:
        raise ProsecoError(f"{out} exists; pass --force to replace it or --out to choose another folder")
    sd, which = full_weights(ckpt, weights)
    cfg = config_from_dict(meta["config"])
    from pipeline.model import Backbone

    probe = Backbone(cfg.model, vocab_size=meta["model"]["vocab_size"])
    try:
        probe.load_state_dict(sd)
    except RuntimeError as exc:
        raise ProsecoError(f"{ckpt}: weights do not fit the model its config describes ({exc})") from exc
    info = {"format": EXPORT_FORMAT, "source": str(ckpt), "step": meta["step"], "weights": which,
            "vocab_size": meta["model"]["vocab_size"], "mask_id": meta["model"]["mask_id"],
            "topology": meta.get("topology"), "code": meta.get("code"), "config": meta["config"]}
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # safetensors refuses tensors that share memory (a tied head): store each name's own copy
    save_file({k: v.detach().clone().contiguous() for k, v in probe.state_dict().items()},
              str(tmp / EXPORT_WEIGHTS), metadata={"format": EXPORT_FORMAT})
    os.chmod(tmp / EXPORT_WEIGHTS, default_file_mode())  # safetensors creates 0600 whatever the umask
    atomic_write(tmp / EXPORT_META, json.dumps(info, indent=1) + "\n")
    atomic_write(tmp / "config.yaml", dump_yaml(cfg))
    write_sums(tmp, [EXPORT_WEIGHTS, EXPORT_META, "config.yaml"])
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_export(folder: Path) -> dict:
    """An export folder as the dict :func:`pipeline.checkpoint.read_model_file` returns."""
    from safetensors.torch import load_file

    try:
        bad = check_sums(folder)
    except FileNotFoundError:
        print(f"warning: {folder} has no {SUMS_FILE} (exported by an older version): its files are not "
              "checked; re-export it to add checksums", file=sys.stderr)
        bad = []
    except OSError as exc:
        raise ProsecoError(f"{folder / SUMS_FILE} is unreadable ({exc})") from exc
    if bad:
        raise ProsecoError(f"export {folder} is corrupted: {'; '.join(bad)}; export the checkpoint again")
    try:
        info = json.loads((folder / EXPORT_META).read_text())
        state = load_file(str(folder / EXPORT_WEIGHTS))
    except Exception as exc:  # missing / truncated / foreign files
        raise ProsecoError(f"{folder} is not a readable export folder ({type(exc).__name__}: {exc})") from exc
    if info.get("format") != EXPORT_FORMAT:
        raise ProsecoError(f"{folder} is not a {EXPORT_FORMAT} export (format {info.get('format')!r})")
    return {"format": EXPORT_FORMAT, "config": info["config"], "vocab_size": info["vocab_size"],
            "mask_id": info["mask_id"], "state_dict": state, "export": info}


def universal(path: str | os.PathLike, force: bool = False) -> Path:
    """Convert a DeepSpeed checkpoint's ZeRO files to DeepSpeed's universal format, in place."""
    from pipeline.engines.deepspeed_engine import DS_TAG, UNIVERSAL_TAG, import_deepspeed

    ckpt = resolve(path)
    meta = _meta(ckpt)
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
    tmp = ckpt / f"{UNIVERSAL_TAG}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(ckpt / DS_TAG), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    ds_to_universal.main(args)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    new = sorted(p.relative_to(ckpt).as_posix() for p in out.rglob("*") if p.is_file())
    rewrite_meta(ckpt, {**meta, "files": {**files, **file_entries(ckpt, new)}})
    return out


def info(path: str | os.PathLike) -> str:
    ckpt = resolve(path)
    meta = _meta(ckpt)
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
