"""lm-eval tasks as items of ``proseco eval``: ``eval.tasks=[lm_eval:gsm8k, lm_eval:my_local_task, ...]``.

An item ``lm_eval:NAME`` runs lm-eval's task NAME (``lm_eval.simple_evaluate``) on the item's model
through the adapter :class:`pipeline.lmeval.adapter.ProsecoLM`, with the item's complete sampler
setting (the ``sampler`` section with T, S and omega of the work list) and ``eval.batch_size``. It is
an item like any other: same work list, same resumability (its key holds the model identity, the
sampler settings, the lm-eval options, the sha256 of the local task files and the versions of
lm-eval and of the adapter), same ``--shard i/n``, same result JSON, read by ``proseco report``.

Options (``eval.*``): ``lm_eval_include`` (folders of task YAML; the tasks are looked up there
first, lm-eval's built-in tasks are indexed only for names not found there), ``lm_eval_limit``,
``lm_eval_fewshot``, ``lm_eval_gen_length``, ``lm_eval_mc_samples``, ``lm_eval_pad_to`` (the
adapter's ``pad_to``).

The result's ``metrics`` are lm-eval's metrics of the task (``acc``, ``exact_match/strict-match``:
the filter follows a slash unless it is ``none``); ``primary`` is the first metric of the task's
``metric_list``; ``nfe`` is the mean NFE per document (all requests of a document: choices x Monte
Carlo samples, greedy checks, generation); the samples file has one line per document.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import yaml

from pipeline.config import Config, SamplerConfig
from pipeline.errors import ProsecoError
from pipeline.lmeval import ADAPTER_VERSION, PREFIX, lm_eval_version

SKIP_KEYS = ("alias", "name", "sample_len", "samples")


def is_lm_eval(task: str) -> bool:
    """Whether an ``eval.tasks`` entry names an lm-eval task (``lm_eval:NAME``)."""
    return task.startswith(PREFIX)


def task_name(task: str) -> str:
    return task[len(PREFIX):]


def options(cfg: Config) -> dict:
    e = cfg.eval
    return {"include": e.lm_eval_include, "limit": e.lm_eval_limit, "fewshot": e.lm_eval_fewshot,
            "gen_length": e.lm_eval_gen_length, "mc_samples": e.lm_eval_mc_samples, "pad_to": e.lm_eval_pad_to}


def include_paths(cfg: Config) -> list[str]:
    return [p for p in cfg.eval.lm_eval_include.split(os.pathsep) if p]


@functools.lru_cache(maxsize=4)
def _manager(include: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def task_manager(cfg: Config, names: list[str]):
    """An lm-eval ``TaskManager`` that knows every name in ``names``: the include folders alone
    when they have them all (fast: lm-eval's ~15 000 built-in configs are not indexed), else with
    lm-eval's built-in tasks too. Unknown names are a user error naming them."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ProsecoError("lm_eval:* tasks need lm-eval: pip install 'proseco-pipeline[lmeval]'") from None
    include = tuple(include_paths(cfg))
    for path in include:
        if not Path(path).is_dir():
            raise ProsecoError(f"eval.lm_eval_include: {path} is not a folder of lm-eval task YAML files")
    manager = _manager(include, False) if include else None
    if manager is None or not set(names) <= set(manager.all_tasks):
        manager = _manager(include, True)
    unknown = sorted(set(names) - set(manager.all_tasks))
    if unknown:
        where = f" (looked in {os.pathsep.join(include)} and lm-eval's built-in tasks)" if include else ""
        raise ProsecoError(f"unknown lm-eval task(s) {', '.join(unknown)}{where}")
    return manager


def check_names(tasks: list[str], cfg: Config) -> None:
    """Refuse an empty ``lm_eval:`` entry or a name lm-eval does not know, before any work."""
    names = [task_name(t) for t in tasks if is_lm_eval(t)]
    if any(not n for n in names):
        raise ProsecoError("eval.tasks: 'lm_eval:' needs a task name, e.g. lm_eval:gsm8k")
    if names:
        task_manager(cfg, names)


def task_files(cfg: Config) -> dict[str, str]:
    """sha256 of every file in the include folders and of every local data file their YAML names
    (``dataset_kwargs.data_files``): a changed local task or data set is a new item."""
    files: dict[str, str] = {}
    for root in include_paths(cfg):
        for path in sorted(Path(root).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files[str(path.resolve())] = _sha256(path)
                if path.suffix in (".yaml", ".yml"):
                    for data in _data_files(path):
                        files[str(data)] = _sha256(data)
    return files


def _sha256(path: Path) -> str:
    """A file's sha256, computed once per (path, size, modification time) in this process: the work
    list asks for the same task files once per item."""
    st = path.stat()
    return _sha256_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    from pipeline.io import sha256_file

    return sha256_file(path)


class _Lenient(yaml.SafeLoader):
    """A YAML loader that reads lm-eval's ``!function`` tags as plain strings."""


_Lenient.add_multi_constructor("!", lambda loader, suffix, node: None)


def _data_files(config: Path) -> list[Path]:
    """The existing local files a task YAML names in ``dataset_kwargs.data_files``."""
    try:
        doc = yaml.load(config.read_text(), Loader=_Lenient)  # a SafeLoader subclass
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: bytes that are not UTF-8
        return []
    spec = ((doc or {}).get("dataset_kwargs") or {}).get("data_files") if isinstance(doc, dict) else None
    values = spec.values() if isinstance(spec, dict) else [spec]
    out = []
    for v in values:
        for item in (v if isinstance(v, list) else [v]):
            if isinstance(item, str):
                path = Path(item) if Path(item).is_absolute() else config.parent / item
                if path.is_file():
                    out.append(path.resolve())
    return out


def determinants(item, cfg: Config, sampler: SamplerConfig) -> dict:
    """Everything an lm-eval item's result depends on (its key is a hash of this)."""
    return {"model": {"identity": item.model.identity, "weights": cfg.eval.weights},
            "task": {"name": item.task, "options": options(cfg), "option_files": task_files(cfg),
                     "scorer_version": f"lm_eval {lm_eval_version()}, adapter {ADAPTER_VERSION}"},
            "sampler": dataclasses.asdict(sampler)}


def metric_name(key: str) -> str:
    """lm-eval's ``metric,filter`` as ``metric`` (filter ``none``) or ``metric/filter``."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}/{filt}"


def run_item(loaded, item, sampler: SamplerConfig, cfg: Config) -> tuple[dict, list[dict]]:
    """Run one item; (the result's fields, the samples file's rows)."""
    import lm_eval

    from pipeline.lmeval.adapter import ProsecoLM

    name = task_name(item.task)
    manager = task_manager(cfg, [name])
    e = cfg.eval
    lm = ProsecoLM(loaded=(loaded.model, loaded.cfg, loaded.info), sampler_config=sampler, batch_size=e.batch_size,
                   gen_length=e.lm_eval_gen_length, mc_samples=e.lm_eval_mc_samples, pad_to=e.lm_eval_pad_to)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=e.lm_eval_limit or None,
                                      num_fewshot=None if e.lm_eval_fewshot < 0 else e.lm_eval_fewshot,
                                      bootstrap_iters=0, log_samples=True)
    except ProsecoError:
        raise
    except Exception as exc:  # lm-eval's own failures (data not found offline, unsafe code refused): the item fails
        raise ProsecoError(f"lm-eval task {name} failed: {type(exc).__name__}: {exc}") from exc
    if out is None or name not in out.get("results", {}):
        raise ProsecoError(f"lm-eval returned no results for task {name}")
    raw = out["results"][name]
    metrics = {metric_name(k): float(v) for k, v in raw.items()
               if k not in SKIP_KEYS and "_stderr" not in k and isinstance(v, (int, float))}
    listed = [m.get("metric") for m in (out.get("configs", {}).get(name, {}).get("metric_list") or [])]
    primary = next((k for m in listed for k in metrics if k.split("/")[0] == m), next(iter(metrics), None))
    if primary is None:
        raise ProsecoError(f"lm-eval task {name} reported no numeric metric")
    higher = (out.get("higher_is_better", {}).get(name) or {}).get(primary.split("/")[0], True)
    per_doc: dict[int, list[int]] = {}
    for s in lm.request_stats:
        per_doc.setdefault(s["doc_id"], [0, 0, 0])
        for j, k in enumerate(("nfe", "nfe_predictor", "nfe_corrector")):
            per_doc[s["doc_id"]][j] += s[k]
    docs = max(len(per_doc), 1)
    rows = [{"i": s.get("doc_id"), "nfe": per_doc.get(s.get("doc_id"), [0])[0], "text": _text(s)}
            for s in (out.get("samples") or {}).get(name, [])]
    totals = lm.totals()
    fields = {"primary": primary, "higher_is_better": bool(higher), "diversity": None, "metrics": metrics,
              "nfe": sum(v[0] for v in per_doc.values()) / docs,
              "nfe_predictor": sum(v[1] for v in per_doc.values()) / docs,
              "nfe_corrector": sum(v[2] for v in per_doc.values()) / docs,
              "lm_eval": {"task": name, "documents": len(per_doc), "results": raw,
                          "n_samples": (out.get("n-samples") or {}).get(name), **lm.settings(),
                          "batch_size": lm.batch_size, "totals": totals}}
    return fields, rows


def _text(sample: dict) -> str:
    """A document's line in the samples file: the generated text, or the choices' scores."""
    resps = sample.get("filtered_resps") or []
    target = sample.get("target")
    if resps and all(isinstance(r, str) for r in resps):
        return f"{resps[0]}    [target: {target}]"
    return f"{resps}    [target: {target}]"

