"""DeepSpeed's EMA tracks the fp32 master weights (pipeline/engines/deepspeed_ema.py).

Each case runs in a fresh process (DeepSpeed keeps global state): a bf16 DeepSpeed engine takes a
few optimizer steps with a large learning rate; after every step the script reads the full fp32
master weights through DeepSpeed's own API (``safe_get_full_fp32_param``) and the bf16 module
weights, and keeps a plain EMA of each. The engine's EMA must match the one of the masters and
differ from the one of the bf16 weights (what it averaged before). The 2-rank ZeRO runs of
tests/test_train.py cover assembling and reloading the EMA from the ranks' pieces.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from train_utils import ROOT, _env

SCRIPT = r"""
import json, sys
import torch, torch.distributed as dist
from pipeline.config import load_config
from pipeline.engines.deepspeed_engine import DeepSpeedEngine

stage = int(sys.argv[1])
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
cfg = load_config(sys.argv[2], ["parallel.backend=deepspeed", f"parallel.zero_stage={stage}", "parallel.bf16=true",
                                "optim.ema=0.5", "optim.lr=0.02", "optim.warmup_steps=0", "diffusion.corrector_weight=0",
                                "parallel.threads=1"])
engine = DeepSpeedEngine(cfg, 5, torch.device("cpu"), 0, 1)
from deepspeed.utils import safe_get_full_fp32_param
from deepspeed import zero

def masters():
    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.model.named_parameters()}

def module_weights():
    with zero.GatheredParameters(list(engine.model.parameters())) if stage == 3 else torch.no_grad():
        return {n: p.detach().float().clone() for n, p in engine.model.named_parameters()}

ema_master, ema_bf16 = masters(), module_weights()
gen = torch.Generator().manual_seed(0)
for step in range(4):
    x = torch.randint(0, 5, (4, 16), generator=gen)
    engine.backward(engine.forward(x, None, None, True).pow(2).mean())
    engine.step()
    for ema, now in ((ema_master, masters()), (ema_bf16, module_weights())):
        for n in ema:
            ema[n] = 0.5 * ema[n] + 0.5 * now[n]
got = {n: p.detach() for n, p in engine.eval_model.named_parameters()}
print(json.dumps({"master": max(float((got[n] - ema_master[n]).abs().max()) for n in got),
                  "bf16": max(float((got[n] - ema_bf16[n]).abs().max()) for n in got),
                  "dtype": str(next(iter(got.values())).dtype)}))
"""


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_ema_averages_the_fp32_master_weights(stage):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(stage), str(ROOT / "configs" / "tiny.yaml")],
                         check=False, cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    diff = json.loads(out.stdout.strip().splitlines()[-1])
    assert diff["dtype"] == "torch.float32"
    assert diff["master"] < 1e-6, diff  # the average of the masters (to float rounding of the two formulas)
    assert diff["bf16"] > 1e-4, diff  # and not the average of the bf16 weights
