"""`proseco plan`: the planner's arithmetic on hand-computed cases, and the CLI verb."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ProsecoError
from pipeline.model import parameter_count
from pipeline.plan import (
    GIB,
    Layout,
    flops_per_token,
    format_plan,
    layout_of,
    layouts,
    memory,
    param_counts,
    parse_bytes,
    plan,
)

# hidden 8, 2 layers, 2 heads, MLP 32, vocabulary 10, batch 2 x 4 tokens, fp32, no EMA
TINY = ["model.hidden=8", "model.layers=2", "model.heads=2", "model.mlp_ratio=4", "model.vocab_size=10",
        "model.max_seq_len=4", "data.seq_len=4", "optim.batch_size=2", "optim.ema=0", "model.dropout=0.0"]
# by hand: a block = 2 LayerNorms (2 x 16) + qkv (3 x 64) + proj (64) + MLP (8x32 + 32 + 32x8 + 8) = 840;
# outside: embedding 80 + final LayerNorm 16 + head 80 = 176; total 2 x 840 + 176 = 1856
TINY_PARAMS, TINY_BLOCK, TINY_ROOT = 1856, 840, 176
# activations per block: E = 2 x 4 x 8 = 64 elements; 2 fp32 residual inputs + (8 + 2 x 4) fp32 tensors
# = 18 x 4 bytes x 64 = 4608, plus 2 x 4 rows x (4 LayerNorm statistics + 2 heads' log-sum-exp) x 4 bytes = 320
TINY_BLOCK_ACT = 4608 + 320
TINY_HEAD_INPUT = 2 * 4 * 64  # final LayerNorm input and output, fp32
TINY_LOGITS = 2 * 4 * 10 * 4  # [B, L, V] float32


def _cfg(*extra):
    return load_config([], [*TINY, *extra])


@pytest.mark.parametrize("extra", [[], ["model.tie_embeddings=true"], ["model.time_conditioning=true"],
                                   ["model.learned_positions=true", "model.mlp_ratio=2"]])
def test_param_counts_match_the_built_model(extra):
    cfg = _cfg(*extra)
    counts = param_counts(cfg.model, 10)
    assert counts.total == parameter_count(cfg.model, 10)
    if not extra:
        assert (counts.total, counts.block, counts.root) == (TINY_PARAMS, TINY_BLOCK, TINY_ROOT)
        assert counts.matmul == TINY_PARAMS - 80  # all but the embedding table
        assert counts.tp_split == 2 * (256 + 512 + 32) + 80  # qkv, proj, MLP weights + first bias, head


def test_memory_single_process_by_hand():
    mem = memory(_cfg(), 10, Layout("single", "torch", 1))
    assert (mem.weights, mem.grads, mem.optimizer, mem.ema, mem.buckets, mem.gathered) == \
        (4 * TINY_PARAMS, 4 * TINY_PARAMS, 8 * TINY_PARAMS, 0, 0, 0)
    # split backward: pass 2's activations on top of pass 1's gradients; logits, log-softmax, 2 gradients
    assert mem.activations == 2 * TINY_BLOCK_ACT + TINY_HEAD_INPUT
    assert mem.logits == 4 * TINY_LOGITS
    assert mem.total == 16 * TINY_PARAMS + 2 * TINY_BLOCK_ACT + TINY_HEAD_INPUT + 4 * TINY_LOGITS == 41344


def test_memory_without_split_backward_and_mdm():
    both = memory(_cfg("diffusion.split_backward=false"), 10, Layout("single", "torch", 1))
    act = 2 * TINY_BLOCK_ACT + TINY_HEAD_INPUT
    assert (both.grads, both.activations, both.logits) == (0, 2 * act, 6 * TINY_LOGITS)
    mdm = memory(_cfg("diffusion.corrector_weight=0"), 10, Layout("single", "torch", 1))
    assert (mdm.grads, mdm.activations, mdm.logits) == (0, act, 4 * TINY_LOGITS)


def test_memory_activation_checkpointing_keeps_block_inputs():
    mem = memory(_cfg(), 10, Layout("single", "torch", 1), checkpointing=True)
    # at the head: 2 block inputs + head input + 4 logits = 512 + 512 + 1280 = 2304 bytes; while the
    # last block is recomputed: 2 inputs + the block + its output gradient + the held logits = 6016: the peak
    assert mem.activations == 2 * (4 * 64) + TINY_BLOCK_ACT + 4 * 64
    assert mem.logits == TINY_LOGITS


def test_memory_by_layout_by_hand():
    cfg = _cfg("optim.ema=0.999")
    p = TINY_PARAMS
    ddp = memory(cfg, 10, Layout("ddp", "torch", 4))  # buckets (7424) < activations + logits (11648): not at the peak
    assert (ddp.weights, ddp.grads, ddp.optimizer, ddp.ema, ddp.buckets) == (4 * p, 4 * p, 8 * p, 4 * p, 0)
    assert ddp.activations == 2 * TINY_BLOCK_ACT + TINY_HEAD_INPUT
    # one token per rank: activations + logits = 2 x (8 x 72 + 40) + 64 + 4 x 40 = 1456 < the buckets
    small = memory(_cfg("optim.ema=0.999", "optim.batch_size=1", "data.seq_len=1"), 10, Layout("ddp", "torch", 4))
    assert (small.grads, small.buckets, small.activations, small.logits) == (4 * p, 4 * p, 0, 0)
    z1 = memory(cfg, 10, Layout("zero1", "deepspeed", 4, shard=1))
    assert (z1.weights, z1.grads, z1.optimizer, z1.buckets) == (4 * p, 4 * p, 2 * p, 0)
    z2 = memory(cfg, 10, Layout("zero2", "deepspeed", 4, shard=2))
    assert (z2.weights, z2.grads, z2.optimizer) == (4 * p, p, 2 * p)
    fsdp = memory(cfg, 10, Layout("fsdp", "torch", 4, shard=3))
    assert (fsdp.weights, fsdp.grads, fsdp.optimizer, fsdp.ema) == (p, p, 2 * p, p)
    # unsharded: two blocks' and the root's weights, one block's and the root's gradients
    assert fsdp.gathered == 4 * (2 * TINY_BLOCK + TINY_ROOT) + 4 * (TINY_BLOCK + TINY_ROOT)
    bf16 = memory(load_config([], [*TINY, "parallel.bf16=true"]), 10, Layout("zero3", "deepspeed", 4, shard=3))
    assert (bf16.weights, bf16.grads, bf16.optimizer) == (2 * p / 4, 2 * p / 4, 12 * p / 4)
    tp = memory(cfg, 10, Layout("tp2", "megatron", 2, tp=2))
    local = p - (2 * 800 + 80) / 2  # the split layers halve
    assert (tp.weights, tp.optimizer) == (4 * local, 8 * local)


def test_bf16_activations_by_hand():
    mem = memory(_cfg("parallel.bf16=true"), 10, Layout("single", "torch", 1))
    block = 64 * (2 * 4 + 16 * 2) + 320  # residual inputs fp32, the rest bf16
    casts = 2 * (TINY_PARAMS - 80)  # a bf16 copy of every multiplying weight, saved for the backward
    assert mem.activations == 2 * block + 64 * (4 + 2) + casts


def test_flops_per_token_owt_small_by_hand():
    cfg = load_config(["configs/owt_small.yaml"], [])
    n = 162_215_424 - 50258 * 768  # parameters minus the embedding table
    assert flops_per_token(cfg.model, 50258, 1024, 2) == 2 * (6 * n + 12 * 12 * 768 * 1024)
    assert flops_per_token(cfg.model, 50258, 1024, 1) * 2 == flops_per_token(cfg.model, 50258, 1024, 2)


def test_plan_step_time_and_fit():
    # a vocabulary TP can split (owt_small's 50259 ids are odd: no tp layout)
    cfg = load_config(["configs/owt_small.yaml"], ["optim.batch_size=32", "optim.grad_accum=1", "model.vocab_size=50304"])
    p = plan(cfg, 8, 80 * GIB, 1000.0, 0.5)
    tokens = 32 * 1024 * 8
    assert p.tokens_per_step == tokens
    assert p.step_s == pytest.approx(tokens * p.flops_per_token / 8 / 500e12)
    assert p.tokens_per_s_per_device == pytest.approx(tokens / 8 / p.step_s)
    assert [r.layout.name for r in p.rows] == ["ddp", "fsdp", "zero1", "zero2", "zero3", "tp2", "tp4"]
    assert all(r.fits == (r.memory.total <= 80 * GIB) for r in p.rows)
    assert not plan(cfg, 8, 1 * GIB, 1000.0, 0.5).rows[0].fits


def test_layouts_the_config_check_refuses_are_marked_with_its_reason():
    # ZeRO-3 cannot run with activation checkpointing, nor at all with a tied embedding/head
    # (pipeline/config/validate.py): the plan must not offer them as fitting
    untied = plan(_cfg("model.vocab_size=16", "model.tie_embeddings=false"), 8, 80 * GIB, 1000.0, 0.5)
    rows = {r.layout.name: r for r in untied.rows}
    assert rows["zero3"].refused is None and "activation_checkpointing" in rows["zero3"].refused_ckpt
    assert all(r.refused is None and r.refused_ckpt is None for n, r in rows.items() if n != "zero3")
    tied = plan(_cfg("model.vocab_size=16", "model.tie_embeddings=true"), 8, 80 * GIB, 1000.0, 0.5)
    zero3 = next(r for r in tied.rows if r.layout.name == "zero3")
    assert "tie_embeddings" in zero3.refused and zero3.refused == zero3.refused_ckpt
    text = format_plan(tied, _cfg("model.vocab_size=16", "model.tie_embeddings=true"))
    line = next(x for x in text.splitlines() if x.startswith("zero3"))
    assert line.count("refused") == 2 and " yes " not in line
    assert "refused: zero3 (both): parallel.zero_stage=3 cannot partition the tied embedding" in text
    assert "refused: zero3 with act ckpt: parallel.activation_checkpointing=true" in format_plan(
        untied, _cfg("model.vocab_size=16", "model.tie_embeddings=false"))


def test_layouts_and_layout_of():
    cfg = _cfg("model.vocab_size=16", "model.heads=4")
    assert [x.name for x in layouts(cfg, 16, 8)] == ["ddp", "fsdp", "zero1", "zero2", "zero3", "tp2", "tp4"]
    assert [x.name for x in layouts(cfg, 16, 1)] == ["single", "zero1", "zero2", "zero3"]
    assert layout_of(_cfg("parallel.backend=megatron", "parallel.tp_size=2"), 8) == Layout("tp2", "megatron", 4, tp=2)
    assert layout_of(_cfg("parallel.distributed=fsdp"), 4).shard == 3
    with pytest.raises(ProsecoError, match="must divide --gpus"):
        layout_of(_cfg("parallel.backend=megatron", "parallel.tp_size=2"), 3)


@pytest.mark.parametrize(("text", "value"), [("80GiB", 80 * 2**30), ("80GB", 80 * 10**9), ("1.5 gib", 3 * 2**29),
                                             ("1024", 1024)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_cli_plan_prints_the_table(capsys):
    assert main(["plan", "--config", "owt_small", "--gpus", "8", "--gpu-mem", "80GiB", "optim.batch_size=16",
                 "model.vocab_size=50304"]) == 0
    out = capsys.readouterr().out
    assert "ddp*" in out and "zero3" in out and "tp2" in out and "GFLOP per token" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--gpu-mem", "eighty"], "--gpu-mem must be a size"),
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--mfu", "1.5"], "--mfu must be in (0, 1]"),
    (["--peak-tflops", "0"], "--peak-tflops must be > 0"),
    (["model.vocab_size=null"], "needs model.vocab_size"),
])
def test_cli_plan_user_errors_are_one_line(argv, message, capsys):
    assert main(["plan", "--config", "owt_small", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
