"""The ``proseco`` command line (also ``python -m pipeline``).

Every verb resolves one :class:`~pipeline.config.Config` the same way (preset file(s), then
dotted overrides) and hands it to the stage that does the work; the stage modules are imported
lazily so that ``--help``, ``--dry-run`` and ``proseco config`` stay instant and work even when a
stage (or torch) is unavailable. User errors (:class:`~pipeline.errors.ProsecoError`) become one
``error: ...`` line and exit code 2; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from pipeline.cli.parser import PRESET_DIR, SUITES, build_parser
from pipeline.cli.verbs import VERBS, model_size_line
from pipeline.config import Config, dump_yaml, load_config
from pipeline.errors import ProsecoError

__all__ = ["EXIT_INTERRUPTED", "EXIT_USER_ERROR", "PRESET_DIR", "build_parser", "default_preset", "main",
           "user_message"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
TEXT_PRESET, SUDOKU_PRESET = PRESET_DIR / "text.yaml", PRESET_DIR / "tiny.yaml"
SCIENCE_PRESET = PRESET_DIR / "science.yaml"


def default_preset(args: argparse.Namespace) -> Path | None:
    """The preset a verb runs with when no --config is given: the Sudoku demo's for `demo` and
    `prep sudoku`, the science suite's for `demo --suite science`, the text preset for the corpus
    pipeline (prep, train, launch train / prep, config), and none for the verbs that read a
    trained model (its own config comes with it)."""
    if args.verb == "demo" and getattr(args, "suite", "demo") == "science":
        return SCIENCE_PRESET
    if args.verb == "demo" or (args.verb == "prep" and args.target == "sudoku"):
        return SUDOKU_PRESET
    if args.verb in ("prep", "train", "config", "plan") or (args.verb == "launch" and args.stage != "eval"):
        return TEXT_PRESET
    return None


def _resolve(args: argparse.Namespace) -> Config:
    """The config a verb runs with. `sample` starts from the config stored with the model,
    so only what the user overrides differs from training (model.* must then still match)."""
    if args.verb == "sample":
        from pipeline.artifact import saved_config
        from pipeline.config import config_from_dict

        base = config_from_dict(saved_config(args.model))
        return load_config(_preset_paths(args.config), args.overrides, base=base)
    if args.verb == "eval" or (args.verb == "launch" and args.stage == "eval"):
        _refuse_model_overrides(args.overrides)
    if args.verb == "demo" and args.suite not in SUITES:
        raise ProsecoError(f"--suite must be one of {', '.join(SUITES)}; got {args.suite!r}")
    default = default_preset(args)
    names = args.config or ([str(default)] if default is not None and default.is_file() else [])
    return load_config(_preset_paths(names), args.overrides)


# what a trained model carries: evaluation reads these from the model's own config.yaml
MODEL_SECTIONS = ("model", "diffusion", "optim", "data", "prep", "checkpoint")


def _refuse_model_overrides(overrides: Sequence[str]) -> None:
    """Evaluation scores a model with the settings it was trained with (data.*, model.*, ... come
    from its config.yaml), so an override of those sections would silently change nothing."""
    ignored = [o for o in overrides if o.split(".", 1)[0] in MODEL_SECTIONS]
    if ignored:
        raise ProsecoError(
            f"{', '.join(ignored)}: a model is evaluated with the {'/'.join(MODEL_SECTIONS)} settings it was "
            "trained with (its config.yaml), so this would change nothing; evaluation is set by eval.*, "
            "sampler.* and parallel.* (task settings: eval.task_options)")


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
    paths = []
    for name in names:
        preset = PRESET_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        paths.append(str(preset) if not Path(name).exists() and preset.is_file() else name)
    return paths


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
            print(model_size_line(cfg))
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
