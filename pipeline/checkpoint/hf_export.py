"""``proseco ckpt export --format hf``: a native DiT as a Hugging Face model folder.

The folder (docs/huggingface.md) loads with
``transformers.AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)`` and, for
models trained on text, ``transformers.AutoTokenizer.from_pretrained(folder)``:

========================  ==================================================================
``config.json``           the backbone's settings, vocabulary size, mask id, ``auto_map`` and
                          where the weights came from (``proseco``: source, step, weights)
``modeling_proseco.py``   the modelling code: :mod:`pipeline.model.transformer` followed by
                          :mod:`pipeline.model.hf_wrapper`, their ``pipeline`` imports dropped
``model.safetensors``     the weights (fp32), names prefixed ``backbone.``
``tokenizer.json``        the tokenizer in Hugging Face form, with ``tokenizer_config.json``
                          (models trained on text shards)
``SHA256SUMS``            every file's sha256 (``sha256sum -c SHA256SUMS``)
========================  ==================================================================

Any model :func:`pipeline.artifact.load_model` reads can be exported: a checkpoint, a run (its
latest checkpoint) or a proseco export folder.

A Hugging Face backbone (``model.init=hf:PATH``) is exported in the model's own class instead
(:func:`export_hf_backbone`): ``save_pretrained`` with the checkpoint's weights, its config keeping
what the adaptation changed (the vocabulary with the mask row, ``mask_token_id``, ``is_causal:
false``) and the tokenizer the SFT shards were made with (``hf_tokenizer/`` next to them).
``model.init=hf:OUT`` loads the folder back as a backbone, bidirectional again; a plain
``from_pretrained`` leaves SDPA causal when no attention mask is passed, so load it through
:func:`pipeline.model.hf.build`, or pass ``attn_implementation="eager"`` and an attention mask.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ProsecoError
from pipeline.io import atomic_folder, atomic_write, default_file_mode, write_sums

MODELING_FILE = "modeling_proseco.py"
WEIGHTS_FILE = "model.safetensors"
CONFIG_JSON = "config.json"
# what the generated modelling file may import: the standard library modules below, torch, transformers
ALLOWED_IMPORTS = {"__future__", "contextlib", "math", "torch", "transformers"}


def _without_pipeline_imports(source: str, drop_future: bool) -> str:
    """``source`` without its ``from pipeline...`` imports (and ``from __future__`` when asked)."""
    kept = []
    for line in source.splitlines():
        if line.startswith("from pipeline.") or (drop_future and line.startswith("from __future__ import")):
            continue
        kept.append(line)
    return "\n".join(kept) + "\n"


def modeling_source() -> str:
    """The self-contained modelling file: the backbone's module, then the transformers wrapper."""
    from pipeline.model import hf_wrapper, transformer

    header = ("# Written by `proseco ckpt export --format hf`: pipeline/model/transformer.py followed by\n"
              "# pipeline/model/hf_wrapper.py of proseco-pipeline, their imports of the pipeline package removed.\n")
    source = (header + _without_pipeline_imports(inspect.getsource(transformer), drop_future=False)
              + "\n\n# " + "-" * 90 + " the transformers wrapper\n"
              + _without_pipeline_imports(inspect.getsource(hf_wrapper), drop_future=True))
    imported = imported_modules(source)
    if not imported <= ALLOWED_IMPORTS:  # pragma: no cover - guards an edit of the two modules
        raise RuntimeError(f"the modelling file would import {sorted(imported - ALLOWED_IMPORTS)}")
    return source


def imported_modules(source: str) -> set[str]:
    """Top-level names of the modules ``source`` imports."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    return names


def hf_config(model_cfg, vocab_size: int, mask_id: int, tokenizer, provenance: dict) -> dict:
    """``config.json`` of the export (a plain dict; transformers fills in its own defaults on load)."""
    from pipeline.model.hf_wrapper import BACKBONE_FIELDS, MODEL_TYPE

    cfg = {name: getattr(model_cfg, name) for name in BACKBONE_FIELDS}
    special = {} if tokenizer is None else {f"{k}_token_id": v for k, v in tokenizer.special.items()
                                              if k in ("pad", "bos", "eos")}
    return {"model_type": MODEL_TYPE, "architectures": ["ProsecoDiTForMaskedLM"],
            "auto_map": {"AutoConfig": "modeling_proseco.ProsecoDiTConfig",
                         "AutoModelForMaskedLM": "modeling_proseco.ProsecoDiTForMaskedLM"},
            **cfg, "tie_word_embeddings": bool(model_cfg.tie_embeddings), "vocab_size": int(vocab_size),
            "mask_token_id": int(mask_id), **special, "dtype": "float32", "proseco": provenance}


def write_hf_export(out: str | os.PathLike, model: nn.Module, model_cfg, vocab_size: int, mask_id: int, *,
                    tokenizer=None, provenance: dict | None = None, force: bool = False) -> Path:
    """Write the Hugging Face folder of a backbone (``model``, built from ``model_cfg``) atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not force:
        raise ProsecoError(f"{out} exists; pass --force to replace it or --out to choose another folder")
    with atomic_folder(out) as tmp:
        names = [CONFIG_JSON, MODELING_FILE, WEIGHTS_FILE]
        # safetensors refuses tensors that share memory (a tied head): each name gets its own copy
        state = {f"backbone.{k}": v.detach().float().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        os.chmod(tmp / WEIGHTS_FILE, default_file_mode())  # safetensors creates 0600 whatever the umask
        atomic_write(tmp / MODELING_FILE, modeling_source())
        config = hf_config(model_cfg, vocab_size, mask_id, tokenizer, provenance or {})
        atomic_write(tmp / CONFIG_JSON, json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            names += tokenizer.save_hf(tmp)
        write_sums(tmp, names)
    return out


def default_out(folder: Path, kind: str) -> Path:
    """``RUN/exports/step_XXXXXXXX_hf`` for a checkpoint, ``NAME_hf`` next to an export folder."""
    if kind == "checkpoint":
        return folder.parent.parent / "exports" / f"{folder.name}_hf"
    return folder.with_name(f"{folder.name}_hf")


def export_hf(path: str | os.PathLike, out: str | os.PathLike | None = None, weights: str = "auto",
              force: bool = False) -> Path:
    """``proseco ckpt export --format hf``: a checkpoint, run or export folder as a Hugging Face folder
    (``weights``: auto = EMA when the run kept it, else raw)."""
    from pipeline.artifact import load_model

    backbone = _hf_backbone_checkpoint(path)
    if backbone is not None:
        return export_hf_backbone(*backbone, out, weights, force)
    model, cfg, info = load_model(path, weights=weights)
    out = Path(out) if out else default_out(info.path, info.kind)
    provenance = {"source": str(info.path), "kind": info.kind, "step": info.step, "weights": info.weights,
                  "data": info.data, "format": "proseco-hf/1"}
    with torch.no_grad():
        return write_hf_export(out, model, cfg.model, info.vocab_size, info.mask_id, tokenizer=info.tokenizer,
                               provenance=provenance, force=force)


def _hf_backbone_checkpoint(path) -> tuple[Path, dict] | None:
    """(checkpoint, its meta) when ``path`` resolves to a checkpoint of a Hugging Face backbone."""
    from pipeline.checkpoint.tools import checkpoint_meta, resolve

    try:
        ckpt = resolve(path).resolve()
        meta = checkpoint_meta(ckpt)
    except ProsecoError:
        return None
    return (ckpt, meta) if meta.get("config", {}).get("model", {}).get("init") else None


def export_hf_backbone(ckpt: Path, meta: dict, out: str | os.PathLike | None, weights: str = "auto",
                       force: bool = False) -> Path:
    """Write the HF-backbone checkpoint ``ckpt`` (its ``meta``) as a transformers folder; returns it."""
    from pipeline.artifact import _checkpoint_data, _shards_folder
    from pipeline.checkpoint.tools import full_weights
    from pipeline.config import config_from_dict
    from pipeline.model import hf

    cfg = config_from_dict(meta["config"])
    out = Path(out) if out else default_out(ckpt, "checkpoint")
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


__all__ = ["export_hf", "export_hf_backbone", "modeling_source", "write_hf_export"]
