"""Typed configuration: YAML file -> nested dataclasses -> dotted `key=value` overrides.

Precedence: command line > file > defaults. Every error names the dotted key and the bad
value and is raised as `ConfigError`, which the entry point prints without a traceback.
"""

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

INTERACTIONS = ("dot", "cat", "dcn")
LOSSES = ("bce", "mse", "wbce")
DENSE_OPTIMIZERS = ("sgd", "adagrad", "adam")
SPARSE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
SHARDING_TYPES = (
    "table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise", "data_parallel",
)
COMPUTE_KERNELS = ("fused", "dense", "fused_uvm", "fused_uvm_caching")
CRITEO_SOURCES = ("criteo_kaggle", "criteo_terabyte")  # preprocessed Criteo data
DATA_SOURCES = ("random", "synthetic") + CRITEO_SOURCES
QR_OPERATIONS = ("mult", "add", "concat")
DENSE_AUTOCAST = ("none", "bf16")
EMBEDDING_DTYPES = ("fp32", "fp16")
COMM_PRECISIONS = ("fp32", "fp16", "bf16")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
STEP_KINDS = ("auto", "pipeline", "direct", "cuda_graph")


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the key and the value."""


@dataclass
class ModelConfig:
    dense_in_features: int = 13
    """Number of dense (integer) features: the bottom MLP's input width."""
    bottom_mlp: List[int] = field(default_factory=lambda: [512, 256, 64, 16])
    """Bottom MLP layer widths after the input (reference --arch-mlp-bot without its first
    entry). The last must equal embeddings.dim for dot and cat."""
    top_mlp: List[int] = field(default_factory=lambda: [512, 256, 1])
    """Top MLP layer widths after the interaction (the input width is derived); last is 1."""
    interaction: str = "dot"
    """Feature interaction: dot, cat or dcn (DCNv2 low-rank cross net)."""
    interaction_itself: bool = False
    """dot only: include each feature's dot product with itself (--arch-interaction-itself)."""
    dcn_num_layers: int = 3
    """dcn only: number of cross layers."""
    dcn_low_rank_dim: int = 512
    """dcn only: rank of each cross layer's weight factorisation."""


@dataclass
class EmbeddingsConfig:
    dim: int = 16
    """Embedding dimension d of every table (--arch-sparse-feature-size)."""
    num_embeddings_per_feature: List[int] = field(default_factory=lambda: [1000] * 26)
    """Rows of each feature's table, one table per sparse feature."""
    max_ind_range: int = 0
    """Cap every table at this many rows; ids are taken mod the cap (0: no cap)."""
    qr_threshold: int = 0
    """Quotient-remainder: compress tables with more rows than this (0: off)."""
    qr_collisions: int = 4
    """Quotient-remainder: collisions c; remainder table c rows, quotient ceil(n / c)."""
    qr_operation: str = "mult"
    """Quotient-remainder: how the two pooled embeddings combine: mult, add or concat."""
    md_alpha: float = 0.0
    """Mixed dimensions: power-law temperature alpha (0: off, every table gets dim)."""
    md_round_dims: bool = False
    """Mixed dimensions: round each table dimension to the nearest power of two."""
    md_dim_multiple: int = 4
    """Mixed dimensions: round each table dimension up to a multiple of this (FBGEMM's
    fused kernels need multiples of 4; 1 keeps the rule's values, for data-parallel tables)."""

    def table_sizes(self) -> List[int]:
        """Row counts after the max_ind_range cap."""
        if self.max_ind_range > 0:
            return [min(n, self.max_ind_range) for n in self.num_embeddings_per_feature]
        return list(self.num_embeddings_per_feature)


@dataclass
class DataConfig:
    source: str = "synthetic"
    """random, synthetic (labels from a known click model), criteo_kaggle, criteo_terabyte."""
    path: str = ""
    """Folder of preprocessed Criteo data (criteo_* sources)."""
    batch_size: int = 128
    """Global training batch size, split evenly across ranks (--mini-batch-size)."""
    eval_batch_size: int = 0
    """Global evaluation batch size (0: batch_size)."""
    train_samples: int = 65536
    """random/synthetic: training samples per epoch."""
    eval_samples: int = 16384
    """random/synthetic: validation samples."""
    num_indices_per_lookup: int = 1
    """Ids per bag for random/synthetic data (--num-indices-per-lookup)."""
    num_indices_per_lookup_fixed: bool = True
    """Every bag has exactly num_indices_per_lookup ids; otherwise 1..that many, at random."""
    multi_hot_sizes: List[int] = field(default_factory=list)
    """Per-feature bag sizes (MLPerf DCNv2 multi-hot); overrides num_indices_per_lookup."""
    multi_hot_distribution: str = "uniform"
    """How multi-hot ids are drawn from the one-hot id: uniform or pareto (Criteo and synthetic sources)."""
    id_distribution: str = "uniform"
    """random data: how ids are drawn, uniform (the reference's --rand-data-dist=uniform) or
    zipf, a power law over each table with data.zipf_exponent, hot ids spread over the table
    (for embedding-cache and load-balance benchmarks)."""
    zipf_exponent: float = 1.05
    """Exponent s of data.id_distribution=zipf: id rank r drawn with probability about
    (r + 1)^-s."""
    shuffle_window: int = 0
    """Criteo sources: shuffle training samples within windows of this many (0: no shuffle)."""
    num_workers: int = -1
    """Processes per rank that build batches ahead of the training loop (0: the training
    process builds them; -1: auto, 0 on CPU and up to 4 per rank on CUDA, 8 with multi-hot
    bags or synthetic data)."""
    pin_memory: bool = True
    """CUDA: hand batches over in page-locked memory, so their copy to the GPU overlaps
    compute (no effect on CPU)."""
    seed: int = 0
    """Seed of the random/synthetic data and of shuffling."""


@dataclass
class OptimizerConfig:
    dense: str = "sgd"
    """Optimizer of the dense (data-parallel) parameters: sgd, adagrad, adam."""
    sparse: str = "sgd"
    """Optimizer fused into the embedding backward: sgd, adagrad, rowwise_adagrad, adam."""
    lr: float = 0.01
    """Base learning rate (--learning-rate)."""
    sparse_lr: float = 0.0
    """Base learning rate of the embeddings (0: same as lr)."""
    eps: float = 1e-8
    """Epsilon of adagrad, rowwise_adagrad and adam."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    weight_decay: float = 0.0
    """L2 weight decay of the dense optimizer."""


@dataclass
class LRScheduleConfig:
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps (--lr-num-warmup-steps)."""
    decay_start_step: int = 0
    """Step where the quadratic decay starts (--lr-decay-start-step); >= warmup_steps."""
    num_decay_steps: int = 0
    """Length of the decay (--lr-num-decay-steps); 0: no decay."""


@dataclass
class TableShardingConfig:
    sharding_types: List[str] = field(default_factory=list)
    """Sharding types the planner may use for this table (empty: any)."""
    compute_kernels: List[str] = field(default_factory=list)
    """Compute kernels the planner may use for this table (empty: sharding.compute_kernel)."""


@dataclass
class ShardingConfig:
    sharding_type: str = ""
    """Sharding type for every table (empty: the planner chooses)."""
    compute_kernel: str = "fused"
    """Embedding compute kernel: fused (FBGEMM, optimizer in backward), dense, fused_uvm,
    fused_uvm_caching (GPU only)."""
    tables: Dict[str, TableShardingConfig] = field(default_factory=dict)
    """Per-table constraints keyed by table name (t_<feature>), overriding the above."""
    hbm_cap_gb: float = 0.0
    """Per-device memory the planner may use, GB (0: the device's own size; on CPU 32)."""
    ddr_cap_gb: float = 0.0
    """Host (DDR) memory for UVM per rank, GB: TorchRec's ddr_cap is per rank, so divide a
    node's host memory by its ranks per node (0: TorchRec's default)."""
    cache_load_factor: float = 0.0
    """fused_uvm_caching: the share of each cached table's rows kept in the HBM cache
    (TorchRec CacheParams.load_factor; 0: TorchRec's default, 0.2)."""
    prefetch_pipeline: bool = False
    """fused_uvm_caching: fetch the next batch's rows from host memory into the HBM cache
    while the current batch trains (TorchRec's PrefetchTrainPipelineSparseDist, FBGEMM's
    prefetch_pipeline). Trained as the HBM tables on an H200 (tests/gpu); off by default
    until its speed is benchmarked."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on GPU, gloo on CPU), gloo or nccl."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""


@dataclass
class PrecisionConfig:
    """Numeric formats (see dlrm_torchrec/precision.py). All default to full fp32."""

    tf32: bool = False
    """CUDA: let fp32 matmuls and convolutions use TF32 tensor cores (no effect on CPU)."""
    dense_autocast: str = "none"
    """none or bf16: run the bottom MLP, interaction and top MLP under torch.autocast in
    bfloat16 (weights, gradients, optimizer and loss stay fp32)."""
    embedding_dtype: str = "fp32"
    """fp32 or fp16: storage of the embedding tables (EmbeddingBagConfig.data_type)."""
    comms_forward: str = "fp32"
    """fp32, fp16 or bf16: precision of the pooled embeddings in the sharding all-to-alls
    and reduce-scatters of the forward pass (TorchRec qcomms)."""
    comms_backward: str = "fp32"
    """fp32, fp16 or bf16: precision of their gradients in the backward pass (qcomms)."""


@dataclass
class TrainingConfig:
    epochs: int = 1
    """Passes over the training data (--nepochs)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: no limit) (--num-batches)."""
    eval_every_n_steps: int = 0
    """Evaluate every N steps (0: at the end of each epoch only); also at the end."""
    eval_split: str = "val"
    """The split those evaluations (early stop, best checkpoint) use: val or test. The
    reference's periodic evaluation uses the first half of the last day: test in this
    project's preprocessing (REFERENCE.md's order), val in data adopted from TorchRec."""
    loss: str = "bce"
    """bce, mse or wbce (--loss-function)."""
    loss_weights: List[float] = field(default_factory=lambda: [1.0, 1.0])
    """wbce: weights of label 0 and label 1 (--loss-weights)."""
    round_targets: bool = False
    """Round labels to 0/1 before the loss (--round-targets)."""
    seed: int = 123
    """Seed of every initialisation (--numpy-rand-seed)."""
    target_auc: float = 0.0
    """Stop once the evaluation split's AUC reaches this (MLPerf early stop; 0: off)."""
    target_accuracy: float = 0.0
    """Stop once the evaluation split's accuracy reaches this (0: off)."""
    compile: str = "none"
    """torch.compile the data-parallel modules (bottom MLP, interaction, top MLP, loss):
    none, default, reduce-overhead (default plus CUDA graphs on GPU) or max-autotune.
    Removes per-step kernel-launch overhead; the first steps pay the compilation."""
    step: str = "auto"
    """How a training step runs. auto: the fastest kind the run allows (several ranks:
    pipeline; one rank: cuda_graph on CUDA, else direct, else pipeline; one_rank_step.py).
    pipeline: TorchRec's TrainPipelineSparseDist (any world size). One rank only (one GPU,
    or one CPU process), fused tables in one group, no QR/MD: direct calls the sharded
    collection's FBGEMM kernel itself, without input distribution or pipeline; cuda_graph
    (CUDA; SGD or Adagrad, not Adam) also replays the whole step (lookup, MLPs, loss,
    backward with the fused table update, dense update) as one CUDA graph while the
    learning rate and input shapes stay those it was captured with."""
    crash_at_step: int = 0
    """Fault-injection for tests: rank crash_rank exits at this step on a job's first
    attempt (TORCHELASTIC_RESTART_COUNT=0); 0: off."""
    crash_rank: int = 1
    """The rank that crash_at_step kills."""


@dataclass
class CheckpointConfig:
    dir: str = ""
    """Folder of checkpoints (empty: <logging.run_dir>/checkpoints)."""
    every_n_steps: int = 0
    """Save every N optimizer steps (0: only at the end, if at_end)."""
    at_end: bool = True
    """Save when training ends."""
    keep_last: int = 2
    """Keep the newest K checkpoints (the best one is kept besides)."""
    keep_best: bool = True
    """Also save and keep the checkpoint with the best validation AUC (--save-model)."""
    resume: str = ""
    """"" (start fresh), auto (the newest complete checkpoint in dir, if any) or a folder."""
    save_on_sigterm: bool = True
    """On SIGTERM (scancel, time limit, preemption, pod eviction, torchrun shutdown) the ranks agree on a step within 16, save a checkpoint there and exit with status 143; resume=auto continues from it (false: SIGTERM kills at once)."""


@dataclass
class LoggingConfig:
    run_dir: str = "runs/latest"
    """Folder for the resolved config, metrics and logs."""
    log_every_n_steps: int = 50
    """Print the training loss every N steps."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0 when stdout is a terminal."""
    tensorboard: bool = True
    """Write TensorBoard scalars (loss, AUC, log loss, accuracy, lr, samples/s) to run_dir/tensorboard."""
    plot: bool = True
    """At the end, plot training loss and validation AUC/accuracy to run_dir/metrics.png."""
    profile: bool = False
    """Trace a window of training steps with torch.profiler into run_dir/profile (Chrome/Perfetto JSON)."""
    profile_start_step: int = 5
    """First traced training step (1-based); the step before it warms the profiler up."""
    profile_steps: int = 3
    """Number of traced training steps."""
    profile_all_ranks: bool = False
    """Trace every rank (one file each) instead of rank 0 only."""
    mlperf_logging: bool = False
    """Write MLPerf compliance events (mlperf_logging.mllog) to run_dir/mlperf.log."""
    mlperf_submission_org: str = ""
    """MLPerf submission_org of the mllog submission info."""
    mlperf_submission_platform: str = ""
    """MLPerf submission_platform of the mllog submission info (e.g. 2xDGX-H100)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the field type `tp`; return it converted. Raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, List):
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and item_tp in (int, float) and "-" in value.strip("-"):
            value = value.split("-")  # the reference's "512-256-1" style
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config field type {tp} at {key}")  # a bug, not a user error


def _field_types(cls: Any) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: Any, values: Dict[str, Any], prefix: str) -> Any:
    types = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in types:
            raise ConfigError(
                f"{key}: unknown key (known keys{' of ' + prefix if prefix else ''}: "
                f"{', '.join(types)})"
            )
        kwargs[name] = _coerce(value, types[name], key)
    return cls(**kwargs)


def _set_dotted(tree: Dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, validating each step against the Config schema."""
    parts = key.split(".")
    cls: Any = Config
    node = tree
    for depth, part in enumerate(parts):
        path = ".".join(parts[: depth + 1])
        if cls is None:
            raise ConfigError(f"{key}: {'.'.join(parts[:depth])} is not a section")
        if dataclasses.is_dataclass(cls):
            types = _field_types(cls)
            if part not in types:
                raise ConfigError(f"{path}: unknown key (known: {', '.join(types)})")
            tp = types[part]
        else:  # Dict[str, X]
            tp = typing.get_args(cls)[1]
        if depth == len(parts) - 1:
            node[part] = value
            return
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: is a value, not a section")
        cls = tp if dataclasses.is_dataclass(tp) or typing.get_origin(tp) in (dict, Dict) else None


def parse_override(text: str) -> tuple:
    """`a.b=value` -> ("a.b", parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults < YAML file < overrides; then validation. Raises ConfigError."""
    tree: Dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path}: not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else path
            raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    file_tree = copy.deepcopy(tree)
    for text in overrides:
        try:
            key, value = parse_override(text)
            _set_dotted(tree, key, value)
        except ConfigError as e:
            raise ConfigError(f"command line: {e}") from None
    try:
        cfg = _build(Config, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{_origin(path, file_tree, overrides, str(e))}: {e}") from None
    validate(cfg)
    return cfg


def _origin(path: Optional[str], file_tree: Dict[str, Any], overrides: Sequence[str],
            message: str) -> str:
    """Where the setting that failed to build (`message`) came from: the file when the file
    alone fails the same way, else the command line's key=value overrides."""
    if not path:
        return "command line"
    if not overrides:
        return path
    try:
        _build(Config, file_tree, "")
    except ConfigError as e:
        if str(e) == message:
            return path
    return "command line"


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def _one_of(key: str, value: str, choices: Sequence[str]) -> None:
    _require(value in choices, key, value, f"unknown; choose one of {', '.join(choices)}")


def sparse_output_dim(cfg: Config) -> int:
    """Width of each feature's embedding as the interaction sees it."""
    e = cfg.embeddings
    return 2 * e.dim if e.qr_threshold > 0 and e.qr_operation == "concat" else e.dim


def _check_compression(cfg: Config) -> None:
    """QR / MD settings that cannot work (see dlrm_torchrec/compression.py)."""
    e, s = cfg.embeddings, cfg.sharding
    if e.qr_threshold > 0 and e.md_alpha > 0:
        raise ConfigError(f"embeddings.md_alpha={e.md_alpha!r} with embeddings.qr_threshold="
                          f"{e.qr_threshold!r}: quotient-remainder and mixed dimensions cannot "
                          "be combined; set one of them to 0")
    if e.md_alpha <= 0:
        return
    _require(e.md_dim_multiple >= 1, "embeddings.md_dim_multiple", e.md_dim_multiple, "must be >= 1")
    _require(e.dim % e.md_dim_multiple == 0, "embeddings.md_dim_multiple", e.md_dim_multiple,
             f"must divide embeddings.dim ({e.dim})")
    if e.md_round_dims:
        _require(e.dim & (e.dim - 1) == 0, "embeddings.dim", e.dim,
                 "must be a power of two with embeddings.md_round_dims=true")
    from dlrm_torchrec.compression import embedding_layout

    for f in embedding_layout(e):  # md_solver raises for impossible dimensions
        t = f.tables[0]
        tcfg = s.tables.get(t.name)
        dense_only = tcfg is not None and tcfg.sharding_types == ["data_parallel"]
        kernels = list(tcfg.compute_kernels) if tcfg and tcfg.compute_kernels else [s.compute_kernel]
        if s.sharding_type == "data_parallel" and not (tcfg and tcfg.sharding_types):
            dense_only = True
        if t.dim % 4 and not dense_only and any(k != "dense" for k in kernels):
            raise ConfigError(
                f"embeddings.md_dim_multiple={e.md_dim_multiple!r}: table {t.name} gets "
                f"dimension {t.dim}, but FBGEMM's fused kernels need multiples of 4; use "
                "embeddings.md_dim_multiple=4, or data-parallel tables (the dense kernel)")


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Cross-field checks. `world_size` adds the batch-divisibility check."""
    m, e, d, o, s, t = cfg.model, cfg.embeddings, cfg.data, cfg.optimizer, cfg.sharding, cfg.training
    _require(e.dim > 0, "embeddings.dim", e.dim, "must be > 0")
    _require(len(e.num_embeddings_per_feature) > 0, "embeddings.num_embeddings_per_feature",
             e.num_embeddings_per_feature, "needs at least one table")
    for i, n in enumerate(e.num_embeddings_per_feature):
        _require(n > 0, f"embeddings.num_embeddings_per_feature[{i}]", n, "table sizes must be > 0")
    _require(e.max_ind_range >= 0, "embeddings.max_ind_range", e.max_ind_range, "must be >= 0")
    _require(e.qr_threshold >= 0, "embeddings.qr_threshold", e.qr_threshold, "must be >= 0")
    _require(e.qr_collisions >= 1, "embeddings.qr_collisions", e.qr_collisions, "must be >= 1")
    _one_of("embeddings.qr_operation", e.qr_operation, QR_OPERATIONS)
    _require(e.md_alpha >= 0, "embeddings.md_alpha", e.md_alpha, "must be >= 0")
    _check_compression(cfg)

    _one_of("model.interaction", m.interaction, INTERACTIONS)
    _require(m.dense_in_features > 0, "model.dense_in_features", m.dense_in_features, "must be > 0")
    for name in ("bottom_mlp", "top_mlp"):
        layers = getattr(m, name)
        _require(len(layers) > 0, f"model.{name}", layers, "needs at least one layer")
        for i, w in enumerate(layers):
            _require(w > 0, f"model.{name}[{i}]", w, "layer widths must be > 0")
    _require(m.top_mlp[-1] == 1, "model.top_mlp", m.top_mlp, "the last layer must have width 1")
    if m.interaction in ("dot", "cat"):
        want = sparse_output_dim(cfg)
        _require(
            m.bottom_mlp[-1] == want, "model.bottom_mlp", m.bottom_mlp,
            f"the bottom MLP's output ({m.bottom_mlp[-1]}) must equal the embedding width "
            f"({want}, embeddings.dim{' x 2 for qr concat' if want != e.dim else ''}) for "
            f"{m.interaction} interaction",
        )
    if m.interaction == "dcn":
        _require(m.dcn_num_layers > 0, "model.dcn_num_layers", m.dcn_num_layers, "must be > 0")
        _require(m.dcn_low_rank_dim > 0, "model.dcn_low_rank_dim", m.dcn_low_rank_dim, "must be > 0")
    if m.interaction_itself:
        _require(m.interaction == "dot", "model.interaction_itself", True, "only applies to dot")

    _one_of("data.source", d.source, DATA_SOURCES)
    _require(d.batch_size > 0, "data.batch_size", d.batch_size, "must be > 0")
    _require(d.eval_batch_size >= 0, "data.eval_batch_size", d.eval_batch_size, "must be >= 0")
    _require(d.train_samples > 0, "data.train_samples", d.train_samples, "must be > 0")
    _require(d.eval_samples >= 0, "data.eval_samples", d.eval_samples, "must be >= 0")
    _require(d.num_indices_per_lookup > 0, "data.num_indices_per_lookup",
             d.num_indices_per_lookup, "must be > 0")
    if d.multi_hot_sizes:
        _require(len(d.multi_hot_sizes) == len(e.num_embeddings_per_feature),
                 "data.multi_hot_sizes", d.multi_hot_sizes,
                 f"needs one size per table ({len(e.num_embeddings_per_feature)})")
        for i, k in enumerate(d.multi_hot_sizes):
            _require(k > 0, f"data.multi_hot_sizes[{i}]", k, "must be > 0")
    _one_of("data.multi_hot_distribution", d.multi_hot_distribution, ("uniform", "pareto"))
    _one_of("data.id_distribution", d.id_distribution, ("uniform", "zipf"))
    if d.id_distribution == "zipf":
        _require(d.source == "random", "data.id_distribution", d.id_distribution,
                 f"applies to data.source=random, not {d.source}")
        _require(d.zipf_exponent > 0, "data.zipf_exponent", d.zipf_exponent, "must be > 0")
        for i, n in enumerate(e.table_sizes()):
            _require(n < 1 << 40, f"embeddings.num_embeddings_per_feature[{i}]", n,
                     "zipf ids need tables below 2^40 rows")
    _require(d.shuffle_window >= 0, "data.shuffle_window", d.shuffle_window, "must be >= 0")
    _require(d.num_workers >= -1, "data.num_workers", d.num_workers, "must be >= 0, or -1 (auto)")
    if d.source.startswith("criteo"):
        _require(bool(d.path), "data.path", d.path, f"required for data.source={d.source}")
        _require(m.dense_in_features == 13, "model.dense_in_features", m.dense_in_features,
                 "Criteo data has 13 dense features")

    _one_of("optimizer.dense", o.dense, DENSE_OPTIMIZERS)
    _one_of("optimizer.sparse", o.sparse, SPARSE_OPTIMIZERS)
    _require(o.lr > 0, "optimizer.lr", o.lr, "must be > 0")
    _require(o.sparse_lr >= 0, "optimizer.sparse_lr", o.sparse_lr, "must be >= 0")
    _require(o.eps > 0, "optimizer.eps", o.eps, "must be > 0")
    _require(0 <= o.beta1 < 1, "optimizer.beta1", o.beta1, "must be in [0, 1)")
    _require(0 <= o.beta2 < 1, "optimizer.beta2", o.beta2, "must be in [0, 1)")

    ls = cfg.lr_schedule
    for name in ("warmup_steps", "decay_start_step", "num_decay_steps"):
        _require(getattr(ls, name) >= 0, f"lr_schedule.{name}", getattr(ls, name), "must be >= 0")
    _require(ls.decay_start_step >= ls.warmup_steps or ls.num_decay_steps == 0,
             "lr_schedule.decay_start_step", ls.decay_start_step,
             f"must be >= lr_schedule.warmup_steps ({ls.warmup_steps})")

    if s.sharding_type:
        _one_of("sharding.sharding_type", s.sharding_type, SHARDING_TYPES)
    _one_of("sharding.compute_kernel", s.compute_kernel, COMPUTE_KERNELS)
    _one_of("sharding.backend", s.backend, ("auto", "gloo", "nccl"))
    _one_of("sharding.device", s.device, ("auto", "cpu", "cuda"))
    _require(s.hbm_cap_gb >= 0, "sharding.hbm_cap_gb", s.hbm_cap_gb, "must be >= 0")
    _require(s.ddr_cap_gb >= 0, "sharding.ddr_cap_gb", s.ddr_cap_gb, "must be >= 0")
    _require(0 <= s.cache_load_factor <= 1, "sharding.cache_load_factor", s.cache_load_factor,
             "must be in [0, 1]")
    if s.prefetch_pipeline:
        allowed = [s.compute_kernel] + [ck for tc in s.tables.values() for ck in tc.compute_kernels]
        _require("fused_uvm_caching" in allowed, "sharding.prefetch_pipeline", True,
                 "prefetches the HBM cache of fused_uvm_caching tables, and neither "
                 "sharding.compute_kernel nor any sharding.tables.*.compute_kernels allows "
                 "that kernel")
    pr = cfg.precision
    _one_of("precision.dense_autocast", pr.dense_autocast, DENSE_AUTOCAST)
    _one_of("precision.embedding_dtype", pr.embedding_dtype, EMBEDDING_DTYPES)
    _one_of("precision.comms_forward", pr.comms_forward, COMM_PRECISIONS)
    _one_of("precision.comms_backward", pr.comms_backward, COMM_PRECISIONS)
    from dlrm_torchrec.compression import embedding_layout, table_specs

    ordered = [t.name for t in table_specs(embedding_layout(cfg.embeddings))]
    table_names = set(ordered)
    listed = ", ".join(ordered) if len(ordered) <= 8 else f"{ordered[0]} .. {ordered[-1]}"
    for name, tcfg in s.tables.items():
        base = f"sharding.tables.{name}"
        _require(name in table_names or name.split("@")[0] in table_names, base, name,
                 f"no such table (tables are {listed})")
        for st in tcfg.sharding_types:
            _one_of(f"{base}.sharding_types", st, SHARDING_TYPES)
        for ck in tcfg.compute_kernels:
            _one_of(f"{base}.compute_kernels", ck, COMPUTE_KERNELS)

    _require(t.epochs > 0, "training.epochs", t.epochs, "must be > 0")
    _require(t.max_steps >= 0, "training.max_steps", t.max_steps, "must be >= 0")
    _require(t.eval_every_n_steps >= 0, "training.eval_every_n_steps", t.eval_every_n_steps,
             "must be >= 0")
    _one_of("training.loss", t.loss, LOSSES)
    _one_of("training.eval_split", t.eval_split, ("val", "test"))
    _one_of("training.compile", t.compile, COMPILE_MODES)
    _one_of("training.step", t.step, STEP_KINDS)
    _require(len(t.loss_weights) == 2, "training.loss_weights", t.loss_weights,
             "needs two weights: label 0, label 1")
    _require(0 <= t.target_auc <= 1, "training.target_auc", t.target_auc, "must be in [0, 1]")
    _require(0 <= t.target_accuracy <= 1, "training.target_accuracy", t.target_accuracy,
             "must be in [0, 1]")
    c = cfg.checkpoint
    _require(c.every_n_steps >= 0, "checkpoint.every_n_steps", c.every_n_steps, "must be >= 0")
    _require(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "must be >= 1")
    _require(cfg.logging.log_every_n_steps > 0, "logging.log_every_n_steps",
             cfg.logging.log_every_n_steps, "must be > 0")
    _require(cfg.logging.profile_start_step >= 1, "logging.profile_start_step",
             cfg.logging.profile_start_step, "must be >= 1")
    _require(cfg.logging.profile_steps >= 1, "logging.profile_steps", cfg.logging.profile_steps,
             "must be >= 1")

    if world_size is not None:
        _require(d.batch_size % world_size == 0, "data.batch_size", d.batch_size,
                 f"must be divisible by the world size ({world_size})")
        eb = d.eval_batch_size or d.batch_size
        _require(eb % world_size == 0, "data.eval_batch_size", eb,
                 f"must be divisible by the world size ({world_size})")


def feature_names(e: EmbeddingsConfig) -> List[str]:
    """Sparse feature (KJT key) names: cat_0 .. cat_{F-1}."""
    return [f"cat_{i}" for i in range(len(e.num_embeddings_per_feature))]


def to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: Any = Config, prefix: str = "") -> List[str]:
    """`key (type, default): docstring` lines for --help, read from the field docstrings."""
    import ast
    import inspect

    docs: Dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(
                getattr(b, "value", None), ast.Constant
            ):
                docs[a.target.id] = " ".join(str(b.value.value).split())  # type: ignore
    except (OSError, TypeError):
        pass
    lines = []
    default = cls()
    for name, tp in _field_types(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, key + "."))
        else:
            lines.append(f"  {key} ({_type_name(tp)}, default {getattr(default, name)!r}): "
                         f"{docs.get(name, '')}")
    return lines
