"""The pieces every engine shares (pipeline/optim.py), the in-memory batch source
(pipeline/data/memory.py) and rank discovery (pipeline/distributed.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import OptimConfig
from pipeline.data.memory import TensorLoader
from pipeline.distributed import started_by_launcher, world_from_env
from pipeline.errors import ProsecoError
from pipeline.optim import EMA, lr_at, make_optimizer


def test_optimizer_skips_weight_decay_on_biases_norms_and_embeddings():
    model = nn.ModuleDict({"embed": nn.Embedding(5, 4), "proj": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})
    groups = make_optimizer(model, OptimConfig(weight_decay=0.1)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert [sorted(names[id(p)] for p in g["params"]) for g in groups] == [
        ["proj.weight"], ["embed.weight", "norm.bias", "norm.weight", "proj.bias"]]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, steps=104, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(54, cfg) == pytest.approx(0.55) and lr_at(104, cfg) == pytest.approx(0.1)
    assert lr_at(50, OptimConfig(lr=0.3, warmup_steps=0, schedule="constant")) == 0.3


def test_ema_is_a_frozen_average():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, 0.75)
    assert ema.shadow is not model and not any(p.requires_grad for p in ema.shadow.parameters())
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert torch.equal(ema.shadow.weight, torch.full((2, 3), 0.25))


def _drain(loader: TensorLoader, n: int) -> list[torch.Tensor]:
    it = iter(loader)
    return [next(it)["tokens"] for _ in range(n)]


def test_tensor_loader_covers_each_epoch_and_resumes_where_it_stopped():
    rows = torch.arange(40).view(20, 2)
    loader = TensorLoader(rows, 4, fingerprint="f", seed=3)
    assert loader.batches_per_epoch == 5
    epoch = torch.cat(_drain(loader, 5))
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 40, 2))  # every row once
    odd = TensorLoader(rows, 8, fingerprint="f", seed=3)  # 20 rows: batches span epochs, rows stay even
    seen = torch.cat(_drain(odd, 5))[:, 0].tolist()
    assert all(seen.count(v) == 2 for v in range(0, 40, 2)) and odd.epoch == 2
    first = TensorLoader(rows, 4, fingerprint="f", seed=3)
    head = _drain(first, 7)
    state = first.state_dict()
    rest = _drain(first, 4)
    again = TensorLoader(rows, 4, fingerprint="f", seed=0)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_drain(again, 4), rest)) and len(head) == 7
    batch = next(iter(again))
    assert batch["valid"].dtype == torch.bool and bool(batch["valid"].all())


def test_tensor_loader_splits_ranks_and_refuses_other_data_or_layout():
    rows = torch.arange(24).view(12, 2)
    parts = [torch.cat(_drain(TensorLoader(rows, 2, fingerprint="f", rank=r, world_size=2), 3)) for r in (0, 1)]
    assert sorted(torch.cat(parts)[:, 0].tolist()) == list(range(0, 24, 2))
    state = TensorLoader(rows, 2, fingerprint="f").state_dict()
    with pytest.raises(ProsecoError, match="belongs to data"):
        TensorLoader(rows, 2, fingerprint="g").load_state_dict(state)
    with pytest.raises(ProsecoError, match="world size 1"):
        TensorLoader(rows, 2, fingerprint="f", rank=1, world_size=2).load_state_dict(state)
    TensorLoader(rows, 2, fingerprint="f", rank=1, world_size=2).load_state_dict(state, allow_new_world_size=True)
    with pytest.raises(ProsecoError, match="lower the batch size"):
        TensorLoader(rows, 13, fingerprint="f")


def test_rank_discovery_reads_torchrun_then_srun_variables(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.setenv(key, "0")  # recorded, so that what world_from_env exports is undone afterwards
        monkeypatch.delenv(key)
    assert world_from_env() == (0, 1, 0) and not started_by_launcher()
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert world_from_env() == (3, 4, 1)
    assert started_by_launcher()  # srun's values were exported for init_process_group(env://)
    monkeypatch.setenv("RANK", "2")
    assert world_from_env() == (2, 4, 1)  # a launcher's RANK wins over SLURM's
