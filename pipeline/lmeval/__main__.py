"""``python -m pipeline.lmeval ARGS`` (installed as ``proseco-lm-eval``): lm-eval's CLI, unchanged,
with the ``proseco`` model (and every ``lm_eval.models`` entry point) registered first. A user
error of the adapter is one line on stderr and exit code 2, not a traceback."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import ProsecoError

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("error: lm-eval is not installed: pip install 'proseco-pipeline[lmeval]'", file=sys.stderr)
        return 2
    from pipeline.lmeval import register

    register()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except ProsecoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
