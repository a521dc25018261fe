"""Throughput of the lm-eval adapter's ``generate_until``: tokens/s and NFE per token of the confidence
sampler with and without the corrector, at batch size 1 and 16, on an untrained model.

    python benchmarks/bench_lmeval.py [--device cpu|cuda] [--hidden 64 --layers 2 --heads 2]
                                      [--gen-length 64] [--requests 32] [--pad-to 32]

A random DiT of the given size is exported with a small sentencepiece tokenizer (trained here on
tests/data/gsm8k_sample.jsonl) and loaded back through :func:`pipeline.artifact.load_model`;
``--requests`` GSM8K-style prompts (the sample's questions, numbered, so their lengths differ) go
through :meth:`ProsecoLM.generate_until` directly (lm-eval's task machinery is not timed). Settings:
confidence sampler, ``steps = gen_length``, block 32, temperature 0, and the corrector at omega = 4,
S = 2. Per setting it prints wall seconds, generated tokens/s (up to EOS), positions/s
(``gen_length`` per request), NFE per token and per request, and whether batch 16 reproduced
batch 1's texts exactly. An untrained model decodes noise, so only the speed and NFE are meaningful.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(folder: Path, args) -> Path:
    from data_prep.tokenizer import Tokenizer, train_tokenizer
    from pipeline.artifact import write_export
    from pipeline.config import load_config
    from pipeline.model import Backbone

    rows = [json.loads(line) for line in (ROOT / "tests" / "data" / "gsm8k_sample.jsonl").read_text().splitlines()]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"text": f"Question: {r['question']}\nAnswer: "
                                                                      f"{r['answer']}"}) + "\n" for r in rows))
    train_tokenizer([str(folder / "corpus.jsonl")], folder / "tok", vocab_size=400, num_threads=1)
    tok = Tokenizer.load(folder / "tok")
    cfg = load_config(str(ROOT / "configs" / "text.yaml"), [
        f"model.hidden={args.hidden}", f"model.layers={args.layers}", f"model.heads={args.heads}",
        f"model.max_seq_len={args.max_seq_len}", f"data.seq_len={args.max_seq_len}"])
    torch.manual_seed(0)
    state = Backbone(cfg.model, vocab_size=tok.vocab_size).state_dict()
    return write_export(folder / "model", {"raw": state}, cfg, tok.vocab_size, tok.mask_id,
                        tokenizer_dir=folder / "tok", data={"tokenizer_sha256": tok.sidecar["sha256"]})


def requests(n: int) -> list:
    from lm_eval.api.instance import Instance

    rows = [json.loads(line) for line in (ROOT / "tests" / "data" / "gsm8k_sample.jsonl").read_text().splitlines()]
    out = []
    for i in range(n):
        q = rows[i % len(rows)]["question"] + " (problem " + str(i) * (1 + i % 3) + ")"
        out.append(Instance("generate_until", {}, (f"Question: {q}\nAnswer:", {"until": ["Question:"]}), 0,
                            ("bench", i, 1)))
    return out


def run(model: Path, reqs, batch: int, corrector: bool, args) -> tuple[dict, list[str]]:
    from pipeline.lmeval.adapter import ProsecoLM

    extra = {"corrector_steps": 2, "corrector_every": 4} if corrector else {"corrector_steps": 0}
    lm = ProsecoLM(path=str(model), batch_size=batch, device=args.device, gen_length=args.gen_length,
                   block_length=32, pad_to=args.pad_to, **extra)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    texts = lm.generate_until(reqs)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tot = lm.totals()["generate_until"]
    return {"wall_s": wall, "tokens_per_s": tot["tokens"] / wall, "positions_per_s": len(reqs) * args.gen_length / wall,
            "nfe_per_token": tot["nfe"] / max(tot["tokens"], 1), "nfe_per_request": tot["nfe"] / len(reqs),
            "corrector_nfe_per_request": tot["nfe_corrector"] / len(reqs)}, texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--pad-to", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp), args)
        reqs = requests(args.requests)
        print(f"model hidden {args.hidden} x {args.layers} layers, max_seq_len {args.max_seq_len}, device "
              f"{args.device}; {args.requests} requests, gen_length {args.gen_length}, block 32, steps = gen_length, "
              f"pad_to {args.pad_to}")
        print(f"{'setting':<28}{'batch':>6}{'wall s':>9}{'tok/s':>10}{'pos/s':>10}{'NFE/tok':>9}{'NFE/req':>9}"
              f"{'corr NFE/req':>14}  same as batch 1")
        for corrector in (False, True):
            name = "confidence + corrector w=4 S=2" if corrector else "confidence (no corrector)"
            ref = None
            for batch in (1, 16):
                m, texts = run(model, reqs, batch, corrector, args)
                same = "-" if ref is None else str(texts == ref)
                ref = texts if ref is None else ref
                print(f"{name:<28}{batch:>6}{m['wall_s']:>9.2f}{m['tokens_per_s']:>10.1f}{m['positions_per_s']:>10.1f}"
                      f"{m['nfe_per_token']:>9.3f}{m['nfe_per_request']:>9.1f}{m['corrector_nfe_per_request']:>14.1f}"
                      f"  {same}")


if __name__ == "__main__":
    main()
