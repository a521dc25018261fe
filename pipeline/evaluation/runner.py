"""``proseco eval``: checkpoints x tasks x sampler settings -> one result JSON per work item.

The work list is the product of

* **models**: every complete checkpoint of a run folder, a checkpoint folder, a glob of them, a
  model file (``.pt``) or a ``proseco ckpt export`` folder; training checkpoints are read with
  their EMA weights by default (``eval.weights``);
* **tasks**: ``eval.tasks`` (default: the model's own ``data.task``), plug-ins of
  :mod:`pipeline.evaluation.tasks`;
* **sampler settings**: ``eval.samplers`` x unmasking steps ``eval.steps`` (T) x corrector budget
  ``eval.corrector_steps`` (S; 0 = plain MDM sampling) x corrector frequency
  ``eval.corrector_every`` (omega, only with S > 0). ReMDM is its own remasking baseline and runs
  without the corrector.

Each item writes ``OUT/results/<model>/<task>/<setting>.json`` (metrics, NFE breakdown, settings,
seed, checkpoint step, wall time) and its decoded samples beside it, atomically (tmp + rename), so
a rerun skips finished items and a killed run loses at most the item in progress. A failing item
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
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.config import Config, config_from_dict, to_dict
from pipeline.diffusion.sampling import check_sampler, sample, sample_seeds
from pipeline.errors import ProsecoError

RESULT_FORMAT = "proseco-eval/1"


# ------------------------------------------------------------------------------------ work list
@dataclass(frozen=True)
class ModelRef:
    """A model to evaluate: a training checkpoint folder, a model file or an export folder."""

    key: str  # a stable name for result paths: "<run>/step_00001000" for checkpoints, the file's stem otherwise
    path: str
    step: int | None = None


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
        return f"{self.model.key}/{self.task}/{self.setting.slug}"


def resolve_models(spec: str, weights_of: dict | None = None) -> list[ModelRef]:
    """Models named by ``spec``: a run folder (all complete checkpoints), a checkpoint folder, a
    glob, a model file or an export folder."""
    from pipeline.checkpoint.manager import MARKER, CheckpointManager

    paths = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec]
    if not paths:
        raise ProsecoError(f"no checkpoint matches {spec!r}")
    out: list[ModelRef] = []
    for p in map(Path, paths):
        if (p / "checkpoints").is_dir():
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
        elif p.is_file() or (p / "model.json").is_file():
            out.append(ModelRef(p.stem if p.is_file() else p.name, str(p.resolve())))
        else:
            raise ProsecoError(f"{p} is not a run folder, checkpoint, model file or export folder")
    return out


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
    if not spec:
        return items
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ProsecoError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}") from None
    if not 0 <= i < n:
        raise ProsecoError(f"--shard {spec}: need 0 <= i < n")
    return items[i::n]


# ------------------------------------------------------------------------------------ loading
@dataclass
class Loaded:
    model: torch.nn.Module
    cfg: Config  # the training config
    vocab_size: int
    mask_id: int
    weights: str


def load_for_eval(ref: ModelRef, weights: str) -> Loaded:
    from pipeline.checkpoint import load_model
    from pipeline.model import Backbone

    path = Path(ref.path)
    if ref.step is None:  # a model file or an export folder
        model, cfg, blob = load_model(path)
        return Loaded(model, cfg, int(blob["vocab_size"]), int(blob["mask_id"]), blob.get("export", {}).get("weights",
                                                                                                        "file"))
    from pipeline.checkpoint.tools import _meta, full_weights

    meta = _meta(path)
    if "model" not in meta:
        raise ProsecoError(f"{path} predates evaluable checkpoints (no vocabulary / mask id in meta.json)")
    cfg = config_from_dict(meta["config"])
    sd, which = full_weights(path, weights)
    model = Backbone(cfg.model, vocab_size=meta["model"]["vocab_size"])
    model.load_state_dict(sd)
    return Loaded(model.eval(), cfg, int(meta["model"]["vocab_size"]), int(meta["model"]["mask_id"]), which)


def _tokenizer(cfg: Config):
    if cfg.data.task != "text":
        return None
    from pipeline.generate import _tokenizer

    return _tokenizer(cfg)


# ------------------------------------------------------------------------------------ running
def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def result_path(out: Path, item: Item) -> Path:
    return out / "results" / f"{item.relpath}.json"


def is_done(out: Path, item: Item) -> bool:
    try:
        return json.loads(result_path(out, item).read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def generate(loaded: Loaded, task, setting: Setting, cfg: Config, n: int, batch_size: int,
             progress: bool = False) -> dict:
    """Sample ``n`` sequences for ``task`` at ``setting``; tokens, NFE per sample, conditioning."""
    tcfg = loaded.cfg
    sampler = dataclasses.replace(cfg.sampler, name=setting.sampler, steps=setting.steps,
                                  corrector_steps=setting.corrector_steps, corrector_every=setting.corrector_every)
    seq_len = task.model.seq_len
    check_sampler(sampler, seq_len, tcfg.model.max_seq_len)
    cond = task.conditioning(n, cfg.sampler.seed)
    tokens, nfe, nfe_p, nfe_c = [], [], [], []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        kwargs = {"batch": size} if cond is None else {"prompt": cond[0][start:start + size],
                                                       "fixed": cond[1][start:start + size]}
        with torch.no_grad():
            out = sample(loaded.model, sampler, seq_len=seq_len, mask_id=loaded.mask_id,
                         seeds=sample_seeds(cfg.sampler.seed, start, size),
                         time_conditioned=tcfg.model.time_conditioning, max_seq_len=tcfg.model.max_seq_len, **kwargs)
        tokens.append(out.tokens.cpu())
        nfe.append(out.nfe.float().cpu())
        nfe_p.append(out.nfe_predictor.float().cpu())
        nfe_c.append(out.nfe_corrector.float().cpu())
    return {"tokens": torch.cat(tokens), "nfe": torch.cat(nfe), "nfe_predictor": torch.cat(nfe_p),
            "nfe_corrector": torch.cat(nfe_c), "conditioning": cond}


def task_options(cfg: Config, task: str) -> dict:
    """The eval.* settings a task takes, under the task's own option names."""
    e = cfg.eval
    options = {"text": {"reference": e.reference_lm, "mauve_reference": e.mauve_reference,
                        "batch_size": e.batch_size},
               "qm9": {"train_smiles": e.task_data}, "gsm8k": {"data": e.task_data}}.get(task, {})
    return {k: v for k, v in options.items() if v != ""}


def run_items(items: list[Item], cfg: Config, out: Path, *, progress: bool = True,
              log=print) -> dict[str, int]:
    """Run every item not done yet; returns counts of ok / failed / skipped."""
    from pipeline.evaluation.tasks import ModelInfo, task_class

    counts = {"ok": 0, "failed": 0, "skipped": 0}
    loaded_key, loaded, load_error = None, None, None
    tasks: dict[tuple[str, str], object] = {}
    todo = [i for i in items if not is_done(out, i)]
    counts["skipped"] = len(items) - len(todo)
    bar = tqdm(todo, desc="eval", disable=not progress, dynamic_ncols=True)
    for item in bar:
        bar.set_postfix_str(item.relpath[-48:])
        t0 = time.perf_counter()
        base = {"format": RESULT_FORMAT, "model": dataclasses.asdict(item.model), "task": item.task,
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
            key = (item.model.key, item.task)
            if key not in tasks:
                try:
                    info = ModelInfo(loaded.vocab_size, loaded.mask_id, loaded.cfg.data.seq_len,
                                     _tokenizer(loaded.cfg))
                    tasks[key] = task_class(item.task)(loaded.cfg, task_options(cfg, item.task), info)
                except ProsecoError as exc:
                    tasks[key] = exc
            task = tasks[key]
            if isinstance(task, Exception):
                raise task
            gen = generate(loaded, task, item.setting, cfg, cfg.eval.num_samples, cfg.eval.batch_size)
            metrics = {k: (float(v) if v is not None and math.isfinite(float(v)) else None)
                       for k, v in task.score(gen["tokens"], gen["conditioning"]).items()}  # NaN -> null
            samples_file = result_path(out, item).with_suffix(".samples.jsonl")
            samples_file.parent.mkdir(parents=True, exist_ok=True)
            texts = task.decode(gen["tokens"])
            tmp = samples_file.with_name(samples_file.name + ".tmp")
            tmp.write_text("".join(json.dumps({"i": i, "nfe": int(gen["nfe"][i]), "text": t}) + "\n"
                                   for i, t in enumerate(texts)))
            os.replace(tmp, samples_file)
            result = {**base, "status": "ok", "weights": loaded.weights, "primary": task.primary,
                      "higher_is_better": task.higher_is_better, "diversity": task.diversity,
                      "metrics": metrics, "nfe": float(gen["nfe"].mean()),
                      "nfe_predictor": float(gen["nfe_predictor"].mean()),
                      "nfe_corrector": float(gen["nfe_corrector"].mean()),
                      "seconds": time.perf_counter() - t0, "samples_file": samples_file.name}
            counts["ok"] += 1
        except ProsecoError as exc:
            result = {**base, "status": "failed", "error": str(exc), "seconds": time.perf_counter() - t0}
            counts["failed"] += 1
            log(f"eval: {item.relpath} failed: {exc}")
        _write_json(result_path(out, item), result)
    bar.close()
    return counts


def default_out(spec: str, cfg: Config) -> Path:
    if cfg.eval.out:
        return Path(cfg.eval.out)
    p = Path(spec)
    if (p / "checkpoints").is_dir():
        return p / "eval"
    if p.is_dir() and p.name.startswith("step_"):
        return p.parent.parent / "eval"
    return (p.parent if p.is_file() else p) / "eval"


def run(cfg: Config, spec: str, *, shard_spec: str | None = None, out: str | None = None,
        command: str | None = None) -> int:
    models = resolve_models(spec)
    if cfg.eval.tasks:
        tasks = list(cfg.eval.tasks)
        from pipeline.evaluation.tasks import TASKS

        unknown = [t for t in tasks if t not in TASKS]
        if unknown:  # a typo fails the whole command before any work (an item-level failure would hide it)
            raise ProsecoError(f"unknown evaluation task(s) {', '.join(unknown)}; known: {', '.join(sorted(TASKS))}")
    else:
        tasks = sorted({_own_task(m) for m in models})
    folder = Path(out) if out else default_out(spec, cfg)
    items = shard(work_list(models, tasks, cfg), shard_spec)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "commands.txt", "a") as f:  # the report quotes the commands that made it
        f.write((command or " ".join(["proseco", *sys.argv[1:]])) + "\n")
    (folder / "eval_config.json").write_text(json.dumps(to_dict(cfg)["eval"], indent=1) + "\n")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    print(f"eval: {len(models)} model(s) x {len(tasks)} task(s) x {len(settings(cfg))} sampler settings"
          f"{f' (shard {shard_spec})' if shard_spec else ''} = {len(items)} items -> {folder}")
    counts = run_items(items, cfg, folder)
    print(f"eval: {counts['ok']} done, {counts['skipped']} already done, {counts['failed']} failed; "
          f"`proseco report {folder}` renders the table and plots")
    return 0


def _own_task(ref: ModelRef) -> str:
    """The task a model was trained on (its config's data.task); sudoku4 models also solve puzzles."""
    try:
        if ref.step is None:
            from pipeline.checkpoint import read_model_file

            task = read_model_file(ref.path)["config"]["data"]["task"]
        else:
            task = json.loads((Path(ref.path) / "meta.json").read_text())["config"]["data"]["task"]
    except (OSError, ValueError, KeyError, ProsecoError):
        return "text"
    return task


