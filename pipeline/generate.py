"""``proseco sample``: generate from a model (export, checkpoint or run folder) with any sampler and
report exact NFE."""

from __future__ import annotations

import torch

from pipeline.artifact import load_model
from pipeline.config import Config
from pipeline.diffusion.sampling import check_sampler, sample, sample_seeds
from pipeline.errors import ProsecoError
from pipeline.io import atomic_write_json
from pipeline.tasks import sudoku


def run(cfg: Config, model_path: str, *, num: int = 8, out: str | None = None, infill: bool = False) -> int:
    if num < 1:
        raise ProsecoError(f"--num must be >= 1, got {num}")
    check_sampler(cfg.sampler, cfg.data.seq_len, cfg.model.max_seq_len)  # fail before loading weights
    if cfg.data.task == "text" and infill:
        raise ProsecoError("--infill solves a synthetic task's puzzles; a text model generates from scratch")
    model, _, info = load_model(model_path, cfg=cfg)
    if cfg.data.task == "text":
        return _run_text(cfg, model, info, num, out)
    if cfg.data.task != sudoku.NAME:
        raise ProsecoError(f"proseco sample generates for text and {sudoku.NAME} models, not data.task={cfg.data.task!r}")
    if cfg.parallel.threads:
        torch.set_num_threads(cfg.parallel.threads)
    prompt = fixed = None
    if infill:
        d = cfg.data
        prompt, fixed = sudoku.heldout_puzzles(d.split_seed, d.holdout_fraction, d.puzzle_clues, n=num)
    seeds = sample_seeds(cfg.sampler.seed, 0, num)
    result = sample(model, cfg.sampler, seq_len=cfg.data.seq_len, mask_id=info.mask_id,
                    batch=None if infill else num, prompt=prompt, fixed=fixed, seeds=seeds,
                    time_conditioned=cfg.model.time_conditioning, max_seq_len=cfg.model.max_seq_len,
                    **info.sampling_ids(cfg))
    for i, row in enumerate(result.tokens):
        head = f"sample {i}  NFE {int(result.nfe[i])} (predictor {int(result.nfe_predictor[i])}, " \
               f"corrector {int(result.nfe_corrector[i])})"
        print(head)
        if infill:
            print("  puzzle:\n" + _indent(sudoku.to_text(prompt[i])))
        print(_indent(sudoku.to_text(row)))
    score = sudoku.score_solutions(result.tokens, prompt, fixed) if infill else sudoku.score_generated(result.tokens)
    summary = {**result.summary(), **score}
    print("summary: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    if out:
        _write_samples(out, summary, result)
    return 0


def _write_samples(out: str, summary: dict, result, texts: list[str] | None = None) -> None:
    """``--out FILE``: the summary, the samples (token ids, and texts for a text model) and their NFE."""
    atomic_write_json(out, {"summary": summary, **({"texts": texts} if texts is not None else {}),
                            "tokens": result.tokens.tolist(), "nfe_predictor": result.nfe_predictor.tolist(),
                            "nfe_corrector": result.nfe_corrector.tolist()})


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _run_text(cfg: Config, model, info, num: int, out: str | None) -> int:
    """Generate ``num`` sequences of ``data.seq_len`` tokens from scratch and decode them."""
    if info.tokenizer is None:  # an HF backbone trained on SFT shards from before they carried it
        raise ProsecoError(f"{info.path} has no pipeline tokenizer to decode text with (a model.init=hf: model "
                           "whose shards predate it: rerun `proseco prep sft`, or export it with `proseco ckpt "
                           "export --format hf` and sample with transformers)")
    if cfg.parallel.threads:
        torch.set_num_threads(cfg.parallel.threads)
    result = sample(model, cfg.sampler, seq_len=cfg.data.seq_len, mask_id=info.mask_id, batch=num,
                    seeds=sample_seeds(cfg.sampler.seed, 0, num), time_conditioned=cfg.model.time_conditioning,
                    max_seq_len=cfg.model.max_seq_len, **info.sampling_ids(cfg))
    tok = info.tokenizer  # load_model loads a text model's tokenizer or says why it cannot
    texts = []
    for i, row in enumerate(result.tokens):
        ids = [int(x) for x in row]
        texts.append(tok.decode(ids))
        print(f"sample {i}  NFE {int(result.nfe[i])} (predictor {int(result.nfe_predictor[i])}, "
              f"corrector {int(result.nfe_corrector[i])})")
        print(_indent(texts[-1]))
    summary = result.summary()
    print("summary: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    if out:
        _write_samples(out, summary, result, texts=texts)
    return 0
