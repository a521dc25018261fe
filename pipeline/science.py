"""``proseco demo --suite science``: MDM against ProSeCo on every task of ``demo.tasks``.

For each task the suite does what ``proseco demo`` does for 4x4 Sudoku - prepare the task's data,
train an MDM model and a ProSeCo model at equal training compute through `proseco train`'s loop
(:func:`pipeline.demo.train_or_load`: MDM gets ``demo.mdm_step_ratio`` times the steps), evaluate
both through the batch evaluator (`proseco eval`, then `proseco report`) - and then compares five
sampling methods at matched NFE (paper arXiv 2602.11590, Section 5 and Table 1):

(a) MDM, (b) the MDM model + the corrector loop, (c) ProSeCo with the corrector off, (d) ProSeCo +
the corrector loop, (e) ReMDM (remasking, sampler ``remdm``) on the MDM model; sweeping T
(``demo.steps_grid``), S (``demo.corrector_grid``) and omega (``demo.corrector_every_grid``) with
the sampler's official NFE and nucleus rules (the ``sampler.*`` defaults).

A task is a module of :mod:`pipeline.tasks` obeying the suite interface: ``NAME``, ``VOCAB_SIZE``,
``MASK_ID`` (= VOCAB_SIZE - 1), ``SEQ_LEN``, ``SUITE_TASKS`` (registered evaluation tasks; the first
one's primary metric sets the headline NFE ratio), ``prepare_data(cfg, out_dir)`` (idempotent,
from ``cfg.data``) and ``load(out_dir)`` (``train`` [N, SEQ_LEN] and a ``manifest`` with a
``fingerprint``). ``demo.tasks`` names map to modules by :data:`pipeline.config.validate.SUITE_MODULES`.

Written under ``<demo.out_dir>/<task>/``: ``data/``, the models (``mdm/``, ``proseco/``, their run
folders in ``runs/``), ``eval/`` (the evaluator's results and report), ``results.json`` (every
point), ``report.md`` (NFE-matched tables with diversity beside quality, the NFE ratio; the same for the
task's graded metric where it has one: :class:`pipeline.tasks.base.EvalTask`) and one
quality-and-diversity-vs-NFE PNG per evaluation task; ``<demo.out_dir>/science.md`` summarises
all tasks. A rerun reuses the trained models (same config and data) and every finished result.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from pathlib import Path
from types import ModuleType

import torch

from pipeline import demo
from pipeline.config import Config, to_dict
from pipeline.config.validate import SUITE_MODULES, validate
from pipeline.errors import ProsecoError
from pipeline.evaluation.matching import nfe_matched
from pipeline.evaluation.plots import Point, quality_figure, save
from pipeline.model import Backbone, count_parameters

METHOD_NAMES = {**demo.METHOD_NAMES, "e": "ReMDM (MDM model)"}
INTERFACE = ("NAME", "VOCAB_SIZE", "MASK_ID", "SEQ_LEN", "SUITE_TASKS", "prepare_data", "load")
KINDS = {"mdm": ("ancestral", "remdm"), "proseco": ("ancestral",)}  # model -> the samplers it is evaluated with


def task_module(name: str) -> ModuleType:
    """The task module of a ``demo.tasks`` entry, checked for the suite interface."""
    if name not in SUITE_MODULES:
        raise ProsecoError(f"unknown demo.tasks entry {name!r}; suite tasks: {', '.join(SUITE_MODULES)}")
    path = f"pipeline.tasks.{SUITE_MODULES[name]}"
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name != path:
            raise
        raise ProsecoError(f"demo.tasks entry {name!r}: its module {path} is not in this installation") from None
    missing = [a for a in INTERFACE if not hasattr(module, a)]
    if missing:
        raise ProsecoError(f"{path} lacks the suite interface's {', '.join(missing)} (see pipeline/science.py)")
    return module


def task_config(cfg: Config, module: ModuleType) -> Config:
    """``cfg`` for one task: data.task and data.seq_len from the module, model.max_seq_len = its
    length (the models are the preset's size otherwise); validated like any config."""
    tcfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, task=module.NAME, seq_len=module.SEQ_LEN),
                               model=dataclasses.replace(cfg.model, max_seq_len=module.SEQ_LEN))
    validate(tcfg)
    return tcfg


def method_of(kind: str, sampler: str, corrector_steps: int) -> str:
    """The method letter (a)-(e) of a model kind and sampler setting."""
    if sampler == "remdm":
        return "e"
    return {("mdm", False): "a", ("mdm", True): "b", ("proseco", False): "c",
            ("proseco", True): "d"}[(kind, corrector_steps > 0)]


def eval_config(cfg: Config, module: ModuleType, samplers: tuple[str, ...]) -> Config:
    """The evaluator's config of one model: the module's SUITE_TASKS x ``samplers`` x T x S x omega."""
    d = cfg.demo
    return dataclasses.replace(cfg, eval=dataclasses.replace(
        cfg.eval, tasks=list(module.SUITE_TASKS), samplers=list(samplers), steps=list(d.steps_grid),
        corrector_steps=[0, *d.corrector_grid], corrector_every=list(d.corrector_every_grid),
        num_samples=d.eval_samples, batch_size=cfg.sampler.batch_size))


def _eval_command(path: str, ecfg: Config, folder: Path) -> str:
    e = ecfg.eval
    lists = {k: ",".join(map(str, getattr(e, k))) for k in ("tasks", "samplers", "steps", "corrector_steps",
                                                           "corrector_every")}
    return (f"proseco eval {path} " + " ".join(f"eval.{k}=[{v}]" for k, v in lists.items())
            + f" eval.num_samples={e.num_samples} --out {folder}\n")


def to_row(kind: str, item, result: dict) -> dict:
    """One point of the sweep: method, T, S, omega, NFE, primary and diversity metric, all metrics."""
    st, m = item.setting, result["metrics"]
    return {"method": method_of(kind, st.sampler, st.corrector_steps), "task": item.task, "sampler": st.sampler,
            "steps": st.steps, "corrector_steps": st.corrector_steps, "corrector_every": st.corrector_every,
            "nfe": result["nfe"], "nfe_predictor": result["nfe_predictor"], "nfe_corrector": result["nfe_corrector"],
            "primary": result["primary"], "quality": m.get(result["primary"]),
            "higher_is_better": result["higher_is_better"], "diversity_metric": result["diversity"],
            "diversity": m.get(result["diversity"]) if result["diversity"] else None,
            "graded_metric": result.get("graded"), "graded": m.get(result["graded"]) if result.get("graded") else None,
            "metrics": m}


def evaluate(cfg: Config, module: ModuleType, folder: Path, trained: dict, log) -> list[dict]:
    """Both models through the batch evaluator (ReMDM on the MDM model only), then `proseco report`;
    the rows of every finished item, in the evaluator's (sorted) order."""
    from pipeline.artifact import model_identity
    from pipeline.evaluation import report, runner

    items, configs = [], {}
    for kind, samplers in KINDS.items():
        ref = runner.ModelRef(f"{kind}-{trained[kind]['key'][:8]}", str((folder / kind).resolve()),
                              identity=model_identity(folder / kind))
        configs[kind] = eval_config(cfg, module, samplers)
        items += [(kind, item) for item in runner.work_list([ref], configs[kind].eval.tasks, configs[kind])]
    out = folder / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "commands.txt").write_text("proseco demo --suite science  # trains both models, then evaluates them as:\n"
                                      + "".join(_eval_command(str((folder / k).resolve()), c, out)
                                                for k, c in configs.items()))
    log(f"  {len(items)} items x {cfg.demo.eval_samples} samples -> {out}")
    by_key = demo.run_and_collect([item for _, item in items], configs["mdm"], out, log)
    rows = [to_row(kind, item, by_key[k]) for kind, item in items
            if (k := (item.model.key, item.setting, item.task)) in by_key]
    report.build(out)
    return rows


# ------------------------------------------------------------------------------------ bookkeeping
def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _rated(rows: list[dict], key: str = "quality") -> list[dict]:
    return [r for r in rows if r.get(key) is not None]


def _scale(rows: list[dict], task: str, graded: bool) -> tuple[list[dict], str, str, bool]:
    """``task``'s rows that have the compared metric, its row key, its name and direction: the
    primary metric, or (``graded``) the task's graded metric, higher is better."""
    mine = [r for r in rows if r["task"] == task]
    key = "graded" if graded else "quality"
    mine = _rated(mine, key)
    if not mine:
        return [], key, "", True
    return (mine, key, mine[0]["graded_metric"], True) if graded else (
        mine, key, mine[0]["primary"], mine[0]["higher_is_better"])


def ratio(rows: list[dict], task: str, graded: bool = False) -> dict | None:
    """:func:`pipeline.demo.nfe_ratio` of one evaluation task's rows, in its metric's direction
    (``graded``: on the task's graded metric instead of its primary)."""
    mine, key, _, higher = _scale(rows, task, graded)
    return demo.nfe_ratio(mine, key, "nfe", higher) if mine else None


def ratio_line(rows: list[dict], task: str, graded: bool = False) -> str:
    """The NFE ratio at which (d) reaches (a)'s best quality on ``task``, as a sentence."""
    r = ratio(rows, task, graded)
    if r is None:
        return f"{task}: no (a) and (d) results to compare" + (" on a graded metric" if graded else "")
    metric = _scale(rows, task, graded)[2]
    if r.get("flat"):
        return (f"{task}: MDM (a) scores {_fmt(r['mdm_best'])} {metric} at every setting, so there is no "
                f"NFE ratio; compare (d)'s column")
    if r["ratio"] is None:
        return f"{task}: ProSeCo (d) does not reach MDM's best {metric} ({_fmt(r['mdm_best'])}) in this sweep"
    verdict = "fewer network evaluations" if r["ratio"] >= 1 else "(ProSeCo needs more network evaluations)"
    return (f"{task}: ProSeCo (d) reaches MDM's best {metric} ({_fmt(r['mdm_best'])} at {r['mdm_nfe']:.1f} NFE) "
            f"at {r['proseco_nfe']:.1f} NFE: {r['ratio']:.2f}x {verdict}")


def ratio_lines(rows: list[dict], task: str) -> list[str]:
    """:func:`ratio_line` of ``task``'s primary metric, and of its graded metric when it has one."""
    graded = _has_graded(rows, task)
    return [ratio_line(rows, task)] + ([ratio_line(rows, task, graded=True) + " (graded metric)"] if graded else [])


def _has_graded(rows: list[dict], task: str) -> bool:
    return any(r["task"] == task and r.get("graded") is not None for r in rows)


def _setting(r: dict) -> str:
    corrector = f" S={r['corrector_steps']} ω={r['corrector_every']}" if r["corrector_steps"] else ""
    return f"T={r['steps']}{corrector}"


def table(rows: list[dict], task: str, graded: bool = False) -> list[str]:
    """Markdown NFE-matched table of ``task``: per budget and method, the best setting within the
    budget (its metric's direction) as ``quality / diversity (T, S, omega)``; ``graded``: of the
    task's graded metric instead of its primary."""
    mine, key, metric, hib = _scale(rows, task, graded)
    if not mine:
        return [f"(no results for {task})"]
    best = nfe_matched(mine, demo.budgets_for(r["nfe"] for r in mine), lambda r: r[key], hib,
                       label="method", labels=METHOD_NAMES)
    div = mine[0]["diversity_metric"] or "no diversity metric"
    lines = [(f"{task}: {metric} ({'higher' if hib else 'lower'} is better) / {div}, best setting "
              "with mean NFE <= budget (T steps, S corrector passes, ω corrector every ω steps)"), "",
             "| NFE <= | " + " | ".join(f"({k}) {n}" for k, n in METHOD_NAMES.items()) + " |",
             "|---:|" + "---|" * len(METHOD_NAMES)]
    for budget in next(iter(best.values())):
        cells = [("-" if (r := best[k][budget]) is None else
                  f"{_fmt(r[key])} / {_fmt(r['diversity'])} ({_setting(r)})") for k in METHOD_NAMES]
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    return lines


def tables(rows: list[dict], task: str) -> list[str]:
    """:func:`table` of ``task``'s primary metric, then of its graded metric when it has one."""
    return table(rows, task) + (["", *table(rows, task, graded=True)] if _has_graded(rows, task) else [])


def frontier(rows: list[dict], higher: bool, key: str = "quality") -> list[Point]:
    """A method's quality-vs-NFE frontier: the settings better than every cheaper one (the best
    quality the method reaches within each NFE), with their diversity; ``key``: the row's metric
    (``quality``, or ``graded``)."""
    sign, out, top = (1 if higher else -1), [], None
    for r in sorted(_rated(rows, key), key=lambda r: (r["nfe"], -sign * r[key])):
        if top is None or sign * r[key] > sign * top:
            out.append(Point(r["nfe"], r[key], r["diversity"]))
            top = r[key]
    return out


def plot(rows: list[dict], task: str, path: Path, title: str, graded: bool = False) -> None:
    """Quality (and diversity, second panel) against NFE for ``task``: one line per method (a)-(e);
    ``graded``: of the task's graded metric."""
    mine, key, metric, higher = _scale(rows, task, graded)
    if not mine:
        return
    lines = {f"({k}) {n}": frontier([r for r in mine if r["method"] == k], higher, key)
             for k, n in METHOD_NAMES.items() if any(r["method"] == k for r in mine)}
    save(quality_figure(lines, metric, higher, mine[0]["diversity_metric"], title), path)


def _times(trained: dict, stages: dict) -> str:
    return ("training: " + ", ".join(f"{k} {v['steps']} steps / {v['seconds']:.0f} s" for k, v in trained.items())
            + "; wall time this run: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()))


def task_report(name: str, module: ModuleType, rows: list[dict], trained: dict, stages: dict) -> str:
    """``report.md`` of one task: a table, the NFE ratio and the plot of every evaluation task."""
    lines = [f"# {name}: MDM vs ProSeCo at matched NFE", "",
             "(a)-(e) as in pipeline/science.py; each cell: quality / diversity (setting).", "",
             _times(trained, stages)]
    for task in module.SUITE_TASKS:
        graded = [f"![{task}, graded]({task}-graded.png)"] if _has_graded(rows, task) else []
        lines += ["", f"## {task}", "", *tables(rows, task), "", *ratio_lines(rows, task), "", f"![{task}]({task}.png)",
                  *graded]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ driver
def run_task(cfg: Config, name: str, out: Path, log) -> dict:
    """Prepare, train, evaluate and report one task into ``out/<name>``; returns its summary."""
    module = task_module(name)
    tcfg, folder, stages = task_config(cfg, module), out / name, {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        stages[stage] = time.perf_counter() - clock
        clock = time.perf_counter()

    module.prepare_data(tcfg, folder / "data")
    data = module.load(folder / "data")
    lap("data")
    log(f"[{name}] 1/4 data: {len(data['train'])} training sequences of {module.SEQ_LEN} tokens "
        f"(fingerprint {data['manifest']['fingerprint'][:12]}) in {stages['data']:.0f} s")
    log(f"[{name}] 2/4 train ({count_parameters(Backbone(tcfg.model, vocab_size=module.VOCAB_SIZE)):,} "
        "parameters each)")
    trained = {}
    for kind in KINDS:
        trained[kind] = demo.train_or_load(kind, tcfg, data, folder, log, task=module)[1]
        lap(f"train {kind}")
    log(f"[{name}] 3/4 evaluate (a)-(e) on {', '.join(module.SUITE_TASKS)}")
    rows = evaluate(tcfg, module, folder, trained, log)
    lap("eval")
    for task in module.SUITE_TASKS:
        plot(rows, task, folder / f"{task}.png", f"{name}: {task} against NFE")
        if _has_graded(rows, task):
            plot(rows, task, folder / f"{task}-graded.png", f"{name}: {task}, graded metric, against NFE", graded=True)
    ratios = {task: ratio(rows, task) for task in module.SUITE_TASKS}
    graded = {task: r for task in module.SUITE_TASKS if (r := ratio(rows, task, graded=True))}
    lap("report")
    (folder / "results.json").write_text(json.dumps(
        {"task": name, "suite_tasks": list(module.SUITE_TASKS), "config": to_dict(tcfg), "trained": trained,
         "results": rows, "ratios": ratios, "graded_ratios": graded, "stage_seconds": stages}, indent=1))
    (folder / "report.md").write_text(task_report(name, module, rows, trained, stages))
    log(f"[{name}] 4/4 report: {folder / 'report.md'}; "
        + "; ".join(line for t in module.SUITE_TASKS for line in ratio_lines(rows, t)))
    return {"name": name, "module": module, "rows": rows, "trained": trained, "stages": stages}


def summary(tasks: list[dict], seconds: float) -> str:
    """``science.md``: per task the headline table (its first SUITE_TASK), every NFE ratio and the
    wall times, ready to paste into docs/science.md."""
    lines = ["# Science suite: MDM vs ProSeCo at matched NFE", "",
             (f"Tasks: {', '.join(t['name'] for t in tasks)}; total wall time {seconds:.0f} s. "
              "Each cell: quality / diversity (best setting within the NFE budget).")]
    for t in tasks:
        suite = t["module"].SUITE_TASKS
        lines += ["", f"## {t['name']}", "", *tables(t["rows"], suite[0]), "",
                  *(f"- {line}" for task in suite for line in ratio_lines(t["rows"], task)), "",
                  _times(t["trained"], t["stages"]),
                  f"(full tables and plots: {t['name']}/report.md)"]
    return "\n".join(lines) + "\n"


def run(cfg: Config) -> int:
    """The suite over ``demo.tasks``, in order; 0 when done."""
    start = time.perf_counter()
    modules = [task_module(name) for name in cfg.demo.tasks]  # every entry is checked before any work
    out, log = demo.output_folder(cfg), demo.log
    log(f"proseco demo --suite science -> {out}/  ({', '.join(m.NAME for m in modules)}; "
        f"torch threads: {torch.get_num_threads()})")
    done = [run_task(cfg, name, out, log) for name in cfg.demo.tasks]
    (out / "science.md").write_text(summary(done, time.perf_counter() - start))
    log(f"\nwrote {out / 'science.md'} in {time.perf_counter() - start:.0f} s")
    return 0
