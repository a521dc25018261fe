"""The native DiT (:class:`pipeline.model.transformer.Backbone`) as a transformers model.

``proseco ckpt export --format hf`` writes this module, with the source of
:mod:`pipeline.model.transformer` in front of it, as ``modeling_proseco.py`` into the export folder
(:mod:`pipeline.checkpoint.hf_export`): the lines importing from ``pipeline`` are dropped there, so
the file needs torch and transformers only, and the model it defines is the very code that trained.
``AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)`` then loads it.

The model returns the backbone's raw logits over the whole vocabulary (the mask id included; the
samplers force the mask logit to -inf themselves). ``attention_mask`` (1 = real token) hides
padding keys; ``t`` (one time per sequence, in [0, 1]) is needed by time-conditioned models only.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from pipeline.model.transformer import Backbone, rotary_tables

MODEL_TYPE = "proseco_dit"
# the fields of pipeline.config.ModelConfig the backbone reads, with their defaults
BACKBONE_FIELDS = {"hidden": 64, "layers": 3, "heads": 4, "mlp_ratio": 4.0, "max_seq_len": 16,
                   "time_conditioning": False, "cond_dim": 128, "dropout": 0.0, "tie_embeddings": False,
                   "rope_base": 10000.0, "learned_positions": False}


class ProsecoDiTConfig(PretrainedConfig):
    """The backbone's settings (those of ``model:`` in a proseco config) plus the vocabulary size and mask id."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 8, mask_token_id: int | None = None, **kwargs):
        for name, default in BACKBONE_FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        kwargs["tie_word_embeddings"] = bool(self.tie_embeddings)
        super().__init__(mask_token_id=mask_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id


class ProsecoDiTForMaskedLM(PreTrainedModel):
    """``logits = model(input_ids, attention_mask=None, t=None).logits``: [B, L, V] over the vocabulary."""

    config_class = ProsecoDiTConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"

    def __init__(self, config: ProsecoDiTConfig):
        super().__init__(config)
        self.backbone = Backbone(config, vocab_size=config.vocab_size)
        if config.tie_embeddings:
            self._tied_weights_keys = {"backbone.head.weight": "backbone.embed.weight"}
        self.post_init()

    def _init_weights(self, module) -> None:
        """Loading builds the model on the meta device: the rotary tables (buffers, not weights)
        are computed again here; weights come from the file."""
        if isinstance(module, Backbone):
            cos, sin = rotary_tables(self.config.max_seq_len, self.config.hidden // self.config.heads,
                                     self.config.rope_base, device=module.rope_cos.device)
            with torch.no_grad():
                module.rope_cos.copy_(cos)
                module.rope_sin.copy_(sin)

    def get_input_embeddings(self):
        return self.backbone.embed

    def get_output_embeddings(self):
        return self.backbone.head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                t: torch.Tensor | None = None, **kwargs) -> MaskedLMOutput:
        valid = None if attention_mask is None else attention_mask.to(torch.bool)
        return MaskedLMOutput(logits=self.backbone(input_ids, t=t, valid=valid))
