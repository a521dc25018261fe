"""Hugging Face transformers models as the ProSeCo backbone (``model.init=hf:PATH``).

``PATH`` is a transformers model folder or a ``.gguf`` file (transformers de-quantises it to fp32).
Two kinds of checkpoint:

* **Autoregressive** (Llama / Qwen2 / SmolLM / ... any ``AutoModelForCausalLM``): made a masked
  diffusion model the DiffuLLaMA / Dream way. Attention becomes full bidirectional attention
  (:func:`make_bidirectional`: ``config.is_causal = False``, which makes transformers build a
  bidirectional mask, and ``is_causal = False`` on every attention module, which SDPA / flash
  kernels read when there is no mask), and one mask token is appended to the vocabulary
  (:func:`add_mask_token`: the embedding, and an untied head, grow by one row initialised to the
  mean of the existing rows). The mask id is the new row, the last one. A model adapted before
  (``ckpt export --format hf`` keeps ``mask_token_id`` in its config) keeps its mask row.
* **Diffusion with its own modelling code** (LLaDA / Dream style: ``auto_map`` in the config and
  a ``mask_token_id``): loaded with ``trust_remote_code=True`` and used as it is; its mask id is the
  config's ``mask_token_id``.

:class:`HFBackbone` gives either the native :class:`pipeline.model.Backbone` contract,
``logits = model(tokens, t=None, valid=None)``, so the objective, samplers, engines and
checkpoints are shared. The native model is time-independent by default
(``model.time_conditioning=false``) and so is this one: ``t`` is accepted and ignored.
``blocks`` is the decoder-layer list (FSDP2 wraps each, activation checkpointing recomputes each).

State dicts hold the transformers model's own names under ``model.`` (a checkpoint stores the full
adapted weights, so a run resumes or evaluates from it alone; the pretrained folder is read for its
config only). :func:`save_hf` writes the model's own class with ``save_pretrained``.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ProsecoError

PREFIX = "hf:"


@dataclass(frozen=True)
class HFSource:
    """Where a transformers model comes from: a folder, or a ``.gguf`` file in ``folder``."""

    folder: Path
    gguf_file: str | None

    @property
    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def is_hf(init: str) -> bool:
    """``model.init`` names a Hugging Face model (``hf:PATH``)."""
    return init.startswith(PREFIX)


def source_of(init: str) -> HFSource:
    """The :class:`HFSource` of ``model.init=hf:PATH``; a one-line error when PATH is unusable."""
    if not is_hf(init):
        raise ProsecoError(f"model.init must be '' (the native model) or hf:PATH, got {init!r}")
    path = Path(init[len(PREFIX):]).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return HFSource(path.parent.resolve(), path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return HFSource(path.resolve(), None)
    raise ProsecoError(f"model.init={init}: expected a transformers model folder (with config.json) or a .gguf "
                       f"file, and {path} is neither")


def remote_code(src: HFSource) -> bool:
    """The folder's config.json names its own modelling code (``auto_map``): LLaDA / Dream style."""
    if src.gguf_file:
        return False
    try:
        return "auto_map" in json.loads((src.folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProsecoError(f"cannot read {src.folder / 'config.json'} ({exc})") from None


def load_config(src: HFSource):
    """The transformers config of ``src`` (remote code is trusted only when the config asks for it);
    a fresh copy of one read per process (a GGUF's header takes a minute to parse on a busy CPU)."""
    return copy.deepcopy(_read_config(src))


@functools.lru_cache(maxsize=4)
def _read_config(src: HFSource):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src.folder, trust_remote_code=remote_code(src), **src.kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ProsecoError(f"cannot read the transformers config of {src.folder} ({exc})") from None


def is_diffusion_config(config) -> bool:
    """A diffusion LM with its own modelling code (LLaDA / Dream): remote code plus a mask id."""
    return bool(getattr(config, "auto_map", None)) and getattr(config, "mask_token_id", None) is not None


def make_bidirectional(model: nn.Module) -> int:
    """Turn a causal LM's attention into full bidirectional attention in place; returns the number
    of attention modules switched (0 means the architecture was not recognised)."""
    model.config.is_causal = False
    switched = 0
    for module in model.modules():
        if hasattr(module, "is_causal") and isinstance(module.is_causal, bool):
            module.is_causal = False
            switched += 1
    return switched


def add_mask_token(model: nn.Module) -> int:
    """Append one row to the input embedding (and the output head when untied), initialised to the
    mean of the existing rows; returns its id (the mask id)."""
    old = model.get_input_embeddings().weight
    mask_id = old.shape[0]
    with torch.no_grad():
        mean_in = old.mean(0)
        head = model.get_output_embeddings()
        mean_out = head.weight.mean(0) if head is not None and head.weight is not old else None
        model.resize_token_embeddings(mask_id + 1, mean_resizing=False)
        model.get_input_embeddings().weight[mask_id] = mean_in
        head = model.get_output_embeddings()
        if mean_out is not None:
            head.weight[mask_id] = mean_out
            if getattr(head, "bias", None) is not None:
                head.bias[mask_id] = head.bias[:mask_id].mean()
    model.config.mask_token_id = mask_id
    return mask_id


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The repeated decoder layers (the largest ModuleList of the model)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ProsecoError(f"{type(model).__name__} has no list of decoder layers to shard or checkpoint")
    return max(lists, key=len)


class HFBackbone(nn.Module):
    """A transformers model behind the native Backbone's ``forward(tokens, t=None, valid=None)``."""

    def __init__(self, model: nn.Module, mask_id: int, diffusion: bool):
        super().__init__()
        self.model, self.mask_id, self.diffusion = model, mask_id, diffusion
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])

    @property
    def blocks(self) -> nn.ModuleList:
        return _decoder_layers(self.model)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if valid is None else valid.to(torch.long)
        if self.diffusion:
            return self.model(input_ids=tokens, attention_mask=mask).logits
        return self.model(input_ids=tokens, attention_mask=mask, use_cache=False).logits


# the auto classes a diffusion LM's own modelling code may register, in the order tried: LLaDA and
# Dream register AutoModel (their model returns logits), a proseco HF export AutoModelForMaskedLM
REMOTE_AUTO_CLASSES = ("AutoModelForMaskedLM", "AutoModel", "AutoModelForCausalLM")


def remote_auto_class(config, init: str):
    """The transformers auto class that builds a remote-code diffusion LM: the first of
    :data:`REMOTE_AUTO_CLASSES` its config's ``auto_map`` names; a one-line error when none is."""
    import transformers

    names = [name for name in REMOTE_AUTO_CLASSES if name in (getattr(config, "auto_map", None) or {})]
    if not names:
        raise ProsecoError(f"{init[len(PREFIX):]}: its config's auto_map names none of {', '.join(REMOTE_AUTO_CLASSES)} "
                           f"(it has {', '.join(config.auto_map)}): no model class with logits to load")
    return getattr(transformers, names[0])


def build(init: str, *, pretrained: bool = True) -> HFBackbone:
    """The backbone of ``model.init=hf:PATH`` in fp32: pretrained weights (``pretrained``) or the
    architecture only (randomly initialised; a checkpoint's state dict fills it)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    src = source_of(init)
    config = load_config(src)
    diffusion = is_diffusion_config(config)
    auto = remote_auto_class(config, init) if diffusion else transformers.AutoModelForCausalLM
    try:
        if pretrained:
            model = auto.from_pretrained(src.folder, dtype=torch.float32, trust_remote_code=diffusion, **src.kwargs)
        else:
            model = auto.from_config(config, dtype=torch.float32, trust_remote_code=diffusion)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ProsecoError(f"cannot load the transformers model {init[len(PREFIX):]} ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if diffusion:
        return HFBackbone(model, int(config.mask_token_id), diffusion=True)
    if make_bidirectional(model) == 0:
        raise ProsecoError(f"{type(model).__name__} has no attention module with an is_causal switch: cannot make "
                           "it bidirectional")
    adapted = _adapted_mask_id(config)
    return HFBackbone(model, adapted if adapted is not None else add_mask_token(model), diffusion=False)


def _adapted_mask_id(config) -> int | None:
    """The mask id of an autoregressive model adapted before (exported by ``ckpt export --format hf``:
    its config has ``mask_token_id`` inside the vocabulary), else None."""
    mask = getattr(config, "mask_token_id", None)
    rows = int(config.get_text_config().vocab_size)
    return int(mask) if mask is not None and 0 <= int(mask) < rows else None


def vocab_info(init: str) -> tuple[int, int]:
    """(embedding rows of the adapted model, mask id) of ``model.init=hf:PATH``, from its config only."""
    config = load_config(source_of(init))
    if is_diffusion_config(config):
        return int(config.vocab_size), int(config.mask_token_id)
    rows = int(config.get_text_config().vocab_size)
    adapted = _adapted_mask_id(config)
    return (rows, adapted) if adapted is not None else (rows + 1, rows)


def save_hf(backbone: HFBackbone, state: dict[str, torch.Tensor], out: Path) -> None:
    """``save_pretrained`` of ``backbone``'s own transformers class with the weights ``state``
    (a state dict of :class:`HFBackbone`) into ``out``."""
    backbone.load_state_dict(state)
    backbone.model.save_pretrained(out, safe_serialization=True)
