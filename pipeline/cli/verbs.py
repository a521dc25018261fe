"""What each ``proseco`` verb runs: one function per verb, taking the parsed arguments and the config.

The stage modules are imported lazily (:func:`import_stage`) so that ``--help``, ``--dry-run`` and
``proseco config`` stay instant and work even when a stage (or torch) is unavailable.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from types import ModuleType

from pipeline.config import Config, check_world_size, dump_yaml
from pipeline.errors import ProsecoError


def import_stage(module: str) -> ModuleType:
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


def _demo_stage(args: argparse.Namespace) -> str:
    """`proseco demo` runs the 4x4 demo (pipeline.demo); `--suite science` the suite (pipeline.science)."""
    return "pipeline.science" if getattr(args, "suite", "demo") == "science" else "pipeline.demo"


def _run_demo(args: argparse.Namespace, cfg: Config) -> int:
    return _exit_code(import_stage(_demo_stage(args)).run(cfg))


def _run_train(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline import distributed, spawn

    if args.nproc is not None:  # the launcher process: it does not import torch (the ranks start faster)
        check_world_size(cfg, args.nproc)
        if distributed.started_by_launcher():
            raise ProsecoError("--nproc starts its own ranks: do not combine it with torchrun / srun "
                               "(drop --nproc, or run `proseco train --nproc N` directly)")
        return spawn.run(spawn.strip_nproc(args.argv), args.nproc)
    spawn.follow_launcher()  # a rank of `proseco train --nproc`: stop (and save) if the launcher dies
    return _exit_code(import_stage("pipeline.train").run(cfg))


def _describe_train(args: argparse.Namespace, cfg: Config) -> str:
    from pipeline.train import world_layout

    ranks = f"{args.nproc} ranks on this machine (proseco train --nproc), each: " if args.nproc else ""
    return f"{ranks}pipeline.train.run(cfg)\n# world: {world_layout(cfg, args.nproc)}"


def _run_prep(args: argparse.Namespace, cfg: Config) -> int:
    stages = import_stage("data_prep.stages")
    if args.target == "sudoku":
        return _exit_code(stages.sudoku(cfg, args.out or _prep_out("sudoku", cfg)))
    if args.target == "tokenizer":
        return _exit_code(stages.tokenizer(cfg, args.out, import_model=args.import_model, force=args.force))
    if args.target == "shards":
        return _exit_code(stages.shards(cfg, args.out, task=args.task))
    return _exit_code(getattr(stages, args.target)(cfg, args.out))


def _run_sample(args: argparse.Namespace, cfg: Config) -> int:
    return _exit_code(import_stage("pipeline.generate").run(cfg, args.model, num=args.num, out=args.out,
                                                            infill=args.infill))


def _run_ckpt(args: argparse.Namespace, cfg: Config) -> int:
    tools = import_stage("pipeline.checkpoint.tools")
    if args.format != "proseco" and args.action != "export":
        raise ProsecoError(f"--format applies to export only (ckpt {args.action} was given --format {args.format})")
    if args.action == "export" and args.format == "hf":
        out = import_stage("pipeline.checkpoint.hf_export").export_hf(args.path, args.out, weights=args.weights,
                                                                      force=args.force)
        how = ("transformers.AutoModelForMaskedLM.from_pretrained({!r}, trust_remote_code=True)"
               if (out / "modeling_proseco.py").exists() else "model.init=hf:{} (bidirectional, with its mask row)")
        print(f"exported {out} (load it with {how.format(str(out))}; docs/huggingface.md)")
    elif args.action == "export":
        out = import_stage("pipeline.artifact").export(args.path, args.out, weights=args.weights, force=args.force)
        print(f"exported {out} (load it with `proseco sample {out}` or pipeline.artifact.load_model)")
    elif args.action == "universal":
        out = tools.universal(args.path, force=args.force)
        print(f"wrote {out}; rerun the training command with the new layout to resume from it")
    else:
        print(tools.info(args.path))
    return 0


def _describe_ckpt(args: argparse.Namespace) -> str:
    if args.action == "export" and args.format == "hf":
        return f"pipeline.checkpoint.hf_export.export_hf({args.path!r})"
    return f"pipeline.{'artifact' if args.action == 'export' else 'checkpoint.tools'}.{args.action}({args.path!r})"


def _run_eval(args: argparse.Namespace, cfg: Config) -> int:
    import shlex

    command = "proseco " + shlex.join(args.argv)
    return _exit_code(import_stage("pipeline.evaluation.runner").run(cfg, args.run, shard_spec=args.shard,
                                                                     out=args.out, command=command,
                                                                     force=args.force, dry_run=args.dry_run))


def _run_report(args: argparse.Namespace, cfg: Config) -> int:
    md, page = import_stage("pipeline.evaluation.report").build(args.folder)
    print(f"wrote {md} and {page}")
    return 0


def _run_launch(args: argparse.Namespace, cfg: Config) -> int:
    launch = import_stage("pipeline.launch")
    if args.stage == "prep":
        return _exit_code(launch.launch_prep(cfg, args.parts, dry_run=args.dry_run))
    if args.stage == "eval":
        if not args.target:
            raise ProsecoError("proseco launch eval needs what to evaluate: --target RUN (run folder, checkpoint, glob)")
        return _exit_code(launch.launch_eval(cfg, args.target, args.parts, dry_run=args.dry_run))
    return _exit_code(launch.launch_train(cfg, dry_run=args.dry_run))


def _run_status(args: argparse.Namespace, cfg: Config) -> int:
    launch = import_stage("pipeline.launch")
    return _exit_code(launch.cancel(args.run) if args.verb == "cancel" else launch.status(args.run))


def model_size_line(cfg: Config) -> str:
    """`# model: N parameters`, as a YAML comment so the output still parses."""
    from pipeline.model import parameter_count
    from pipeline.tasks import task_class

    vocab = cfg.model.vocab_size
    if vocab is None:
        vocab = task_class(cfg.data.task).vocab_size
        if vocab is None:
            return "# model: size depends on the vocabulary of the data (model.vocab_size: null)"
    return f"# model: {parameter_count(cfg.model, vocab):,} parameters (vocabulary {vocab:,})"


def _run_config(args: argparse.Namespace, cfg: Config) -> int:
    print(dump_yaml(cfg), end="")
    print(model_size_line(cfg))
    return 0


def _run_plan(args: argparse.Namespace, cfg: Config) -> int:
    plan = import_stage("pipeline.plan")
    result = plan.plan(cfg, args.gpus, plan.parse_bytes(args.gpu_mem), args.peak_tflops, args.mfu)
    print(plan.format_plan(result, cfg))
    return 0


def _prep_out(target: str, cfg: Config) -> str:
    """Where `proseco prep TARGET` writes without --out."""
    return {"tokenizer": cfg.prep.tokenizer_dir, "sudoku": "data/sudoku4"}.get(target, cfg.data.shards)


# verb -> (runner, description of what it runs, for --dry-run)
VERBS: dict[str, tuple[Callable[[argparse.Namespace, Config], int], Callable[[argparse.Namespace, Config], str]]] = {
    "demo": (_run_demo, lambda a, c: f"{_demo_stage(a)}.run(cfg)"),
    "prep": (_run_prep, lambda a, c: f"proseco prep {a.target} (output: {a.out or _prep_out(a.target, c)})"),
    "train": (_run_train, _describe_train),
    "sample": (_run_sample, lambda a, c: f"pipeline.generate.run(cfg, {a.model!r}, num={a.num})"),
    "eval": (_run_eval, lambda a, c: f"pipeline.evaluation.runner.run(cfg, {a.run!r}, shard_spec={a.shard!r})"),
    "report": (_run_report, lambda a, c: f"pipeline.evaluation.report.build({a.folder!r})"),
    "launch": (_run_launch, lambda a, c: "the job script above"),
    "status": (_run_status, lambda a, c: f"pipeline.launch.status({a.run!r})"),
    "cancel": (_run_status, lambda a, c: f"pipeline.launch.cancel({a.run!r})"),
    "ckpt": (_run_ckpt, lambda a, c: _describe_ckpt(a)),
    "plan": (_run_plan, lambda a, c: f"pipeline.plan.plan(cfg, {a.gpus}, {a.gpu_mem!r}, {a.peak_tflops}, {a.mfu})"),
    "config": (_run_config, lambda a, c: "nothing (proseco config only prints the resolved config)"),
}
