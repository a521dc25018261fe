"""The GPU features, exercised on CPU: activation checkpointing, bf16 autocast, torch.compile, and
the throughput metrics (tokens/s per device, MFU) of the train log."""

from __future__ import annotations

import time

import pytest
import torch

from pipeline.config import load_config
from pipeline.console import step_line
from pipeline.diffusion.objective import proseco_loss
from pipeline.engines.base import checkpoint_blocks
from pipeline.engines.torch_engine import TorchEngine
from pipeline.errors import ProsecoError
from pipeline.model import Backbone
from pipeline.plan import flops_per_token
from pipeline.train import _throughput

VOCAB, MASK = 50, 49
TINY = ["model.hidden=32", "model.layers=2", "model.heads=2", "model.max_seq_len=16", "data.seq_len=16",
        f"model.vocab_size={VOCAB}", "optim.ema=0", "data.task=text"]


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, MASK, (4, 16), generator=g)


def _grads_of(forward, params, x, cfg):
    """Loss and gradients of one ProSeCo step with the split backward (fixed masking draws)."""
    for p in params:
        p.grad = None
    torch.manual_seed(7)  # dropout
    terms = proseco_loss(forward, x, cfg.diffusion, MASK, generator=torch.Generator().manual_seed(5),
                         backward=torch.Tensor.backward)
    return float(terms.loss), [p.grad.clone() for p in params]


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = load_config([], [*TINY, "model.dropout=0.1"])
    torch.manual_seed(0)
    plain = Backbone(cfg.model)
    ckpt = Backbone(cfg.model)
    ckpt.load_state_dict(plain.state_dict())
    checkpoint_blocks(ckpt.blocks)
    x = _batch()
    loss_a, grads_a = _grads_of(plain, list(plain.parameters()), x, cfg)
    loss_b, grads_b = _grads_of(ckpt, list(ckpt.parameters()), x, cfg)
    assert loss_a == loss_b  # dropout masks replayed in the recompute (preserve_rng_state)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _engine(*extra):
    cfg = load_config([], [*TINY, *extra])
    return TorchEngine(cfg, VOCAB, torch.device("cpu"), 0, 1), cfg


def test_bf16_autocast_runs_on_cpu_and_stays_close_to_fp32():
    fp32, cfg = _engine()
    bf16, _ = _engine("parallel.bf16=true")
    x = _batch()
    assert bf16.forward(x, None, None, True).dtype == torch.bfloat16  # the head ran under CPU autocast
    assert fp32.forward(x, None, None, True).dtype == torch.float32
    loss_a, grads_a = _grads_of(lambda z, t, v: fp32.forward(z, t, v, True), list(fp32.model.parameters()), x, cfg)
    loss_b, grads_b = _grads_of(lambda z, t, v: bf16.forward(z, t, v, True), list(bf16.model.parameters()), x, cfg)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # fp32 weights, gradients
    assert abs(loss_b - loss_a) / loss_a < 2e-2
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads_a]),
                                                torch.cat([g.flatten() for g in grads_b]), dim=0)
    assert cos > 0.99


@pytest.mark.slow  # inductor compiles C++ kernels: ~30 s of CPU, over a minute on a busy machine
def test_compile_matches_eager_and_reports_its_time(capsys):
    """Compiled blocks under activation checkpointing (the harder case: dynamo must trace into the
    checkpoint) against the eager model without either."""
    from torch._dynamo.utils import counters

    counters.clear()
    eager, cfg = _engine()
    compiled, _ = _engine("parallel.compile=true", "parallel.activation_checkpointing=true")
    x = _batch()
    params_a, params_b = list(eager.model.parameters()), list(compiled.model.parameters())
    loss_a, grads_a = _grads_of(lambda z, t, v: eager.forward(z, t, v, True), params_a, x, cfg)
    t0 = time.perf_counter()
    loss_b, grads_b = _grads_of(lambda z, t, v: compiled.forward(z, t, v, True), params_b, x, cfg)
    first = time.perf_counter() - t0
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo traced the blocks (not a silent eager fallback)
    assert [n for n, _ in eager.model.named_parameters()] == [n for n, _ in compiled.model.named_parameters()]
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with capsys.disabled():
        print(f"\n  compile: first step (compiling) {first:.1f} s")


def test_compile_is_refused_outside_the_torch_backend():
    with pytest.raises(ProsecoError, match="parallel.compile=true is for parallel.backend=torch"):
        load_config([], ["parallel.compile=true", "parallel.backend=megatron"])


def test_throughput_row_by_hand():
    cfg = load_config([], TINY)
    fpt = flops_per_token(cfg.model, VOCAB, 16, 2)
    row = _throughput(8000.0, 4, cfg, VOCAB, 16, 2, 100.0)
    assert row["tokens_per_s_per_device"] == 2000.0
    assert row["mfu"] == pytest.approx(2000.0 * fpt / 100e12)
    assert "mfu" not in _throughput(8000.0, 4, cfg, VOCAB, 16, 2, None)  # unknown device peak (CPU)


def test_step_line_shows_tokens_per_device_and_mfu():
    line = step_line({"step": 3, "tokens_per_s": 8000.0, "tokens_per_s_per_device": 2000.0, "mfu": 0.412}, 10, None)
    assert "8,000 tok/s | 2,000 tok/s/dev | mfu 41.2%" in line
    single = step_line({"step": 3, "tokens_per_s": 8000.0, "tokens_per_s_per_device": 8000.0}, 10, None)
    assert "tok/s/dev" not in single and "mfu" not in single
