"""The configuration schema: one dataclass per component's section, with a docstring per
key (which `describe` turns into --help), and the names of the choices each key accepts.

Each component gets its own section (the model `ModelConfig`, the planner `ShardingConfig`,
the checkpointer `CheckpointConfig`, ...), never the whole `Config`, unless it really reads
several sections.
"""

from dataclasses import dataclass, field
from typing import Dict, List

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
    """Numeric formats (see dlrm_torchrec/parallel/precision.py). All default to full fp32."""

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
    project's preprocessing (docs/reference.md), val in data adopted from TorchRec."""
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


def sparse_output_dim(cfg: Config) -> int:
    """Width of each feature's embedding as the interaction sees it."""
    e = cfg.embeddings
    return 2 * e.dim if e.qr_threshold > 0 and e.qr_operation == "concat" else e.dim


def feature_names(e: EmbeddingsConfig) -> List[str]:
    """Sparse feature (KJT key) names: cat_0 .. cat_{F-1}."""
    return [f"cat_{i}" for i in range(len(e.num_embeddings_per_feature))]
