"""Corpus shards -> training batches: manifest checks and the deterministic, resumable loader."""

from pipeline.data.loader import EpochPlan, ShardLoader, default_rank_world, plan_epoch
from pipeline.data.manifest import Manifest, Shard, manifest_fingerprint

__all__ = ["EpochPlan", "Manifest", "Shard", "ShardLoader", "default_rank_world", "manifest_fingerprint",
           "plan_epoch"]
