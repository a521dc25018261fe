"""Benchmark `prep shards` throughput against raw sentencepiece encoding.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_prep.py [--repeat 1] [--workers 1 2]

Trains a BPE tokenizer (vocab 8192) on the bundled corpus (``data_prep.readers.DEFAULT_CORPUS``),
then measures, on the same documents:

* **raw**: ``SentencePieceProcessor.encode`` of every document in this one process (ids only;
  no reading, no packing): the ceiling one core can reach;
* **prep**: ``build_shards`` end to end (read + tokenize in N worker processes + pack + write
  tar shards + manifest) with N = 1 and 2 workers, wall clock, worker start-up included.

It prints tokens/s, tokens/s per worker divided by raw (goal >= 0.8) and the 1 -> 2 worker
speed-up. ``--repeat K`` feeds K copies of the corpus (a longer run amortises the ~0.3 s of
worker start-up). On a machine whose other cores are busy the 2-worker numbers say little:
the main process also needs CPU (reading, packing, writing), so 2 workers + main want 3 cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from data_prep.readers import DEFAULT_CORPUS, SkipLog, expand_inputs, iter_documents
from data_prep.shards import ShardSettings, build_shards
from data_prep.tokenizer import train_tokenizer


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1, help="copies of the corpus to feed (default 1)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--chunk-docs", type=int, default=256)
    args = parser.parse_args()

    import sentencepiece as spm

    work = Path(tempfile.mkdtemp(prefix="bench_prep-"))
    try:
        corpus = work / "corpus"
        corpus.mkdir()
        for k in range(args.repeat):
            for path in sorted(DEFAULT_CORPUS.glob("*.txt.gz")):
                shutil.copy(path, corpus / f"{k:02d}-{path.name}")
        t = time.perf_counter()
        train_tokenizer([str(DEFAULT_CORPUS / "*.txt.gz")], work / "tok", vocab_size=args.vocab, num_threads=1)
        print(f"tokenizer: BPE vocab {args.vocab} trained in {time.perf_counter() - t:.1f} s")

        texts = [doc.text for path in expand_inputs([str(corpus)])
                 for doc in iter_documents(path, skips=SkipLog())]
        sp = spm.SentencePieceProcessor(model_file=str(work / "tok" / "tokenizer.model"))
        t = time.perf_counter()
        ids = [sp.encode(text, out_type=int) for text in texts]
        raw_s = time.perf_counter() - t
        tokens = sum(len(x) for x in ids)
        raw = tokens / raw_s
        mb = sum(len(x.encode()) for x in texts) / 1e6
        print(f"corpus: {len(texts)} documents, {mb:.1f} MB, {tokens:,} tokens (x{args.repeat} bundled corpus)")
        print(f"raw sentencepiece encode, 1 process: {raw:,.0f} tokens/s ({raw_s:.2f} s)")

        t = time.perf_counter()
        import webdataset  # noqa: F401 - once per process (it imports torch); paid by any prep run

        print(f"import webdataset (+torch), once per prep process: {time.perf_counter() - t:.2f} s "
              "(excluded below)")
        rates = {}
        for n in args.workers:
            out = work / f"out-{n}"
            settings = ShardSettings(inputs=[str(corpus)], tokenizer_dir=str(work / "tok"), out_dir=str(out),
                                     seq_len=args.seq_len, shard_bytes=4 * 2**20, num_workers=n,
                                     chunk_docs=args.chunk_docs)
            cpu, t = _cpu(), time.perf_counter()
            manifest = build_shards(settings, progress=False)
            wall, cpu = time.perf_counter() - t, _cpu() - cpu
            fed = sum(t["tokens"] + t["dropped_tokens"] for t in manifest["splits"].values())
            fed -= 2 * sum(manifest["documents"].values())  # bos/eos are not tokenizer output
            assert fed == tokens, (fed, tokens)
            rates[n] = fed / wall
            per_core = rates[n] / max(n, 1)
            print(f"prep shards, {n} worker(s): {rates[n]:,.0f} tokens/s ({wall:.2f} s wall, {cpu:.2f} s CPU "
                  f"all processes); per worker / raw = {per_core / raw:.2f} (goal >= 0.8); "
                  f"per CPU-second / raw = {fed / cpu / raw:.2f}")
        if 1 in rates and 2 in rates:
            print(f"speed-up 1 -> 2 workers: {rates[2] / rates[1]:.2f}x (machine has {os.cpu_count()} cores)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
