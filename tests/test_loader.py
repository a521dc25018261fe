"""The shard loader: exact slices per (rank, worker), equal batch counts, golden resume, refusals."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline.data import Manifest, ShardLoader, manifest_fingerprint
from pipeline.data import loader as loader_mod
from pipeline.data.loader import sample_order
from pipeline.errors import ProsecoError

torch.set_num_threads(1)

PAD, OFFSET, SEQ_LEN = 0, 5, 6
COUNTS = (11, 12, 13, 10, 14, 9, 12, 11, 13)  # 9 shards, 105 samples, uneven on purpose


def make_shards(root: Path, counts=COUNTS, seq_len: int = SEQ_LEN, split: str = "train") -> Path:
    """Shards per docs/data_format.md; sample j of shard i is [i+5, j+5, 7, ..., pad] (real tokens != pad)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    shards, index = [], 0
    for i, n in enumerate(counts):
        name = f"{split}/shard-00000-{i:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for j in range(n):
                tokens = np.full(seq_len, 7, dtype=np.uint16)
                tokens[0], tokens[1], tokens[-1] = i + OFFSET, j + OFFSET, PAD
                sink.write({"__key__": f"p00000-{index:010d}", "tokens.npy": tokens})
                index += 1
        shards.append({"name": name, "samples": n, "tokens": n * seq_len,
                       "sha256": hashlib.sha256((root / name).read_bytes()).hexdigest()})
    manifest = {
        "format": "proseco-shards/1",
        "tokenizer": {"file": "tokenizer.model", "sha256": "-", "vocab_size": 64,
                      "special": {"pad": PAD, "unk": 1, "bos": 2, "eos": 3, "mask": 4}},
        "seq_len": seq_len, "mode": "wrap", "dtype": "uint16",
        "splits": {split: {"samples": sum(counts), "tokens": sum(counts) * seq_len, "shards": shards}},
        "documents": {split: 1}, "sources": [], "skipped": {}, "config": {},
    }
    manifest["fingerprint"] = manifest_fingerprint(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))


def ids(batch) -> list[tuple[int, int]]:
    t = batch["tokens"]
    return [(int(a) - OFFSET, int(b) - OFFSET) for a, b in zip(t[:, 0], t[:, 1])]


def take(loader, n: int) -> list[dict]:
    it = iter(loader)
    out = list(itertools.islice(it, n))
    it.close()
    return out


def expected_ids(loader: ShardLoader, epoch: int, rank: int) -> set[tuple[int, int]]:
    """What the rank must see in the epoch, from the manifest arithmetic alone."""
    plan, b = loader.plan(epoch), loader.batch_size
    out = set()
    for w in range(loader.workers):
        stream = [(i, int(j)) for i in plan.slot_shards[rank * loader.workers + w]
                  for j in sample_order(COUNTS[i], loader.seed, epoch, i, loader.shuffle)]
        out |= set(stream[: plan.batches_per_slot * b])
    return out


def test_one_rank_one_epoch_sees_each_kept_sample_once(data):
    loader = ShardLoader(data, batch_size=4, rank=0, world_size=1, num_workers=2, seed=0)
    plan = loader.plan(0)
    batches = list(loader.epoch_iter())
    assert len(batches) == loader.batches_per_epoch == 2 * plan.batches_per_slot
    seen = [i for b in batches for i in ids(b)]
    assert len(seen) == len(set(seen)) == sum(COUNTS) - plan.dropped
    assert set(seen) == expected_ids(loader, 0, 0)
    b = batches[0]
    assert b["tokens"].dtype == torch.long and b["tokens"].shape == (4, SEQ_LEN)
    assert b["valid"].dtype == torch.bool and not b["valid"][:, -1].any() and b["valid"][:, :-1].all()
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batches"] == 0


def test_orders_depend_on_seed_and_epoch_only(data):
    def run(seed, **kw):
        loader = ShardLoader(data, batch_size=4, rank=0, world_size=1, seed=seed, **kw)
        e0 = [i for b in loader.epoch_iter() for i in ids(b)]
        e1 = [i for b in loader.epoch_iter() for i in ids(b)]
        return e0, e1

    a0, a1 = run(3, num_workers=2)
    b0, b1 = run(3, num_workers=2)
    assert (a0, a1) == (b0, b1)
    assert a0 != a1
    assert run(4, num_workers=2)[0] != a0
    unshuffled = run(3, num_workers=0, shuffle=False)[0]  # one slot reads whole shards in tar order
    assert [j for i, j in unshuffled if i == unshuffled[0][0]] == list(range(COUNTS[unshuffled[0][0]]))


def test_two_ranks_two_workers_disjoint_and_equal(data):
    loaders = [ShardLoader(data, batch_size=4, rank=r, world_size=2, num_workers=2, seed=1) for r in range(2)]
    for epoch in range(2):
        per_rank = [list(ld.epoch_iter()) for ld in loaders]
        assert len(per_rank[0]) == len(per_rank[1]) == loaders[0].batches_in_epoch(epoch)
        seen = [[i for b in batches for i in ids(b)] for batches in per_rank]
        assert not set(seen[0]) & set(seen[1])
        assert len(seen[0]) + len(seen[1]) == sum(COUNTS) - loaders[0].plan(epoch).dropped
        for r in range(2):
            assert set(seen[r]) == expected_ids(loaders[r], epoch, r)


@pytest.mark.parametrize("where", ["odd", "last", "boundary", "next_epoch"])
def test_golden_resume_two_ranks_two_workers(data, where):
    for rank in range(2):
        def fresh(rank=rank):
            return ShardLoader(data, batch_size=4, rank=rank, world_size=2, num_workers=2, seed=2)

        reference = fresh()
        per_epoch = reference.batches_in_epoch(0)
        total = per_epoch + 4  # crosses into epoch 1
        straight = take(reference, total)
        first = fresh()
        cut = {"odd": 3, "last": per_epoch - 1, "boundary": per_epoch, "next_epoch": per_epoch + 1}[where]
        head = take(first, cut)
        state = first.state_dict()
        assert set(state) == set(loader_mod.STATE_KEYS)
        resumed = fresh()
        resumed.load_state_dict(json.loads(json.dumps(state)))  # a checkpoint holds plain JSON
        tail = take(resumed, total - len(head))
        assert len(head) + len(tail) == total
        for a, b in zip(straight, head + tail):
            assert torch.equal(a["tokens"], b["tokens"])


def test_resume_reads_and_decodes_no_skipped_sample(data, monkeypatch):
    def fresh():
        return ShardLoader(data, batch_size=4, rank=1, world_size=2, num_workers=0, seed=5)

    straight = take(fresh(), 6)
    first = fresh()
    take(first, 5)
    state = first.state_dict()
    opened = []
    real_index = loader_mod.index_samples
    monkeypatch.setattr(loader_mod, "index_samples", lambda buf, where: opened.append(where) or real_index(buf, where))
    monkeypatch.setattr(loader_mod, "DECODED_SAMPLES", 0)
    resumed = fresh()
    resumed.load_state_dict(state)
    batch = take(resumed, 1)[0]
    assert torch.equal(batch["tokens"], straight[5]["tokens"])
    assert loader_mod.DECODED_SAMPLES == 4  # exactly the one batch, nothing replayed
    # only the shard(s) holding the next batch are opened, not the ones before it in the slot
    plan, (shards, rank) = resumed.plan(0), (resumed.shards, 1)
    order = plan.slot_shards[rank]
    start, before = 5 * 4, 0
    for i in order:
        if before + COUNTS[i] > start:
            break
        before += COUNTS[i]
    assert opened[0] == shards[i].path and all(p != shards[j].path for p in opened for j in order[: order.index(i)])


def test_manifest_change_refused_unless_opted_in(data, tmp_path):
    other = make_shards(tmp_path / "other", counts=COUNTS[:-1] + (20,))
    first = ShardLoader(data, batch_size=4, rank=0, world_size=1, seed=0)
    take(first, 3)
    state = first.state_dict()
    new = ShardLoader(other, batch_size=4, rank=0, world_size=1, seed=0)
    with pytest.raises(ProsecoError, match="allow_new_manifest=True"):
        new.load_state_dict(state)
    new.load_state_dict(state, allow_new_manifest=True)
    assert new.state_dict()["epoch"] == 0 and new.state_dict()["batches"] == 0
    assert new.state_dict()["fingerprint"] == Manifest.load(other).fingerprint


def test_world_size_change_refused_unless_opted_in(data):
    old = ShardLoader(data, batch_size=4, rank=0, world_size=2, num_workers=0, seed=0)
    state = {**old.state_dict(), "epoch": 3, "batches": 5}
    new = ShardLoader(data, batch_size=4, rank=0, world_size=3, num_workers=0, seed=0)
    with pytest.raises(ProsecoError, match=r"world size 2.*allow_new_world_size=True"):
        new.load_state_dict(state)
    opted = ShardLoader(data, batch_size=4, rank=0, world_size=3, num_workers=0, seed=0, allow_new_world_size=True)
    opted.load_state_dict(state)
    assert (opted.state_dict()["epoch"], opted.state_dict()["batches"]) == (3, 0)


def test_too_few_shards_refused_before_any_read(data, monkeypatch):
    monkeypatch.setattr(loader_mod, "index_samples", lambda *a: pytest.fail("read a shard"))
    with pytest.raises(ProsecoError, match=r"9 shards, fewer than 2 ranks x 5 loader workers.*at most 4 loader"):
        ShardLoader(data, batch_size=4, rank=0, world_size=2, num_workers=5)
    with pytest.raises(ProsecoError, match="re-shard"):
        ShardLoader(data, batch_size=1, rank=0, world_size=10, num_workers=0)


def test_a_shard_changed_since_prep_is_refused_before_its_samples_are_used(tmp_path):
    root = make_shards(tmp_path / "flipped", counts=(4, 4))
    shard = root / "train" / "shard-00000-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[600] ^= 0x01  # inside the first sample's token payload: still a readable tar, other tokens
    shard.write_bytes(bytes(raw))
    loader = ShardLoader(root, batch_size=2, rank=0, world_size=1, num_workers=0, shuffle=False)
    with pytest.raises(ProsecoError, match=r"shard-00000-000001.tar fails its sha256 check"):
        list(loader.epoch_iter())


def test_an_empty_split_is_named_as_empty(tmp_path):
    root = make_shards(tmp_path / "empty", counts=())
    with pytest.raises(ProsecoError, match=r"split 'train' of .* is empty") as info:
        ShardLoader(root, batch_size=4, rank=0, world_size=1, num_workers=0)
    assert "shard_mb" not in str(info.value)


def test_tampered_or_incomplete_manifest_refused(data, tmp_path):
    copy = make_shards(tmp_path / "copy")
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["splits"]["train"]["shards"][0]["samples"] += 1
    manifest["splits"]["train"]["samples"] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(ProsecoError, match="modified after it was written"):
        ShardLoader(copy, batch_size=4, rank=0, world_size=1)
    path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "fingerprint"}))
    with pytest.raises(ProsecoError, match="no fingerprint"):
        Manifest.load(copy)
    path.unlink()
    with pytest.raises(ProsecoError, match="no shard manifest"):
        Manifest.load(copy)
    (data / "train" / "shard-00000-000000.tar").rename(tmp_path / "moved.tar")
    try:
        with pytest.raises(ProsecoError, match="missing"):
            Manifest.load(data)
    finally:
        (tmp_path / "moved.tar").rename(data / "train" / "shard-00000-000000.tar")


def _gloo_rank(rank: int, world: int, data: str, init: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        loader = ShardLoader(data, batch_size=4, num_workers=0, seed=7)  # rank/world from the group
        seen = [i for b in loader.epoch_iter() for i in ids(b)]
        Path(out, f"rank{rank}.json").write_text(json.dumps({"rank": loader.rank, "world": loader.world_size,
                                                             "seen": seen}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_rank_detection_in_a_real_gloo_group(data, tmp_path):
    torch.multiprocessing.spawn(_gloo_rank, args=(2, str(data), f"file://{tmp_path}/pg", str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world"]) for r in results] == [(0, 2), (1, 2)]
    seen = [{tuple(i) for i in r["seen"]} for r in results]
    assert len(results[0]["seen"]) == len(results[1]["seen"])
    assert not seen[0] & seen[1]
    ref = ShardLoader(data, batch_size=4, rank=0, world_size=2, seed=7)
    assert len(seen[0] | seen[1]) == sum(COUNTS) - ref.dropped_per_epoch


def test_old_iterator_invalidated_by_load_state_dict(data):
    loader = ShardLoader(data, batch_size=4, rank=0, world_size=1, num_workers=0)
    it = iter(loader)
    next(it)
    loader.load_state_dict(loader.state_dict())
    with pytest.raises(RuntimeError, match="invalidated"):
        next(it)
    assert loader.state_dict()["batches"] == 1


def test_shard_disagreeing_with_manifest_fails_in_workers_as_proseco_error(tmp_path):
    root = make_shards(tmp_path / "bad", counts=(8, 8, 8, 8))
    with wds.TarWriter(str(root / "train" / "shard-00000-000002.tar")) as sink:  # 5 samples, manifest says 8
        for j in range(5):
            sink.write({"__key__": f"p00000-{j:010d}", "tokens.npy": np.full(SEQ_LEN, 9, dtype=np.uint16)})
    loader = ShardLoader(root, batch_size=2, rank=0, world_size=1, num_workers=2, shuffle=False)
    with pytest.raises(ProsecoError, match="shard-00000-000002.tar fails its sha256 check") as info:
        for _ in range(3):
            list(loader.epoch_iter())
    from pipeline.cli import user_message

    shown = user_message(info.value)  # what `proseco train` prints: one line, the worker's traceback gone
    assert len(shown.splitlines()) == 1 and shown.startswith("shard ") and "fails its sha256 check" in shown


@pytest.mark.parametrize("tar_format", ["ustar", "pax", "gnu"])
def test_the_one_tar_reader_agrees_with_tarfile(tmp_path, tar_format):
    """format.tar_members reads what tarfile writes: long names (pax / GNU headers), folders, payload slices."""
    import io
    import tarfile

    from pipeline.data import format as fmt

    fmts = {"ustar": tarfile.USTAR_FORMAT, "pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT}
    long = "d" * 90 + "/" + "k" * 40 if tar_format == "ustar" else "d" * 150
    payloads = {"p00000-0000000000.tokens.npy": b"abc", f"{long}.tokens.npy": bytes(range(200)) * 5}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmts[tar_format]) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in payloads.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    members = list(fmt.tar_members(raw, "t.tar"))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert [(m.name.rstrip("/"), m.is_file) for m in members] == [(t.name, t.isfile()) for t in tar.getmembers()]
    assert {m.name: raw[m.offset:m.offset + m.size] for m in members if m.is_file} == payloads
    assert [raw[o:o + n] for o, n in fmt.index_samples(raw, "t.tar")] == list(payloads.values())
    with pytest.raises(ProsecoError, match="t.tar is not a readable tar"):
        list(fmt.tar_members(raw[:700], "t.tar"))
