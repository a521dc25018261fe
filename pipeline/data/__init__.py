"""Corpus shards -> training batches: the shard contract (:mod:`pipeline.data.format`), manifest
checks and the deterministic, resumable loader.

The names below are imported on first use, so that ``pipeline.data.format`` (which the tokenizer
worker processes of ``prep shards`` import) does not pull in torch.
"""

from importlib import import_module

_EXPORTS = {
    "EpochPlan": "loader", "ShardLoader": "loader", "default_rank_world": "loader", "plan_epoch": "loader",
    "Manifest": "manifest", "Shard": "manifest", "manifest_fingerprint": "format",
}

__all__ = ["EpochPlan", "Manifest", "Shard", "ShardLoader", "default_rank_world", "manifest_fingerprint",
           "plan_epoch"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"pipeline.data.{_EXPORTS[name]}"), name)
