"""`proseco prep tokenizer | shards | merge | verify | sudoku | sft`: the CLI's entry points into data prep.

Each function takes the resolved config (the ``prep`` section, plus ``data.seq_len`` for the
shard length) and the few command-line flags that are not settings (an output folder, a task
index); it returns the process exit code.
"""

from __future__ import annotations

import sys
import time

from data_prep import readers
from pipeline.config import Config, check_tokenizer_vocab, parse_part


def _inputs(cfg: Config) -> list[str]:
    return list(cfg.prep.inputs) or list(readers.DEFAULT_INPUTS)


def tokenizer(cfg: Config, out: str | None, *, import_model: str | None = None, force: bool = False) -> int:
    from data_prep import tokenizer as tok

    out = out or cfg.prep.tokenizer_dir
    start = time.perf_counter()
    if import_model:
        sidecar = tok.import_tokenizer(import_model, out, overwrite=force)
    else:
        p = cfg.prep
        sidecar = tok.train_tokenizer(
            _inputs(cfg), out, vocab_size=check_tokenizer_vocab(cfg), model_type=p.model_type, byte_fallback=p.byte_fallback,
            character_coverage=p.character_coverage, input_sentence_size=p.input_sentence_size, seed=p.seed,
            text_field=p.text_field, doc_split=p.doc_split, fmt=p.fmt, max_chars=p.max_chars, overwrite=force,
        )
    print(tok.summary(sidecar))
    print(f"wrote {out}/tokenizer.model and tokenizer.json in {time.perf_counter() - start:.1f} s")
    return 0


def shards(cfg: Config, out: str | None, *, task: str | None = None) -> int:
    from data_prep.shards import ShardSettings, build_shards

    i, n = parse_part(task, "--task")
    p = cfg.prep
    settings = ShardSettings(
        inputs=_inputs(cfg), tokenizer_dir=p.tokenizer_dir, out_dir=out or cfg.data.shards, seq_len=cfg.data.seq_len,
        mode=p.mode, shard_bytes=int(p.shard_mb * 2**20), val_fraction=p.val_fraction, text_field=p.text_field,
        doc_split=p.doc_split, fmt=p.fmt, max_chars=p.max_chars, num_workers=p.workers, task_index=i, num_tasks=n,
    )
    start = time.perf_counter()
    result = build_shards(settings)
    seconds = time.perf_counter() - start
    if n > 1 and "splits" not in result:
        print(f"partition {i}/{n} done in {seconds:.1f} s; run `proseco prep merge` once all {n} are done")
        return 0
    print(_manifest_summary(result, settings.out_dir, seconds))
    _warn_empty_val(result)
    return 0


def merge(cfg: Config, out: str | None) -> int:
    from data_prep.manifest import merge as merge_parts

    out = out or cfg.data.shards
    manifest = merge_parts(out)
    print(_manifest_summary(manifest, out, None))
    _warn_empty_val(manifest)
    return 0


def verify(cfg: Config, out: str | None) -> int:
    from data_prep.verify import verify_report

    report, ok = verify_report(out or cfg.data.shards)
    print(report)
    return 0 if ok else 1


def sudoku(cfg: Config, out: str | None) -> int:
    """The 4x4 Sudoku task's files (default folder ``data/sudoku4``), written by the task itself."""
    from pipeline.tasks import sudoku as task

    return task.main(cfg, out or "data/sudoku4")


def sft(cfg: Config, out: str | None) -> int:
    """Prompt/response JSONL (prep.inputs) into SFT shards for the model of ``model.init=hf:PATH``."""
    from data_prep.sft import prep_sft
    from pipeline.errors import ProsecoError

    if not cfg.model.init:
        raise ProsecoError("proseco prep sft tokenizes with the model's own tokenizer: set model.init=hf:PATH")
    if not cfg.prep.inputs:
        raise ProsecoError("proseco prep sft needs prep.inputs=[FILE.jsonl,...] (prompt/response or messages records)")
    out = out or cfg.data.shards
    start = time.perf_counter()
    manifest = prep_sft(list(cfg.prep.inputs), out, cfg.model.init, cfg.data.seq_len, cfg.prep.val_fraction,
                        int(cfg.prep.shard_mb * 2**20))
    print(_manifest_summary(manifest, out, time.perf_counter() - start))
    _warn_empty_val(manifest)
    return 0


def _warn_empty_val(manifest: dict) -> None:
    """An empty val split is accepted (an empty train split is refused), but validation would fail."""
    fraction = manifest["config"]["val_fraction"]
    if fraction and not manifest["splits"]["val"]["samples"]:
        print(f"warning: the val split holds no sample ({manifest['documents']['val']} document(s) at "
              f"val_fraction {fraction}); train with log.val_every=0, or give more text or a higher "
              "prep.val_fraction", file=sys.stderr)


def _manifest_summary(manifest: dict, out: str, seconds: float | None) -> str:
    lines = [f"wrote {out}/manifest.json" + (f" in {seconds:.1f} s" if seconds is not None else "")]
    for split, info in manifest.get("splits", {}).items():
        lines.append(f"  {split:5s} {len(info['shards']):4d} shards, {info['samples']:,} sequences, "
                     f"{info['tokens']:,} tokens, {manifest.get('documents', {}).get(split, 0):,} documents")
    skipped = {k: v for k, v in manifest.get("skipped", {}).items() if v}
    lines.append("  skipped: " + (", ".join(f"{k} {v}" for k, v in skipped.items()) if skipped else "nothing"))
    lines.append(f"  fingerprint {manifest.get('fingerprint', '?')[:16]}")
    return "\n".join(lines)
