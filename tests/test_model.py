"""The bidirectional backbone (pipeline.model.transformer): shapes, padding, time conditioning, sizes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.model import Backbone, count_parameters
from pipeline.model.transformer import rotary_tables

V, L = 6, 10


def tokens(batch: int = 2, seq: int = L, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_output_shape_and_dtype(tiny_factory):
    model = tiny_factory().float()
    out = model(tokens(3))
    assert out.shape == (3, L, V) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out64 = tiny_factory()(tokens(3, seq=7))
    assert out64.shape == (3, 7, V) and out64.dtype == torch.float64


def test_padding_mask_hides_padded_tokens(tiny_model):
    a = tokens(2)
    b = a.clone()
    b[:, 7:] = (a[:, 7:] + 1) % V  # different tokens at the padded tail
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[:, 7:] = False
    la, lb = tiny_model(a, valid=valid), tiny_model(b, valid=valid)
    torch.testing.assert_close(la[:, :7], lb[:, :7], rtol=0, atol=1e-12)
    # Without the mask the real positions do see the tail.
    assert (tiny_model(a)[:, :7] - tiny_model(b)[:, :7]).abs().max() > 1e-6


def test_attention_is_bidirectional(tiny_model):
    a = tokens(1)
    b = a.clone()
    b[0, -1] = (a[0, -1] + 1) % V
    assert (tiny_model(a)[0, 0] - tiny_model(b)[0, 0]).abs().max() > 1e-6


def test_adaln_zero_makes_t_irrelevant_at_init_then_t_matters(tiny_factory):
    model = tiny_factory(time_conditioning=True, cond_dim=16)
    x = tokens(2)
    t_lo, t_hi = torch.tensor([0.1, 0.1]), torch.tensor([0.9, 0.9])
    assert torch.equal(model(x, t_lo), model(x, t_hi))  # zero gates / shifts / scales: exact
    with torch.no_grad():
        for block in model.blocks:
            block.adaln.weight.normal_(std=0.1, generator=torch.Generator().manual_seed(2))
    assert (model(x, t_lo) - model(x, t_hi)).abs().max() > 1e-4


def test_adaln_zero_blocks_are_the_identity_at_init(tiny_factory):
    model = tiny_factory(time_conditioning=True, cond_dim=16)
    x = tokens(2)
    h = model.embed(x) + model.pos_embed[:L]
    want = model.head(F.layer_norm(h, (h.shape[-1],)))
    torch.testing.assert_close(model(x, torch.tensor([0.3, 0.7])), want, rtol=0, atol=1e-12)


def test_final_adaln_alone_makes_t_matter(tiny_factory):
    model = tiny_factory(time_conditioning=True, cond_dim=16)
    x = tokens(2)
    with torch.no_grad():
        model.final_adaln.weight.normal_(std=0.1, generator=torch.Generator().manual_seed(3))
    assert (model(x, torch.tensor([0.1, 0.1])) - model(x, torch.tensor([0.9, 0.9]))).abs().max() > 1e-4


def test_time_conditioned_model_requires_t(tiny_factory):
    model = tiny_factory(time_conditioning=True, cond_dim=16)
    with pytest.raises(ValueError, match="pass t"):
        model(tokens(2))


def test_tied_embeddings_share_storage_and_count_once(tiny_factory):
    tied, untied = tiny_factory(tie_embeddings=True), tiny_factory()
    assert tied.head.weight is tied.embed.weight
    assert tied.head.weight.data_ptr() == tied.embed.weight.data_ptr()
    assert untied.head.weight is not untied.embed.weight
    # By hand for the tiny config (hidden 32, 2 blocks, mlp 128, vocab 6, 12 learned positions):
    # embed 192 + pos 384 + 2 x (norms 128 + qkv 3072 + proj 1024 + mlp 8352) + final norm 64 + head 192.
    assert count_parameters(untied) == 25984
    assert count_parameters(tied) == 25984 - V * 32
    with torch.no_grad():  # one tensor: writing the embedding changes the head's output
        before = tied(tokens(1)).clone()
        tied.embed.weight[0].add_(1.0)
    assert not torch.equal(before, tied(tokens(1)))


def test_sequence_longer_than_max_seq_len_raises(tiny_model):
    tiny_model(tokens(1, seq=12))  # exactly max_seq_len is fine
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model(tokens(1, seq=13))


def test_dit_small_parameter_count_on_meta():
    cfg = ModelConfig(vocab_size=50258, hidden=768, layers=12, heads=12, max_seq_len=1024,
                      time_conditioning=True, cond_dim=128)
    with torch.device("meta"):
        model = Backbone(cfg)
    assert model.head.weight.is_meta
    assert 165e6 <= count_parameters(model) <= 172e6


def test_an_all_padding_row_gives_finite_logits_and_leaves_other_rows_alone(tiny_model):
    tokens = torch.randint(0, 5, (2, 12))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1] = False
    out = tiny_model(tokens, None, valid)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out[0], tiny_model(tokens[:1], None, valid[:1])[0], rtol=0, atol=1e-12)


def test_attention_runs_on_any_subset_of_its_heads(tiny_factory):
    """Attention reads its head count from qkv's width: layers cut to some heads' q/k/v rows and proj
    columns (what a tensor-parallel rank holds) give those heads' share, and the shares sum to the whole."""
    attn = tiny_factory().blocks[0].attn
    hidden, d = attn.qkv.in_features, attn.head_dim
    heads = hidden // d
    assert heads >= 2
    x = torch.randn(2, L, hidden, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cos, sin = rotary_tables(L, d, 10000.0)
    total = torch.zeros_like(x)
    for part in (slice(0, 1), slice(1, heads)):
        n = part.stop - part.start
        cut = copy.deepcopy(attn)
        cut.qkv = nn.Linear(hidden, 3 * n * d, bias=False, dtype=torch.float64)
        cut.proj = nn.Linear(n * d, hidden, bias=False, dtype=torch.float64)
        with torch.no_grad():
            cut.qkv.weight.copy_(attn.qkv.weight.view(3, heads, d, hidden)[:, part].reshape(-1, hidden))
            cut.proj.weight.copy_(attn.proj.weight[:, part.start * d:part.stop * d])
        total += cut(x, cos, sin, None)
    torch.testing.assert_close(total, attn(x, cos, sin, None), rtol=0, atol=1e-12)
