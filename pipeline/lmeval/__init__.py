"""lm-evaluation-harness support: the model adapter ``proseco`` and lm-eval tasks in ``proseco eval``.

* :mod:`pipeline.lmeval.adapter`: the ``LM`` subclass (``lm_eval --model proseco``);
* :mod:`pipeline.lmeval.likelihood`: LLaDA's Monte Carlo masked-diffusion bound;
* :mod:`pipeline.lmeval.requests`: request seeds, tokenization, batching, stop sequences;
* :mod:`pipeline.lmeval.items`: ``eval.tasks=[lm_eval:NAME]`` items of the batch evaluator;
* ``python -m pipeline.lmeval`` / ``proseco-lm-eval``: lm-eval's own CLI with the adapter registered.

The package declares the adapter as an entry point of the group ``lm_eval.models``; lm-eval 0.4.13
itself does not read that group, so :func:`register` adds every model of the group (ours included)
to lm-eval's registry. It runs on import of this package: ``import pipeline.lmeval`` before
``lm_eval.simple_evaluate(model="proseco", ...)``.
"""

from __future__ import annotations

ENTRY_POINT_GROUP = "lm_eval.models"
ADAPTER = "pipeline.lmeval.adapter:ProsecoLM"
NAME = "proseco"
PREFIX = "lm_eval:"  # eval.tasks items that are lm-eval tasks
ADAPTER_VERSION = 1  # part of every result's key: bump when what the adapter computes for a request changes


def lm_eval_version() -> str:
    """The installed lm-eval's version ("not installed" without it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "not installed"


def register() -> list[str]:
    """Register ``proseco`` and every installed ``lm_eval.models`` entry point with lm-eval (lazily:
    nothing is imported until lm-eval asks for the model). Returns the names registered now; does
    nothing when lm-eval is not installed."""
    from importlib.metadata import entry_points

    try:
        from lm_eval.api.registry import model_registry
    except ImportError:
        return []
    found = {NAME: ADAPTER}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    added = []
    for name, target in found.items():
        if name not in model_registry:
            model_registry.register(name, target=target.replace(" ", ""))
            added.append(name)
    return added


register()
