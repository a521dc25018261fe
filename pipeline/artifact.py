"""The model artifact: export folders, and :func:`load_model`, the one way a model is loaded.

A model comes from one of three places, and :func:`load_model` reads all of them the same way,
from any working directory (nothing is resolved against the current directory):

* a **checkpoint folder** (``RUN/checkpoints/step_XXXXXXXX``) of any training backend;
* a **run folder** (or its ``checkpoints/``): its latest complete checkpoint;
* an **export folder** written by ``proseco ckpt export`` (or by the demo), self-contained:

  ========================  ==============================================================
  ``raw.safetensors``       the trained weights
  ``ema.safetensors``       the EMA weights, when the run kept them
  ``model.json``            format, vocabulary size, mask id, step, which weights load by
                            default, the training config and the identity of the training
                            data (manifest fingerprint, name, tokenizer sha256)
  ``config.yaml``           the resolved training config, for reading
  ``tokenizer/``            the tokenizer's files (models trained on text shards)
  ``SHA256SUMS``            every file's sha256, checked before each load (``sha256sum -c``)
  ========================  ==============================================================

Loading an export needs torch and safetensors only (no DeepSpeed, no megatron-core). A
checkpoint finds its tokenizer through the shard folder it records as an absolute path
(:func:`data_identity`), checked against the recorded tokenizer sha256; a tokenizer that does not
load is an error that says why. The single-file ``.pt`` model format of earlier versions is retired.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.checkpoint.manager import MARKER
from pipeline.checkpoint.tools import checkpoint_meta, full_weights, resolve, weight_sets
from pipeline.config import Config, config_from_dict, dump_yaml, to_dict
from pipeline.errors import ProsecoError
from pipeline.io import SUMS_FILE, atomic_folder, atomic_write, check_sums, default_file_mode, write_sums

EXPORT_FORMAT = "proseco-export/2"
EXPORT_META = "model.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
WEIGHT_FILES = {"raw": "raw.safetensors", "ema": "ema.safetensors"}
WEIGHT_CHOICES = ("auto", "ema", "raw")
NOT_A_MODEL = ("expected a run folder, a checkpoint folder (runs/NAME/checkpoints/step_XXXXXXXX) "
               "or an export folder (`proseco ckpt export`, `proseco demo`)")


@dataclass
class ArtifactInfo:
    """What :func:`load_model` knows about the model it loaded besides its weights and config."""

    kind: str  # "checkpoint" | "export"
    path: Path  # the checkpoint or export folder, absolute
    vocab_size: int
    mask_id: int
    step: int | None  # the training step of the weights (None: not recorded)
    weights: str  # which weights the model holds: "ema" | "raw"
    identity: str  # a short hash of the checksums of the model's files (another model: another identity)
    data: dict  # the training data's identity: manifest fingerprint, name, shard folder, tokenizer sha256
    tokenizer: Any = None  # data_prep.tokenizer.Tokenizer of a model trained on text shards, else None
    extra: dict = field(default_factory=dict)  # what the writer of an export added (the demo: key, steps)

    def sampling_ids(self, cfg: Config) -> dict:
        """The keywords of :func:`pipeline.diffusion.sampling.sample` that follow how the model was
        trained (``cfg``: its training config): its padding rule and its tokenizer's pad and EOS ids."""
        tok = self.tokenizer
        return {"pad_id": None if tok is None else tok.pad_id, "eos_id": None if tok is None else tok.eos_id,
                "loss_on_pad": cfg.diffusion.loss_on_pad}


def data_identity(manifest) -> dict:
    """The identity of a model's training data, stored in checkpoints and exports: the manifest's
    fingerprint, the shard folder's name and absolute path, and the sha256 of its tokenizer."""
    root = Path(manifest.root).resolve()
    return {"fingerprint": manifest.fingerprint, "name": root.name, "path": str(root),
            "tokenizer_sha256": (manifest.data.get("tokenizer") or {}).get("sha256")}


# ------------------------------------------------------------------------------------ locating
def locate(path: str | os.PathLike) -> tuple[str, Path]:
    """("export" | "checkpoint", the absolute folder) of a model path; a run folder (or its
    ``checkpoints/``) names its latest complete checkpoint."""
    p = Path(path)
    if (p / EXPORT_META).is_file():
        return "export", p.resolve()
    if p.is_file():
        raise ProsecoError(f"{p} is not a model: {NOT_A_MODEL}" + (
            "; single-file .pt models are retired: retrain, or export the checkpoint" if p.suffix == ".pt" else ""))
    if not p.exists():
        raise ProsecoError(f"no model at {p}: {NOT_A_MODEL}")
    if not ((p / MARKER).is_file() or p.name.startswith("step_") or (p / "checkpoints").is_dir()
            or p.name == "checkpoints"):
        raise ProsecoError(f"{p} is not a model: {NOT_A_MODEL}")
    return "checkpoint", resolve(p).resolve()


def saved_config(path: str | os.PathLike) -> dict:
    """The training config (as a dict) stored with a model, without loading its weights."""
    kind, folder = locate(path)
    return _export_meta(folder)["config"] if kind == "export" else checkpoint_meta(folder, verify=False)["config"]


def model_identity(path: str | os.PathLike) -> str:
    """A short hash of a model's content: a checkpoint's recorded file checksums or an export's
    ``SHA256SUMS``. Another model at the same path gets another identity."""
    kind, folder = locate(path)
    if kind == "checkpoint":
        blob = json.dumps(checkpoint_meta(folder, verify=False).get("files", {}), sort_keys=True).encode()
    else:
        try:
            blob = (folder / SUMS_FILE).read_bytes()
        except OSError as exc:
            raise ProsecoError(f"export {folder} has no readable {SUMS_FILE} ({exc}); export it again") from exc
    return hashlib.sha256(blob).hexdigest()[:16]


# ------------------------------------------------------------------------------------ loading
def model_config_mismatch(saved: dict, wanted: dict) -> list[str]:
    """Dotted keys whose values differ between two model sections (vocab_size None = from data)."""
    return [f"model.{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in wanted.items()
            if saved.get(k) != v and not (k == "vocab_size" and v is None)]


def load_model(path: str | os.PathLike, *, weights: str = "auto",
               cfg: Config | None = None) -> tuple[nn.Module, Config, ArtifactInfo]:
    """(model in eval mode, the config it was trained with, :class:`ArtifactInfo`) of a checkpoint,
    run or export folder.

    ``weights``: ``ema`` (refused when there are none), ``raw``, or ``auto`` (an export's default,
    a checkpoint's EMA when the run kept one). With ``cfg``, its model section must match the
    saved one; a mismatch is a user error that names every differing key."""
    if weights not in WEIGHT_CHOICES:
        raise ProsecoError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    kind, folder = locate(path)
    if kind == "export":
        meta = _export_meta(folder)
        which = meta["weights"] if weights == "auto" else weights
        state = _export_weights(folder, meta, which)
        sizes, step, data, extra = meta, meta.get("step"), meta.get("data") or {}, meta.get("extra") or {}
    else:
        meta = checkpoint_meta(folder)
        if "model" not in meta:
            raise ProsecoError(f"{folder} predates loadable checkpoints (no vocabulary / mask id in meta.json)")
        state, which = full_weights(folder, weights, meta)
        sizes, step, data, extra = meta["model"], meta["step"], _checkpoint_data(meta), {}
    saved_cfg = config_from_dict(meta["config"])
    if cfg is not None:
        diff = model_config_mismatch(to_dict(saved_cfg)["model"], to_dict(cfg)["model"])
        if diff:
            raise ProsecoError(f"{folder} was trained with another model config: " + "; ".join(diff))
    vocab_size, mask_id = int(sizes["vocab_size"]), int(sizes["mask_id"])
    model = _backbone(saved_cfg, vocab_size, state, folder)
    tokenizer = None
    if saved_cfg.data.task == "text" and has_tokenizer(saved_cfg, kind, folder, data):
        where = folder / TOKENIZER_DIR if kind == "export" else _shards_folder(folder, data)
        tokenizer = load_tokenizer(where, data.get("tokenizer_sha256"), folder)
    info = ArtifactInfo(kind, folder, vocab_size, mask_id, step, which,
                     model_identity(folder), data, tokenizer, extra)
    return model.eval(), saved_cfg, info


def has_tokenizer(cfg: Config, kind: str, folder: Path, data: dict) -> bool:
    """Whether a text model comes with a pipeline tokenizer. A native model always does (a missing
    one is an error). An HF backbone's does where its shards were written by a `prep sft` that
    saves the model's tokenizer in the pipeline's form (older SFT shards carry only the transformers
    folder: such a model loads without one and cannot decode text)."""
    from data_prep.tokenizer import SIDECAR

    if not cfg.model.init:
        return True
    if kind == "export":
        return (folder / TOKENIZER_DIR / SIDECAR).is_file()
    return bool(data.get("tokenizer_sha256"))


def load_tokenizer(where: Path, sha256: str | None, owner: Path):
    """The tokenizer in folder ``where`` of the model at ``owner``; when ``sha256`` is given it
    must be the tokenizer the model was trained with. Any failure is an error that says why."""
    from data_prep.tokenizer import Tokenizer

    try:
        tok = Tokenizer.load(where)
    except ProsecoError as exc:
        raise ProsecoError(f"the tokenizer of {owner} does not load: {exc}") from exc
    if sha256 and tok.sidecar.get("sha256") != sha256:
        raise ProsecoError(f"the tokenizer in {where} (sha256 {str(tok.sidecar.get('sha256'))[:12]}) is not the one "
                           f"{owner} was trained with ({sha256[:12]}): the shards were rebuilt with another tokenizer")
    return tok


def _backbone(cfg: Config, vocab_size: int, state: dict, where: Path) -> nn.Module:
    from pipeline.model import Backbone, hf

    if hf.is_hf(cfg.model.init):  # the architecture from the transformers config, weights from ``state``
        model = hf.build(cfg.model.init, pretrained=False)
    else:
        model = Backbone(cfg.model, vocab_size=vocab_size)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ProsecoError(f"{where}: weights do not fit the model its config describes ({exc})") from exc
    return model


def _checkpoint_data(meta: dict) -> dict:
    """A checkpoint's data identity; one written before checkpoints stored it gives what it has."""
    if meta.get("data"):
        return meta["data"]
    data = meta["config"]["data"]
    return {"fingerprint": meta.get("manifest"), "path": data.get("shards", data.get("manifest"))}


def _shards_folder(ckpt: Path, data: dict) -> Path:
    """The shard folder (which keeps a copy of the tokenizer) a checkpoint was trained on."""
    shards = Path(data.get("path") or "")
    if not shards.is_absolute():
        raise ProsecoError(f"{ckpt} records its shards as the relative path {str(shards)!r} (it was written before "
                           "checkpoints stored absolute paths), so its tokenizer cannot be found from here")
    return shards.parent if shards.suffix == ".json" else shards


def _export_meta(folder: Path) -> dict:
    """An export's ``model.json`` after every file passed its ``SHA256SUMS`` check."""
    try:
        bad = check_sums(folder)
    except FileNotFoundError:
        raise ProsecoError(f"export {folder} has no {SUMS_FILE}: it is incomplete or of an older version; "
                           "export the checkpoint again") from None
    except OSError as exc:
        raise ProsecoError(f"{folder / SUMS_FILE} is unreadable ({exc})") from exc
    if bad:
        raise ProsecoError(f"export {folder} is corrupted: {'; '.join(bad)}; export the checkpoint again")
    try:
        meta = json.loads((folder / EXPORT_META).read_text())
    except (OSError, ValueError) as exc:
        raise ProsecoError(f"{folder / EXPORT_META} is unreadable ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ProsecoError(f"{folder} is not a {EXPORT_FORMAT} export (format {got!r}); export the checkpoint again")
    return meta


def _export_weights(folder: Path, meta: dict, which: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if which not in meta.get("available", []):
        raise ProsecoError(f"export {folder} has no {which} weights (it has: {', '.join(meta.get('available', []))})")
    try:
        return load_file(str(folder / WEIGHT_FILES[which]))
    except Exception as exc:  # safetensors raises its own types for truncated or foreign files
        raise ProsecoError(f"{folder / WEIGHT_FILES[which]} is unreadable ({type(exc).__name__}: {exc})") from exc


# ------------------------------------------------------------------------------------ writing
def write_export(out: str | os.PathLike, states: dict[str, dict[str, torch.Tensor]], cfg: Config, vocab_size: int,
                 mask_id: int, *, default: str | None = None, step: int | None = None, data: dict | None = None,
                 tokenizer_dir: Path | None = None, extra: dict | None = None, source: dict | None = None,
                 force: bool = False) -> Path:
    """Write an export folder from in-memory weights (``states``: ``{"raw": ..., "ema": ...}``,
    at least one), atomically: a temporary folder renamed into place. ``default``: the weights
    :func:`load_model` picks with ``weights="auto"`` (EMA when present). ``tokenizer_dir``: a
    tokenizer folder to copy in. Returns the folder."""
    out = Path(out)
    if out.exists() and not force:
        raise ProsecoError(f"{out} exists; pass --force to replace it or --out to choose another folder")
    default = default or ("ema" if "ema" in states else "raw")
    if default not in states:
        raise ProsecoError(f"no {default} weights to export (have: {', '.join(states)})")
    with atomic_folder(out) as tmp:
        _write_files(tmp, out, states, cfg, tokenizer_dir, {
            "format": EXPORT_FORMAT, "step": step, "weights": default, "available": sorted(states),
            "vocab_size": vocab_size, "mask_id": mask_id, "config": to_dict(cfg), "data": data or {},
            "extra": extra or {}, **(source or {})})
    return out


def _write_files(tmp: Path, out: Path, states: dict, cfg: Config, tokenizer_dir: Path | None, meta: dict) -> None:
    """Every file of the export folder ``out`` into ``tmp``, ``SHA256SUMS`` last."""
    from safetensors.torch import save_file

    names = [EXPORT_META, CONFIG_FILE]
    for which, state in states.items():
        model = _backbone(cfg, meta["vocab_size"], state, out)  # refuse weights that do not fit before writing
        # safetensors refuses tensors that share memory (a tied head): store each name's own copy
        save_file({k: v.detach().float().clone().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / WEIGHT_FILES[which]), metadata={"format": EXPORT_FORMAT, "weights": which})
        os.chmod(tmp / WEIGHT_FILES[which], default_file_mode())  # safetensors creates 0600 whatever the umask
        names.append(WEIGHT_FILES[which])
    if tokenizer_dir is not None:
        from data_prep.tokenizer import MODEL_FILE, SIDECAR, copy_tokenizer

        copy_tokenizer(tokenizer_dir, tmp / TOKENIZER_DIR)
        names += [f"{TOKENIZER_DIR}/{MODEL_FILE}", f"{TOKENIZER_DIR}/{SIDECAR}"]
    atomic_write(tmp / EXPORT_META, json.dumps(meta, indent=1) + "\n")
    atomic_write(tmp / CONFIG_FILE, dump_yaml(cfg))
    write_sums(tmp, names)


def export(path: str | os.PathLike, out: str | os.PathLike | None = None, weights: str = "auto",
           force: bool = False) -> Path:
    """``proseco ckpt export``: a checkpoint (or a run's latest) as an export folder, by default
    ``RUN/exports/step_XXXXXXXX``, with raw and EMA weights, config, tokenizer and data identity.
    ``weights`` picks the default weights of the export (``auto``: EMA when the run kept it)."""
    ckpt = resolve(path).resolve()
    meta = checkpoint_meta(ckpt)
    if "model" not in meta:
        raise ProsecoError(f"{ckpt} predates exportable checkpoints (no vocabulary / mask id in meta.json)")
    out = Path(out) if out else ckpt.parent.parent / "exports" / ckpt.name
    if out.exists() and not force:
        raise ProsecoError(f"{out} exists; pass --force to replace it or --out to choose another folder")
    states = weight_sets(ckpt, meta)
    if weights == "ema" and "ema" not in states:
        raise ProsecoError(f"{ckpt} has no EMA weights (optim.ema was 0); use --weights raw")
    cfg = config_from_dict(meta["config"])
    data = _checkpoint_data(meta)
    tokenizer_dir = None
    if cfg.data.task == "text" and has_tokenizer(cfg, "checkpoint", ckpt, data):
        tokenizer_dir = _shards_folder(ckpt, data)
        load_tokenizer(tokenizer_dir, data.get("tokenizer_sha256"), ckpt)  # the reason, before writing anything
    return write_export(out, states, cfg, meta["model"]["vocab_size"], meta["model"]["mask_id"],
                        default=None if weights == "auto" else weights, step=meta["step"], data=data,
                        tokenizer_dir=tokenizer_dir, force=force,
                        source={"source": str(ckpt), "topology": meta.get("topology"), "code": meta.get("code")})
