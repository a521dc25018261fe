"""`proseco prep shards`: determinism, exact counts, resume after kill -9, partitions, verify, disk errors.

A tiny BPE tokenizer (vocab 300) and a generated corpus (text, JSONL, .gz and .zst) keep each
build well under a second; expected values are recomputed independently of data_prep.shards
(documents from the readers, ids from the tokenizer, the val rule re-derived with hashlib).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep import manifest as mf
from data_prep import shards
from data_prep.manifest import merge
from data_prep.readers import SkipLog, expand_inputs, iter_documents
from data_prep.shards import ShardSettings, build_shards
from data_prep.tokenizer import Tokenizer, train_tokenizer
from data_prep.verify import verify, verify_report
from pipeline.data import format as fmt
from pipeline.errors import ProsecoError

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "whale", "sea", "ship", "captain", "ahab", "ishmael", "white", "deep", "ocean", "harpoon", "sail", "wind", "storm", "crew", "deck", "mast", "rope", "boat", "night", "day", "pequod", "nantucket", "ivory", "oil"]
SEQ_LEN = 32
SHARD_BYTES = 12_000  # 512 + 576 bytes per sample -> 10 samples per shard


def _doc(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 60)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Four files, four formats, ~500 documents (plus a few the readers must skip)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1234)
    (root / "a.txt").write_text("\n\n".join(_doc(rng) for _ in range(150)) + "\n")
    (root / "sub").mkdir()
    lines = [json.dumps({"text": _doc(rng), "id": i}) for i in range(120)] + ["{not json", '{"other": 1}']
    (root / "sub" / "b.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(root / "c.txt.gz", "wt") as f:
        f.write("\n\n".join(_doc(rng) for _ in range(130)) + "\n")
    import zstandard

    text = "\n".join(json.dumps({"text": _doc(rng)}) for _ in range(110)) + "\n"
    (root / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    return root


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([str(corpus)], out, vocab_size=300, num_threads=1)
    return out


@pytest.fixture(scope="module")
def tok(tokdir) -> Tokenizer:
    return Tokenizer.load(tokdir)


def _settings(corpus, tokdir, out, **kw) -> ShardSettings:
    base = {"seq_len": SEQ_LEN, "shard_bytes": SHARD_BYTES, "val_fraction": 0.1, "num_workers": 0,
            "chunk_docs": 16}
    return ShardSettings(inputs=[str(corpus)], tokenizer_dir=str(tokdir), out_dir=str(out), **{**base, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, tokdir) -> Path:
    """An uninterrupted single-task wrap build (num_workers=0)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    build_shards(_settings(corpus, tokdir, out), progress=False)
    return out


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/shard-*.tar"))}


def _samples(out: Path, name: str) -> list[tuple[str, np.ndarray]]:
    with tarfile.open(out / name) as tar:
        return [(m.name, np.load(io.BytesIO(tar.extractfile(m).read()))) for m in tar]


def _expected(corpus: Path, tok: Tokenizer, val_fraction: float = 0.1, keys: bool = False):
    """bos + ids + eos of every document per split, in input order (independent of shards.py);
    with ``keys`` also the split's set of (relative path, document index)."""
    docs: dict[str, list[list[int]]] = {"train": [], "val": []}
    ids: dict[str, set] = {"train": set(), "val": set()}
    for path in expand_inputs([str(corpus)]):
        rel = path.resolve().relative_to(corpus.resolve()).as_posix()
        for doc in iter_documents(path, skips=SkipLog()):
            score = int.from_bytes(hashlib.sha256(f"{rel}\n{doc.index}".encode()).digest()[:8], "big") / 2**64
            split = "val" if score < val_fraction else "train"
            docs[split].append([tok.bos_id, *tok.encode(doc.text), tok.eos_id])
            ids[split].add((rel, doc.index))
    return (docs, ids) if keys else docs


def _no_temp_files(out: Path) -> list[str]:
    return [p.as_posix() for p in out.rglob("*.tmp")]


# ------------------------------------------------------------------ determinism + counting


@pytest.mark.parametrize("workers", [1, 2])
def test_any_worker_count_gives_byte_identical_shards(corpus, tokdir, reference, tmp_path, workers):
    manifest = build_shards(_settings(corpus, tokdir, tmp_path / "out", num_workers=workers, chunk_docs=7),
                            progress=False)
    ref = json.loads((reference / "manifest.json").read_text())
    assert manifest["fingerprint"] == ref["fingerprint"]
    assert (tmp_path / "out" / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(reference)
    assert len(_shard_bytes(reference)) > 5


def test_wrap_mode_holds_exactly_the_input_stream(corpus, tok, reference):
    manifest = json.loads((reference / "manifest.json").read_text())
    expected = _expected(corpus, tok)
    assert manifest["documents"] == {s: len(v) for s, v in expected.items()}
    assert manifest["documents"]["val"] > 0
    assert manifest["skipped"]["bad_json"] == 1 and manifest["skipped"]["missing_field"] == 1
    assert manifest["dtype"] == "uint16" and manifest["mode"] == "wrap"
    for split, docs in expected.items():
        stream = np.concatenate([np.array(d) for d in docs])
        table = manifest["splits"][split]
        got = [a for shard in table["shards"] for _, a in _samples(reference, shard["name"])]
        assert all(a.dtype == np.uint16 and a.shape == (SEQ_LEN,) for a in got)
        flat = np.concatenate(got)
        # every document once, in order; only the last partial sequence is dropped, and counted
        assert np.array_equal(flat, stream[: len(flat)])
        assert len(stream) - len(flat) == table["dropped_tokens"] < SEQ_LEN
        assert table["tokens"] == len(flat) == table["samples"] * SEQ_LEN
        assert table["tokens"] + table["dropped_tokens"] == sum(len(d) for d in docs)
        keys = [n for shard in table["shards"] for n, _ in _samples(reference, shard["name"])]
        assert keys == [f"p00000-{i:010d}.tokens.npy" for i in range(len(keys))]
    assert [s["path"] for s in manifest["sources"]] == ["a.txt", "c.txt.gz", "d.jsonl.zst", "sub/b.jsonl"]
    assert verify(reference) == []


def test_pad_mode_one_document_per_sample(corpus, tokdir, tok, tmp_path):
    manifest = build_shards(_settings(corpus, tokdir, tmp_path / "out", mode="pad"), progress=False)
    for split, docs in _expected(corpus, tok).items():
        table = manifest["splits"][split]
        got = [a for shard in table["shards"] for _, a in _samples(tmp_path / "out", shard["name"])]
        assert len(got) == table["samples"] == len(docs) == manifest["documents"][split]
        for a, d in zip(got, docs):
            n = min(len(d), SEQ_LEN)
            assert a[:n].tolist() == d[:n] and (a[n:] == tok.pad_id).all()
        assert table["tokens"] == sum(min(len(d), SEQ_LEN) for d in docs)
        assert table["tokens"] + table["dropped_tokens"] == sum(len(d) for d in docs)
    assert any(len(d) > SEQ_LEN for d in _expected(corpus, tok)["train"])  # truncation was exercised
    assert verify(tmp_path / "out") == []


def test_dtype_rule():
    assert fmt.dtype_for(300) == "uint16" and fmt.dtype_for(65536) == "uint16"
    assert fmt.dtype_for(65537) == "int32"


def test_val_split_is_a_stable_function_of_path_and_index(corpus, tokdir, tok, tmp_path):
    assert shards.val_score("a.txt", 0) == shards.val_score("a.txt", 0)
    picked = [i for i in range(2000) if shards.is_val_document("a.txt", i, 0.1)]
    assert 140 < len(picked) < 260  # ~10 %
    # adding a file next to the others changes no existing document's split
    more = tmp_path / "corpus"
    shutil.copytree(corpus, more)
    (more / "e.txt").write_text("\n\n".join(_doc(random.Random(9)) for _ in range(40)) + "\n")
    keys = {}
    for name, folder in (("a", corpus), ("b", more)):
        manifest = build_shards(_settings(folder, tokdir, tmp_path / name, mode="pad"), progress=False)
        expected, keys[name] = _expected(folder, tok, keys=True)
        for split in fmt.SPLITS:  # pad mode: the samples are exactly the split's documents, in order
            got = [a for s in manifest["splits"][split]["shards"] for _, a in _samples(tmp_path / name, s["name"])]
            assert [a[a != tok.pad_id].tolist() for a in got] == [d[:SEQ_LEN] for d in expected[split]]
    assert keys["a"]["val"] <= keys["b"]["val"] and keys["a"]["train"] <= keys["b"]["train"]
    assert not keys["b"]["val"] & keys["b"]["train"]
    assert any(k[0] == "e.txt" for k in keys["b"]["val"])


# ------------------------------------------------------------------ resume


_KILLED_RUN = """
import sys, time
from data_prep import shards
real = shards._encode_chunk
def slow(texts):
    time.sleep(0.03)  # slow enough that the kill lands mid-run
    return real(texts)
shards._encode_chunk = slow
s = shards.ShardSettings(inputs=[sys.argv[1]], tokenizer_dir=sys.argv[2], out_dir=sys.argv[3], seq_len=32,
                         shard_bytes=12000, val_fraction=0.1, num_workers=0, chunk_docs=4)
shards.build_shards(s, progress=False)
"""


def test_kill_9_then_rerun_gives_the_uninterrupted_result(corpus, tokdir, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(corpus), str(tokdir), str(out)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE)
    state = out / ".parts" / "part-00000" / "state.json"
    deadline = time.monotonic() + 30
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # somewhere inside the second shard
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert state.exists() and not (out / "manifest.json").exists()
    checkpoint = json.loads(state.read_text())
    done_before = sum(len(v["shards"]) for v in checkpoint["splits"].values())
    assert done_before >= 1
    orphans = list(out.glob("*/.shard-*.tar.tmp"))  # the shard being written when killed (if any)

    encoded = []
    real = shards._encode_chunk
    monkeypatch.setattr(shards, "_encode_chunk", lambda texts: (encoded.extend(texts), real(texts))[1])
    build_shards(_settings(corpus, tokdir, out), progress=False)
    assert _shard_bytes(out) == _shard_bytes(reference)
    assert (out / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    assert _no_temp_files(out) == [] and not state.exists()
    assert not any(p.exists() for p in orphans)
    total = sum(json.loads((reference / "manifest.json").read_text())["documents"].values())
    assert len(encoded) < total  # finished shards' documents were skipped, not tokenized again


# Kills itself (SIGKILL: no cleanup, no flush) at a deterministic point of the run.
_KILLED_WITH_A_SPLIT_OPEN = """
import os, signal, sys
from data_prep import manifest as mf, shard_writer, shards
corpus, tokdir, out, mode, open_split = sys.argv[1:]
writers, last = {}, {}  # split -> its SplitWriter; split -> (file, document) it was last given
real_init, real_add, real_write = shard_writer.SplitWriter.__init__, shard_writer.SplitWriter.add, mf.write_json
def init(self, split, *args, **kw):
    real_init(self, split, *args, **kw)
    writers[split] = self
def add(self, fi, n, ids):
    real_add(self, fi, n, ids)
    last[self.split] = (fi, n)
def write_json(path, obj, root):
    real_write(path, obj, root)
    w = writers.get(open_split)
    # a checkpoint written by the other split's finished shard while this split has a finished
    # shard, an open one, and a document counted since its last shard boundary (one whose first
    # token lies at or after `start`, i.e. (file, document, 0) >= start)
    if path.name == mf.STATE and w is not None and w.shards and w.open is not None \\
            and (*last.get(open_split, (-1, -1)), 0) >= tuple(w.start):
        os.kill(os.getpid(), signal.SIGKILL)
shard_writer.SplitWriter.__init__, shard_writer.SplitWriter.add, mf.write_json = init, add, write_json
s = shards.ShardSettings(inputs=[corpus], tokenizer_dir=tokdir, out_dir=out, seq_len=32, shard_bytes=12000,
                         val_fraction=0.3, mode=mode, num_workers=0, chunk_docs=4)
shards.build_shards(s, progress=False)
"""


@pytest.mark.parametrize("mode, open_split", [("wrap", "val"), ("pad", "train")])
def test_kill_9_while_the_other_split_has_an_open_shard(corpus, tokdir, tmp_path, mode, open_split):
    """The checkpoint written when one split finishes a shard holds the other split's counters as
    of that split's own last shard boundary, so its open shard's documents are not counted twice."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WITH_A_SPLIT_OPEN, str(corpus), str(tokdir), str(out),
                           mode, open_split], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          stderr=subprocess.PIPE, timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (out / "manifest.json").exists()
    assert list(out.glob(f"{open_split}/.shard-*.tar.tmp"))  # killed with that split's shard open

    build_shards(_settings(corpus, tokdir, out, mode=mode, val_fraction=0.3), progress=False)
    ref = tmp_path / "ref"
    build_shards(_settings(corpus, tokdir, ref, mode=mode, val_fraction=0.3), progress=False)
    got, want = (json.loads((d / "manifest.json").read_text()) for d in (out, ref))
    assert got["documents"] == want["documents"]
    assert {s: t["dropped_tokens"] for s, t in got["splits"].items()} == \
        {s: t["dropped_tokens"] for s, t in want["splits"].items()}
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    assert _shard_bytes(out) == _shard_bytes(ref)


def test_resume_from_a_checkpoint_inside_a_document(corpus, tokdir, reference, tmp_path, monkeypatch):
    """Stop right after each of several shards (pad and wrap positions mid-document included)."""
    out = tmp_path / "out"
    stop_after = iter([1, 3, 4, 6])
    target = next(stop_after)
    count = 0
    real_write = mf.write_json

    class Stop(Exception):
        pass

    def write_then_maybe_stop(path, obj, root):
        nonlocal count, target
        real_write(path, obj, root)
        if path.name == "state.json":
            count += 1
            if count == target:
                target = next(stop_after, -1)
                raise Stop

    monkeypatch.setattr(mf, "write_json", write_then_maybe_stop)
    positions = []
    for _ in range(5):
        try:
            build_shards(_settings(corpus, tokdir, out, seq_len=SEQ_LEN), progress=False)
            break
        except Stop:
            st = json.loads((out / ".parts/part-00000/state.json").read_text())
            positions += [v["start"] for v in st["splits"].values()]
    assert any(p[2] > 0 for p in positions)  # some checkpoint fell inside a document
    assert _shard_bytes(out) == _shard_bytes(reference)
    assert (out / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()


# ------------------------------------------------------------------ partitions


def test_partitions_build_separately_and_merge(corpus, tokdir, tok, reference, tmp_path):
    out = tmp_path / "out"
    part0 = build_shards(_settings(corpus, tokdir, out, num_tasks=2, task_index=0), progress=False)
    assert part0["partition"] == 0 and not (out / "manifest.json").exists()
    with pytest.raises(ProsecoError, match=r"partition\(s\) 1 of 2 are not finished"):
        merge(out)
    done0 = out / ".parts/part-00000/DONE.json"
    stamps = {p: p.stat().st_mtime_ns for p in [done0, *out.glob("*/shard-00000-*.tar")]}
    time.sleep(0.01)
    build_shards(_settings(corpus, tokdir, out, num_tasks=2, task_index=0), progress=False)  # skipped
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    build_shards(_settings(corpus, tokdir, out, num_tasks=2, task_index=1, num_workers=1), progress=False)
    manifest = merge(out)
    ref = json.loads((reference / "manifest.json").read_text())
    assert manifest["documents"] == ref["documents"]
    assert manifest["sources"] == ref["sources"] and manifest["skipped"] == ref["skipped"]
    for split in fmt.SPLITS:  # each partition drops its own wrap tail; all tokens are accounted for
        got, want = manifest["splits"][split], ref["splits"][split]
        assert got["tokens"] + got["dropped_tokens"] == want["tokens"] + want["dropped_tokens"]
        names = [s["name"] for s in got["shards"]]
        assert names == sorted(names) and {n.split("-")[1] for n in names} == {"00000", "00001"}
    assert verify(out) == []
    assert merge(out) == manifest  # idempotent
    (out / "manifest.json").unlink()
    done1 = out / ".parts/part-00001/DONE.json"
    done1.write_text(json.dumps({**json.loads(done1.read_text()), "run_key": "0" * 64}))
    with pytest.raises(ProsecoError, match=r"partition\(s\) 1 were built with other settings"):
        merge(out)


def test_an_empty_partition_is_fine_but_a_run_without_train_samples_is_refused(tokdir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("")  # partition 0 of 2: no document
    (corpus / "b.txt").write_text("the white whale\n")  # partition 1: one document, < SEQ_LEN tokens
    out = tmp_path / "out"
    for i in range(2):
        done = build_shards(_settings(corpus, tokdir, out, num_tasks=2, task_index=i, val_fraction=0.0),
                            progress=False)
    assert done["splits"]["train"]["documents"] == 1 and done["splits"]["train"]["shards"] == []
    with pytest.raises(ProsecoError, match=r"train split has no sample: its 1 document\(s\) hold \d+ tokens "
                                           r"with bos/eos, fewer than seq_len 32 per partition"):
        merge(out)
    assert not (out / "manifest.json").exists()
    assert shards.val_score("b.txt", 0) < 0.9
    with pytest.raises(ProsecoError, match=r"all 1 document\(s\) went to val \(val_fraction 0.9\)"):
        build_shards(_settings(corpus, tokdir, tmp_path / "val", mode="pad", val_fraction=0.9), progress=False)
    assert not (tmp_path / "val" / "manifest.json").exists()
    manifest = build_shards(_settings(corpus, tokdir, tmp_path / "pad", mode="pad", val_fraction=0.0),
                            progress=False)  # pad mode: the short document is a sample; no val is fine
    assert manifest["splits"]["train"]["samples"] == 1 and manifest["skipped"]["empty_file"] == 1
    assert verify(tmp_path / "pad") == []


def test_partitions_with_different_settings_are_not_merged(corpus, tokdir, tmp_path):
    out = tmp_path / "out"
    build_shards(_settings(corpus, tokdir, out, num_tasks=2, task_index=0), progress=False)
    with pytest.raises(ProsecoError, match="different run"):
        build_shards(_settings(corpus, tokdir, out, num_tasks=2, task_index=1, seq_len=16), progress=False)


# ------------------------------------------------------------------ verify


def test_verify_finds_a_flipped_byte_and_a_wrong_count(reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    shard = sorted(out.glob("train/shard-*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[600] ^= 0x01  # inside the first sample's npy payload
    shard.write_bytes(bytes(data))
    problems = verify(out)
    assert any("sha256" in p and shard.name in p for p in problems), problems

    shutil.rmtree(out)
    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["tokens"] += 1
    manifest["splits"]["val"]["tokens"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = verify(out)
    assert any("fingerprint" in p for p in problems)
    manifest["fingerprint"] = fmt.manifest_fingerprint(manifest)  # a consistent-looking but wrong manifest
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = verify(out)
    assert len(problems) == 1 and "manifest says" in problems[0], problems
    text, ok = verify_report(out)
    assert not ok and "FAILED" in text
    text, ok = verify_report(reference)
    assert ok and "OK" in text


# ------------------------------------------------------------------ failures


@pytest.mark.parametrize("code, message", [(errno.ENOSPC, "disk full while writing"),
                                           (errno.EROFS, "is read-only")])
def test_disk_errors_mid_shard_leave_nothing_corrupt(corpus, tokdir, reference, tmp_path, monkeypatch,
                                                     code, message):
    out = tmp_path / "out"
    real = mf.file_write
    calls = 0

    def failing(f, data):
        nonlocal calls
        calls += 1
        if calls == 40:  # a few shards in, inside a tar
            raise OSError(code, os.strerror(code))
        real(f, data)

    monkeypatch.setattr(mf, "file_write", failing)
    with pytest.raises(ProsecoError, match=message) as info:
        build_shards(_settings(corpus, tokdir, out), progress=False)
    assert "shard-" in str(info.value)  # names the file it was writing
    assert not (out / "manifest.json").exists()
    assert _no_temp_files(out) == []
    assert verify_shards_listed_in_checkpoint(out)
    monkeypatch.setattr(mf, "file_write", real)  # space freed: the rerun resumes and completes
    build_shards(_settings(corpus, tokdir, out), progress=False)
    assert _shard_bytes(out) == _shard_bytes(reference)


def verify_shards_listed_in_checkpoint(out: Path) -> bool:
    """Every shard on disk is finished and recorded with its sha256 in the checkpoint."""
    state = json.loads((out / ".parts/part-00000/state.json").read_text())
    recorded = {s["name"]: s["sha256"] for v in state["splits"].values() for s in v["shards"]}
    on_disk = {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in out.glob("*/shard-*.tar")}
    return on_disk == recorded


def test_folder_of_another_run_is_refused(corpus, tokdir, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    assert build_shards(_settings(corpus, tokdir, out), progress=False)["fingerprint"] == \
        json.loads((reference / "manifest.json").read_text())["fingerprint"]  # same run: nothing to do
    with pytest.raises(ProsecoError, match="different run.*new output folder"):
        build_shards(_settings(corpus, tokdir, out, mode="pad"), progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ProsecoError, match="not shard output"):
        build_shards(_settings(corpus, tokdir, other), progress=False)
    # a sibling array task's write in flight (pipeline.io's unique temporary name) is not foreign:
    # `launch prep` task 1 once refused the folder while task 0 was copying the tokenizer into it
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / ".tokenizer.model.tmp-l7_14_q_").write_bytes(b"half")
    assert build_shards(_settings(corpus, tokdir, busy), progress=False)["fingerprint"] == \
        json.loads((reference / "manifest.json").read_text())["fingerprint"]


def test_bad_settings_are_one_clear_error(corpus, tokdir, tmp_path):
    with pytest.raises(ProsecoError, match="mode must be one of wrap, pad.*seq_len must be"):
        build_shards(_settings(corpus, tokdir, tmp_path, mode="cut", seq_len=1), progress=False)
    with pytest.raises(ProsecoError, match="task_index must be in 0..1"):
        build_shards(_settings(corpus, tokdir, tmp_path, num_tasks=2, task_index=2), progress=False)
    with pytest.raises(ProsecoError, match="does not exist"):
        build_shards(_settings(tmp_path / "nope", tokdir, tmp_path / "o"), progress=False)
