"""Every rule a configuration must follow, in one place; each error names its key and the fix.

:func:`validate` checks what the config alone decides (value ranges, choices, keys that must
agree with each other); :func:`pipeline.config.load.load_config` runs it on every config. The
``check_*`` functions check rules that also need a fact known only later (the number of
processes, the shards on disk, the data's vocabulary); the stages call them at that point.
"""

from __future__ import annotations

import math
import typing
from pathlib import Path

from pipeline.errors import ConfigError

if typing.TYPE_CHECKING:
    from pipeline.config.schema import Config, ModelConfig

# interval (as written in the message; brackets say open/closed ends) -> keys that must lie in it
_RANGES: dict[str, str] = {
    "(0, inf)": "model.hidden model.layers model.heads model.max_seq_len model.cond_dim model.mlp_ratio "
    "model.rope_base optim.steps optim.batch_size optim.lr optim.eps log.every sampler.steps "
    "sampler.batch_size data.seq_len demo.proseco_steps demo.mdm_step_ratio demo.eval_samples "
    "prep.max_chars prep.shard_mb optim.grad_accum checkpoint.every checkpoint.keep_last log.val_batches",
    "[0, inf)": "diffusion.mdm_weight diffusion.corrector_weight sampler.temperature sampler.block_size "
    "sampler.corrector_steps sampler.corrector_start sampler.remdm_eta sampler.seed optim.weight_decay "
    "optim.warmup_steps optim.grad_clip parallel.threads run.seed data.split_seed data.puzzle_clues "
    "prep.workers prep.seed prep.input_sentence_size checkpoint.permanent_every run.max_time_s log.val_every "
    "data.loader_workers diffusion.corrector_start_step cluster.retries_on_failure eval.lm_eval_limit eval.lm_eval_gen_length log.peak_tflops",
    "(0, 1)": "diffusion.t_eps data.holdout_fraction",
    "[0, 1)": "model.dropout optim.beta1 optim.beta2 optim.ema prep.val_fraction",
    "(0, 1]": "sampler.nucleus_p prep.character_coverage",
    "[0, 1]": "optim.min_lr_ratio",
    "[0, 3]": "parallel.zero_stage",
    "[1, inf)": "sampler.corrector_every parallel.tp_size cluster.nodes cluster.tasks_per_node "
    "cluster.cpus_per_task cluster.time_min cluster.array_parallelism cluster.startup_timeout_s "
    "eval.num_samples eval.batch_size eval.lm_eval_mc_samples eval.lm_eval_pad_to",
    "[-1, inf)": "eval.lm_eval_fewshot",
}
_LABELS = {  # the paper's symbols, and what the edge value means
    "sampler.corrector_steps": ("sampler.corrector_steps (S)", " (0 turns the corrector off)"),
    "sampler.corrector_every": ("sampler.corrector_every (omega)", " (1 = a corrector loop every step)"),
}
SAMPLERS = ("ancestral", "confidence", "remdm")
_CHOICES = {
    "diffusion.schedule": ("loglinear",),
    "diffusion.corrector_input": ("model_outputs", "masked_only"),
    "sampler.name": SAMPLERS,
    "sampler.remdm_strategy": ("cap", "rescale", "conf", "loop"),
    "sampler.corrector_mode": ("argmax", "sample", "select_top_k"),
    "sampler.nfe_cache": ("official", "exact"),
    "sampler.nucleus_rule": ("official", "minimal"),
    "optim.schedule": ("constant", "cosine"),
    "parallel.backend": ("torch", "deepspeed", "megatron"),
    "parallel.distributed": ("none", "ddp", "fsdp"),
    "checkpoint.format": ("full", "sharded"),
    "log.wandb": ("offline", "online", "disabled"),
    "cluster.executor": ("slurm", "local"),
    "eval.weights": ("auto", "ema", "raw"),
    "data.task": ("sudoku4", "sudoku9", "markov", "text"),
    "prep.fmt": ("auto", "text", "jsonl", "parquet"),
    "prep.doc_split": ("line", "paragraph", "file"),
    "prep.model_type": ("bpe", "unigram"),
    "prep.mode": ("wrap", "pad"),
}
_TASK_CELLS = {"sudoku4": 16, "sudoku9": 81}  # tasks whose puzzles have a fixed number of cells
_TASK_SEQ_LEN = {"sudoku9": 81, "markov": 64}  # tasks whose sequences have a fixed length (data.seq_len must match)
# demo.tasks entry (`proseco demo --suite science`) -> its task module, pipeline.tasks.<module>
SUITE_MODULES = {"sudoku4": "sudoku", "sudoku9": "sudoku9", "markov": "markov"}
MIN_TOKENIZER_VOCAB = 16  # the special ids plus a few pieces


def _get(cfg: Config, key: str) -> typing.Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _check_range(key: str, value: float, spec: str) -> None:
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    above = lo < value if spec[0] == "(" else lo <= value
    if not (above and (value < hi if spec[-1] == ")" else value <= hi)):
        label, hint = _LABELS.get(key, (key, ""))
        lo_op = ">" if spec[0] == "(" else ">="
        want = f"{lo_op} {lo:g}" if hi == math.inf else f"in {spec}"
        raise ConfigError(f"{label} must be {want}{hint}, got {value!r}")


def _int_lists(cfg: Config) -> list[tuple[str, list[int], int]]:
    """(key, value, lowest allowed entry) of the keys holding non-empty lists of ints."""
    return [("demo.steps_grid", cfg.demo.steps_grid, 1), ("demo.corrector_grid", cfg.demo.corrector_grid, 1),
            ("demo.corrector_every_grid", cfg.demo.corrector_every_grid, 1), ("eval.steps", cfg.eval.steps, 1),
            ("eval.corrector_steps", cfg.eval.corrector_steps, 0), ("eval.corrector_every", cfg.eval.corrector_every, 1)]


def _cross_field_rules(cfg: Config) -> list[tuple[bool, str]]:
    """(holds, message) for each rule tying keys together."""
    m, d, s, data, par = cfg.model, cfg.diffusion, cfg.sampler, cfg.data, cfg.parallel
    cells, head_dim, vocab = _TASK_CELLS.get(data.task), m.hidden // m.heads, m.vocab_size
    n, n_max, eta, clues, name = data.seq_len, m.max_seq_len, s.remdm_eta, data.puzzle_clues, cfg.run.name
    mlp, tp, delay = int(m.hidden * m.mlp_ratio), par.tp_size, cfg.cluster.signal_delay_s
    return [
        (m.hidden % m.heads == 0, f"model.hidden ({m.hidden}) must be divisible by model.heads ({m.heads})"),
        (head_dim % 2 == 0, f"model.hidden / model.heads = {head_dim} must be even (rotary embeddings)"),
        (vocab is None or vocab >= 2, f"model.vocab_size must be null (from the data) or >= 2, got {vocab}"),
        (d.mdm_weight + d.corrector_weight > 0, "diffusion.mdm_weight and corrector_weight are both 0"),
        (s.remdm_strategy != "cap" or eta <= 1, f"sampler.remdm_eta must be <= 1 with cap, got {eta}"),
        (cells is None or clues < cells, f"data.puzzle_clues must be < {cells} (cells of {data.task}), got {clues}"),
        (n <= n_max, f"data.seq_len ({n}) exceeds model.max_seq_len ({n_max})"),
        (_TASK_SEQ_LEN.get(data.task, n) == n,
         f"data.seq_len must be {_TASK_SEQ_LEN.get(data.task)} for data.task={data.task}, got {n}"),
        *((bool(v) and min(v) >= low, f"{k} must be a non-empty list of ints >= {low}: {v}")
          for k, v, low in _int_lists(cfg)),
        (bool(cfg.demo.out_dir.strip()), "demo.out_dir must not be empty"),
        (bool(cfg.demo.tasks) and set(cfg.demo.tasks) <= set(SUITE_MODULES) and
         len(set(cfg.demo.tasks)) == len(cfg.demo.tasks),
         f"demo.tasks must be a non-empty list of distinct suite tasks ({', '.join(SUITE_MODULES)}): {cfg.demo.tasks}"),
        (bool(name.strip()) and "/" not in name, f"run.name must be a name without '/', got {name!r}"),
        (bool(data.shards.strip()), "data.shards must not be empty"),
        (par.backend == "megatron" or tp == 1, f"parallel.tp_size={tp} needs parallel.backend=megatron"),
        (par.backend == "torch" or par.distributed == "none",
         (f"parallel.distributed={par.distributed!r} is for parallel.backend=torch; backend "
          f"{par.backend} does its own data parallelism (set parallel.distributed=none)")),
        (m.heads % tp == 0 and mlp % tp == 0,
         f"parallel.tp_size={tp} must divide model.heads ({m.heads}) and the MLP width ({mlp})"),
        (par.backend != "deepspeed" or par.zero_stage != 3 or not m.tie_embeddings,
         ("parallel.zero_stage=3 cannot partition the tied embedding/head weight of model.tie_embeddings=true; "
          "use parallel.zero_stage=2 or model.tie_embeddings=false")),
        (par.backend != "deepspeed" or par.zero_stage != 3 or not par.activation_checkpointing,
         ("parallel.activation_checkpointing=true is not supported with parallel.zero_stage=3 "
          "(ZeRO-3 re-gathers partitioned weights inside recomputation); use parallel.zero_stage<=2")),
        (par.backend == "torch" or not par.compile,
         f"parallel.compile=true is for parallel.backend=torch (backend {par.backend} runs eagerly)"),
        (cfg.checkpoint.format == "full" or par.backend != "deepspeed",
         ("checkpoint.format=sharded is for the torch and megatron backends; DeepSpeed always writes its own "
          "per-rank ZeRO files (set checkpoint.format=full)")),
        (cfg.checkpoint.format == "sharded" or not cfg.checkpoint.async_save,
         "checkpoint.async_save=true needs checkpoint.format=sharded (a full-state save is written by rank 0 alone)"),
        (m.init == "" or m.init.startswith("hf:"), f"model.init must be '' (the native model) or hf:PATH, got {m.init!r}"),
        (not m.init or vocab is None, "model.vocab_size must be null with model.init=hf:... (the model's own vocabulary)"),
        (par.backend != "megatron" or not m.init,
         ("parallel.backend=megatron (tensor parallelism) supports the native model only; train model.init=hf:... "
          "with parallel.backend=torch or deepspeed")),
        (bool(cfg.log.wandb_project.strip()), "log.wandb_project must not be empty"),
        (bool(cfg.eval.samplers) and set(cfg.eval.samplers) <= set(SAMPLERS),
         f"eval.samplers must be a non-empty list of {', '.join(SAMPLERS)}: {cfg.eval.samplers}"),
        (0 <= delay < 60 * cfg.cluster.time_min,
         (f"cluster.signal_delay_s ({delay}) must be >= 0 and shorter than cluster.time_min "
          f"({cfg.cluster.time_min} min)")),
    ]


def validate(cfg: Config) -> None:
    """Range, choice and consistency checks; raises ConfigError naming the first offending key."""
    for spec, keys in _RANGES.items():
        for key in keys.split():
            _check_range(key, _get(cfg, key), spec)
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key} must be one of: {', '.join(choices)}; got {_get(cfg, key)!r}")
    for ok, message in _cross_field_rules(cfg):
        if not ok:
            raise ConfigError(message)


def check_world_size(cfg: Config, world: int) -> None:
    """Refuse a number of training processes the configured layout cannot use."""
    par = cfg.parallel
    if world < 1:
        raise ConfigError(f"--nproc must be >= 1, got {world}")
    if world > 1 and par.backend == "torch" and par.distributed not in ("ddp", "fsdp"):
        raise ConfigError(f"{world} processes were launched but parallel.distributed={par.distributed!r}; "
                          "set parallel.distributed=ddp (DDP) or parallel.distributed=fsdp (FSDP2)")
    if par.backend == "megatron" and world % par.tp_size:
        raise ConfigError(f"world size {world} is not divisible by parallel.tp_size={par.tp_size}; launch a "
                          f"multiple of {par.tp_size} processes or change parallel.tp_size")


def check_corpus_run(cfg: Config, verb: str, need_shards: bool = True) -> None:
    """`proseco train` / `launch train` read corpus shards: the task must be text and (with
    ``need_shards``; a launch may prepare them in an earlier job) the shards prepared."""
    if cfg.data.task != "text":
        raise ConfigError(f"{verb} reads corpus shards (data.task=text), got data.task={cfg.data.task!r}; "
                          "the sudoku4 task trains with `proseco demo`")
    if need_shards and not (Path(cfg.data.shards) / "manifest.json").is_file():
        raise ConfigError(f"no prepared shards in {cfg.data.shards}: run `proseco prep tokenizer` and then "
                          "`proseco prep shards` with the same --config and overrides first (or set data.shards)")


def check_shards(cfg: Config, shards_seq_len: int, data_vocab: int) -> int:
    """The shards agree with data.seq_len and model.vocab_size; returns the model's vocabulary size."""
    if shards_seq_len != cfg.data.seq_len:
        raise ConfigError(f"{cfg.data.shards} holds sequences of {shards_seq_len} tokens but data.seq_len is "
                          f"{cfg.data.seq_len}; set data.seq_len={shards_seq_len} or re-run `proseco prep shards`")
    vocab = cfg.model.vocab_size or data_vocab
    if vocab < data_vocab:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {data_vocab} ids of "
                          f"{cfg.data.shards}; set model.vocab_size={data_vocab} (or null)")
    return vocab


def check_tokenizer_vocab(cfg: Config) -> int:
    """`proseco prep tokenizer` trains a tokenizer of model.vocab_size ids; returns that number."""
    vocab = cfg.model.vocab_size
    if vocab is None or vocab < MIN_TOKENIZER_VOCAB:
        raise ConfigError(f"proseco prep tokenizer trains a tokenizer of model.vocab_size ids: set "
                          f"model.vocab_size to at least {MIN_TOKENIZER_VOCAB} (e.g. 8192), got {vocab}")
    return vocab


def check_tensor_parallel(model: ModelConfig, vocab_size: int, tp_size: int, world: int | None = None) -> None:
    """Heads, MLP width, vocabulary (and the number of processes, when given) all divide by ``tp_size``."""
    mlp = int(model.hidden * model.mlp_ratio)
    if tp_size < 1 or (world is not None and world % tp_size):
        raise ConfigError(f"parallel.tp_size={tp_size} must be >= 1 and divide the number of processes "
                          f"({world}); use a tp_size that divides it")
    if model.heads % tp_size:
        raise ConfigError(f"model.heads={model.heads} is not divisible by parallel.tp_size={tp_size}; "
                          "pick a tp_size that divides the number of heads")
    if mlp % tp_size:
        raise ConfigError(f"the MLP width int(model.hidden*model.mlp_ratio)={mlp} is not divisible "
                          f"by parallel.tp_size={tp_size}")
    if vocab_size % tp_size:
        raise ConfigError(f"model.vocab_size={vocab_size} is not divisible by parallel.tp_size={tp_size}; set "
                          f"model.vocab_size to a multiple of {tp_size} that is at least the tokenizer's "
                          "vocabulary (the extra rows are never used)")


def parse_part(spec: str | None, option: str) -> tuple[int, int]:
    """``i/n`` of ``--task`` / ``--shard`` -> (i, n), 0 <= i < n; (0, 1) when not given."""
    if not spec:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ConfigError(f"{option} must look like i/n (e.g. 0/4), got {spec!r}") from None
    if not 0 <= i < n:
        raise ConfigError(f"{option} {spec}: need 0 <= i < n")
    return i, n
