"""``proseco demo``: the paper's effect, end to end, on 2 CPU cores in a few minutes.

prep (4x4 Sudoku grids -> files + manifest) -> train an MDM model and a ProSeCo model at the
same training compute -> sweep sampling budgets -> an NFE-matched table of
(a) MDM sampling, (b) MDM model + corrector loop, (c) ProSeCo model without and
(d) with the corrector loop. Quality: valid grids generated from scratch, and held-out
puzzles solved; diversity: distinct valid grids.

Training budgets are step counts, not wall-clock timers, so the demo is deterministic under its
seed: a ProSeCo step does two forward and two backward passes, so the MDM model gets
``demo.mdm_step_ratio`` (default 2) times as many steps. The measured training times are
printed beside the table so the match can be checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import torch

from pipeline import train
from pipeline.artifact import load_model, model_identity, write_export
from pipeline.config import Config, to_dict
from pipeline.data.memory import MemoryData
from pipeline.errors import ProsecoError
from pipeline.evaluation.matching import nfe_matched
from pipeline.model import Backbone, count_parameters
from pipeline.rundir import RunDir
from pipeline.runlog import read_metrics
from pipeline.tasks import sudoku

METHODS = {  # label -> (which model, corrector on?)
    "a": ("mdm", False),
    "b": ("mdm", True),
    "c": ("proseco", False),
    "d": ("proseco", True),
}
METHOD_NAMES = {
    "a": "MDM",
    "b": "MDM + corrector",
    "c": "ProSeCo, corrector off",
    "d": "ProSeCo + corrector",
}


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def mdm_steps(cfg: Config) -> int:
    """MDM steps at ProSeCo's training compute: its plain-MDM steps before
    ``diffusion.corrector_start_step`` count once, the ProSeCo steps after ``demo.mdm_step_ratio`` times."""
    warm = min(cfg.diffusion.corrector_start_step, cfg.demo.proseco_steps)
    return warm + round((cfg.demo.proseco_steps - warm) * cfg.demo.mdm_step_ratio)


def train_or_load(kind: str, cfg: Config, data: dict, out: Path, log,
                  task: ModuleType = sudoku) -> tuple[torch.nn.Module, dict]:
    """Train one model (or load it when this exact config + data was trained before).

    Training is `proseco train`'s loop in this process (:func:`pipeline.train.run` on the
    sequences held in memory, single process, torch backend), in the run folder
    ``<out>/runs/<kind>-<key>``: an interrupted demo resumes from its checkpoint when rerun.
    ``task``: the task module (the suite interface of :mod:`pipeline.science`) whose token layout
    (VOCAB_SIZE, MASK_ID) the training data ``data`` (its ``load``) is in."""
    diffusion = dataclasses.replace(cfg.diffusion, corrector_weight=0.0 if kind == "mdm" else
                                    (cfg.diffusion.corrector_weight or 1.0))
    steps = cfg.demo.proseco_steps if kind == "proseco" else mdm_steps(cfg)
    key = _fingerprint({"model": to_dict(cfg)["model"], "diffusion": dataclasses.asdict(diffusion),
                        "optim": to_dict(cfg)["optim"], "seed": cfg.run.seed, "log_every": cfg.log.every,
                        "steps": steps, "data": data["manifest"]["fingerprint"]})
    path = out / kind
    if path.exists():
        model, _, info = load_model(path)
        saved = info.extra
        if saved.get("key") == key:
            log(f"  {kind:8s} loaded {path} (same config and data; {saved['steps']} steps, {saved['seconds']:.0f} s)")
            return model, {"steps": saved["steps"], "seconds": saved["seconds"], "cached": True, "key": key}
    folder = RunDir(out / "runs" / f"{kind}-{key[:12]}")
    trained_cfg = dataclasses.replace(
        cfg, diffusion=diffusion,
        optim=dataclasses.replace(cfg.optim, steps=steps),
        parallel=dataclasses.replace(cfg.parallel, backend="torch", distributed="none"),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=steps),
        log=dataclasses.replace(cfg.log, val_every=0, wandb="disabled"),
        run=dataclasses.replace(cfg.run, name=f"demo-{kind}", dir=str(folder)))
    noun = getattr(task, "DATA_NAME", f"{task.NAME} sequences")  # optional: how the training log names the rows
    grids = MemoryData(data["train"], task.VOCAB_SIZE, task.MASK_ID, data["manifest"]["fingerprint"],
                       f"{len(data['train'])} {noun} in memory")
    start = time.perf_counter()
    if train.run(trained_cfg, memory=grids) != 0:
        raise ProsecoError(f"training of the {kind} model stopped early; its checkpoint is in {folder.checkpoints}: "
                           "rerun the same `proseco demo` command to continue")
    seconds = time.perf_counter() - start
    model, _, info = load_model(folder.path)  # its latest checkpoint: the EMA weights when kept
    last = read_metrics(folder.metrics)[-1]
    log(f"  {kind:8s} {steps} steps in {seconds:.0f} s ({1e3 * seconds / steps:.1f} ms/step); "
        f"final mdm loss {last['mdm']:.3f}, correction loss {last['correction']:.3f}")
    write_export(path, {info.weights: model.state_dict()}, trained_cfg, task.VOCAB_SIZE, task.MASK_ID,
                 step=steps, extra={"key": key, "steps": steps, "seconds": seconds}, force=True)
    return model, {"steps": steps, "seconds": seconds, "cached": False, "key": key}


def nfe_ratio(results: list[dict], metric: str, nfe_key: str, higher: bool = True) -> dict | None:
    """NFE MDM (a) needs for its best quality / NFE ProSeCo (d) needs to reach that quality (the
    paper's headline: the same quality with 2-3x fewer network evaluations). ``higher``: whether a
    larger ``metric`` is better (False for e.g. a fraction of impossible sequences). No ratio
    (``ratio`` None, ``flat`` True) when MDM scores the same at every setting: more NFE buys it
    nothing, so "reaching its best" compares nothing."""
    sign = 1 if higher else -1
    base = [r for r in results if r["method"] == "a"]
    ours = [r for r in results if r["method"] == "d"]
    if not base or not ours:
        return None
    best = max(base, key=lambda r: (sign * r[metric], -r[nfe_key]))
    if len({r[metric] for r in base}) == 1:  # e.g. no valid grid at any setting: reaching that is no result
        return {"mdm_best": best[metric], "mdm_nfe": best[nfe_key], "proseco_nfe": None, "ratio": None, "flat": True}
    reach = [r for r in ours if sign * r[metric] >= sign * best[metric]]
    if not reach:
        return {"mdm_best": best[metric], "mdm_nfe": best[nfe_key], "proseco_nfe": None, "ratio": None}
    cheapest = min(reach, key=lambda r: r[nfe_key])
    return {"mdm_best": best[metric], "mdm_nfe": best[nfe_key], "proseco_nfe": cheapest[nfe_key],
            "ratio": best[nfe_key] / cheapest[nfe_key]}


def format_report(results: list[dict], budgets: list[int], trained: dict) -> str:
    lines = []
    for metric, nfe_key, title in (("valid", "nfe", "valid grids generated from scratch (distinct valid)"),
                                   ("solved", "solve_nfe", "held-out puzzles solved")):
        table = nfe_matched(results, budgets, lambda r, m=metric: r[m], nfe=nfe_key, label="method", labels=METHODS)
        lines += [f"\nNFE-matched: {title}; best setting with mean NFE <= budget (T = steps, S = corrector)",
                  f"{'NFE <=':>7} | " + " | ".join(f"({k}) {METHOD_NAMES[k]:<22}" for k in METHODS)]
        for b in budgets:
            cells = []
            for k in METHODS:
                r = table[k][b]
                if r is None:
                    cells.append(f"{'-':<26}")
                    continue
                extra = f" ({r['distinct_valid']:>3})" if metric == "valid" else ""
                cells.append(f"{r[metric]:6.1%}{extra} T={r['steps']:<2} S={r['corrector_steps']}".ljust(26)[:26])
            lines.append(f"{b:>7} | " + " | ".join(cells))
        ratio = nfe_ratio(results, metric, nfe_key)
        if ratio and ratio["ratio"]:
            lines.append(f"  ProSeCo (d) reaches MDM's best {metric} ({ratio['mdm_best']:.1%} at {ratio['mdm_nfe']:.1f} NFE)"
                         f" at {ratio['proseco_nfe']:.1f} NFE: {ratio['ratio']:.2f}x fewer network evaluations")
        elif ratio and ratio.get("flat"):
            lines.append(f"  MDM (a) scores {ratio['mdm_best']:.1%} {metric} at every setting: no NFE ratio")
        elif ratio:
            lines.append(f"  ProSeCo (d) does not reach MDM's best {metric} ({ratio['mdm_best']:.1%}) in this sweep")
    lines.append("\ntraining: " + ", ".join(f"{k} {v['steps']} steps / {v['seconds']:.0f} s" for k, v in trained.items()))
    return "\n".join(lines)


def budgets_for(nfes: Iterable[float]) -> list[int]:
    """The NFE budgets of a table: the powers of two from 2 up to twice the largest mean NFE."""
    top = 2 * max(nfes)
    return [2 ** i for i in range(1, 12) if 2 ** i <= top]


def run_and_collect(items: list, ecfg: Config, folder: Path, log) -> dict:
    """Run the evaluator's work ``items`` into ``folder`` (finished items are skipped, as `proseco
    eval` does) -> (model key, setting, task) -> the result JSON of every item that succeeded."""
    from pipeline.evaluation import runner

    counts = runner.run_items(items, ecfg, folder, log=log)
    if counts["failed"]:
        log(f"  {counts['failed']} evaluation items failed; see {folder / 'report.md'}")
    by_key = {}
    for item in items:
        r = json.loads(runner.result_path(folder, item).read_text())
        if r.get("status") == "ok":
            by_key[(item.model.key, item.setting, item.task)] = r
    return by_key


def evaluate_with_runner(cfg: Config, out: Path, trained: dict, log) -> tuple[list[dict], Path]:
    """Step 3 through the batch evaluator (``proseco eval``): both model files x {sudoku4,
    sudoku4-solve} x T in demo.steps_grid x S in [0] + demo.corrector_grid, then ``proseco report``.
    Returns the rows of the NFE-matched console table ((a)-(d)) and the HTML report's path."""
    from pipeline.evaluation import report, runner

    ecfg = dataclasses.replace(cfg, eval=dataclasses.replace(
        cfg.eval, tasks=["sudoku4", "sudoku4-solve"], samplers=["ancestral"], steps=list(cfg.demo.steps_grid),
        corrector_steps=[0, *cfg.demo.corrector_grid], corrector_every=[1], num_samples=cfg.demo.eval_samples,
        batch_size=cfg.sampler.batch_size))
    models = [runner.ModelRef(f"{kind}-{trained[kind]['key'][:8]}", str((out / kind).resolve()),
                              identity=model_identity(out / kind))
              for kind in ("mdm", "proseco")]
    items = runner.work_list(models, ecfg.eval.tasks, ecfg)
    folder = out / "eval"
    log(f"3/3 evaluate {len(items)} items (2 models x 2 tasks x {len(runner.settings(ecfg))} sampler settings) "
        f"x {cfg.demo.eval_samples} samples -> {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    grid = ",".join(map(str, cfg.demo.steps_grid))
    corr = ",".join(map(str, [0, *cfg.demo.corrector_grid]))
    (folder / "commands.txt").write_text("proseco demo  # trains both models, then evaluates each like:\n" + "".join(
        f"proseco eval {m.path} eval.tasks=[sudoku4,sudoku4-solve] eval.samplers=[ancestral] eval.steps=[{grid}] "
        f"eval.corrector_steps=[{corr}] eval.num_samples={cfg.demo.eval_samples} --out {folder}\n" for m in models))
    by_key = run_and_collect(items, ecfg, folder, log)
    rows = []
    for model, kind in zip(models, ("mdm", "proseco")):
        for st in runner.settings(ecfg):
            gen, solve = (by_key.get((model.key, st, t)) for t in ("sudoku4", "sudoku4-solve"))
            if gen is None or solve is None:
                continue
            method = {("mdm", False): "a", ("mdm", True): "b", ("proseco", False): "c",
                      ("proseco", True): "d"}[(kind, st.corrector_steps > 0)]
            rows.append({"method": method, "steps": st.steps, "corrector_steps": st.corrector_steps,
                         "nfe": gen["nfe"], "valid": gen["metrics"]["valid"],
                         "distinct_valid": int(gen["metrics"]["distinct_valid"]), "solve_nfe": solve["nfe"],
                         "solved": solve["metrics"]["solved"],
                         "clue_violations": int(solve["metrics"]["clue_violations"])})
    _, page = report.build(folder)
    return rows, page


def log(msg: str) -> None:
    """The demo's and the suite's progress line (flushed: their logs are often redirected)."""
    print(msg, flush=True)


def output_folder(cfg: Config) -> Path:
    """``demo.out_dir``, created, with ``parallel.threads`` applied: what every demo run starts with."""
    if cfg.parallel.threads:
        torch.set_num_threads(cfg.parallel.threads)
    out = Path(cfg.demo.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run(cfg: Config) -> int:
    start = time.perf_counter()
    out = output_folder(cfg)
    log(f"proseco demo -> {out}/  (4x4 Sudoku; torch threads: {torch.get_num_threads()})")
    sudoku.prepare_data(cfg, out / "data")
    data = sudoku.load(out / "data")
    log(f"1/3 data: {len(data['train'])} training grids, {len(data['puzzles'])} held-out puzzles "
        f"with {cfg.data.puzzle_clues} clues (fingerprint {data['manifest']['fingerprint'][:12]})")

    log(f"2/3 train ({count_parameters(Backbone(cfg.model, vocab_size=sudoku.VOCAB_SIZE)):,} parameters each)")
    models, trained = {}, {}
    for kind in ("mdm", "proseco"):
        models[kind], trained[kind] = train_or_load(kind, cfg, data, out, log)

    results, report_page = evaluate_with_runner(cfg, out, trained, log)
    budgets = budgets_for(r["nfe"] for r in results)
    report = format_report(results, budgets, trained)
    log(report)
    (out / "results.json").write_text(json.dumps({"config": to_dict(cfg), "trained": trained, "results": results,
                                                  "ratio_valid": nfe_ratio(results, "valid", "nfe"),
                                                  "ratio_solved": nfe_ratio(results, "solved", "solve_nfe")},
                                                 indent=1))
    (out / "report.txt").write_text(report + "\n")
    log(f"\nwrote {out / 'results.json'}, {out / 'report.txt'} and {report_page} in "
        f"{time.perf_counter() - start:.0f} s")
    return 0
