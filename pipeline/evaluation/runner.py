"""``proseco eval``: checkpoints x tasks x sampler settings -> one result JSON per work item.

The work list is the product of

* **models**: every complete checkpoint of a run folder, a checkpoint folder, a glob of them or
  an export folder (``proseco ckpt export``), each loaded by :func:`pipeline.artifact.load_model`
  with its EMA weights by default (``eval.weights``);
* **tasks**: ``eval.tasks`` (default: the model's own ``data.task``), plug-ins of
  :mod:`pipeline.tasks`, or lm-eval tasks ``lm_eval:NAME`` (:mod:`pipeline.lmeval.items`);
* **sampler settings**: ``eval.samplers`` x unmasking steps ``eval.steps`` (T) x corrector budget
  ``eval.corrector_steps`` (S; 0 = plain MDM sampling) x corrector frequency
  ``eval.corrector_every`` (omega, only with S > 0). ReMDM is its own remasking baseline and runs
  without the corrector.

Each item writes ``OUT/results/<model>/<task>/<setting>.json`` (metrics, NFE breakdown, settings,
seed, checkpoint step, wall time) and its decoded samples beside it, atomically (tmp + rename), so
a killed run loses at most the item in progress. A result carries the **key** of everything that
determines it (:func:`determinants`: the model's identity - the checksums of its files - and
weights, the task, its options and scorer version, the full sampler settings with the seed, the
number of samples); a rerun skips an item only when a finished result with the same key exists,
so a changed setting recomputes the item (and says which settings changed), never reuses a stale
number. ``--force`` recomputes everything. The exit code is 1 when any item failed. A failing item
(a task that cannot run for this model, a sampler setting the model cannot run, a checkpoint that
does not load) writes a result with ``status: failed`` and the message; the rest of the list
still runs, and the report lists the failure. ``--shard i/n`` takes every n-th item of the sorted
list, so n array tasks cover each item exactly once.

Samples are drawn in batches of ``eval.batch_size`` with one seeded generator per sample
(``sample_seeds(sampler.seed, index)``), so results do not depend on the batch size or the shard.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.artifact import EXPORT_META, NOT_A_MODEL, ArtifactInfo, load_model, model_identity, saved_config
from pipeline.config import Config, parse_part, to_dict
from pipeline.diffusion.sampling import check_sampler, sample, sample_seeds
from pipeline.errors import ProsecoError
from pipeline.io import atomic_write, atomic_write_json, sha256_file
from pipeline.lmeval import items as lm_items
from pipeline.rundir import RunDir
from pipeline.tasks import task_class

RESULT_FORMAT = "proseco-eval/1"


# ------------------------------------------------------------------------------------ work list
@dataclass(frozen=True)
class ModelRef:
    """A model to evaluate: a training checkpoint folder or an export folder."""

    key: str  # a stable name for result paths: "<run>/step_00001000" for checkpoints, the folder's name otherwise
    path: str
    step: int | None = None
    identity: str = ""  # what the weights are: a hash of the checksums of the model's files


@dataclass(frozen=True)
class Setting:
    sampler: str  # ancestral | confidence | remdm
    steps: int  # T
    corrector_steps: int  # S (0 = off)
    corrector_every: int  # omega

    @property
    def slug(self) -> str:
        corr = f"_S{self.corrector_steps}_w{self.corrector_every}" if self.corrector_steps else ""
        return f"{self.sampler}_T{self.steps}{corr}"

    @property
    def label(self) -> str:
        """The report's line: a sampler with or without the corrector (T varies along the line)."""
        if self.corrector_steps == 0:
            return "remdm" if self.sampler == "remdm" else f"{self.sampler} (MDM)"
        return f"{self.sampler} + corrector S={self.corrector_steps} w={self.corrector_every}"


@dataclass(frozen=True)
class Item:
    model: ModelRef
    task: str
    setting: Setting

    @property
    def relpath(self) -> str:
        return f"{self.model.key}/{self.task.replace(':', '/')}/{self.setting.slug}"


def resolve_models(spec: str, weights_of: dict | None = None) -> list[ModelRef]:
    """Models named by ``spec``: a run folder (all complete checkpoints), a checkpoint folder, a
    glob or an export folder."""
    from pipeline.checkpoint.manager import MARKER, CheckpointManager

    paths = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec]
    if not paths:
        raise ProsecoError(f"no checkpoint matches {spec!r}")
    out: list[ModelRef] = []
    for p in map(Path, paths):
        if (p / EXPORT_META).is_file():  # RUN/exports/step_N is an export, not a checkpoint
            where = p.resolve()
            out.append(ModelRef(f"{where.parent.parent.name}/exports/{p.name}" if where.parent.name == "exports"
                                else p.name, str(where)))
        elif (p / "checkpoints").is_dir():
            found = CheckpointManager(p).list_complete()
            if not found:
                raise ProsecoError(f"{p} has no complete checkpoint to evaluate")
            out += [ModelRef(f"{p.resolve().name}/{c.name}", str(c.resolve()), CheckpointManager.step_of(c))
                    for c in found]
        elif p.is_dir() and p.name.startswith("step_"):
            if not (p / MARKER).is_file():
                raise ProsecoError(f"{p} is not a complete checkpoint (no {MARKER} marker): its save was interrupted")
            out.append(ModelRef(f"{p.resolve().parent.parent.name}/{p.name}", str(p.resolve()),
                                CheckpointManager.step_of(p)))
        else:
            raise ProsecoError(f"{p} is not a model: {NOT_A_MODEL}")
    return [dataclasses.replace(m, identity=model_identity(m.path)) for m in out]


def settings(cfg: Config) -> list[Setting]:
    e, seen, out = cfg.eval, set(), []
    for name in e.samplers:
        for t in e.steps:
            for s in ([0] if name == "remdm" else e.corrector_steps):
                for w in (e.corrector_every if s else [1]):
                    st = Setting(name, t, s, w)
                    if st not in seen:
                        seen.add(st)
                        out.append(st)
    return out


def work_list(models: list[ModelRef], tasks: list[str], cfg: Config) -> list[Item]:
    items = [Item(m, t, s) for m in models for t in tasks for s in settings(cfg)]
    return sorted(items, key=lambda i: i.relpath)


def shard(items: list[Item], spec: str | None) -> list[Item]:
    """``i/n``: every n-th item starting at i (0-based)."""
    i, n = parse_part(spec, "--shard")
    return items[i::n]


# ------------------------------------------------------------------------------------ loading
@dataclass
class Loaded:
    """A model loaded for evaluation: the module, its training config and what else it came with."""

    model: torch.nn.Module
    cfg: Config  # the training config
    info: ArtifactInfo  # vocabulary size, mask id, which weights, tokenizer


def load_for_eval(ref: ModelRef, weights: str) -> Loaded:
    return Loaded(*load_model(ref.path, weights=weights))


# ------------------------------------------------------------------------------------ running
def result_path(out: Path, item: Item) -> Path:
    return out / "results" / f"{item.relpath}.json"


def determinants(item: Item, cfg: Config) -> dict:
    """Everything a result depends on (its key is a hash of this): the model's identity and
    weights, the task with its options and scorer version, the complete sampler settings (seed
    included) and the number of samples. Not the batch size of generation: per-sample
    generators make results independent of it."""
    if lm_items.is_lm_eval(item.task):
        return lm_items.determinants(item, cfg, _sampler(cfg, item.setting))
    options = task_options(cfg, item.task)
    files = {k: sha256_file(v) for k, v in options.items() if isinstance(v, str) and Path(v).is_file()}
    return {"model": {"identity": item.model.identity, "weights": cfg.eval.weights},
            "task": {"name": item.task, "options": options, "option_files": files,
                     "scorer_version": task_class(item.task).version},
            "sampler": dataclasses.asdict(_sampler(cfg, item.setting)),
            "num_samples": cfg.eval.num_samples}


def item_key(det: dict) -> str:
    return hashlib.sha256(json.dumps(det, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the leaves that differ between two determinant dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def previous(out: Path, item: Item) -> dict | None:
    """The result already written for ``item``'s path (any settings), or None."""
    try:
        old = json.loads(result_path(out, item).read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else None


def _sampler(cfg: Config, setting: Setting):
    return dataclasses.replace(cfg.sampler, name=setting.sampler, steps=setting.steps,
                               corrector_steps=setting.corrector_steps, corrector_every=setting.corrector_every)


def generate(loaded: Loaded, task, setting: Setting, cfg: Config, n: int, batch_size: int,
             progress: bool = False) -> dict:
    """Sample ``n`` sequences for ``task`` at ``setting``; tokens, NFE per sample, conditioning."""
    tcfg = loaded.cfg
    sampler = _sampler(cfg, setting)
    seq_len = task.model.seq_len
    check_sampler(sampler, seq_len, tcfg.model.max_seq_len)
    cond = task.conditioning(n, cfg.sampler.seed)
    tokens, nfe, nfe_p, nfe_c = [], [], [], []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        kwargs = {"batch": size} if cond is None else {"prompt": cond[0][start:start + size],
                                                       "fixed": cond[1][start:start + size]}
        with torch.no_grad():
            out = sample(loaded.model, sampler, seq_len=seq_len, mask_id=loaded.info.mask_id,
                         seeds=sample_seeds(cfg.sampler.seed, start, size),
                         time_conditioned=tcfg.model.time_conditioning, max_seq_len=tcfg.model.max_seq_len,
                         **loaded.info.sampling_ids(tcfg), **kwargs)
        tokens.append(out.tokens.cpu())
        nfe.append(out.nfe.float().cpu())
        nfe_p.append(out.nfe_predictor.float().cpu())
        nfe_c.append(out.nfe_corrector.float().cpu())
    return {"tokens": torch.cat(tokens), "nfe": torch.cat(nfe), "nfe_predictor": torch.cat(nfe_p),
            "nfe_corrector": torch.cat(nfe_c), "conditioning": cond}


def task_options(cfg: Config, task: str) -> dict:
    """The eval.* settings a task takes, under the task's own option names (its ``eval_options``)."""
    options = {name: getattr(cfg.eval, key) for name, key in task_class(task).eval_options.items()}
    return {k: v for k, v in options.items() if v != ""}


def plan(items: list[Item], cfg: Config, out: Path, force: bool = False) -> list[tuple[Item, dict, str]]:
    """(item, determinants, why) of the items to run: ``why`` is ``new``, ``failed before``,
    ``forced`` or ``changed: <settings>`` (a finished result of other settings is not reused)."""
    todo = []
    for item in items:
        det = determinants(item, cfg)
        old = previous(out, item)
        if old is None:
            why = "new"
        elif force:
            why = "forced"
        elif old.get("key") != item_key(det):
            why = "changed: " + ", ".join(_changed(old.get("determinants") or {}, det) or ["the result's key"])
        elif old.get("status") != "ok":
            why = "failed before"
        else:
            continue
        todo.append((item, det, why))
    return todo


def run_items(items: list[Item], cfg: Config, out: Path, *, progress: bool | None = None, force: bool = False,
              log=print) -> dict[str, int]:
    """Run every item without a finished result of the same key; returns counts of ok / failed / skipped.
    ``progress``: a progress bar (default: when stderr is a terminal), else one plain line per item."""
    if progress is None:
        progress = sys.stderr.isatty()

    counts = {"ok": 0, "failed": 0, "skipped": 0}
    loaded_key, loaded, load_error = None, None, None
    tasks: dict[tuple[str, str], object] = {}
    todo = plan(items, cfg, out, force)
    counts["skipped"] = len(items) - len(todo)
    stale = [(i, why) for i, _, why in todo if why.startswith("changed")]
    if stale:
        log(f"eval: {len(stale)} finished result(s) were computed with other settings and are recomputed "
            f"(e.g. {stale[0][0].relpath}: {stale[0][1]})")
    bar = tqdm(todo, desc="eval", disable=not progress, dynamic_ncols=True)
    for n, (item, det, _why) in enumerate(bar, 1):
        bar.set_postfix_str(item.relpath[-48:])
        t0 = time.perf_counter()
        base = {"format": RESULT_FORMAT, "key": item_key(det), "determinants": det,
                "model": dataclasses.asdict(item.model), "task": item.task,
                "setting": dataclasses.asdict(item.setting), "label": item.setting.label,
                "num_samples": cfg.eval.num_samples, "seed": cfg.sampler.seed}
        try:
            if loaded_key != item.model.key:
                loaded_key, loaded, load_error, tasks = item.model.key, None, None, {}
                try:
                    loaded = load_for_eval(item.model, cfg.eval.weights)
                except ProsecoError as exc:
                    load_error = str(exc)
            if load_error is not None:
                raise ProsecoError(load_error)
            if lm_items.is_lm_eval(item.task):
                result = _lm_eval_item(loaded, item, cfg, out, base, t0)
            else:
                result = _native_item(loaded, item, cfg, out, base, t0, tasks)
            counts["ok"] += 1
            if not progress:  # plain lines in logs (a SLURM .out file gets no progress bar)
                primary = result["primary"]
                log(f"eval: [{n}/{len(todo)}] {item.relpath}: {primary} {_num(result['metrics'].get(primary))}, "
                    f"NFE {result['nfe']:.1f} ({result['seconds']:.1f} s)")
        except ProsecoError as exc:
            result = {**base, "status": "failed", "error": str(exc), "seconds": time.perf_counter() - t0}
            counts["failed"] += 1
            log(f"eval: {item.relpath} failed: {exc}")
        result_path(out, item).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(result_path(out, item), result, fsync=False)
    bar.close()
    return counts


def _native_item(loaded: Loaded, item: Item, cfg: Config, out: Path, base: dict, t0: float, tasks: dict) -> dict:
    """Generate and score one item of a :mod:`pipeline.tasks` task; its samples file; the result.
    ``tasks`` caches each (model, task) plug-in, or the error it raised, across items."""
    from pipeline.tasks import ModelInfo

    key = (item.model.key, item.task)
    if key not in tasks:
        try:
            info = ModelInfo(loaded.info.vocab_size, loaded.info.mask_id, loaded.cfg.data.seq_len,
                             loaded.info.tokenizer)
            tasks[key] = task_class(item.task)(loaded.cfg, task_options(cfg, item.task), info)
        except ProsecoError as exc:
            tasks[key] = exc
    task = tasks[key]
    if isinstance(task, Exception):
        raise task
    gen = generate(loaded, task, item.setting, cfg, cfg.eval.num_samples, cfg.eval.batch_size)
    metrics = {k: (float(v) if v is not None and math.isfinite(float(v)) else None)
               for k, v in task.score(gen["tokens"], gen["conditioning"]).items()}  # NaN -> null
    texts = task.decode(gen["tokens"])
    samples_file = _write_samples(out, item, [{"i": i, "nfe": int(gen["nfe"][i]), "text": t}
                                              for i, t in enumerate(texts)])
    return {**base, "status": "ok", "weights": loaded.info.weights, "primary": task.primary,
            "higher_is_better": task.higher_is_better, "diversity": task.diversity, "graded": task.graded,
            "metrics": metrics, "nfe": float(gen["nfe"].mean()),
            "nfe_predictor": float(gen["nfe_predictor"].mean()),
            "nfe_corrector": float(gen["nfe_corrector"].mean()),
            "seconds": time.perf_counter() - t0, "samples_file": samples_file.name}


def _lm_eval_item(loaded: Loaded, item: Item, cfg: Config, out: Path, base: dict, t0: float) -> dict:
    """Run one ``lm_eval:NAME`` item (:mod:`pipeline.lmeval.items`); its samples file; the result."""
    fields, rows = lm_items.run_item(loaded, item, _sampler(cfg, item.setting), cfg)
    samples_file = _write_samples(out, item, rows)
    return {**base, "status": "ok", "weights": loaded.info.weights, **fields, "num_samples": len(rows),
            "seconds": time.perf_counter() - t0, "samples_file": samples_file.name}


def _write_samples(out: Path, item: Item, rows: list[dict]) -> Path:
    samples_file = result_path(out, item).with_suffix(".samples.jsonl")
    samples_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(samples_file, "".join(json.dumps(r) + "\n" for r in rows), fsync=False)
    return samples_file


def _num(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def default_out(spec: str, cfg: Config) -> Path:
    if cfg.eval.out:
        return Path(cfg.eval.out)
    run = RunDir.holding(spec)
    return run.eval if run is not None else Path(spec) / "eval"


def run(cfg: Config, spec: str, *, shard_spec: str | None = None, out: str | None = None,
        command: str | None = None, force: bool = False, dry_run: bool = False) -> int:
    """Evaluate; 0 when every item has a result, 1 when any item failed. ``dry_run``: print the
    work list (and what would run) without writing anything."""
    models = resolve_models(spec)
    if cfg.eval.tasks:
        tasks = list(cfg.eval.tasks)
        from pipeline.tasks import check_names

        # a typo fails the whole command before any work (an item-level failure would hide it)
        check_names([t for t in tasks if not lm_items.is_lm_eval(t)])
        lm_items.check_names(tasks, cfg)
    else:
        tasks = sorted({_own_task(m) for m in models})
    folder = Path(out) if out else default_out(spec, cfg)
    items = shard(work_list(models, tasks, cfg), shard_spec)
    summary = (f"{len(models)} model(s) x {len(tasks)} task(s) x {len(settings(cfg))} sampler settings"
               f"{f' (shard {shard_spec})' if shard_spec else ''} = {len(items)} items -> {folder}")
    if dry_run:
        todo = {i.relpath: why for i, _, why in plan(items, cfg, folder, force)}
        print(f"eval (dry run): {summary}; {len(todo)} to run, {len(items) - len(todo)} already done")
        for item in items:
            print(f"  {todo.get(item.relpath, 'done (skipped)'):<16} {item.relpath}  [{item.model.path}, {_size(item, cfg)}]")
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "commands.txt", "a") as f:  # the report quotes the commands that made it
        f.write((command or " ".join(["proseco", *sys.argv[1:]])) + "\n")
    atomic_write_json(folder / "eval_config.json", to_dict(cfg)["eval"])
    if cfg.parallel.threads:
        torch.set_num_threads(cfg.parallel.threads)
    print(f"eval: {summary}")
    counts = run_items(items, cfg, folder, force=force)
    print(f"eval: {counts['ok']} done, {counts['skipped']} already done, {counts['failed']} failed; "
          f"`proseco report {folder}` renders the table and plots")
    if counts["failed"]:
        print(f"eval: {counts['failed']} item(s) failed (their messages are above and in the report); exit 1",
              file=sys.stderr)
        return 1
    return 0


def _size(item: Item, cfg: Config) -> str:
    """How much an item evaluates, for the dry run: samples drawn, or an lm-eval task's documents."""
    if lm_items.is_lm_eval(item.task):
        return f"{cfg.eval.lm_eval_limit} documents" if cfg.eval.lm_eval_limit else "every document"
    return f"{cfg.eval.num_samples} samples"


def _own_task(ref: ModelRef) -> str:
    """The task a model was trained on (its config's data.task); sudoku4 models also solve puzzles."""
    try:
        return saved_config(ref.path)["data"]["task"]
    except (KeyError, TypeError, ProsecoError):
        return "text"
