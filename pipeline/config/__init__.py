"""Configuration: the schema (one dataclass per section), loading, and validation.

Precedence is ``defaults <- YAML preset(s) <- dotted CLI overrides`` (``model.hidden=512``).
:mod:`~pipeline.config.schema` declares every key, :mod:`~pipeline.config.load` reads presets and
overrides strictly, :mod:`~pipeline.config.validate` holds every rule between keys.
"""

from pipeline.config.load import config_from_dict, dump_yaml, load_config, to_dict
from pipeline.config.schema import (
    MOVED_KEYS,
    CheckpointConfig,
    ClusterConfig,
    Config,
    DataConfig,
    DemoConfig,
    DiffusionConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PrepConfig,
    RunConfig,
    SamplerConfig,
)
from pipeline.config.validate import (
    check_corpus_run,
    check_shards,
    check_tensor_parallel,
    check_tokenizer_vocab,
    check_world_size,
    parse_part,
    validate,
)

__all__ = [
    "MOVED_KEYS", "CheckpointConfig", "ClusterConfig", "Config", "DataConfig", "DemoConfig", "DiffusionConfig",
    "EvalConfig", "LogConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "PrepConfig", "RunConfig",
    "SamplerConfig", "check_corpus_run", "check_shards", "check_tensor_parallel", "check_tokenizer_vocab",
    "check_world_size", "config_from_dict", "dump_yaml", "load_config", "parse_part", "to_dict", "validate",
]
