"""The training engine's checkpoint manager: atomic saves, discovery, pruning, crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.checkpoint.manager import (
    FORMAT,
    CheckpointManager,
    code_version,
    rewrite_meta,
    rng_state,
    set_rng_state,
    topology_mismatch,
)
from pipeline.errors import ProsecoError
from pipeline.io import save_torch

REPO = Path(__file__).resolve().parents[1]
META = {"topology": {"backend": "torch", "dp": 1, "tp": 1, "zero_stage": 0}, "manifest": "abc", "config": {}}


def _train_state(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    return model, opt, {"step": 2, "tokens": 96, "epoch": 0}


def _save(mgr: CheckpointManager, step: int, state: dict, meta: dict = META) -> Path:
    """A one-process save whose writer puts ``state`` into ``state.pt`` (what the torch engine does)."""
    return mgr.save(step, meta, writer=lambda folder: {"state.pt": save_torch(state, folder / "state.pt")})


def _load(mgr: CheckpointManager, path: Path | None = None) -> tuple[dict, dict]:
    """(state, meta) of ``path`` (default: the latest), checked first, as a resume reads it."""
    path = mgr.latest() if path is None else path
    meta = mgr.read_meta(path)
    mgr.verify(path, meta)
    return torch.load(path / "state.pt", weights_only=True), meta


def _touch_save(mgr: CheckpointManager, step: int) -> Path:
    return _save(mgr, step, {"step": torch.tensor(step)})


def test_round_trip_model_optimizer_counters(tmp_path):
    model, opt, counters = _train_state()
    mgr = CheckpointManager(tmp_path)
    path = _save(mgr, 2, {"model": model.state_dict(), "optimizer": opt.state_dict(), "counters": counters,
                        "rng": rng_state()}, META)
    assert path == tmp_path / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "meta.json", "state.pt"]
    assert mgr.latest() == path and mgr.list_complete() == [path]

    state, meta = _load(mgr)  # weights_only=True inside
    assert meta["step"] == 2 and meta["format"] == FORMAT and meta["manifest"] == "abc"
    assert meta["files"]["state.pt"]["size"] == (path / "state.pt").stat().st_size
    assert len(meta["files"]["state.pt"]["sha256"]) == 64
    assert state["counters"] == counters
    for k, v in model.state_dict().items():
        assert torch.equal(state["model"][k], v)

    model2, opt2, _ = _train_state(seed=1)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    for p, q in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(p[k], q[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_discovery_ignores_partial_and_cleanup_removes_it(tmp_path):
    mgr = CheckpointManager(tmp_path)
    good = _touch_save(mgr, 3)
    tmp = mgr.dir / "step_00000005.tmp-999"  # crash before the rename
    tmp.mkdir()
    (tmp / "state.pt").write_bytes(b"half")
    unmarked = mgr.dir / "step_00000004"  # crash after the rename, before COMPLETE
    unmarked.mkdir()
    (unmarked / "state.pt").write_bytes(b"whole")
    (mgr.dir / "notes.txt").write_text("not a checkpoint")

    assert mgr.latest() == good and mgr.list_complete() == [good]
    with pytest.raises(ProsecoError, match="COMPLETE"):
        _load(mgr, unmarked)
    assert CheckpointManager(tmp_path, rank=1).cleanup_partial() == []  # rank 0's job only
    assert sorted(p.name for p in mgr.cleanup_partial()) == ["step_00000004", "step_00000005.tmp-999"]
    assert sorted(p.name for p in mgr.dir.iterdir()) == ["notes.txt", "step_00000003"]


def test_keep_last_and_permanent(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, permanent_every=4)
    for step in range(1, 10):
        _touch_save(mgr, step)
    assert [mgr.step_of(p) for p in mgr.list_complete()] == [4, 8, 9]
    assert sorted(p.name for p in mgr.dir.iterdir()) == ["step_00000004", "step_00000008", "step_00000009"]


def test_resave_same_step_replaces_it(tmp_path):
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 7, {"x": torch.tensor(1)})
    _save(mgr, 7, {"x": torch.tensor(2)})
    assert _load(mgr)[0]["x"].item() == 2 and len(list(mgr.dir.iterdir())) == 1


def test_bad_settings_and_empty_run(tmp_path):
    with pytest.raises(ProsecoError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    mgr = CheckpointManager(tmp_path)
    assert mgr.latest() is None and mgr.list_complete() == []


@pytest.mark.parametrize("damage", ["size", "sha"])
def test_corrupted_file_is_refused(tmp_path, damage):
    mgr = CheckpointManager(tmp_path)
    path = _save(mgr, 1, {"w": torch.arange(100.0)})
    f = path / "state.pt"
    data = bytearray(f.read_bytes())
    if damage == "size":
        data += b"x"
    else:
        data[-20] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ProsecoError, match="state.pt"):
        _load(mgr)


def test_every_file_has_a_true_sha256_whatever_its_size(tmp_path):
    """A state above the old 64 MiB checksum limit: the sha256 its writer recorded equals an
    independent hash of the bytes on disk, and one flipped byte anywhere is refused."""
    mgr = CheckpointManager(tmp_path)

    state = {"w": torch.arange(17 * 2**20, dtype=torch.float32)}

    def writer(folder: Path) -> dict:  # one file hashed by the writer, one left to the manager
        (folder / "extra.bin").write_bytes(b"\x01" * 1000)
        return {"state.pt": save_torch(state, folder / "state.pt")}

    path = mgr.save(1, META, writer=writer)
    files = mgr.read_meta(path)["files"]
    assert (path / "state.pt").stat().st_size > 64 * 2**20
    for name in ("state.pt", "extra.bin"):
        assert files[name]["sha256"] == hashlib.sha256((path / name).read_bytes()).hexdigest()
    marker = (path / "COMPLETE").read_text().split()
    assert marker == ["1", hashlib.sha256((path / "meta.json").read_bytes()).hexdigest()]

    raw = bytearray((path / "state.pt").read_bytes())
    raw[len(raw) // 3] ^= 0x01
    (path / "state.pt").write_bytes(bytes(raw))
    with pytest.raises(ProsecoError, match="state.pt fails its sha256 check"):
        _load(mgr)
    from pipeline.checkpoint import tools

    with pytest.raises(ProsecoError, match="corrupted"):
        tools.info(path)


def test_a_changed_meta_json_is_refused(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = _touch_save(mgr, 1)
    meta = json.loads((path / "meta.json").read_text())
    meta["manifest"] = "abd"  # one character: still valid JSON, silently different without a checksum
    (path / "meta.json").write_text(json.dumps(meta, indent=1))
    with pytest.raises(ProsecoError, match="meta.json fails its sha256 check"):
        _load(mgr)
    rewrite_meta(path, meta)  # the sanctioned way to edit it
    assert _load(mgr)[1]["manifest"] == "abd"


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from pipeline.checkpoint.manager import CheckpointManager
    mgr = CheckpointManager(sys.argv[1])
    mgr.save(1, {"note": "first"}, writer=lambda folder: torch.save({"w": torch.ones(10)}, folder / "state.pt"))
    def slow_writer(folder):
        state = {"w": torch.zeros(200_000)}
        torch.save(state, folder / "part0.pt")
        (folder / "part0.pt.done").write_text("x")
        time.sleep(30)
        torch.save(state, folder / "part1.pt")
    mgr.save(2, {"note": "second"}, writer=slow_writer)
""")


def test_kill_9_during_save(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpts = tmp_path / "checkpoints"
    deadline = time.monotonic() + 25
    try:
        while time.monotonic() < deadline:
            if any((p / "part0.pt.done").exists() for p in ckpts.glob("step_00000002.tmp-*")):
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("the save of step 2 never started")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    mgr = CheckpointManager(tmp_path)
    assert mgr.latest() == ckpts / "step_00000001"
    state, meta = _load(mgr)
    assert torch.equal(state["w"], torch.ones(10)) and meta["note"] == "first"
    removed = mgr.cleanup_partial()
    assert [p.name for p in removed] == [f"step_00000002.tmp-{proc.pid}"]
    assert [p.name for p in ckpts.iterdir()] == ["step_00000001"]


def test_rng_round_trip_through_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian in python's state
    np.random.standard_normal()
    st = rng_state()
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal(),
                torch.rand(3))
    torch.save(st, tmp_path / "rng.pt")
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and got[3] == expected[3]
    assert np.array_equal(got[2], expected[2]) and torch.equal(got[4], expected[4])


def test_code_version_and_topology():
    cv = code_version()
    assert set(cv) == {"git_sha", "dirty", "version"} and cv["version"]
    assert cv["git_sha"] is None or len(cv["git_sha"]) == 40
    now = {"backend": "deepspeed", "dp": 4, "tp": 1, "zero_stage": 2}
    assert topology_mismatch({"topology": now}, now) == []
    diffs = topology_mismatch(META, now)
    assert [d.split(":")[0] for d in diffs] == ["backend", "dp", "zero_stage"]
    assert "dp: checkpoint 1, now 4" in diffs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mgr = CheckpointManager(run_dir, rank=rank, world_size=world)

        def writer(folder: Path) -> dict:  # rank{r}.pt hashed by its writer, extra{r}.bin not
            (folder / f"extra{rank}.bin").write_bytes(bytes([rank]) * 100)
            return {f"rank{rank}.pt": save_torch({"shard": torch.full((4,), float(rank))}, folder / f"rank{rank}.pt")}

        path = mgr.save(5, META, writer=writer)
        latest = mgr.latest()
        mgr.verify(path, mgr.read_meta(path))  # collective: each rank hashes half of the files
        dist.barrier()
        if rank == 0:
            (path / "extra1.bin").write_bytes(bytes([7]) * 100)  # same size, other bytes
        dist.barrier()
        try:
            mgr.verify(path, mgr.read_meta(path))
            error = None
        except ProsecoError as exc:
            error = str(exc)
        Path(run_dir, f"result{rank}.json").write_text(json.dumps({"path": str(path), "latest": str(latest),
                                                                   "error": error}))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_rank_gloo_save(tmp_path):
    mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2)]
    final = tmp_path / "checkpoints" / "step_00000005"
    assert all(r["path"] == r["latest"] == str(final) for r in results)
    assert sorted(p.name for p in final.iterdir()) == ["COMPLETE", "extra0.bin", "extra1.bin", "meta.json",
                                                        "rank0.pt", "rank1.pt"]
    # every rank refuses the file that one rank found corrupted
    assert all(r["error"] and "extra1.bin fails its sha256 check" in r["error"] for r in results), results
    files = CheckpointManager(tmp_path).read_meta(final)["files"]
    assert sorted(files) == ["extra0.bin", "extra1.bin", "rank0.pt", "rank1.pt"]
    assert files["extra1.bin"]["sha256"] == hashlib.sha256(bytes([1]) * 100).hexdigest()
    assert files["rank1.pt"]["sha256"] == hashlib.sha256((final / "rank1.pt").read_bytes()).hexdigest()
