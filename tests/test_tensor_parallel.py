"""Tensor parallelism applied to the Backbone (pipeline/model/parallelize.py, plan and state conversion in
pipeline/model/tensor_parallel.py) against the single-process Backbone.

One 2-process gloo run (module fixture ``tp2``) does every TP=2 computation and records the results;
the tests below assert on them. Reference models are built in every process from the same seed and
sharded with ``shard_full_state``.
"""

from __future__ import annotations

import re
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

pytest.importorskip("megatron.core")

# megatron's RowParallelLinear calls its linear function with tp_group=None (unused there): harmless.
pytestmark = pytest.mark.filterwarnings("ignore:Warning. tp_group is None:DeprecationWarning")

from pipeline.config import ModelConfig
from pipeline.errors import ProsecoError
from pipeline.model import Backbone, count_parameters
from pipeline.model import parallelize as par
from pipeline.model import tensor_parallel as tpm

V = 64
BASE = {"hidden": 64, "heads": 4, "layers": 2, "max_seq_len": 16, "cond_dim": 32}
CONFIGS = {
    "plain_learned_pos": {**BASE, "time_conditioning": False, "learned_positions": True},
    "time_cond": {**BASE, "time_conditioning": True},
    "time_cond_tied": {**BASE, "time_conditioning": True, "tie_embeddings": True, "learned_positions": True},
}
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(cfg: ModelConfig, seed: int = 0) -> Backbone:
    """A Backbone with every parameter perturbed: adaLN gates and biases are zero at init, which
    would hide the blocks (and the row-parallel biases) from the comparison."""
    torch.manual_seed(seed)
    ref = Backbone(cfg, V)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


def _tp_copy(ref: Backbone, cfg: ModelConfig) -> Backbone:
    model = par.tensor_parallel_backbone(cfg, V, device="cpu")
    model.load_state_dict(tpm.shard_full_state(ref.state_dict(), cfg, V, tpm.tp_rank(), tpm.tp_world()))
    return model


def _batch(seed: int, b: int = 3, seq: int = 16):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (b, seq), generator=g)
    targets = torch.randint(0, V, (b, seq), generator=g)
    t = torch.rand(b, generator=g)
    valid = torch.ones(b, seq, dtype=torch.bool)
    valid[1, 11:] = False  # padded tail
    valid[2, :] = False  # an all-padding row (attends everywhere, excluded from the loss)
    valid[2, 0] = True
    return tokens, targets, t, valid


def _loss(logits, targets, valid):
    return F.cross_entropy(logits[valid], targets[valid])


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _grads(model) -> dict:
    return {n: p.grad for n, p in model.named_parameters()}


def _check_config(cfg: ModelConfig) -> dict:
    rank = tpm.tp_rank()
    ref = _reference(cfg)
    full = ref.state_dict()
    model = _tp_copy(ref, cfg)
    tokens, targets, t, valid = _batch(1)
    out = {}

    ref_logits, tp_logits = ref(tokens, t, valid), model(tokens, t, valid)
    out["logits_shape"] = tuple(tp_logits.shape)
    out["logit_diff"] = (ref_logits - tp_logits).abs().max().item()
    out["logits"] = tp_logits.detach().clone()

    _loss(ref_logits, targets, valid).backward()
    _loss(tp_logits, targets, valid).backward()
    full_grads = tpm.gather_full_state(_grads(model), cfg, V, alias_tied_head=False)
    out["grad_diff"] = _max_diff(full_grads, _grads(ref))
    out["replicated_grads"] = {n: p.grad.clone() for n, p in model.named_parameters()
                               if tpm.partition_dim(n) is None}
    out["sharded_names"] = sorted(n for n, p in model.named_parameters()
                                  if getattr(p, "tensor_model_parallel", False))
    out["expected_sharded"] = sorted(n for n, _ in model.named_parameters() if tpm.partition_dim(n) is not None)
    out["counts"] = (tpm.full_parameter_count(model), count_parameters(ref))
    out["one_model"] = (type(model) is Backbone, type(model.blocks[0].attn.qkv) is par.ColumnLinear,
                        type(model.blocks[1].mlp[2]) is par.RowLinear, type(model.head) is par.VocabHead)

    local = model.state_dict()
    gathered = tpm.gather_full_state(local, cfg, V)
    out["roundtrip_full"] = sorted(gathered) == sorted(full) and all(torch.equal(gathered[k], full[k]) for k in full)
    back = tpm.shard_full_state(gathered, cfg, V, rank, tpm.tp_world())
    local_tensors = {k: v for k, v in local.items() if torch.is_tensor(v)}
    out["roundtrip_local"] = sorted(back) == sorted(local_tensors) and all(
        torch.equal(back[k], local_tensors[k]) for k in local_tensors)

    max_norm = 0.05
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    tp_norm = tpm.clip_grad_norm_tp(model.parameters(), max_norm)
    out["norms"] = (ref_norm.item(), tp_norm.item())
    clipped = tpm.gather_full_state(_grads(model), cfg, V, alias_tied_head=False)
    out["clipped_grad_diff"] = _max_diff(clipped, _grads(ref))
    return out


def _check_adam(cfg: ModelConfig, steps: int = 4) -> dict:
    ref = _reference(cfg, seed=3)
    model = _tp_copy(ref, cfg)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt_tp = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_losses, tp_losses = [], []
    for step in range(steps):
        tokens, targets, t, valid = _batch(100)  # one batch: the loss must fall
        for m, opt, losses, clip in ((ref, opt_ref, ref_losses, torch.nn.utils.clip_grad_norm_),
                                     (model, opt_tp, tp_losses, tpm.clip_grad_norm_tp)):
            opt.zero_grad()
            loss = _loss(m(tokens, t, valid), targets, valid)
            loss.backward()
            clip(m.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
    params = tpm.gather_full_state(model.state_dict(), cfg, V)
    out = {"ref_losses": ref_losses, "tp_losses": tp_losses, "param_diff": _max_diff(params, ref.state_dict())}
    for key in ("exp_avg", "exp_avg_sq"):
        tp_state = {n: opt_tp.state[p][key] for n, p in model.named_parameters()}
        ref_state = {n: opt_ref.state[p][key] for n, p in ref.named_parameters()}
        out[key + "_diff"] = _max_diff(tpm.gather_full_state(tp_state, cfg, V, alias_tied_head=False), ref_state)
        # and back: the sharded reference state equals this rank's state
        sharded = tpm.shard_full_state(ref_state, cfg, V, tpm.tp_rank(), tpm.tp_world())
        out[key + "_shard_diff"] = _max_diff(sharded, tp_state)
    # the optimizer-state converters the megatron checkpoints use: same ids as the reference's
    names = [n for n, _ in model.named_parameters()]
    full, ref_sd = tpm.gather_optimizer_state(opt_tp.state_dict(), names, cfg, V), opt_ref.state_dict()
    out["optim_ids"] = (full["param_groups"] == ref_sd["param_groups"], sorted(full["state"]) == sorted(ref_sd["state"]))
    out["optim_full_diff"] = max(_max_diff(full["state"][i], ref_sd["state"][i]) for i in ref_sd["state"])
    back = tpm.shard_optimizer_state(full, names, tpm.tp_rank(), tpm.tp_world())["state"]
    local = opt_tp.state_dict()["state"]
    out["optim_roundtrip"] = all(torch.equal(back[i][k], local[i][k]) for i in local for k in local[i])
    return out


def _check_dropout() -> dict:
    cfg = ModelConfig(**{**BASE, "dropout": 0.2, "learned_positions": True})
    torch.manual_seed(0)  # same seed on both TP ranks, as the trainer does
    model = par.tensor_parallel_backbone(cfg, V, device="cpu")
    tokens, targets, t, valid = _batch(7)
    model.eval()
    eval_logits = model(tokens, t, valid)
    model.train()
    torch.manual_seed(11)
    logits = model(tokens, t, valid)
    _loss(logits, targets, valid).backward()
    torch.manual_seed(3)
    with par.tp_region_rng(torch.device("cpu"), tpm.tp_rank()):
        inside = torch.rand(8)
    after = torch.rand(8)
    # What the attention's dropout would draw: spy on SDPA (this process only).
    draws, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        draws.append(torch.rand(8))
        return sdpa(*args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        torch.manual_seed(12)
        model(tokens, t, valid)
    finally:
        F.scaled_dot_product_attention = sdpa
    return {"logits": logits.detach().clone(), "active": (logits - eval_logits).abs().max().item(),
            "replicated_grads": {n: p.grad.clone() for n, p in model.named_parameters()
                                 if tpm.partition_dim(n) is None},
            "rng_inside": inside, "rng_after": after, "attn_draws": torch.stack(draws)}


def _check_init_from_seed(cfg: ModelConfig) -> dict:
    torch.manual_seed(0)
    ref_sd = Backbone(cfg, V).state_dict()
    ref_next = torch.rand(4)
    torch.manual_seed(0)
    model = par.tensor_parallel_backbone(cfg, V, device="cpu")
    tp_next = torch.rand(4)
    gathered = tpm.gather_full_state(model.state_dict(), cfg, V)
    same = sorted(gathered) == sorted(ref_sd) and all(torch.equal(gathered[k], ref_sd[k]) for k in ref_sd)
    return {"same_weights": same, "same_rng": torch.equal(ref_next, tp_next)}


def _check_native_gather(cfg: ModelConfig) -> dict:
    """The CUDA logits path (megatron's all-gather) on CPU, with torch.cuda.current_device patched."""
    ref = _reference(cfg)
    model = _tp_copy(ref, cfg)
    tokens, targets, t, valid = _batch(5)
    saved = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("cpu")
    par.NATIVE_GATHER_ON_CPU = True
    try:
        logits = model(tokens, t, valid)
        _loss(logits, targets, valid).backward()
    finally:
        torch.cuda.current_device = saved
        par.NATIVE_GATHER_ON_CPU = False
    _loss(ref(tokens, t, valid), targets, valid).backward()
    grads = tpm.gather_full_state(_grads(model), cfg, V, alias_tied_head=False)
    return {"logit_diff": (logits - ref(tokens, t, valid)).abs().max().item(),
            "grad_diff": _max_diff(grads, _grads(ref))}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    res = {}
    try:
        try:
            tpm.init_model_parallel(3)
            res["bad_world"] = None
        except ProsecoError as e:
            res["bad_world"] = str(e)
        tpm.init_model_parallel(2)
        res["tp"] = (tpm.tp_rank(), tpm.tp_world(), dist.get_world_size(tpm.dp_group()))
        try:
            par.tensor_parallel_backbone(ModelConfig(**BASE), V - 1, device="cpu")
            res["bad_vocab"] = None
        except ProsecoError as e:
            res["bad_vocab"] = str(e)
        res["configs"] = {name: _check_config(ModelConfig(**kw)) for name, kw in CONFIGS.items()}
        res["adam"] = {name: _check_adam(ModelConfig(**CONFIGS[name])) for name in ("time_cond", "time_cond_tied")}
        res["dropout"] = _check_dropout()
        res["init_from_seed"] = _check_init_from_seed(ModelConfig(**CONFIGS["time_cond_tied"]))
        res["native_gather"] = _check_native_gather(ModelConfig(**CONFIGS["time_cond_tied"]))
        torch.save(res, f"{out_dir}/rank{rank}.pt")
    finally:
        if tpm.model_parallel_is_initialized():
            tpm.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


# ---------------------------------------------------------------------------------------------- TP = 2


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp2_logits_match_backbone(tp2, name):
    for r in tp2:
        res = r["configs"][name]
        assert res["logits_shape"] == (3, 16, V)  # full vocabulary on every rank
        assert res["logit_diff"] < TOL, res["logit_diff"]
    assert torch.equal(tp2[0]["configs"][name]["logits"], tp2[1]["configs"][name]["logits"])


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp2_gradients_match_backbone(tp2, name):
    for r in tp2:
        res = r["configs"][name]
        assert res["grad_diff"] < TOL, res["grad_diff"]
        assert res["sharded_names"] == res["expected_sharded"]  # megatron's attribute marks exactly these
        assert res["counts"][0] == res["counts"][1]
        assert res["one_model"] == (True, True, True, True)  # the Backbone itself, its projections swapped
    g0, g1 = (r["configs"][name]["replicated_grads"] for r in tp2)
    assert sorted(g0) == sorted(g1) and "embed.weight" in g0
    for n in g0:  # replicated parameters need no TP all-reduce: bitwise identical gradients
        assert torch.equal(g0[n], g1[n]), n


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp2_state_roundtrip_and_clip(tp2, name):
    for r in tp2:
        res = r["configs"][name]
        assert res["roundtrip_full"] and res["roundtrip_local"]
        ref_norm, tp_norm = res["norms"]
        assert ref_norm > 0.05  # the clip really clipped
        assert abs(ref_norm - tp_norm) <= 1e-5 * ref_norm, (ref_norm, tp_norm)
        assert res["clipped_grad_diff"] < TOL


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["time_cond", "time_cond_tied"])
def test_tp2_adamw_steps_match(tp2, name):
    for r in tp2:
        res = r["adam"][name]
        assert len(res["tp_losses"]) == 4
        for a, b in zip(res["ref_losses"], res["tp_losses"]):
            assert abs(a - b) < TOL, (res["ref_losses"], res["tp_losses"])
        assert res["ref_losses"][-1] < res["ref_losses"][0]  # it trains
        # Adam divides by sqrt(v): entries whose gradient is ~0 turn 1e-9 gradient noise into O(lr) updates,
        # so after a few steps the weights agree to ~1e-4 (lr=1e-2), not 1e-5; the losses above are the check.
        assert res["param_diff"] < 1e-3
        for key in ("exp_avg", "exp_avg_sq"):
            assert res[key + "_diff"] < TOL and res[key + "_shard_diff"] < TOL
        assert res["optim_ids"] == (True, True) and res["optim_full_diff"] < TOL and res["optim_roundtrip"]


@pytest.mark.distributed
def test_tp2_dropout_keeps_replicated_region_in_step(tp2):
    d0, d1 = (r["dropout"] for r in tp2)
    assert d0["active"] > 1e-3  # dropout really changed the output
    assert torch.equal(d0["logits"], d1["logits"])
    for n in d0["replicated_grads"]:
        assert torch.equal(d0["replicated_grads"][n], d1["replicated_grads"][n]), n
    assert not torch.equal(d0["rng_inside"], d1["rng_inside"])  # per-rank masks inside the TP region
    assert torch.equal(d0["rng_after"], d1["rng_after"])  # ... and the shared stream stays in step
    a0, a1 = d0["attn_draws"], d1["attn_draws"]
    assert a0.shape == (BASE["layers"], 8)
    assert all(not torch.equal(x, y) for x, y in zip(a0, a1))  # the model's attention uses the fork


@pytest.mark.distributed
def test_tp2_init_from_seed_and_native_gather(tp2):
    for r in tp2:
        assert r["init_from_seed"] == {"same_weights": True, "same_rng": True}
        assert r["native_gather"]["logit_diff"] < TOL and r["native_gather"]["grad_diff"] < TOL
    assert [r["tp"] for r in tp2] == [(0, 2, 1), (1, 2, 1)]


@pytest.mark.distributed
def test_tp2_bad_sizes_raise(tp2):
    for r in tp2:
        assert r["bad_world"] is not None and "parallel.tp_size=3" in r["bad_world"]
        assert r["bad_vocab"] is not None and "model.vocab_size=63" in r["bad_vocab"]
        assert "parallel.tp_size=2" in r["bad_vocab"]


# ---------------------------------------------------------------------------------------------- TP = 1


@pytest.fixture
def world1():
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        if tpm.model_parallel_is_initialized():
            tpm.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp1_matches_backbone(world1, name):
    with pytest.raises(ProsecoError, match="parallel.tp_size=2"):
        tpm.init_model_parallel(2)  # world size 1
    tpm.init_model_parallel(1)
    cfg = ModelConfig(**{**CONFIGS[name], "dropout": 0.1})
    ref = _reference(cfg)
    model = _tp_copy(ref, cfg)
    tokens, targets, t, valid = _batch(2)
    for train in (False, True):  # at tp=1 dropout draws exactly Backbone's masks
        ref.train(train)
        model.train(train)
        torch.manual_seed(9)
        a = ref(tokens, t, valid)
        torch.manual_seed(9)
        b = model(tokens, t, valid)
        assert (a - b).abs().max().item() < 1e-6
    _loss(a, targets, valid).backward()
    _loss(b, targets, valid).backward()
    assert _max_diff(tpm.gather_full_state(_grads(model), cfg, V, alias_tied_head=False), _grads(ref)) < 1e-6
    assert tpm.clip_grad_norm_tp(model.parameters(), 1e9).item() == pytest.approx(
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9).item(), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # megatron layers run fp32 here: no crash
        c = model(tokens, t, valid)
    assert c.dtype == torch.float32
    _loss(c, targets, valid).backward()


@pytest.mark.distributed
def test_plan_must_match_linear_modules(world1):
    tpm.init_model_parallel(1)
    cfg = ModelConfig(**BASE)
    with pytest.raises(ValueError, match=re.escape(r"match no module of Backbone: blocks\.\d+\.gate")):
        par.apply_tensor_parallel(Backbone(cfg, V), {**tpm.BACKBONE_PLAN, r"blocks\.\d+\.gate": tpm.RowParallel()})
    with pytest.raises(TypeError, match="'blocks.0.norm1', a LayerNorm, not an nn.Linear"):
        par.apply_tensor_parallel(Backbone(cfg, V), {r"blocks\.\d+\.norm1": tpm.ColumnParallel()})
    dp = par.apply_tensor_parallel(Backbone(cfg, V), {r"blocks\.\d+\.mlp\.0": tpm.ColumnParallel()})
    assert type(dp.blocks[1].mlp[0]) is par.ColumnLinear and type(dp.blocks[1].attn.qkv) is torch.nn.Linear


# ---------------------------------------------------------------------------------------------- pure layout


def test_partition_dims():
    assert tpm.partition_dim("module.blocks.0.attn.qkv.weight") == 0  # a wrapper's prefix is allowed
    assert tpm.param_split("blocks.3.attn.qkv.weight") == (0, 3) and tpm.param_split("head.weight") == (0, 1)
    assert tpm.partition_dim("blocks.0.attn.qkv.weight") == 0
    assert tpm.partition_dim("blocks.11.mlp.0.bias") == 0
    assert tpm.partition_dim("head.weight") == 0
    assert tpm.partition_dim("blocks.1.attn.proj.weight") == 1
    assert tpm.partition_dim("blocks.1.mlp.2.weight") == 1
    for name in ("blocks.1.mlp.2.bias", "embed.weight", "pos_embed", "blocks.0.adaln.weight",
                 "blocks.0.norm1.weight", "final_adaln.bias", "time_mlp.0.weight"):
        assert tpm.partition_dim(name) is None, name


def test_qkv_shard_holds_own_heads_q_k_v_rows():
    full = torch.arange(3 * 64, dtype=torch.float32)[:, None].expand(3 * 64, 5)
    shard = tpm.shard_tensor("blocks.0.attn.qkv.weight", full, 1, 2)  # heads 2, 3
    rows = shard[:, 0].long().tolist()
    assert rows == list(range(32, 64)) + list(range(96, 128)) + list(range(160, 192))
    assert not torch.equal(shard, full.chunk(2)[1])  # not a plain contiguous chunk


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("tied", [False, True])
def test_shard_unshard_roundtrip(tp, tied):
    cfg = ModelConfig(**{**BASE, "tie_embeddings": tied, "time_conditioning": True})
    torch.manual_seed(0)
    full = Backbone(cfg, V).state_dict()
    shards = [tpm.shard_full_state(full, cfg, V, r, tp) for r in range(tp)]
    assert ("head.weight" in shards[0]) == (not tied)
    for name in shards[0]:
        rebuilt = tpm.unshard_tensors(name, [s[name] for s in shards])
        assert torch.equal(rebuilt, full[name]), name
        if tpm.partition_dim(name) is not None and tp > 1:
            assert shards[0][name].numel() * tp == full[name].numel()


def test_bad_config_raises_without_process_group():
    with pytest.raises(ProsecoError, match=r"model.vocab_size=63 .*parallel.tp_size=2"):
        tpm.shard_full_state({}, ModelConfig(**BASE), 63, 0, 2)
    with pytest.raises(ProsecoError, match="model.heads=4"):
        tpm.check_tp_config(ModelConfig(**BASE), V, 8)
    with pytest.raises(ProsecoError, match="mlp_ratio"):
        tpm.check_tp_config(ModelConfig(**{**BASE, "mlp_ratio": 1.5, "hidden": 36, "heads": 4}), 96, 4)
