"""GPU paths: bf16 autocast / DeepSpeed bf16 / megatron-core on CUDA with nccl, and the GPU benchmark.

The CUDA tests skip on machines without a GPU (``-m gpu`` selects them on one); the benchmark's
``--smoke`` mode runs on CPU so the script cannot rot unnoticed. ``benchmarks/gpu_check.sh`` runs
all of it on a lent GPU machine in a few minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}  # TORCH_EXTENSIONS_DIR: conftest


def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--smoke", "--backends", "torch",
                           "--json", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["backends"]["torch"]["tokens_per_s"] > 0 and result["flops_per_token"] > 0


def _train(shards: Path, run: Path, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "pipeline", "train", "data.task=text", f"data.shards={shards}", f"run.dir={run}",
           "data.seq_len=32", "model.max_seq_len=32", "model.hidden=128", "model.layers=2", "model.heads=4",
           "model.vocab_size=null", "optim.batch_size=8", "optim.steps=6", "optim.lr=1e-2", "log.every=1",
           "checkpoint.every=3", "optim.ema=0.99", "parallel.bf16=true", "log.val_every=0", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", [
    ("parallel.backend=torch",), ("parallel.backend=deepspeed", "parallel.zero_stage=2"),
    ("parallel.backend=deepspeed", "parallel.zero_stage=3"), ("parallel.backend=megatron",)])
def test_bf16_training_on_cuda_learns_saves_and_resumes(shards, tmp_path, backend):
    """The bundled corpus's shards (conftest ``shards``: real text and its tokenizer, which export needs)."""
    rows = _train(shards, tmp_path / "run", *backend)
    assert len(rows) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    losses = [r["loss"] for r in rows]  # one batch's loss is noisy (its t draw): compare thirds
    assert sum(losses[-3:]) < sum(losses[:3]) and rows[-1]["memory_mb"] > 0
    rows = _train(shards, tmp_path / "run", *backend, "optim.steps=8")  # resumes on the GPU
    assert [r["step"] for r in rows][-2:] == [7, 8]
    export = tmp_path / "export"
    from pipeline import cli

    assert cli.main(["ckpt", "export", str(tmp_path / "run"), "--out", str(export)]) == 0
    from pipeline.artifact import load_model

    model, _, info = load_model(export)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, info.vocab_size, (2, 32)))).all()



def test_sampler_launch_count_falls_with_one_block_per_step(monkeypatch):
    """``benchmarks/sampler_launches.py``'s count (the GPU path's kernel launches, counted on CPU)
    moves the way its README table says: fewer launches with the accelerator's blocks, in every
    setting, and the host syncs never rise."""
    from pipeline.config import ModelConfig, SamplerConfig
    from pipeline.diffusion import decoding
    from pipeline.model import Backbone

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import sampler_launches

    monkeypatch.setattr(decoding, "_chunked", lambda x: False)
    model = Backbone(ModelConfig(vocab_size=8192, hidden=32, layers=1, heads=2, max_seq_len=32)).eval()
    sizes = decoding.BLOCK_ELEMENTS, decoding.BLOCK_ELEMENTS_ACCELERATOR
    for kw in sampler_launches.SETTINGS.values():
        counts = []
        for elements in sizes:
            monkeypatch.setattr(decoding, "BLOCK_ELEMENTS", elements)
            counts.append(sampler_launches.count(model, SamplerConfig(steps=8, **kw), 16, 32, 8191))
        (many, many_syncs), (one, one_syncs) = counts
        assert 0 < one < many and one_syncs <= many_syncs, (kw, counts)
