"""The ``proseco`` command line (also ``python -m pipeline``).

Every verb resolves one :class:`~pipeline.config.Config` the same way (preset file(s), then
dotted overrides) and hands it to the stage that does the work; the stage modules are imported
lazily so that ``--help``, ``--dry-run`` and ``proseco config`` stay instant and work even when a
stage (or torch) is unavailable. User errors (:class:`~pipeline.errors.ProsecoError`) become one
``error: ...`` line and exit code 2; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import pipeline
from pipeline.config import Config, check_world_size, dump_yaml, load_config
from pipeline.errors import ProsecoError

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_PRESET = PRESET_DIR / "tiny.yaml"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

OVERRIDES_HELP = """\
configuration:
  Settings resolve as: defaults (pipeline/config.py) <- --config FILE(s), in order
  <- overrides. An override is section.key=value with the value parsed as YAML:
{examples}
  Sections: model, diffusion, sampler, train, data, prep, demo, run, eval, cluster. Unknown keys,
  wrong types and out-of-range values are errors. Without --config, configs/tiny.yaml is used.
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
    "proseco demo train.steps=200 train.lr=1e-3 model.time_conditioning=true",
    "proseco demo demo.steps_grid=[2,4,8] sampler.corrector_steps=2 --dry-run",
)


def _epilog(*examples: str) -> str:
    listed = "\n".join(f"    {e}" for e in examples or DEMO_EXAMPLES)
    return OVERRIDES_HELP.format(examples=listed) + "\n" + _presets_help()


def _describe(text: str) -> str:
    """Wrap a verb description (RawDescriptionHelpFormatter keeps the epilog's layout, so the
    description has to be wrapped by hand)."""
    return textwrap.fill(" ".join(text.split()), width=88)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every verb; added after the verb's own positionals."""
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, e.g. model.hidden=128 train.steps=500",
    )
    p.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML preset: a path or a name in configs/ (e.g. owt_small); repeatable, "
        "later files win (default: configs/tiny.yaml)",
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


def _run_demo(args: argparse.Namespace, cfg: Config) -> int:
    return _exit_code(_import_stage("pipeline.demo").run(cfg))


def _run_train(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline import distributed, spawn

    if args.nproc is not None:  # the launcher process: it does not import torch (the ranks start faster)
        if args.nproc < 1:
            raise ProsecoError(f"--nproc must be >= 1, got {args.nproc}")
        if distributed.started_by_launcher():
            raise ProsecoError("--nproc starts its own ranks: do not combine it with torchrun / srun "
                               "(drop --nproc, or run `proseco train --nproc N` directly)")
        check_world_size(cfg, args.nproc)
        return spawn.run(spawn.strip_nproc(args.argv), args.nproc)
    spawn.follow_launcher()  # a rank of `proseco train --nproc`: stop (and save) if the launcher dies
    return _exit_code(_import_stage("pipeline.train").run(cfg))


def _describe_train(args: argparse.Namespace, cfg: Config) -> str:
    from pipeline.train import world_layout

    ranks = f"{args.nproc} ranks on this machine (proseco train --nproc), each: " if args.nproc else ""
    return f"{ranks}pipeline.train.run(cfg)\n# world: {world_layout(cfg, args.nproc)}"


def _run_prep(args: argparse.Namespace, cfg: Config) -> int:
    if args.target == "sudoku":
        return _exit_code(_import_stage("data_prep.sudoku").main(cfg, args.out or "data/sudoku4"))
    stages = _import_stage("data_prep.stages")
    if args.target == "tokenizer":
        return _exit_code(stages.tokenizer(cfg, args.out, import_model=args.import_model, force=args.force))
    if args.target == "shards":
        return _exit_code(stages.shards(cfg, args.out, task=args.task))
    return _exit_code(getattr(stages, args.target)(cfg, args.out))


def _run_sample(args: argparse.Namespace, cfg: Config) -> int:
    return _exit_code(_import_stage("pipeline.generate").run(cfg, args.model, num=args.num, out=args.out,
                                                            infill=args.infill))


def _run_ckpt(args: argparse.Namespace, cfg: Config) -> int:
    tools = _import_stage("pipeline.checkpoint.tools")
    if args.action == "export":
        out = tools.export(args.path, args.out, weights=args.weights, force=args.force)
        print(f"exported {out} (load it with `proseco sample {out}` or pipeline.checkpoint.load_model)")
    elif args.action == "universal":
        out = tools.universal(args.path, force=args.force)
        print(f"wrote {out}; rerun the training command with the new layout to resume from it")
    else:
        print(tools.info(args.path))
    return 0


def _run_eval(args: argparse.Namespace, cfg: Config) -> int:
    import shlex

    command = "proseco " + shlex.join(args.argv)
    return _exit_code(_import_stage("pipeline.evaluation.runner").run(cfg, args.run, shard_spec=args.shard,
                                                                     out=args.out, command=command,
                                                                     force=args.force, dry_run=args.dry_run))


def _run_report(args: argparse.Namespace, cfg: Config) -> int:
    md, page = _import_stage("pipeline.evaluation.report").build(args.folder)
    print(f"wrote {md} and {page}")
    return 0


def _run_launch(args: argparse.Namespace, cfg: Config) -> int:
    launch = _import_stage("pipeline.launch")
    if args.stage == "prep":
        return _exit_code(launch.launch_prep(cfg, args.parts, dry_run=args.dry_run))
    if args.stage == "eval":
        if not args.target:
            raise ProsecoError("proseco launch eval needs what to evaluate: --target RUN (run folder, checkpoint, glob)")
        return _exit_code(launch.launch_eval(cfg, args.target, args.parts, dry_run=args.dry_run))
    return _exit_code(launch.launch_train(cfg, dry_run=args.dry_run))


def _run_status(args: argparse.Namespace, cfg: Config) -> int:
    launch = _import_stage("pipeline.launch")
    return _exit_code(launch.cancel(args.run) if args.verb == "cancel" else launch.status(args.run))


def _resolve(args: argparse.Namespace) -> Config:
    """The config a verb runs with. `sample` starts from the config stored in the model file,
    so only what the user overrides differs from training (model.* must then still match)."""
    if args.verb == "sample":
        from pipeline.checkpoint import read_model_file
        from pipeline.config import config_from_dict

        base = config_from_dict(read_model_file(args.model)["config"])
        return load_config([_preset_paths([c])[0] for c in args.config], args.overrides, base=base)
    return load_config(_preset_paths(args.config), args.overrides)


def _model_size_line(cfg: Config) -> str:
    """`# model: N parameters`, as a YAML comment so the output still parses."""
    from pipeline.model import parameter_count
    from pipeline.tasks import get_task

    vocab = cfg.model.vocab_size
    if vocab is None:
        try:
            vocab = get_task(cfg.data.task).VOCAB_SIZE
        except ProsecoError:
            return "# model: size depends on the vocabulary of the data (model.vocab_size: null)"
    return f"# model: {parameter_count(cfg.model, vocab):,} parameters (vocabulary {vocab:,})"


def _run_config(args: argparse.Namespace, cfg: Config) -> int:
    print(dump_yaml(cfg), end="")
    print(_model_size_line(cfg))
    return 0


# verb -> (runner, description of what it runs, for --dry-run)
VERBS: dict[str, tuple[Callable[[argparse.Namespace, Config], int], Callable[[argparse.Namespace, Config], str]]] = {
    "demo": (_run_demo, lambda a, c: "pipeline.demo.run(cfg)"),
    "prep": (_run_prep, lambda a, c: f"proseco prep {a.target} (output: {a.out or 'the folder in the prep section'})"),
    "train": (_run_train, _describe_train),
    "sample": (_run_sample, lambda a, c: f"pipeline.generate.run(cfg, {a.model!r}, num={a.num})"),
    "eval": (_run_eval, lambda a, c: f"pipeline.evaluation.runner.run(cfg, {a.run!r}, shard_spec={a.shard!r})"),
    "report": (_run_report, lambda a, c: f"pipeline.evaluation.report.build({a.folder!r})"),
    "launch": (_run_launch, lambda a, c: "the job script above"),
    "status": (_run_status, lambda a, c: f"pipeline.launch.status({a.run!r})"),
    "cancel": (_run_status, lambda a, c: f"pipeline.launch.cancel({a.run!r})"),
    "ckpt": (_run_ckpt, lambda a, c: f"pipeline.checkpoint.tools.{a.action}({a.path!r})"),
    "config": (_run_config, lambda a, c: "nothing (proseco config only prints the resolved config)"),
}


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
            evaluations. Results go to demo.out_dir."""
        ),
        epilog=_epilog(*DEMO_EXAMPLES),
        formatter_class=fmt,
    )
    _add_config_args(demo)
    demo.set_defaults(verb_parser=demo)

    prep = sub.add_parser(
        "prep",
        help="prepare data: tokenizer, corpus shards (+ merge, verify), or the demo's Sudoku task",
        description=_describe(
            """Prepare data. `tokenizer`: train a sentencepiece model on prep.inputs (default: the
            bundled public-domain corpus) with the special ids the diffusion model needs (pad, unk,
            bos, eos, mask), or --import an existing one; writes prep.tokenizer_dir. `shards`:
            tokenize prep.inputs (text, JSONL, parquet; .gz/.zst) in prep.workers processes into
            webdataset shards of data.seq_len tokens plus manifest.json in prep.out_dir; rerunning
            after a crash resumes; --task i/n prepares one partition (then `merge`). `verify`:
            re-checksum and recount the shards against the manifest. `sudoku`: the demo's task as
            files."""
        ),
        epilog=_epilog("proseco prep tokenizer --config text",
                       "proseco prep shards --config text prep.workers=2",
                       "proseco prep shards --config text --task 0/4   # one of 4 machines; then: prep merge",
                       "proseco prep verify --config text",
                       "proseco prep sudoku --out data/sudoku4 data.split_seed=7"),
        formatter_class=fmt,
    )
    prep.add_argument("target", choices=["tokenizer", "shards", "merge", "verify", "sudoku"],
                      help="what to prepare")
    prep.add_argument("--out", metavar="DIR",
                      help="output folder (default: prep.tokenizer_dir for tokenizer, prep.out_dir otherwise)")
    prep.add_argument("--import", dest="import_model", metavar="MODEL",
                      help="tokenizer: use this existing sentencepiece model instead of training one")
    prep.add_argument("--force", action="store_true", help="tokenizer: replace an existing tokenizer")
    prep.add_argument("--task", metavar="i/n", help="shards: prepare partition i of n (0-based)")
    _add_config_args(prep)
    prep.set_defaults(verb_parser=prep)

    train = sub.add_parser(
        "train",
        help="pretrain on corpus shards (torch DDP/FSDP2, DeepSpeed ZeRO, megatron TP); resumes automatically",
        description=_describe(
            """Train a ProSeCo model on the shards in data.manifest (written by `proseco prep shards`)
            for train.steps optimizer steps. train.backend picks the engine: torch (one process, or
            with --nproc N or under torchrun DDP / FSDP2 with train.distributed=ddp|fsdp), deepspeed (ZeRO stage
            train.zero_stage=0..3, config generated from ours) or megatron (megatron-core tensor
            parallelism of size train.tp_size, data parallel over the remaining ranks); gloo on CPU,
            nccl on CUDA. Everything goes to the run folder (run.dir, default runs/<run.name>):
            run.json, config.yaml, metrics.jsonl, wandb/ (train.wandb=offline|online|disabled) and
            checkpoints/ every train.checkpoint_every steps. Rerunning the same command resumes from
            the latest complete checkpoint. Ctrl-C, SIGTERM / SIGUSR1 or the time budget
            train.max_time_s saves at the next step boundary and exits with code 3 (requeue); a
            second Ctrl-C aborts without saving. The log is plain lines: a header, a line every
            train.log_every steps, validations and checkpoint saves."""
        ),
        epilog=_epilog("proseco train --config text train.steps=20",
                       "proseco train --nproc 2 --config text train.distributed=ddp",
                       "proseco train --nproc 2 --config text train.backend=deepspeed "
                       "train.zero_stage=3",
                       "proseco train --nproc 2 --config text train.backend=megatron "
                       "train.tp_size=2",
                       "proseco train --config text run.name=exp1 train.max_time_s=3600 --dry-run"),
        formatter_class=fmt,
    )
    train.add_argument("--nproc", type=int, metavar="N",
                       help="start N ranks on this machine (instead of torchrun): Ctrl-C / SIGTERM make all "
                            "ranks save and exit 3, a failed rank stops the others")
    _add_config_args(train)
    train.set_defaults(verb_parser=train)

    smp = sub.add_parser(
        "sample",
        help="generate from a trained model file with any sampler (e.g. runs/demo/proseco.pt)",
        description=_describe(
            """Load a model file written by training (its config comes with it) and generate
            --num samples with the sampler settings given as sampler.* overrides: the policy
            (sampler.name = ancestral | confidence | remdm), unmasking steps T (sampler.steps),
            corrector passes S (sampler.corrector_steps) every omega steps (sampler.corrector_every).
            Prints the samples, their score on the task, and the exact NFE (predictor, corrector)."""
        ),
        epilog=_epilog("proseco sample runs/demo/proseco.pt sampler.steps=4 sampler.corrector_steps=2",
                       "proseco sample runs/demo/proseco.pt --infill --num 16 sampler.name=confidence"),
        formatter_class=fmt,
    )
    smp.add_argument("model", metavar="MODEL_FILE",
                     help="a model file (e.g. runs/demo/proseco.pt) or a `proseco ckpt export` folder")
    smp.add_argument("--num", type=int, default=8, help="number of samples (default: 8)")
    smp.add_argument("--infill", action="store_true",
                     help="solve the task's held-out puzzles instead of generating from scratch")
    smp.add_argument("--out", metavar="FILE", help="also write samples and NFE to this JSON file")
    _add_config_args(smp)
    smp.set_defaults(verb_parser=smp)

    ev = sub.add_parser(
        "eval",
        help="evaluate checkpoints x tasks x sampler settings (NFE, quality, diversity); resumable",
        description=_describe(
            """Expand RUN (a run folder: all its complete checkpoints; a checkpoint folder; a glob; a
            model file; a `proseco ckpt export` folder) x eval.tasks (default: the model's own task)
            x sampler settings (eval.samplers x eval.steps T x eval.corrector_steps S x
            eval.corrector_every omega; S=0 is plain MDM sampling, remdm the remasking baseline)
            into a work list and write one result JSON + samples file per item under eval.out
            (default RUN/eval/results/). A result is keyed by everything that determines it (model
            checksums, task options, scorer version, sampler settings, seed, sample count): a rerun
            skips items finished with the same key and recomputes those whose settings changed
            (--force: all). A failing item is recorded, the rest still runs, and the exit code is 1.
            --shard i/n runs every n-th item (SLURM arrays: `proseco launch eval --parts n`).
            --dry-run prints the work list and what would run. Training checkpoints are read with
            their EMA weights (eval.weights)."""
        ),
        epilog=_epilog("proseco eval runs/demo/proseco.pt eval.steps=[4,8,16] eval.corrector_steps=[0,1,2]",
                       "proseco eval runs/exp1 eval.tasks=[text] eval.reference_lm=/models/gpt2-large",
                       "proseco eval 'runs/exp1/checkpoints/step_*' --shard 0/4"),
        formatter_class=fmt,
    )
    ev.add_argument("run", metavar="RUN", help="run folder, checkpoint folder, glob, model file or export folder")
    ev.add_argument("--shard", metavar="i/n", help="run only every n-th item, starting at i")
    ev.add_argument("--out", metavar="DIR", help="results folder (default: eval.out or RUN/eval)")
    ev.add_argument("--force", action="store_true",
                    help="recompute every item, even those with a finished result of the same settings")
    _add_config_args(ev)
    ev.set_defaults(verb_parser=ev)

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
    _add_config_args(rep)
    rep.set_defaults(verb_parser=rep)

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
                       "cluster.partition=gpu train.backend=deepspeed",
                       "proseco launch prep --parts 8 --config text --config cluster_local",
                       "proseco launch eval --target runs/exp1 --parts 4 --config cluster_local",
                       "proseco launch train --config text --config cluster_local --dry-run"),
        formatter_class=fmt,
    )
    launch.add_argument("stage", choices=["train", "prep", "eval"], help="what the job runs")
    launch.add_argument("--parts", type=int, default=4, help="prep / eval: number of array tasks")
    launch.add_argument("--target", metavar="RUN", help="eval: what to evaluate (as for `proseco eval RUN`)")
    _add_config_args(launch)
    launch.set_defaults(verb_parser=launch)
    for verb, text in (("status", "job state, step, last checkpoint and log tail of a launched run"),
                       ("cancel", "cancel a launched run's job (its checkpoints stay)")):
        p = sub.add_parser(verb, help=text, description=_describe(f"Show the {text}." if verb == "status" else
                                                                  "Cancel the SLURM job of a launched run; "
                                                                  "rerun `proseco launch` to continue later."),
                           formatter_class=fmt)
        p.add_argument("run", metavar="RUN", help="run folder (runs/NAME) or prep output folder")
        _add_config_args(p)
        p.set_defaults(verb_parser=p)

    ckpt = sub.add_parser(
        "ckpt",
        help="inspect, export (safetensors) or convert (DeepSpeed universal) a training checkpoint",
        description=_describe(
            """Work on a checkpoint of `proseco train`. PATH is a checkpoint folder
            (runs/NAME/checkpoints/step_XXXXXXXX) or a run folder (its latest complete checkpoint).
            `info`: step, parallel layout, files (verified against their checksums), code version.
            `export`: consolidate the weights (EMA by default) of any backend - torch, FSDP2,
            DeepSpeed ZeRO, megatron tensor parallel - into model.safetensors + model.json +
            config.yaml, loadable for sampling without DeepSpeed or megatron-core (default folder:
            runs/NAME/exports/step_XXXXXXXX). `universal`: convert a DeepSpeed ZeRO checkpoint with
            DeepSpeed's universal-checkpoint tool, so that the run resumes under another
            data-parallel size or ZeRO stage."""
        ),
        epilog=_epilog("proseco ckpt info runs/exp1",
                       "proseco ckpt export runs/exp1 --weights raw --out models/exp1",
                       "proseco ckpt universal runs/exp1/checkpoints/step_00002000"),
        formatter_class=fmt,
    )
    ckpt.add_argument("action", choices=["info", "export", "universal"], help="what to do")
    ckpt.add_argument("path", metavar="PATH", help="checkpoint folder or run folder")
    ckpt.add_argument("--out", metavar="DIR", help="export: output folder")
    ckpt.add_argument("--weights", choices=["auto", "ema", "raw"], default="auto",
                      help="export: EMA weights (auto: when the run kept them) or the raw trained ones")
    ckpt.add_argument("--force", action="store_true", help="replace an existing export / conversion")
    _add_config_args(ckpt)
    ckpt.set_defaults(verb_parser=ckpt)

    config = sub.add_parser(
        "config",
        help="print the resolved config as YAML (nothing runs)",
        description=_describe(
            """Print the fully resolved configuration (defaults <- presets <- overrides) as YAML.
            The output is itself a valid preset: save it and pass it to --config."""
        ),
        epilog=_epilog("proseco config --config owt_small sampler.steps=128 > my_preset.yaml"),
        formatter_class=fmt,
    )
    _add_config_args(config)
    config.set_defaults(verb_parser=config)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_known_args, so overrides may also follow options (`demo --dry-run a.b=1`)."""
    args, extras = parser.parse_known_args(argv)
    unknown = [e for e in extras if e.startswith("-") or "=" not in e]
    if unknown:
        getattr(args, "verb_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.verb is not None:
        args.overrides = [*args.overrides, *extras]
    return args


def _preset_paths(names: list[str]) -> list[str]:
    """--config values as paths; a bare name like `owt_small` means configs/owt_small.yaml."""
    if not names:
        return [str(DEFAULT_PRESET)] if DEFAULT_PRESET.is_file() else []
    paths = []
    for name in names:
        preset = PRESET_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        paths.append(str(preset) if not Path(name).exists() and preset.is_file() else name)
    return paths


def _import_stage(module: str) -> ModuleType:
    """Import a stage lazily; a missing stage module is a user-facing error, not a crash."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
            raise  # a dependency of the stage is missing: a real bug / broken install
        raise ProsecoError(f"{module} is not available in this installation") from exc


def _exit_code(result: int | None) -> int:
    """Stages return an exit code; a stage that returns nothing succeeded."""
    return 0 if result is None else int(result)


def user_message(exc: ProsecoError) -> str:
    """The error's own message. One raised in a DataLoader worker arrives wrapped with the worker's
    traceback ("Caught ProsecoError in DataLoader worker process 0. Original Traceback ..."): its
    last line holds the message."""
    text = str(exc)
    if "\nOriginal Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split("Error: ", 1)[-1] if last.startswith("pipeline.errors.") else last


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `proseco` console script; returns the process exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(parser, argv)
    args.argv = argv
    if args.verb is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    runner, describe = VERBS[args.verb]
    try:
        cfg = _resolve(args)
        if args.dry_run and args.verb not in ("launch", "eval"):  # those print the job script / the work list
            print(dump_yaml(cfg), end="")
            print(_model_size_line(cfg))
            print(f"# dry run: would run {describe(args, cfg)}")
            return 0
        return runner(args, cfg)
    except ProsecoError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
