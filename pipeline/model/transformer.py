"""Bidirectional transformer backbone in the MDLM / DiT style.

* Rotary position embeddings on queries and keys (no learned positions), as in MDLM's DiT.
* Optional time conditioning through adaLN-Zero (DiT): each block's LayerNorms are shifted,
  scaled and gated by an MLP of a sinusoidal embedding of t. MDLM's OWT model (and the
  ProSeCo scripts) run with ``time_conditioning=False``; then the blocks are plain pre-LN.
* Attention goes through ``torch.nn.functional.scaled_dot_product_attention`` so GPU flash /
  memory-efficient kernels are used without a flash-attn dependency. It is bidirectional; an
  optional ``valid`` mask ([B, L] bool, True = real token) hides padding keys.
* Output head tied to the input embedding or separate (the paper's DiT: untied).

Tensor parallelism is applied to this one model by a plan (:mod:`pipeline.model.parallelize`),
which swaps its projections for megatron-core layers; the forward below serves both.

The backbone returns raw logits over the whole vocabulary. Forcing the mask logit to -inf
(MDLM's "SUBS"/zero-masking parameterisation) is the objective's and the sampler's business,
see :func:`pipeline.diffusion.objective.denoiser_logits`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig


def rotary_tables(seq_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [seq_len, head_dim] for the rotate-half rotary convention."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, L, D] by position; cos/sin are [L, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a per-sequence scalar t in [0, 1] (DiT), shape [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with rotary positions.

    The number of heads is read from ``qkv``'s output width (laid out as ``(3, heads, head_dim)``), so
    the same forward runs on a tensor-parallel shard of ``qkv`` / ``proj`` (this rank's heads) as on the
    full layers. ``dropout_rng(device)`` is the context the attention-probability dropout draws under:
    a no-op here; :func:`pipeline.model.parallelize.apply_tensor_parallel` sets a per-rank generator.
    """

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.head_dim = hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.dropout = dropout
        self.dropout_rng = contextlib.nullcontext

    def forward(self, x, cos, sin, attn_mask):
        b, seq, _ = x.shape
        qkv = self.qkv(x)
        heads = qkv.shape[-1] // (3 * self.head_dim)  # all heads, or this tensor-parallel rank's
        q, k, v = qkv.view(b, seq, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        p = self.dropout if self.training else 0.0
        with self.dropout_rng(x.device) if p > 0 else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return self.proj(out.transpose(1, 2).reshape(b, seq, heads * self.head_dim))


class Block(nn.Module):
    """Pre-LN transformer block; with ``cond_dim`` it becomes a DiT adaLN-Zero block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden
        self.norm1 = nn.LayerNorm(h, elementwise_affine=not cfg.time_conditioning)
        self.attn = Attention(h, cfg.heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(h, elementwise_affine=not cfg.time_conditioning)
        inner = int(h * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(h, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, h))
        self.drop = nn.Dropout(cfg.dropout)
        self.adaln = None
        if cfg.time_conditioning:
            self.adaln = nn.Linear(cfg.cond_dim, 6 * h)  # shift/scale/gate for attention and MLP
            nn.init.zeros_(self.adaln.weight)
            nn.init.zeros_(self.adaln.bias)

    def forward(self, x, cos, sin, attn_mask, cond):
        if self.adaln is None:
            x = x + self.drop(self.attn(self.norm1(x), cos, sin, attn_mask))
            return x + self.drop(self.mlp(self.norm2(x)))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(cond)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.drop(self.attn(self.norm1(x) * (1 + scale1) + shift1, cos, sin, attn_mask))
        return x + gate2 * self.drop(self.mlp(self.norm2(x) * (1 + scale2) + shift2))


class Backbone(nn.Module):
    """``logits = Backbone(tokens, t=None, valid=None)``; tokens [B, L] long -> logits [B, L, V] float."""

    def __init__(self, cfg: ModelConfig, vocab_size: int | None = None):
        super().__init__()
        vocab_size = vocab_size if vocab_size is not None else cfg.vocab_size
        if vocab_size is None:
            raise ValueError("model vocab size unknown: set model.vocab_size or pass it from the data")
        self.cfg, self.vocab_size = cfg, vocab_size
        h = cfg.hidden
        self.embed = nn.Embedding(vocab_size, h)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos_embed = None
        if cfg.learned_positions:
            self.pos_embed = nn.Parameter(torch.zeros(cfg.max_seq_len, h))
            nn.init.normal_(self.pos_embed, std=0.02)
        self.time_mlp = None
        if cfg.time_conditioning:
            self.time_mlp = nn.Sequential(
                nn.Linear(cfg.cond_dim, cfg.cond_dim), nn.SiLU(), nn.Linear(cfg.cond_dim, cfg.cond_dim)
            )
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(h, elementwise_affine=not cfg.time_conditioning)
        self.final_adaln = nn.Linear(cfg.cond_dim, 2 * h) if cfg.time_conditioning else None
        if self.final_adaln is not None:
            nn.init.zeros_(self.final_adaln.weight)
            nn.init.zeros_(self.final_adaln.bias)
        self.head = nn.Linear(h, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=0.02)
        cos, sin = rotary_tables(cfg.max_seq_len, h // cfg.heads, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor | None = None, valid: torch.Tensor | None = None):
        seq = tokens.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed[:seq]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        # SDPA boolean mask: True = may attend. Keys that are padding are hidden from every query.
        # A row that is all padding would attend to nothing (NaN); let it attend everywhere instead:
        # its outputs are masked out of every loss anyway.
        attn_mask = None
        if valid is not None:
            valid = valid.to(torch.bool)
            attn_mask = (valid | ~valid.any(-1, keepdim=True))[:, None, None, :]
        cond = None
        if self.time_mlp is not None:
            if t is None:
                raise ValueError("this model is time-conditioned: pass t")
            cond = F.silu(self.time_mlp(timestep_embedding(t, self.cfg.cond_dim).to(x.dtype)))
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask, cond)
        x = self.final_norm(x)
        if self.final_adaln is not None:
            shift, scale = self.final_adaln(cond)[:, None].chunk(2, dim=-1)
            x = x * (1 + scale) + shift
        return self.head(x)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied head is counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def parameter_count(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters of the backbone a config describes, built on the meta device (no memory)."""
    with torch.device("meta"):
        return count_parameters(Backbone(cfg, vocab_size=vocab_size))
