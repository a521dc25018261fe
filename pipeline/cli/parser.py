"""The argparse tree of ``proseco``: one sub-parser per verb, with its help text and examples."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import pipeline

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs"

OVERRIDES_HELP = """\
configuration:
  Settings resolve as: defaults (pipeline/config/schema.py) <- --config FILE(s), in order
  <- overrides. An override is section.key=value with the value parsed as YAML:
{examples}
  Sections: model, diffusion, sampler, optim, parallel, checkpoint, log, data, prep, eval, cluster,
  run, demo. Unknown keys, wrong types and out-of-range values are errors; a renamed key names its
  new place. Without --config: configs/tiny.yaml for demo and prep sudoku, configs/text.yaml for
  prep, train, launch train / prep and config, none for verbs that load a trained model.
  --dry-run prints the resolved YAML and what would run, then exits.
"""


def _presets_help() -> str:
    """`presets:` block listing configs/*.yaml with the description from each file's first line."""
    lines = []
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        first = next(iter(path.read_text(encoding="utf-8").splitlines()), "")
        desc = first.lstrip("# ").split(":", 1)[-1].strip().rstrip(".") if first.startswith("#") else ""
        lines.append(f"  {path.stem:<12} {desc}")
    return "presets (--config NAME or a path):\n" + ("\n".join(lines) or "  (none found)") + "\n"


DEMO_EXAMPLES = (
    "proseco demo optim.steps=200 optim.lr=1e-3 model.time_conditioning=true",
    "proseco demo demo.steps_grid=[2,4,8] sampler.corrector_steps=2 --dry-run",
)
SUITE_EXAMPLES = (
    "proseco demo --suite science demo.tasks=[sudoku9] demo.out_dir=runs/science",
)
SUITES = ("demo", "science")  # --suite values


def _epilog(*examples: str) -> str:
    listed = "\n".join(f"    {e}" for e in examples or DEMO_EXAMPLES)
    return OVERRIDES_HELP.format(examples=listed) + "\n" + _presets_help()


def _describe(text: str) -> str:
    """Wrap a verb description (RawDescriptionHelpFormatter keeps the epilog's layout, so the
    description has to be wrapped by hand)."""
    return textwrap.fill(" ".join(text.split()), width=88)


def _add_config_args(p: argparse.ArgumentParser, example: str) -> None:
    """Options shared by every verb; added after the verb's own positionals."""
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help=f"config overrides, e.g. {example}",
    )
    p.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML preset: a path or a name in configs/ (e.g. owt_small); repeatable, "
        "later files win (default: see `configuration` below)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and what would run, then exit without running",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,  # keep a top-level `proseco --debug VERB` from being reset
        help="show full tracebacks for errors",
    )



def build_parser() -> argparse.ArgumentParser:
    """The full argparse tree; exposed so tests and docs can inspect it."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="proseco",
        description="Train and sample self-correcting masked diffusion LMs (ProSeCo).",
        epilog=_epilog(),
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"proseco {pipeline.__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs")

    demo = sub.add_parser(
        "demo",
        help="train MDM and ProSeCo on 4x4 Sudoku and compare them (CPU, minutes)",
        description=_describe(
            """Train a plain masked diffusion model (MDM) and a ProSeCo model at a matched training
            budget (demo.proseco_steps; MDM gets demo.mdm_step_ratio times as many steps) on 4x4
            Sudoku, then sweep sampling steps (demo.steps_grid) and corrector passes
            (demo.corrector_grid) and report puzzle accuracy against the number of function
            evaluations. Results go to demo.out_dir. With --suite science: the same for every task
            of demo.tasks (preset configs/science.yaml), adding ReMDM and a sweep of the corrector
            frequency (demo.corrector_every_grid); tables, plots and science.md in demo.out_dir."""
        ),
        epilog=_epilog(*DEMO_EXAMPLES, *SUITE_EXAMPLES),
        formatter_class=fmt,
    )
    demo.add_argument("--suite", default="demo", metavar="{demo,science}",
                      help="demo: 4x4 Sudoku (default); science: the tasks of demo.tasks with (a)-(e), "
                      "see pipeline/science.py")

    prep = sub.add_parser(
        "prep",
        help="prepare data: tokenizer, corpus shards (+ merge, verify), SFT shards, or the demo's Sudoku task",
        description=_describe(
            """Prepare data. `tokenizer`: train a sentencepiece model on prep.inputs (default: the
            bundled public-domain corpus) of model.vocab_size ids, with the special ids the diffusion model needs (pad, unk,
            bos, eos, mask), or --import an existing one (sentencepiece, or Hugging Face:
            tokenizer.json, a tokenizer folder, a .gguf file; docs/huggingface.md); writes prep.tokenizer_dir. `shards`:
            tokenize prep.inputs (text, JSONL, parquet; .gz/.zst) in prep.workers processes into
            webdataset shards of data.seq_len tokens plus manifest.json in data.shards; rerunning
            after a crash resumes; --task i/n prepares one partition (then `merge`). `verify`:
            re-checksum and recount the shards against the manifest. `sudoku`: the demo's task as
            files. `sft`: prompt/response JSONL (prep.inputs) into SFT shards with prompt masks,
            tokenized by the model.init=hf:PATH model's tokenizer (docs/huggingface.md)."""
        ),
        epilog=_epilog("proseco prep tokenizer --config text",
                       "proseco prep shards --config text prep.workers=2",
                       "proseco prep shards --config text --task 0/4   # one of 4 machines; then: prep merge",
                       "proseco prep verify --config text",
                       "proseco prep sudoku --out data/sudoku4 data.split_seed=7",
                       "proseco prep sft model.init=hf:models/SmolLM2 prep.inputs=[sft.jsonl] data.seq_len=256"),
        formatter_class=fmt,
    )
    prep.add_argument("target", choices=["tokenizer", "shards", "merge", "verify", "sudoku", "sft"],
                      help="what to prepare")
    prep.add_argument("--out", metavar="DIR",
                      help="output folder (default: prep.tokenizer_dir for tokenizer, data.shards otherwise)")
    prep.add_argument("--import", dest="import_model", metavar="MODEL",
                      help="tokenizer: use this existing tokenizer instead of training one: a sentencepiece "
                           ".model file, a Hugging Face tokenizer.json or tokenizer folder, or a .gguf file")
    prep.add_argument("--force", action="store_true", help="tokenizer: replace an existing tokenizer")
    prep.add_argument("--task", metavar="i/n", help="shards: prepare partition i of n (0-based)")

    train = sub.add_parser(
        "train",
        help="pretrain on corpus shards (torch DDP/FSDP2, DeepSpeed ZeRO, megatron TP); resumes automatically",
        description=_describe(
            """Train a ProSeCo model on the shards in data.shards (written by `proseco prep shards`)
            for optim.steps optimizer steps. parallel.backend picks the engine: torch (one process, or
            with --nproc N or under torchrun DDP / FSDP2 with parallel.distributed=ddp|fsdp), deepspeed (ZeRO stage
            parallel.zero_stage=0..3, config generated from ours) or megatron (megatron-core tensor
            parallelism of size parallel.tp_size, data parallel over the remaining ranks); gloo on CPU,
            nccl on CUDA. Everything goes to the run folder (run.dir, default runs/<run.name>):
            run.json, config.yaml, metrics.jsonl, wandb/ (log.wandb=offline|online|disabled) and
            checkpoints/ every checkpoint.every steps. Rerunning the same command resumes from
            the latest complete checkpoint. Ctrl-C, SIGTERM / SIGUSR1 or the time budget
            run.max_time_s saves at the next step boundary and exits with code 3 (requeue); a
            second Ctrl-C aborts without saving. The log is plain lines: a header, a line every
            log.every steps, validations and checkpoint saves."""
        ),
        epilog=_epilog("proseco train --config text optim.steps=20",
                       "proseco train --nproc 2 --config text parallel.distributed=ddp",
                       "proseco train --nproc 2 --config text parallel.backend=deepspeed "
                       "parallel.zero_stage=3",
                       "proseco train --nproc 2 --config text parallel.backend=megatron "
                       "parallel.tp_size=2",
                       "proseco train --config text run.name=exp1 run.max_time_s=3600 --dry-run"),
        formatter_class=fmt,
    )
    train.add_argument("--nproc", type=int, metavar="N",
                       help="start N ranks on this machine (instead of torchrun): Ctrl-C / SIGTERM make all "
                            "ranks save and exit 3, a failed rank stops the others")

    smp = sub.add_parser(
        "sample",
        help="generate from a trained model with any sampler (e.g. runs/demo/proseco)",
        description=_describe(
            """Load a model - an export folder, a checkpoint folder or a run folder (its latest
            checkpoint); its config and tokenizer come with it - and generate
            --num samples with the sampler settings given as sampler.* overrides: the policy
            (sampler.name = ancestral | confidence | remdm), unmasking steps T (sampler.steps),
            corrector passes S (sampler.corrector_steps) every omega steps (sampler.corrector_every).
            Prints the samples, their score on the task, and the exact NFE (predictor, corrector)."""
        ),
        epilog=_epilog("proseco sample runs/demo/proseco sampler.steps=4 sampler.corrector_steps=2",
                       "proseco sample runs/demo/proseco --infill --num 16 sampler.name=confidence"),
        formatter_class=fmt,
    )
    smp.add_argument("model", metavar="MODEL",
                     help="an export folder (e.g. runs/demo/proseco), a checkpoint folder or a run folder")
    smp.add_argument("--num", type=int, default=8, help="number of samples (default: 8)")
    smp.add_argument("--infill", action="store_true",
                     help="solve the task's held-out puzzles instead of generating from scratch")
    smp.add_argument("--out", metavar="FILE", help="also write samples and NFE to this JSON file")

    ev = sub.add_parser(
        "eval",
        help="evaluate checkpoints x tasks x sampler settings (NFE, quality, diversity); resumable",
        description=_describe(
            """Expand RUN (a run folder: all its complete checkpoints; a checkpoint folder; a glob;
            a `proseco ckpt export` folder) x eval.tasks (default: the model's own task)
            x sampler settings (eval.samplers x eval.steps T x eval.corrector_steps S x
            eval.corrector_every omega; S=0 is plain MDM sampling, remdm the remasking baseline)
            into a work list and write one result JSON + samples file per item under eval.out
            (default RUN/eval/results/). A result is keyed by everything that determines it (model
            checksums, task options, scorer version, sampler settings, seed, sample count): a rerun
            skips items finished with the same key and recomputes those whose settings changed
            (--force: all). A failing item is recorded, the rest still runs, and the exit code is 1.
            --shard i/n runs every n-th item (SLURM arrays: `proseco launch eval --parts n`).
            --dry-run prints the work list and what would run. Models are read with their EMA
            weights when they have them (eval.weights). Overrides set eval.*, sampler.* and
            parallel.*; a model brings its own data.*, model.*, diffusion.* and optim.* (overriding
            those is refused: it would change nothing)."""
        ),
        epilog=_epilog("proseco eval runs/demo/proseco eval.steps=[4,8,16] eval.corrector_steps=[0,1,2]",
                       "proseco eval runs/exp1 eval.tasks=[text] eval.reference_lm=/models/gpt2-large",
                       "proseco eval 'runs/exp1/checkpoints/step_*' --shard 0/4"),
        formatter_class=fmt,
    )
    ev.add_argument("run", metavar="RUN", help="run folder, checkpoint folder, glob or export folder")
    ev.add_argument("--shard", metavar="i/n", help="run only every n-th item, starting at i")
    ev.add_argument("--out", metavar="DIR", help="results folder (default: eval.out or RUN/eval)")
    ev.add_argument("--force", action="store_true",
                    help="recompute every item, even those with a finished result of the same settings")

    rep = sub.add_parser(
        "report",
        help="render eval results as Markdown + HTML with quality-vs-NFE plots",
        description=_describe(
            """Read the result files under FOLDER/results (written by `proseco eval`) and write
            FOLDER/report.md and FOLDER/report.html: per model and task a table of every sampler
            setting, a quality-vs-NFE plot (one line per sampler, diversity beside it), an
            NFE-matched comparison with the best of each budget in bold, the failed items, and the
            commands that produced the results."""
        ),
        epilog=_epilog("proseco report runs/exp1/eval"),
        formatter_class=fmt,
    )
    rep.add_argument("folder", metavar="FOLDER", help="an eval output folder (e.g. runs/exp1/eval)")

    launch = sub.add_parser(
        "launch",
        help="submit training, or prep / eval array jobs, to SLURM through submitit; requeues itself",
        description=_describe(
            """Submit `proseco train` as one SLURM job of cluster.nodes x cluster.tasks_per_node tasks
            (one rank each) through submitit, with the resources of the cluster.* section (a preset
            such as configs/cluster_local.yaml, or overrides). The resolved config, git sha +
            uncommitted diff and the job script are saved under RUN/launch/. Before the time limit
            every rank saves at the same step and the job requeues itself (up to
            cluster.max_requeues); a restart resumes from the latest checkpoint under the same run
            id. A rank that dies ends the job step at once (srun --kill-on-bad-exit), ranks that
            do not all meet within cluster.startup_timeout_s stop, and
            cluster.retries_on_failure=N requeues a failed job up to N times. `launch prep --parts
            N` prepares shards as an array job of N partitions plus a dependent merge job; `launch
            eval --target RUN --parts N` runs `proseco eval` as N array shards into one results
            folder. --dry-run prints the job scripts exactly as they would be submitted, what each
            task runs and the resolved config, and submits nothing."""
        ),
        epilog=_epilog("proseco launch train --config text --config cluster_local cluster.nodes=2",
                       "proseco launch train --config owt_small --config cluster_gpu cluster.nodes=4 "
                       "cluster.partition=gpu parallel.backend=deepspeed",
                       "proseco launch prep --parts 8 --config text --config cluster_local",
                       "proseco launch eval --target runs/exp1 --parts 4 --config cluster_local",
                       "proseco launch train --config text --config cluster_local --dry-run"),
        formatter_class=fmt,
    )
    launch.add_argument("stage", choices=["train", "prep", "eval"], help="what the job runs")
    launch.add_argument("--parts", type=int, default=4, help="prep / eval: number of array tasks")
    launch.add_argument("--target", metavar="RUN", help="eval: what to evaluate (as for `proseco eval RUN`)")
    for verb, text in (("status", "job state, step, last checkpoint and log tail of a launched run"),
                       ("cancel", "cancel a launched run's job (its checkpoints stay)")):
        p = sub.add_parser(verb, help=text, description=_describe(f"Show the {text}." if verb == "status" else
                                                                  "Cancel the SLURM job of a launched run; "
                                                                  "rerun `proseco launch` to continue later."),
                           formatter_class=fmt)
        p.add_argument("run", metavar="RUN", help="run folder (runs/NAME) or prep output folder")

    ckpt = sub.add_parser(
        "ckpt",
        help="inspect, export (safetensors) or convert (DeepSpeed universal) a training checkpoint",
        description=_describe(
            """Work on a checkpoint of `proseco train`. PATH is a checkpoint folder
            (runs/NAME/checkpoints/step_XXXXXXXX) or a run folder (its latest complete checkpoint).
            `info`: step, parallel layout, files (verified against their checksums), code version.
            `export`: consolidate the raw and EMA weights of any backend - torch, FSDP2,
            DeepSpeed ZeRO, megatron tensor parallel - into one self-contained folder
            (raw/ema.safetensors, model.json, config.yaml, the tokenizer, SHA256SUMS), loadable
            from any directory without DeepSpeed or megatron-core (default folder:
            runs/NAME/exports/step_XXXXXXXX). `export --format hf`: a Hugging Face folder
            (config.json, modeling_proseco.py, model.safetensors, the tokenizer in Hugging Face form,
            SHA256SUMS) that transformers loads with trust_remote_code=True; PATH may also be an
            export folder (default folder: runs/NAME/exports/step_XXXXXXXX_hf, see
            docs/huggingface.md). `universal`: convert a DeepSpeed ZeRO checkpoint with
            DeepSpeed's universal-checkpoint tool, so that the run resumes under another
            data-parallel size or ZeRO stage."""
        ),
        epilog=_epilog("proseco ckpt info runs/exp1",
                       "proseco ckpt export runs/exp1 --weights raw --out models/exp1",
                       "proseco ckpt export runs/exp1 --format hf --out models/exp1-hf",
                       "proseco ckpt universal runs/exp1/checkpoints/step_00002000"),
        formatter_class=fmt,
    )
    ckpt.add_argument("action", choices=["info", "export", "universal"], help="what to do")
    ckpt.add_argument("path", metavar="PATH", help="checkpoint folder or run folder")
    ckpt.add_argument("--out", metavar="DIR", help="export: output folder")
    ckpt.add_argument("--weights", choices=["auto", "ema", "raw"], default="auto",
                      help="export: the weights the export loads by default: EMA (auto: when the run kept "
                           "them) or the raw trained ones")
    ckpt.add_argument("--format", choices=["proseco", "hf"], default="proseco",
                      help="export: proseco's export folder (default) or a Hugging Face model folder "
                           "(the native DiT with its modelling file, or an HF backbone in its own class)")
    ckpt.add_argument("--force", action="store_true", help="replace an existing export / conversion")

    plan = sub.add_parser(
        "plan",
        help="predict memory per device and step time of a config on N devices (nothing runs)",
        description=_describe(
            """Predict, from the config alone (no model is built), the memory per device of one
            training step under every layout the engines offer on --gpus devices (torch DDP / FSDP2,
            DeepSpeed ZeRO-1/2/3, megatron tensor parallel sizes), with and without activation
            checkpointing: weights, gradients, AdamW states, EMA, activations (ProSeCo's second pass
            under the split backward), the [B, L, V] logits; which layouts fit --gpu-mem; FLOPs per
            token (both ProSeCo passes) and the step time at --mfu of --peak-tflops. optim.batch_size
            is per data-parallel rank. See docs/plan.md."""
        ),
        epilog=_epilog("proseco plan --config owt_small --gpus 8 --gpu-mem 80GiB",
                       "proseco plan --config owt_small --gpus 8 optim.batch_size=64 parallel.bf16=true --mfu 0.4"),
        formatter_class=fmt,
    )
    plan.add_argument("--gpus", type=int, default=8, metavar="N", help="devices in the job (default 8)")
    plan.add_argument("--gpu-mem", default="80GiB", metavar="SIZE",
                      help="memory per device, e.g. 80GiB, 141GB (default 80GiB)")
    plan.add_argument("--peak-tflops", type=float, default=989.0, metavar="T",
                      help="dense peak TFLOP/s per device in the training precision (default 989: H100/H200 bf16)")
    plan.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default 0.4)")

    sub.add_parser(
        "config",
        help="print the resolved config as YAML (nothing runs)",
        description=_describe(
            """Print the fully resolved configuration (defaults <- presets <- overrides) as YAML.
            The output is itself a valid preset: save it and pass it to --config."""
        ),
        epilog=_epilog("proseco config --config owt_small sampler.steps=128 > my_preset.yaml"),
        formatter_class=fmt,
    )
    for name, verb_parser in sub.choices.items():  # every verb takes --config, overrides, --dry-run, --debug
        _add_config_args(verb_parser, "eval.steps=[8,16] sampler.nucleus_p=0.9" if name == "eval"
                         else "model.hidden=128 optim.steps=500")
        verb_parser.set_defaults(verb_parser=verb_parser)
    return parser

