"""The lm-evaluation-harness model ``proseco``: a checkpoint, run or export folder as an lm-eval ``LM``.

    proseco-lm-eval --model proseco --model_args path=RUN_OR_EXPORT,sampler=confidence,steps=256,\
block_length=32,corrector_every=4,corrector_steps=2 --tasks ...          (docs/lm_eval.md)

The model is loaded by :func:`pipeline.artifact.load_model`, the project's one loader (any backbone
it knows, with the tokenizer stored beside it); requests run through the project's samplers. The
tokenizer (``ArtifactInfo.tokenizer``) must offer ``encode(str) -> list[int]``, ``decode(ids) -> str``
and ``bos_id`` / ``eos_id`` / ``pad_id``; the model must be callable as ``model(tokens, t, valid)``.

* ``generate_until``: each request's prompt (the tokenizer's BOS first, ``add_bos``) followed by
  ``gen_length`` masks (default: the request's ``max_gen_toks``) is decoded by
  :func:`pipeline.diffusion.sampling.sample` with the adapter's sampler settings (``confidence``
  prompted blocks by default: ``block_length``, ``steps`` (0 = one step per generated token),
  ``threshold``, ``temperature``, the corrector's ``corrector_every`` = omega and
  ``corrector_steps`` = S, ``eos_stop`` for early EOS; any ``sampler.*`` key). The text is cut
  at the first EOS and at the first of the request's ``until`` stop sequences. The request's
  ``do_sample`` / ``temperature`` are ignored: the sampler settings are the adapter's, recorded
  in the results. Requests are batched with requests of the same prompt length; ``pad_to`` = k > 1
  left-pads each prompt with the pad id to a multiple of k (hidden from attention for models
  trained without loss on pads), so more requests share a batch (its outputs differ from
  ``pad_to=1`` for models with learned positions or visible pads, and are again independent of the
  batch size).
* ``loglikelihood``: the Monte Carlo masked-diffusion bound of :mod:`pipeline.lmeval.likelihood`
  with ``mc_samples`` draws; ``is_greedy`` by decoding the continuation greedily (confidence
  sampler, temperature 0, one token per step, no corrector; ``greedy_check=false`` skips it
  and reports False).
* ``loglikelihood_rolling``: the text in windows of ``max_seq_len // 2`` tokens, each scored by the
  same bound given the tokens before it (BOS first) that fit; the windows' bounds summed.

Reproducibility: every request draws from its own generator seeded by :func:`request_seed` from
``seed``, its text, its settings and its repeat number, and rows are batched only with rows of the
same length, so outputs do not depend on ``batch_size``, on the order of requests or on which
other tasks run. NFE (one per row through the network) and wall time are recorded per request
(:attr:`ProsecoLM.request_stats`) and summed per request kind; :meth:`get_model_info` puts them,
the full sampler settings and the lm-eval version into lm-eval's results (``config.proseco``).
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections import defaultdict

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from pipeline.config import SamplerConfig
from pipeline.diffusion.sampling import Denoiser, check_sampler, sample
from pipeline.errors import ProsecoError
from pipeline.lmeval import ADAPTER_VERSION, lm_eval_version
from pipeline.lmeval.likelihood import masked_rows, mc_masks, row_terms
from pipeline.lmeval.requests import (
    batches,
    cut_at_stops,
    encode_pair,
    fit_left,
    occurrences,
    request_seed,
    stop_sequences,
    until_eos,
)

DEFAULT_GEN_TOKENS = 256  # lm-eval's default max_gen_toks
ALIASES = {"sampler": "name", "block_length": "block_size", "omega": "corrector_every"}
# the adapter's defaults where they differ from SamplerConfig's: LLaDA's benchmark setting
DEFAULTS = {"name": "confidence", "temperature": 0.0, "block_size": 32, "steps": 0}
SAMPLER_KEYS = tuple(f.name for f in dataclasses.fields(SamplerConfig))


def sampler_from_args(args: dict, base: SamplerConfig | None = None) -> SamplerConfig:
    """A :class:`SamplerConfig` from model_args (``sampler``, ``block_length``, ``omega`` are aliases
    of ``name``, ``block_size``, ``corrector_every``); values are cast to the field's type. Unknown
    keys and values of the wrong type are user errors."""
    values = dataclasses.asdict(base) if base is not None else {**dataclasses.asdict(SamplerConfig()), **DEFAULTS}
    for key, value in args.items():
        name = ALIASES.get(key, key)
        if name not in SAMPLER_KEYS:
            known = sorted(set(SAMPLER_KEYS) | set(ALIASES) | set(OWN_ARGS))
            raise ProsecoError(f"proseco model_args: unknown key {key!r}; known: {', '.join(known)}")
        values[name] = _cast(key, value, type(values[name]))
    cfg = SamplerConfig(**values)
    check_sampler(dataclasses.replace(cfg, steps=max(cfg.steps, 1)), 1, None)
    return cfg


def _cast(key: str, value, kind: type):
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif kind is int and not isinstance(value, bool):
        try:
            if float(value) == int(float(value)):
                return int(float(value))
        except (TypeError, ValueError):
            pass
    elif kind is str:
        return str(value)
    raise ProsecoError(f"proseco model_args: {key} must be a {kind.__name__}, got {value!r}")


OWN_ARGS = ("path", "weights", "batch_size", "device", "seed", "gen_length", "mc_samples", "greedy_check",
            "add_bos", "pad_to")


@register_model("proseco")
class ProsecoLM(LM):
    """lm-eval's ``LM`` over a ProSeCo model (module docstring). ``loaded``: an already loaded
    ``(model, training config, ArtifactInfo)`` instead of ``path``; ``sampler_config``: a complete
    :class:`SamplerConfig` instead of sampler keys (``sampler`` is the sampler's name, as on the CLI)."""

    def __init__(self, path: str | None = None, weights: str = "auto", batch_size=1, max_batch_size=None,
                 device: str | None = None, seed: int | None = None, gen_length: int = 0, mc_samples: int = 128,
                 greedy_check: bool = True, add_bos: bool = True, pad_to: int = 1, sampler_config: SamplerConfig | None = None,
                 loaded=None, **sampler_args):
        super().__init__()
        if loaded is None:
            if not path:
                raise ProsecoError("proseco model_args: give path=RUN_OR_CHECKPOINT_OR_EXPORT")
            from pipeline.artifact import load_model

            loaded = load_model(str(path), weights=str(weights))
        self.model, self.train_cfg, self.info = loaded
        if self.info.tokenizer is None:
            raise ProsecoError(f"{self.info.path} has no tokenizer (it was not trained on text); "
                               "lm-eval tasks need a text model")
        self.tok = self.info.tokenizer
        if seed is not None:
            sampler_args["seed"] = seed
        self.sampler = sampler_from_args(sampler_args, sampler_config)
        self.batch_size = _positive("batch_size", batch_size)
        self.mc_samples = _positive("mc_samples", mc_samples)
        self.gen_length = _cast("gen_length", gen_length, int)
        self.greedy_check = _cast("greedy_check", greedy_check, bool)
        self.add_bos = _cast("add_bos", add_bos, bool)
        self.pad_to = _positive("pad_to", pad_to)
        if self.pad_to > 1 and (self.tok.pad_id is None or self.tok.pad_id < 0):
            raise ProsecoError("proseco: pad_to > 1 needs a tokenizer with a pad id; this one has none")
        self._device = _device(device)
        self.model = self.model.to(self._device).eval()
        self.max_len = int(self.train_cfg.model.max_seq_len)
        self.ids = self.info.sampling_ids(self.train_cfg)
        self.request_stats: list[dict] = []

    # ------------------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [r.args for r in requests]
        keys = [(ctx, json.dumps(kw, sort_keys=True, default=str)) for ctx, kw in args]
        jobs = []
        for (ctx, kw), key, rep in zip(args, keys, occurrences(keys), strict=True):
            gen = self.gen_length or int(kw.get("max_gen_toks", DEFAULT_GEN_TOKENS))
            if gen >= self.max_len:
                raise ProsecoError(f"generation length {gen} leaves no room for a prompt in the model's "
                                   f"max_seq_len {self.max_len}; set gen_length smaller")
            prompt = self._pad_left(fit_left(self._head() + self.tok.encode(ctx), self.max_len - gen), gen)
            jobs.append((prompt, gen, request_seed(self.sampler.seed, "generate_until", *key, rep),
                         stop_sequences(kw.get("until"))))
        out: list[str | None] = [None] * len(jobs)
        ends = {i for i in (self.ids.get("eos_id"), self.tok.pad_id) if i is not None}
        for idx in batches([(len(j[0]), j[1]) for j in jobs], self.batch_size):
            width, gen = len(jobs[idx[0]][0]), jobs[idx[0]][1]
            cfg = self.sampler if self.sampler.steps else dataclasses.replace(self.sampler, steps=gen)
            res, seconds = self._complete([jobs[i][0] for i in idx], gen, cfg, [jobs[i][2] for i in idx], self.ids)
            for row, i in enumerate(idx):
                ids = until_eos(res.tokens[row, width:].tolist(), ends)
                out[i] = cut_at_stops(self.tok.decode(ids), jobs[i][3])
                self._record(requests[i], "generate_until", seconds, len(ids), res.nfe_predictor[row],
                             res.nfe_corrector[row])
        for r, text in zip(requests, out, strict=True):
            self.cache_hook.add_partial("generate_until", r.args, text)
        return out

    # ------------------------------------------------------------------------------ likelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for ctx, cont in (r.args for r in requests):
            c, x = encode_pair(self.tok, ctx, cont, self.add_bos)
            pairs.append((self._fit(c, x), x))
        seeds = [request_seed(self.sampler.seed, "loglikelihood", *r.args) for r in requests]
        values = self._bound(pairs, seeds, requests, "loglikelihood")
        greedy = self._greedy(pairs, requests) if self.greedy_check else [False] * len(pairs)
        out = list(zip(values, greedy, strict=True))
        for r, v in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", r.args, v)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        window = max(1, self.max_len // 2)
        pairs, owner, seeds = [], [], []
        for n, r in enumerate(requests):
            (text,) = r.args
            ids = self.tok.encode(text)
            for start in range(0, len(ids), window):
                cont = ids[start:start + window]
                pairs.append((fit_left(self._head() + ids[:start], self.max_len - len(cont)), cont))
                owner.append(n)
                seeds.append(request_seed(self.sampler.seed, "loglikelihood_rolling", text, start))
        values = self._bound(pairs, seeds, [requests[o] for o in owner], "loglikelihood_rolling")
        out = [0.0] * len(requests)
        for o, v in zip(owner, values, strict=True):
            out[o] += v
        for r, v in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, v)
        return out

    def _bound(self, pairs, seeds, requests, kind: str) -> list[float]:
        """The Monte Carlo bound of each (context ids, continuation ids) pair (module
        :mod:`pipeline.lmeval.likelihood`); rows of one length share forward passes."""
        m = self.mc_samples
        terms = torch.zeros(len(pairs), m, dtype=torch.float64)
        seconds = torch.zeros(len(pairs), dtype=torch.float64)
        for batch in self._row_batches(pairs, seeds):
            tokens = torch.stack([row for _, _, row in batch]).to(self._device)
            start = torch.tensor([len(pairs[n][0]) for n, _, _ in batch], device=self._device)
            targets = torch.stack([torch.tensor(pairs[n][0] + pairs[n][1]) for n, _, _ in batch]).to(self._device)
            t0 = time.perf_counter()
            masked = (tokens == self.info.mask_id).sum(-1)
            t = (masked / (tokens.shape[1] - start).clamp_min(1)).to(torch.get_default_dtype())
            denoise = Denoiser(self.model, self.info.mask_id, len(batch), self._device,
                               None if self.ids["loss_on_pad"] else self.ids["pad_id"])
            with torch.no_grad():
                logits = denoise(tokens, t, torch.ones(len(batch), dtype=torch.bool, device=self._device),
                                 "predictor", None)
                values = row_terms(torch.log_softmax(logits.float(), -1), tokens, targets, start,
                                   self.info.mask_id).cpu()
            share = (time.perf_counter() - t0) / len(batch)
            for (n, j, _), v in zip(batch, values, strict=True):
                terms[n, j] = v
                seconds[n] += share
        for n, r in enumerate(requests):
            self._record(r, kind, float(seconds[n]), len(pairs[n][1]), m, 0)
        return [float(v) for v in terms.mean(-1)]

    def _row_batches(self, pairs, seeds):
        """Batches of (request, sample, noisy row) of one row length and at most ``batch_size`` rows,
        requests in the order of their length then index: a request's Monte Carlo rows are made
        when it is reached, so memory holds one batch, not every request's rows."""
        order = sorted(range(len(pairs)), key=lambda n: (len(pairs[n][0]) + len(pairs[n][1]), n))
        pending, width = [], None
        for n in order:
            ctx, cont = pairs[n]
            if pending and len(ctx) + len(cont) != width:
                yield pending
                pending = []
            width = len(ctx) + len(cont)
            masks = mc_masks(len(cont), self.mc_samples, torch.Generator().manual_seed(seeds[n]))
            for j, row in enumerate(masked_rows(ctx, cont, masks, self.info.mask_id)):
                pending.append((n, j, row))
                if len(pending) == self.batch_size:
                    yield pending
                    pending = []
        if pending:
            yield pending

    def _greedy(self, pairs, requests) -> list[bool]:
        """Whether greedy decoding of each continuation (confidence, temperature 0, one token per
        step, no corrector) reproduces it."""
        out = [False] * len(pairs)
        for idx in batches([(len(c), len(x)) for c, x in pairs], self.batch_size):
            ctx_len, n = len(pairs[idx[0]][0]), len(pairs[idx[0]][1])
            cfg = SamplerConfig(name="confidence", steps=n, temperature=0.0, block_size=0, corrector_steps=0,
                                seed=self.sampler.seed, nfe_cache=self.sampler.nfe_cache, float64=self.sampler.float64)
            res, seconds = self._complete([pairs[i][0] for i in idx], n, cfg, [0] * len(idx),
                                          {**self.ids, "eos_id": None})
            for row, i in enumerate(idx):
                out[i] = res.tokens[row, ctx_len:].tolist() == pairs[i][1]
                self._record(requests[i], "greedy_check", seconds, n, res.nfe_predictor[row], 0)
        return out

    # ------------------------------------------------------------------------------ helpers
    def _complete(self, contexts: list[list[int]], gen: int, cfg: SamplerConfig, seeds: list[int], ids: dict):
        """Sample ``gen`` tokens after each of ``contexts`` (all of one length, kept fixed) with
        ``cfg``; returns (the SampleOutput, wall seconds per row)."""
        width = len(contexts[0])
        prompt = torch.full((len(contexts), width + gen), self.info.mask_id, dtype=torch.long)
        prompt[:, :width] = torch.tensor(contexts, dtype=torch.long)
        fixed = torch.zeros_like(prompt, dtype=torch.bool)
        fixed[:, :width] = True
        t0 = time.perf_counter()
        res = sample(self.model, cfg, seq_len=width + gen, mask_id=self.info.mask_id, prompt=prompt.to(self._device),
                     fixed=fixed.to(self._device), seeds=seeds, max_seq_len=self.max_len,
                     time_conditioned=self.train_cfg.model.time_conditioning, **ids)
        return res, (time.perf_counter() - t0) / len(contexts)

    def _head(self) -> list[int]:
        bos = self.tok.bos_id
        return [bos] if self.add_bos and bos is not None and bos >= 0 else []

    def _pad_left(self, prompt: list[int], gen: int) -> list[int]:
        """With ``pad_to`` > 1: the prompt left-padded with the pad id to the next multiple of
        ``pad_to`` (at most the room left by ``gen``), so prompts of different lengths share batches.
        The padding depends only on the prompt itself, so a request's row is the same in any batch."""
        if self.pad_to == 1:
            return prompt
        width = min(-(-len(prompt) // self.pad_to) * self.pad_to, self.max_len - gen)
        return [self.tok.pad_id] * (width - len(prompt)) + prompt

    def _fit(self, ctx: list[int], cont: list[int]) -> list[int]:
        """The context, cut from the left so that context + continuation fit the model."""
        if len(cont) > self.max_len - (1 if ctx else 0):
            raise ProsecoError(f"a continuation of {len(cont)} tokens does not fit the model's max_seq_len "
                               f"{self.max_len}")
        return fit_left(ctx, self.max_len - len(cont))

    def _record(self, request, kind: str, seconds: float, tokens: int, nfe_predictor, nfe_corrector) -> None:
        p, c = int(nfe_predictor), int(nfe_corrector)
        self.request_stats.append({"kind": kind, "task": getattr(request, "task_name", None),
                                   "doc_id": getattr(request, "doc_id", None), "nfe": p + c, "nfe_predictor": p,
                                   "nfe_corrector": c, "tokens": tokens, "seconds": seconds})

    def totals(self) -> dict[str, dict]:
        """Per request kind: requests, NFE (total, predictor, corrector), tokens, seconds, tokens/s, NFE per token."""
        sums: dict[str, dict] = defaultdict(lambda: defaultdict(float))
        for s in self.request_stats:
            for kind in (s["kind"], "all"):
                agg = sums[kind]
                agg["requests"] += 1
                for k in ("nfe", "nfe_predictor", "nfe_corrector", "tokens", "seconds"):
                    agg[k] += s[k]
        out = {}
        for kind, agg in sums.items():
            agg = {k: (v if k == "seconds" else int(v)) for k, v in agg.items()}
            agg["tokens_per_s"] = agg["tokens"] / agg["seconds"] if agg["seconds"] > 0 else None
            agg["nfe_per_token"] = agg["nfe"] / agg["tokens"] if agg["tokens"] else None
            out[kind] = agg
        return out

    def settings(self) -> dict:
        """Everything besides the model that determines the adapter's outputs."""
        return {"adapter_version": ADAPTER_VERSION, "lm_eval_version": lm_eval_version(),
                "sampler": dataclasses.asdict(self.sampler), "gen_length": self.gen_length,
                "mc_samples": self.mc_samples, "greedy_check": self.greedy_check, "add_bos": self.add_bos,
                "pad_to": self.pad_to}

    def get_model_info(self) -> dict:
        """What lm-eval stores under ``config`` in its results: the model's identity, the full
        settings, and the NFE / throughput totals and per-request stats of this run."""
        info = self.info
        return {"proseco": {"model": {"path": str(info.path), "kind": info.kind, "identity": info.identity,
                                      "weights": info.weights, "step": info.step},
                            **self.settings(), "batch_size": self.batch_size, "totals": self.totals(),
                            "requests": self.request_stats}}

    @property
    def tokenizer_name(self) -> str:
        return f"proseco-{self.info.identity}"


def _device(name: str | None) -> torch.device:
    """The torch device; lm-eval's CLI asks for ``cuda`` by default, so on a machine without CUDA
    the model runs on the CPU (with a warning), as lm-eval's own Hugging Face model does."""
    device = torch.device(name or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"proseco: device {name!r} is not available; running on the CPU", stacklevel=3)
        return torch.device("cpu")
    return device


def _positive(key: str, value) -> int:
    if isinstance(value, str) and not value.strip().isdigit():
        raise ProsecoError(f"proseco: {key} must be a positive integer, got {value!r} ('auto' is not supported)")
    n = _cast(key, value, int)
    if n < 1:
        raise ProsecoError(f"proseco: {key} must be a positive integer, got {value!r}")
    return n
