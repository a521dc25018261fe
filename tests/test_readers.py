"""Corpus readers: formats, compression, document splits, and every bad input from issue 3."""

from __future__ import annotations

import gzip
import json
import os
import time
import tracemalloc

import pytest

from data_prep.readers import (
    DEFAULT_CORPUS,
    DEFAULT_INPUTS,
    Document,
    SkipLog,
    expand_inputs,
    iter_documents,
)
from pipeline.errors import ProsecoError


def read(path, **kw):
    skips = SkipLog()
    docs = list(iter_documents(path, skips=skips, **kw))
    return docs, skips


def texts(docs):
    return [d.text for d in docs]


# ------------------------------------------------------------------ formats and splits


def test_doc_split_modes(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one\ntwo\n\n\nthree\n   \nfour\r\nfive\n")
    assert texts(read(p, doc_split="line")[0]) == ["one", "two", "three", "four", "five"]
    assert texts(read(p, doc_split="paragraph")[0]) == ["one\ntwo", "three", "four\nfive"]
    assert texts(read(p, doc_split="file")[0]) == ["one\ntwo\n\n\nthree\n   \nfour\nfive"]
    docs, skips = read(p)
    assert [d.index for d in docs] == [0, 1, 2] and {d.source for d in docs} == {str(p)}
    assert skips.total == 0 and docs[0] == Document(str(p), 0, "one\ntwo")


def test_jsonl_and_field(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "héllo"}\n\n{"body": "x", "text": "world"}\n')
    assert texts(read(p)[0]) == ["héllo", "world"]
    q = tmp_path / "b.json"
    q.write_text('{"body": "b1"}\n{"body": "b2"}\n')
    assert texts(read(q, text_field="body")[0]) == ["b1", "b2"]


def test_gzip_round_trip(tmp_path):
    body = "alpha beta\n\ngamma\n"
    p = tmp_path / "a.txt.gz"
    p.write_bytes(gzip.compress(body.encode()))
    plain = tmp_path / "a.txt"
    plain.write_text(body)
    assert texts(read(p)[0]) == texts(read(plain)[0]) == ["alpha beta", "gamma"]
    j = tmp_path / "b.jsonl.gz"
    j.write_bytes(gzip.compress(b'{"text": "z"}\n'))
    assert texts(read(j)[0]) == ["z"]


def test_zstd_round_trip(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    body = "".join(f"line {i}\n\n" for i in range(3000))
    p = tmp_path / "a.txt.zst"
    # two frames: the reader must continue across frames
    cctx = zstandard.ZstdCompressor()
    half = len(body) // 2
    half = body.index("\n\n", half) + 2
    p.write_bytes(cctx.compress(body[:half].encode()) + cctx.compress(body[half:].encode()))
    assert texts(read(p)[0]) == [f"line {i}" for i in range(3000)]
    j = tmp_path / "b.jsonl.zst"
    j.write_bytes(cctx.compress(b'{"text": "z"}\n{"text": "y"}\n'))
    assert texts(read(j)[0]) == ["z", "y"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "a.parquet"
    table = pa.table({"id": list(range(5)), "text": ["a", None, "  ", "d", "e"]})
    pq.write_table(table, p, row_group_size=2)
    docs, skips = read(p)
    assert texts(docs) == ["a", "d", "e"] and [d.index for d in docs] == [0, 1, 2]
    assert skips.counts["missing_field"] == 1 and skips.counts["empty_document"] == 1


def test_determinism_and_corpus_iteration(tmp_path):
    (tmp_path / "b.txt").write_text("b1\n\nb2\n")
    (tmp_path / "a.jsonl").write_text('{"text": "a1"}\n')
    runs = []
    for _ in range(2):
        skips = SkipLog()
        runs.append([d for path in expand_inputs([str(tmp_path)]) for d in iter_documents(path, skips=skips)])
    assert runs[0] == runs[1]
    assert [(os.path.basename(d.source), d.text) for d in runs[0]] == [("a.jsonl", "a1"), ("b.txt", "b1"),
                                                                      ("b.txt", "b2")]


# ------------------------------------------------------------------ input expansion


def test_globs_folders_ordering_dedup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ["d/z.txt", "d/sub/a.txt", "d/.hidden.txt", "d/.git/x.txt", "d/notes.bin", "c.jsonl", "b.txt.gz"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x\n")
    got = expand_inputs(["d", "*.txt.gz", "c.jsonl", "./c.jsonl", "d/z.txt"])
    assert [p.as_posix() for p in got] == ["b.txt.gz", "c.jsonl", "d/sub/a.txt", "d/z.txt"]
    assert expand_inputs(["d/**/*.txt"]) == expand_inputs(["d/sub/a.txt", "d/z.txt"])


def test_missing_path_and_empty_glob(tmp_path):
    (tmp_path / "ok.txt").write_text("x\n")
    with pytest.raises(ProsecoError) as err:
        expand_inputs([str(tmp_path / "ok.txt"), str(tmp_path / "nope.txt"), str(tmp_path / "*.jsonl")])
    msg = str(err.value)
    assert "nope.txt does not exist" in msg and "*.jsonl matches no files" in msg
    with pytest.raises(ProsecoError, match="format"):
        (tmp_path / "data.csv").write_text("x")
        expand_inputs([str(tmp_path / "data.csv")])


def test_default_corpus():
    files = expand_inputs(DEFAULT_INPUTS)
    assert len(files) >= 2 and all(p.parent == DEFAULT_CORPUS for p in files)
    assert all(p.stat().st_size < 2_000_000 for p in files)
    docs, skips = read(files[0])
    assert len(docs) > 100 and skips.total == 0


# ------------------------------------------------------------------ bad inputs


def test_non_utf8_mixed_file(tmp_path):
    p = tmp_path / "mixed.txt"
    p.write_bytes(b"good one\nbad \xff\xfe line\ngood two\n")
    docs, skips = read(p, doc_split="line")
    assert texts(docs) == ["good one", "good two"]
    assert skips.counts["not_utf8"] == 1 and skips.examples[0]["where"] == 2
    j = tmp_path / "mixed.jsonl"
    j.write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n{"text": "ok2"}\n')
    docs, skips = read(j)
    assert texts(docs) == ["ok", "ok2"] and skips.counts["not_utf8"] == 1


def test_binary_file(tmp_path):
    p = tmp_path / "blob.txt"
    p.write_bytes(b"looks like text\n" + bytes(range(256)) * 4)
    docs, skips = read(p)
    assert docs == [] and skips.counts["binary_file"] == 1 and skips.total == 1
    g = tmp_path / "blob.txt.gz"
    g.write_bytes(gzip.compress(b"\0\0\0abc\n"))  # detected after decompression
    assert read(g)[1].counts["binary_file"] == 1


def test_empty_file(tmp_path):
    for name, data in [("e.txt", b""), ("e.jsonl", b""), ("e.txt.gz", gzip.compress(b""))]:
        (tmp_path / name).write_bytes(data)
        docs, skips = read(tmp_path / name)
        assert docs == [] and skips.counts["empty_file"] == 1, name


def test_empty_documents(tmp_path):
    p = tmp_path / "w.jsonl"
    p.write_text('{"text": ""}\n{"text": "  \\n "}\n{"text": "x"}\n')
    docs, skips = read(p)
    assert texts(docs) == ["x"] and skips.counts["empty_document"] == 2
    f = tmp_path / "w.txt"
    f.write_text("   \n\n \n")
    assert read(f, doc_split="file")[1].counts["empty_document"] == 1


def test_hundred_mb_line_is_skipped_with_bounded_memory(tmp_path):
    p = tmp_path / "huge.txt"
    chunk = b"a" * (1 << 20)
    with open(p, "wb") as f:
        f.write(b"before\n\n")
        f.writelines(chunk for _ in range(100))
        f.write(b"\n\nafter\n")
    start = time.perf_counter()
    tracemalloc.start()
    try:
        docs, skips = read(p)  # default max_chars 1e6 -> lines are read 4 MB at most at a time
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * (1 << 20), f"peak {peak / 2**20:.0f} MiB: the long line was held in memory"
    assert texts(docs) == ["before", "after"]
    assert skips.counts["too_long"] == 1 and skips.examples[0]["where"] == 3
    assert time.perf_counter() - start < 10
    docs, skips = read(p, doc_split="line", max_chars=1000)
    assert texts(docs) == ["before", "after"] and skips.counts["too_long"] == 1


def test_too_long_paragraph_and_jsonl(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("short\n\n" + "x" * 60 + "\n" + "y" * 60 + "\n\nend\n")
    docs, skips = read(p, max_chars=100)
    assert texts(docs) == ["short", "end"] and skips.counts["too_long"] == 1
    j = tmp_path / "j.jsonl"
    j.write_text(json.dumps({"text": "z" * 200}) + "\n" + '{"text": "ok"}\n')
    docs, skips = read(j, max_chars=100)
    assert texts(docs) == ["ok"] and skips.counts["too_long"] == 1


def test_jsonl_not_json(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a"}\n{not json\n[1, 2]\n"just a string"\n{"text": "b"}\n')
    docs, skips = read(p)
    assert texts(docs) == ["a", "b"] and skips.counts["bad_json"] == 3
    assert [e["where"] for e in skips.examples] == [2, 3, 4]


def test_jsonl_missing_field(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"body": "a"}\n{"text": 5}\n{"text": null}\n{"text": "c"}\n')
    docs, skips = read(p)
    assert texts(docs) == ["c"] and skips.counts["missing_field"] == 3


def test_parquet_without_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"body": ["a"], "id": [1]}), p)
    with pytest.raises(ProsecoError) as err:
        read(p)
    msg = str(err.value)
    assert "nocol.parquet" in msg and "'text'" in msg and "body, id" in msg


def test_corrupt_compressed_streams(tmp_path):
    data = gzip.compress(b"hello world\n" * 10000)
    p = tmp_path / "bad.txt.gz"
    p.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ProsecoError, match="bad.txt.gz"):
        read(p)
    q = tmp_path / "garbage.txt.gz"
    q.write_bytes(b"this is not gzip at all")
    with pytest.raises(ProsecoError, match="garbage.txt.gz"):
        read(q)
    pytest.importorskip("zstandard")
    z = tmp_path / "garbage.txt.zst"
    z.write_bytes(b"not zstd either, definitely")
    with pytest.raises(ProsecoError, match="garbage.txt.zst"):
        read(z)


def test_skiplog_merge_and_dict():
    a, b = SkipLog(max_examples=2), SkipLog()
    a.add("bad_json", "x", 1)
    b.add("bad_json", "y", 2)
    b.add("too_long", "y", 3)
    a.merge(b)
    assert a.total == 3 and a.as_dict()["bad_json"] == 2 and a.as_dict()["too_long"] == 1
    assert len(a.examples) == 2 and set(a.as_dict()) >= {"not_utf8", "empty_file"}
    with pytest.raises(ValueError):
        a.add("nonsense", "x")
