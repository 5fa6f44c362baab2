"""Typed configuration: the schema (one section per component), loading with overrides,
and validation. Everything a caller needs is importable from here."""

from dlrm_torchrec.config.loading import describe, load_config, parse_override, to_dict, to_yaml
from dlrm_torchrec.config.schema import (
    COMM_PRECISIONS,
    COMPILE_MODES,
    COMPUTE_KERNELS,
    CRITEO_SOURCES,
    DATA_SOURCES,
    DENSE_AUTOCAST,
    DENSE_OPTIMIZERS,
    EMBEDDING_DTYPES,
    INTERACTIONS,
    LOSSES,
    QR_OPERATIONS,
    SHARDING_TYPES,
    SPARSE_OPTIMIZERS,
    STEP_KINDS,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EmbeddingsConfig,
    LoggingConfig,
    LRScheduleConfig,
    ModelConfig,
    OptimizerConfig,
    PrecisionConfig,
    ShardingConfig,
    TableShardingConfig,
    TrainingConfig,
    feature_names,
    sparse_output_dim,
)
from dlrm_torchrec.config.validation import validate

__all__ = [
    "COMM_PRECISIONS", "COMPILE_MODES", "COMPUTE_KERNELS", "CRITEO_SOURCES", "DATA_SOURCES",
    "DENSE_AUTOCAST", "DENSE_OPTIMIZERS", "EMBEDDING_DTYPES", "INTERACTIONS", "LOSSES",
    "QR_OPERATIONS", "SHARDING_TYPES", "SPARSE_OPTIMIZERS", "STEP_KINDS",
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EmbeddingsConfig",
    "LoggingConfig", "LRScheduleConfig", "ModelConfig", "OptimizerConfig", "PrecisionConfig",
    "ShardingConfig", "TableShardingConfig", "TrainingConfig",
    "describe", "feature_names", "load_config", "parse_override", "sparse_output_dim",
    "to_dict", "to_yaml", "validate",
]
