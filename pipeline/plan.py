"""`proseco plan`: per-device memory and step time of a config on N devices, before submitting.

Pure arithmetic over the config (no model is built, nothing is allocated): the numbers follow the
code paths of :mod:`pipeline.model.transformer`, :mod:`pipeline.diffusion.objective` and the
engines; ``docs/plan.md`` explains every term and ``benchmarks/bench_plan.py`` checks the total
against measured peak memory on CPU.

Memory per device, in bytes (``P`` parameters, split by the layout):

* **model states**: weights, gradients, AdamW's two moments, the EMA copy. The torch and megatron
  engines keep fp32 weights whatever the precision (bf16 is autocast): 4 + 4 + 8 (+ 4 EMA) bytes per
  parameter. DeepSpeed bf16 keeps bf16 weights and gradients and an fp32 master copy in the
  optimizer: 2 + 2 + 12 (+ 4 EMA, fp32). DDP adds its gradient buckets (one more gradient copy,
  alive from the gradient-syncing backward to the optimizer step). ZeRO-1 / 2 / 3 and FSDP2 divide
  the optimizer / + gradients / + weights by the data-parallel size; tensor parallelism divides the
  split layers (attention, MLP, head) by ``tp``. The EMA is sharded like the weights.
* **gathered**: FSDP2 / ZeRO-3 hold the unsharded weights of two blocks (the current one and the
  prefetched next) and the root's (embedding, head) while computing, and the unsharded gradients of
  one block and of the root (the head's gradient exists from the first backward op on; the root's
  reduce-scatter runs last).
* **activations**: what autograd saves per block (counted from the ops of ``Block.forward``, fused
  attention: no L x L matrix), per pass; with activation checkpointing only each block's input, plus
  one block while the backward recomputes it.
* **logits**: the [B, L, V] float32 logits, their log-softmax (saved by the cross entropy) and, in
  the backward, the two gradients of that size: 4 x B L V x 4 bytes at the head's backward.

The peak is the larger of two moments of the last backward: at the head (activations and logits)
and at its end (all gradients, DDP's buckets). ProSeCo under the split backward
(``diffusion.split_backward``): pass 1's backward runs before pass 2, so at pass 2's head pass 1's
gradients are alive too. Without it both passes' activations and logits are alive at once, before
any gradient. MDM (corrector weight 0) is one pass.

FLOPs per token: ``passes x (6 N + 12 layers x hidden x seq)`` with N the parameters that multiply
(every weight but the embedding and position tables) - the model FLOPs of MFU (a recomputed forward
under activation checkpointing is not counted). Step time = FLOPs of the step per device / (peak x MFU).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from pipeline.config import Config
from pipeline.config.validate import validate
from pipeline.errors import ProsecoError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
GIB = 2**30


def parse_bytes(text: str) -> int:
    """``80GiB`` / ``80GB`` / ``80e9`` -> bytes (a bare number is bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ProsecoError(f"--gpu-mem must be a size like 80GiB, 80GB or 141GiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


# ------------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of the Backbone a model config describes."""

    total: int  # unique parameters (a tied head counted once)
    matmul: int  # parameters that multiply activations (FLOPs): all but embedding / position tables
    block: int  # parameters of one transformer block
    tp_split: int  # parameters split by tensor parallelism (qkv, proj, MLP, head), all blocks
    root: int  # parameters outside the blocks (embedding, positions, time MLP, final norm, head)


def param_counts(m, vocab: int) -> ParamCounts:
    """Count the parameters of ``Backbone(m, vocab)`` by hand (``m``: a ModelConfig)."""
    h, c, inner = m.hidden, m.cond_dim, int(m.hidden * m.mlp_ratio)
    norm = 0 if m.time_conditioning else 2 * h  # LayerNorm weight + bias, off under adaLN
    attn = 3 * h * h + h * h  # qkv, proj: no bias
    mlp_w, mlp_b = 2 * h * inner, inner + h
    adaln = (c * 6 * h + 6 * h) if m.time_conditioning else 0
    block = 2 * norm + attn + mlp_w + mlp_b + adaln
    embed = vocab * h
    pos = m.max_seq_len * h if m.learned_positions else 0
    time_mlp = 2 * (c * c + c) if m.time_conditioning else 0
    final = norm + ((c * 2 * h + 2 * h) if m.time_conditioning else 0)
    head = 0 if m.tie_embeddings else vocab * h
    root = embed + pos + time_mlp + final + head
    total = m.layers * block + root
    matmul = total - embed - pos + (vocab * h if m.tie_embeddings else 0)
    tp_split = m.layers * (attn + mlp_w + inner) + (0 if m.tie_embeddings else vocab * h)
    return ParamCounts(total=total, matmul=matmul, block=block, tp_split=tp_split, root=root)


def flops_per_token(m, vocab: int, seq: int, passes: int) -> float:
    """Model FLOPs per trained token: ``passes x (6 N + 12 layers hidden seq)`` (forward + backward
    of every matmul; bidirectional attention scores and weighted sum over ``seq`` keys)."""
    return passes * (6 * param_counts(m, vocab).matmul + 12 * m.layers * m.hidden * seq)


# dense bf16 peak TFLOP/s of known CUDA devices (SXM), by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def device_peak_tflops(cfg: Config, device_name: str) -> float | None:
    """The peak for MFU: ``log.peak_tflops`` when set, else the table's entry for ``device_name``
    (None: unknown device, e.g. a CPU - no MFU is logged)."""
    if cfg.log.peak_tflops > 0:
        return cfg.log.peak_tflops
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def passes_of(cfg: Config, step: int | None = None) -> int:
    """Network passes per trained sequence: 2 for ProSeCo, 1 for plain MDM (corrector weight 0);
    with ``step``, at that optimizer step (1 before ``diffusion.corrector_start_step``)."""
    from pipeline.diffusion.objective import objective_at

    diffusion = cfg.diffusion if step is None else objective_at(cfg.diffusion, step)
    return 2 if diffusion.corrector_weight > 0 else 1


# ------------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class Layout:
    """How the parameters, gradients and optimizer states are split over the devices."""

    name: str  # ddp | fsdp | zero1 | zero2 | zero3 | tpK
    backend: str  # the parallel.backend that runs it
    dp: int  # data-parallel size
    tp: int = 1  # tensor-parallel size
    shard: int = 0  # ZeRO stage: 0 nothing, 1 optimizer, 2 + gradients, 3 + weights (FSDP2 = 3)

    @property
    def settings(self) -> dict:
        """The parallel.* values besides the backend that select this layout."""
        if self.backend == "deepspeed":
            return {"zero_stage": self.shard}
        if self.backend == "megatron":
            return {"tp_size": self.tp}
        return {"distributed": "fsdp" if self.shard else "ddp" if self.dp > 1 else "none"}

    def applied(self, cfg: Config, checkpointing: bool) -> Config:
        """``cfg`` with this layout (and ``parallel.activation_checkpointing=checkpointing``) selected."""
        return dataclasses.replace(cfg, parallel=dataclasses.replace(
            cfg.parallel, backend=self.backend, activation_checkpointing=checkpointing, **self.settings))

    @property
    def overrides(self) -> str:
        """The config overrides that select this layout."""
        keys = ({} if self.backend == "torch" else {"backend": self.backend}) | self.settings
        return " ".join(f"parallel.{k}={v}" for k, v in keys.items())


def layouts(cfg: Config, vocab: int, gpus: int) -> list[Layout]:
    """Every layout the engines offer on ``gpus`` devices (TP sizes that divide heads, MLP, vocab)."""
    out = [Layout("ddp" if gpus > 1 else "single", "torch", gpus)]
    if gpus > 1:
        out.append(Layout("fsdp", "torch", gpus, shard=3))
    out += [Layout(f"zero{s}", "deepspeed", gpus, shard=s) for s in (1, 2, 3)]
    inner = int(cfg.model.hidden * cfg.model.mlp_ratio)
    for tp in (2, 4, 8):
        if gpus % tp == 0 and cfg.model.heads % tp == 0 and inner % tp == 0 and vocab % tp == 0:
            out.append(Layout(f"tp{tp}", "megatron", gpus // tp, tp=tp))
    return out


def layout_of(cfg: Config, gpus: int) -> Layout:
    """The layout ``cfg.parallel`` selects on ``gpus`` devices."""
    par = cfg.parallel
    if par.backend == "deepspeed":
        return Layout(f"zero{par.zero_stage}", "deepspeed", gpus, shard=par.zero_stage)
    if par.backend == "megatron":
        if gpus % par.tp_size:
            raise ProsecoError(f"parallel.tp_size={par.tp_size} must divide --gpus {gpus}")
        return Layout(f"tp{par.tp_size}", "megatron", gpus // par.tp_size, tp=par.tp_size)
    if gpus > 1 and par.distributed == "fsdp":
        return Layout("fsdp", "torch", gpus, shard=3)
    return Layout("ddp" if gpus > 1 else "single", "torch", gpus)


# ------------------------------------------------------------------------------------ memory
@dataclass(frozen=True)
class Memory:
    """Predicted peak bytes per device, by term (see the module docstring)."""

    weights: float
    grads: float
    optimizer: float
    ema: float
    buckets: float
    gathered: float
    activations: float  # alive at the peak (both passes without the split backward)
    logits: float

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.ema + self.buckets + self.gathered
                + self.activations + self.logits)


def block_activation_bytes(m, batch: int, seq: int, bf16: bool) -> float:
    """Bytes one block saves for its backward (``Block.forward``; fused attention, no L x L matrix).

    In units of E = batch x seq x hidden elements: the residual inputs of both LayerNorms (fp32
    even under autocast), the LayerNorm outputs fed to qkv and the MLP, q and k after the rotary,
    the qkv output (v is a view of it), the attention output fed to proj, the MLP's hidden
    activation before and after the GELU (``mlp_ratio`` E each): 2 fp32 + (8 + 2 mlp_ratio) in the
    activation dtype. adaLN adds the two normalised inputs (fp32) and the two gated branch outputs;
    dropout a one-byte mask per residual branch. Small: LayerNorm statistics and the attention's
    log-sum-exp (fp32 per row / per head and row)."""
    a = 2 if bf16 else 4
    e = batch * seq * m.hidden
    units = 2 * 4 + (8 + 2 * m.mlp_ratio) * a
    if m.time_conditioning:
        units += 2 * 4 + 2 * a
    if m.dropout > 0:
        units += 2
    return e * units + batch * seq * (4 * 2 * 4 + m.heads * 4)


def pass_activation_bytes(cfg: Config, batch: int, seq: int, tp: int, matmul_params: float,
                          checkpointing: bool) -> tuple[float, float]:
    """(kept, recomputed): the activations one pass keeps until its backward (excluding the logits),
    and the extra bytes alive while the backward recomputes a checkpointed block, on one device.

    Tensor parallelism splits the attention and MLP interiors by ``tp`` (the residual stream and
    LayerNorm inputs are replicated). Checkpointing keeps each block's fp32 input; the backward
    recomputes one block at a time (its activations plus the fp32 gradient of its output). Under
    autocast each weight is also saved as a bf16 copy."""
    m, bf16 = cfg.model, cfg.parallel.bf16
    e = batch * seq * m.hidden
    full = block_activation_bytes(m, batch, seq, bf16)
    replicated = 2 * 4 * e
    block = replicated + (full - replicated) / tp
    layers = m.layers * 4 * e if checkpointing else m.layers * block
    head_input = 4 * e + (2 if bf16 else 4) * e  # final LayerNorm input and output (fed to the head)
    casts = 2 * matmul_params if bf16 and cfg.parallel.backend != "deepspeed" else 0
    return layers + head_input + casts, (block + 4 * e - head_input if checkpointing else 0.0)


def memory(cfg: Config, vocab: int, layout: Layout, checkpointing: bool | None = None) -> Memory:
    """Predicted peak memory per device of one training step of ``cfg`` under ``layout``
    (``optim.batch_size`` sequences of ``data.seq_len`` tokens per micro-step)."""
    m, par = cfg.model, cfg.parallel
    ckpt = par.activation_checkpointing if checkpointing is None else checkpointing
    counts = param_counts(m, vocab)
    dp, tp, shard = layout.dp, layout.tp, layout.shard
    local = counts.total - counts.tp_split + counts.tp_split / tp  # parameters held per TP rank
    ds_bf16 = layout.backend == "deepspeed" and par.bf16
    w_bytes, g_bytes, opt_bytes = (2, 2, 12) if ds_bf16 else (4, 4, 8)
    weights = local * w_bytes / (dp if shard >= 3 else 1)
    grads = local * g_bytes / (dp if shard >= 2 else 1)
    optimizer = local * opt_bytes / (dp if shard >= 1 else 1)
    ema = local * 4 / (dp if shard >= 3 else 1) if cfg.optim.ema > 0 else 0.0
    buckets = local * g_bytes if dp > 1 and shard == 0 else 0.0  # DDP's gradient buckets
    gathered = 0.0
    if shard >= 3 and dp > 1:  # unsharded: two blocks' weights + the root's, one block's and the root's gradients
        gathered = (2 * counts.block + counts.root) * w_bytes + (counts.block + counts.root) * g_bytes

    b, seq = cfg.optim.batch_size, cfg.data.seq_len
    act, recompute = pass_activation_bytes(cfg, b, seq, tp, counts.matmul / tp, ckpt)
    logit = b * seq * vocab * 4
    passes = passes_of(cfg)
    # the peak of a backward: at the head (the logits, their log-softmax and two gradients of that
    # size), or - with checkpointing - while a block is recomputed (the logits tensor still held)
    activations, logits = act, 4 * logit
    if recompute + logit > 4 * logit:
        activations, logits = act + recompute, logit
    if passes == 2 and not cfg.diffusion.split_backward:  # pass 1's activations, logits, log-softmax too
        activations, logits = activations + act, logits + 2 * logit
    # Two candidate peaks. At the head's backward of the last pass: the activations and logits, on top
    # of pass 1's gradients under the split backward (else the gradients do not exist yet). At the end
    # of the last backward: all gradients and DDP's buckets (allocated by the gradient-syncing
    # backward, released after the step), the activations freed.
    split = passes == 2 and cfg.diffusion.split_backward
    at_head = Memory(weights, grads if split else 0.0, optimizer, ema, 0.0, gathered, activations, logits)
    at_end = Memory(weights, grads, optimizer, ema, buckets, gathered, 0.0, 0.0)
    return at_head if at_head.total >= at_end.total else at_end


# ------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class PlanRow:
    """One layout's prediction."""

    layout: Layout
    memory: Memory
    memory_ckpt: Memory  # the same with activation checkpointing
    fits: bool
    fits_ckpt: bool
    refused: str | None = None  # why `proseco train` would refuse this layout for the config (None: it runs)
    refused_ckpt: str | None = None  # the same with activation checkpointing


@dataclass(frozen=True)
class Plan:
    """What `proseco plan` prints: the rows, throughput and the inputs they came from."""

    rows: list[PlanRow]
    chosen: Layout  # the layout cfg.parallel selects: the step time is its
    gpus: int
    gpu_mem: int
    vocab: int
    params: ParamCounts
    flops_per_token: float
    tokens_per_step: int  # global, under the chosen layout (optim.batch_size is per data-parallel rank)
    step_s: float  # at the given MFU
    tokens_per_s_per_device: float
    mfu: float
    peak_tflops: float


def plan(cfg: Config, gpus: int, gpu_mem: int, peak_tflops: float, mfu: float) -> Plan:
    """Memory per device of every layout on ``gpus`` devices of ``gpu_mem`` bytes, and the step time
    of ``cfg`` at ``mfu`` of ``peak_tflops``. ``optim.batch_size`` is per data-parallel rank."""
    if gpus < 1:
        raise ProsecoError(f"--gpus must be >= 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ProsecoError(f"--mfu must be in (0, 1], got {mfu}")
    if peak_tflops <= 0:
        raise ProsecoError(f"--peak-tflops must be > 0, got {peak_tflops}")
    vocab = cfg.model.vocab_size
    if vocab is None:
        raise ProsecoError("proseco plan needs model.vocab_size (the vocabulary is otherwise read from the data)")
    rows = []
    for lay in layouts(cfg, vocab, gpus):
        mem, mem_ck = memory(cfg, vocab, lay, False), memory(cfg, vocab, lay, True)
        rows.append(PlanRow(lay, mem, mem_ck, mem.total <= gpu_mem, mem_ck.total <= gpu_mem,
                            refusal(lay.applied(cfg, False)), refusal(lay.applied(cfg, True))))
    chosen = layout_of(cfg, gpus)
    fpt = flops_per_token(cfg.model, vocab, cfg.data.seq_len, passes_of(cfg))
    tokens = cfg.optim.batch_size * cfg.optim.grad_accum * cfg.data.seq_len * chosen.dp  # per optimizer step
    step_s = tokens * fpt / gpus / (peak_tflops * 1e12 * mfu)  # a TP group shares its tokens' FLOPs
    return Plan(rows, chosen, gpus, gpu_mem, vocab, param_counts(cfg.model, vocab), fpt, tokens, step_s,
                tokens / gpus / step_s, mfu, peak_tflops)


def refusal(cfg: Config) -> str | None:
    """The configuration check's message when ``cfg`` would be refused (the planner lists only what
    `proseco train` runs: one owner, :func:`pipeline.config.validate.validate`, decides)."""
    try:
        validate(cfg)
    except ProsecoError as exc:
        return str(exc)
    return None


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _fits(fits: bool, refused: str | None) -> str:
    return "refused" if refused else "yes" if fits else "NO"


def format_plan(p: Plan, cfg: Config) -> str:
    """The table `proseco plan` prints, with its assumptions (see docs/plan.md)."""
    m = cfg.model
    kind = "ProSeCo (2 passes)" if passes_of(cfg) == 2 else "MDM (1 pass)"
    lines = [
        (f"model      {p.params.total:,} parameters ({m.layers} x {m.hidden}, {m.heads} heads, vocabulary {p.vocab:,}), "
        f"{kind}, {'bf16 autocast' if cfg.parallel.bf16 else 'fp32'}, EMA {'on' if cfg.optim.ema > 0 else 'off'}"),
        (f"batch      {cfg.optim.batch_size} sequences x {cfg.data.seq_len} tokens per rank and micro-step, "
        f"grad_accum {cfg.optim.grad_accum}, split backward {'on' if cfg.diffusion.split_backward else 'off'}"),
        (f"devices    {p.gpus} x {p.gpu_mem / GIB:.0f} GiB; memory in GiB per device "
        "(act ckpt: with parallel.activation_checkpointing=true)"),
        "",
        (f"{'layout':<8} {'weights':>8} {'grads':>7} {'optim':>7} {'ema':>6} {'other':>6} {'activ':>7} {'logits':>7} "
        f"{'total':>7} {'fits':>7} | {'act ckpt':>8} {'fits':>7}  overrides"),
    ]
    for r in p.rows:
        mem, ck = r.memory, r.memory_ckpt
        lines.append(
            f"{r.layout.name + ('*' if r.layout == p.chosen else ''):<8} {_gib(mem.weights):>8} {_gib(mem.grads):>7} {_gib(mem.optimizer):>7} "
            f"{_gib(mem.ema):>6} {_gib(mem.buckets + mem.gathered):>6} {_gib(mem.activations):>7} "
            f"{_gib(mem.logits):>7} {_gib(mem.total):>7} {_fits(r.fits, r.refused):>7} | {_gib(ck.total):>8} "
            f"{_fits(r.fits_ckpt, r.refused_ckpt):>7}  {r.layout.overrides}")
    refused = {}
    for r in p.rows:
        if r.refused:
            refused[r.layout.name + (" (both)" if r.refused_ckpt == r.refused else "")] = r.refused
        if r.refused_ckpt and r.refused_ckpt != r.refused:
            refused[f"{r.layout.name} with act ckpt"] = r.refused_ckpt
    lines += [
        "",
        f"* = the layout of the config ({p.chosen.overrides})",
        *(f"refused: {name}: {why}" for name, why in refused.items()),
        (f"throughput {p.flops_per_token / 1e9:.3f} GFLOP per token ({'both passes, ' if passes_of(cfg) == 2 else ''}"
        f"6N + attention), {p.tokens_per_step:,} tokens per optimizer step on {p.gpus} devices"),
        (f"           at MFU {p.mfu:.0%} of {p.peak_tflops:g} TFLOP/s: {p.step_s:.3g} s per step, "
        f"{p.tokens_per_s_per_device:,.0f} tokens/s per device"),
        ("assumes    fused attention (no L x L matrix), peak of a step after the first (AdamW state allocated), "
        "no allocator fragmentation; see docs/plan.md"),
    ]
    return "\n".join(lines)
