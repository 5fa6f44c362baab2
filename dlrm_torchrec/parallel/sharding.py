"""Planner, sharders and DistributedModelParallel.

Tables are built on the meta device; `prepare_sharding` gathers what the planner needs
(`PlannerInputs`: per-table constraints from `ShardingConfig`, the topology, pooling
factors, sharders with the fused optimizer); `parallel.planning` plans their placement
from them (for training on rank 0, sent to every rank; for the `plan` command on a cluster
it does not run on); `shard_model` materialises each rank's shards by that plan and fills
them with the seeded initial values (`embedding_init_rows`), so the initial weights do not
depend on the plan or the world size.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import CacheParams, ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from dlrm_torchrec.config import (
    SHARDING_TYPES,
    Config,
    ConfigError,
    DataConfig,
    EmbeddingsConfig,
    ShardingConfig,
)
from dlrm_torchrec.config.embedding_layout import embedding_layout
from dlrm_torchrec.model.dlrm import embedding_init_rows
from dlrm_torchrec.parallel.precision import qcomm_codecs_registry
from dlrm_torchrec.train.optim import sparse_optimizer

GB = 1024**3
CPU_DEFAULT_CAP_GB = 32.0


def pooling_factors(data: DataConfig, embeddings: EmbeddingsConfig) -> Dict[str, float]:
    """Mean ids per bag of each table's feature (table name -> factor), for the planner's
    cost and input-buffer estimates: data.multi_hot_sizes, else for generated data
    num_indices_per_lookup (its mean, (k + 1) / 2, when bags are 1..k at random), else 1."""
    layout = embedding_layout(embeddings)
    k = data.num_indices_per_lookup
    if data.multi_hot_sizes:
        per_feature = [float(s) for s in data.multi_hot_sizes]
    elif data.source in ("random", "synthetic"):
        per_feature = [float(k if data.num_indices_per_lookup_fixed else (k + 1) / 2)] * len(layout)
    else:  # one-hot Criteo
        per_feature = [1.0] * len(layout)
    return {t.name: pf for f, pf in zip(layout, per_feature) for t in f.tables}


def constraints_for(cfg: ShardingConfig, tables: List[EmbeddingBagConfig],
                    pooling: Optional[Dict[str, float]] = None) -> Dict[str, ParameterConstraints]:
    """Per-table planner constraints: the global sharding type / kernel, then per-table
    overrides. Data-parallel tables need the dense kernel. `pooling`: table name -> mean ids
    per bag (`pooling_factors`; TorchRec assumes 1 for a table not in it).
    sharding.cache_load_factor sets the UVM cache size of fused_uvm_caching tables."""
    out = {}
    for t in tables:
        tcfg = cfg.tables.get(t.name)
        kernels = list(tcfg.compute_kernels) if tcfg and tcfg.compute_kernels else [cfg.compute_kernel]
        if tcfg and tcfg.sharding_types:
            types = list(tcfg.sharding_types)
        elif cfg.sharding_type:
            types = [cfg.sharding_type]
        else:  # the planner's choice (data-parallel only with the dense kernel)
            types = None if "dense" in kernels else [t for t in SHARDING_TYPES if t != "data_parallel"]
        if types == ["data_parallel"]:
            kernels = ["dense"]
        extra = {}  # pooling factors and the UVM cache size
        if pooling and t.name in pooling:
            extra["pooling_factors"] = [pooling[t.name]] * len(t.feature_names)
        if "fused_uvm_caching" in kernels and (cfg.cache_load_factor > 0 or cfg.prefetch_pipeline):
            # prefetch_pipeline: the trainer fetches a batch's rows into the cache while the
            # batch before it trains (PrefetchTrainPipelineSparseDist), and FBGEMM keeps the
            # rows of the batches in flight in the cache
            extra["cache_params"] = CacheParams(
                load_factor=cfg.cache_load_factor or None,
                prefetch_pipeline=True if cfg.prefetch_pipeline else None)
        out[t.name] = ParameterConstraints(sharding_types=types, compute_kernels=kernels, **extra)
    return out


def uses_uvm_caching(plan: ShardingPlan) -> bool:
    """Whether the plan puts any table in UVM behind an HBM cache (fused_uvm_caching)."""
    return any(ps.compute_kernel == "fused_uvm_caching"
               for module_plan in plan.plan.values() for ps in module_plan.values())


def check_supported(cfg: ShardingConfig, device_type: str, sparse_kind: str = "sgd") -> None:
    """Reject sharding types and kernels TorchRec's sharder does not offer on this device,
    naming the config key, before the planner fails with a less direct message."""
    sharder = EmbeddingBagCollectionSharder()
    types = set(sharder.sharding_types(device_type))
    wanted = [("sharding.sharding_type", cfg.sharding_type)] if cfg.sharding_type else []
    wanted += [(f"sharding.tables.{name}.sharding_types", st)
               for name, t in cfg.tables.items() for st in t.sharding_types]
    for key, st in wanted:
        if st not in types:
            raise ConfigError(f"{key}={st!r}: not supported by TorchRec on {device_type} "
                              f"(supported there: {', '.join(sorted(types))})")
    if device_type == "cpu":
        kernels = [("sharding.compute_kernel", cfg.compute_kernel)]
        kernels += [(f"sharding.tables.{name}.compute_kernels", ck)
                    for name, t in cfg.tables.items() for ck in t.compute_kernels]
        for key, ck in kernels:
            if ck not in ("fused", "dense"):
                raise ConfigError(f"{key}={ck!r}: UVM kernels need a GPU (use fused or dense on CPU)")
            if ck == "fused" and sparse_kind == "adam":
                raise ConfigError(
                    f"optimizer.sparse='adam' with {key}='fused': FBGEMM's CPU kernels have no "
                    "fused Adam; on CPU use sharding.compute_kernel=dense (Adam as a plain "
                    "optimizer) or a sparse optimizer of sgd, adagrad, rowwise_adagrad")


def device_memory_bytes(device_type: str) -> int:
    """Total memory of this process's current CUDA device (0 on CPU or without CUDA)."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return 0
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def build_topology(cfg: ShardingConfig, world_size: int, local_world_size: int,
                   device_type: str) -> Topology:
    """sharding.hbm_cap_gb per device; when 0: on CUDA the device's own memory (TorchRec's
    default would be 32 GB), on CPU 32 GB. sharding.ddr_cap_gb is per rank, as TorchRec's."""
    hbm = cfg.hbm_cap_gb or (CPU_DEFAULT_CAP_GB if device_type == "cpu" else 0.0)
    kwargs = {}
    if hbm:
        kwargs["hbm_cap"] = int(hbm * GB)
    elif device_memory_bytes(device_type):
        kwargs["hbm_cap"] = device_memory_bytes(device_type)
    if cfg.ddr_cap_gb:
        kwargs["ddr_cap"] = int(cfg.ddr_cap_gb * GB)
    return Topology(world_size=world_size, local_world_size=local_world_size,
                    compute_device=device_type, **kwargs)


class _SingleProcess(DataParallelWrapper):
    """With one rank there is nothing to all-reduce: skip DDP's bucketing and hooks, but still
    move the dense modules to `device`, as TorchRec's DDP wrapper does before it wraps them
    (the sharded tables are already there; `.to` leaves them as they are)."""

    def wrap(self, dmp, env, device) -> None:
        dmp._dmp_wrapped_module.to(device)


def sharders(fused_params: Optional[Dict] = None, qcomm_codecs_registry: Optional[Dict] = None) -> List:
    """`qcomm_codecs_registry`: fp16/bf16 all-to-alls (precision.qcomm_codecs_registry)."""
    return [EmbeddingBagCollectionSharder(fused_params=fused_params or None,
                                          qcomm_codecs_registry=qcomm_codecs_registry)]


def plan_summary(plan: ShardingPlan) -> str:
    """One line per table: sharding type, kernel, ranks."""
    lines = []
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            ranks = sorted(set(ps.ranks or []))
            shards = ""
            if ps.sharding_spec is not None and hasattr(ps.sharding_spec, "shards"):
                shards = " shards=" + ",".join(
                    f"{list(s.shard_offsets)}+{list(s.shard_sizes)}@{s.placement}"
                    for s in ps.sharding_spec.shards)
            lines.append(f"  {module_path or '<root>'}.{table}: {ps.sharding_type} "
                         f"kernel={ps.compute_kernel} ranks={ranks}{shards}")
    return "\n".join(lines)


@dataclass(frozen=True)
class PlannerInputs:
    """What TorchRec's planner needs to place the tables, gathered once by
    `prepare_sharding` for training and for the `plan` command alike, so the two always
    plan the same problem."""

    sharding: ShardingConfig
    tables: List[EmbeddingBagConfig]
    """The EmbeddingBagCollection's tables (on the meta device), in its order."""
    world_size: int
    local_world_size: int
    """Ranks per node (the planner's intra-node bandwidth applies within it)."""
    device_type: str
    per_rank_batch: int
    pooling: Dict[str, float]
    """Table name -> mean ids per bag (`pooling_factors`)."""
    sharders: List
    """EmbeddingBagCollectionSharder with the fused optimizer's extra params and the
    precision section's all-to-all codecs."""

    def topology(self) -> Topology:
        return build_topology(self.sharding, self.world_size, self.local_world_size,
                              self.device_type)

    def constraints(self) -> Dict[str, ParameterConstraints]:
        return constraints_for(self.sharding, self.tables, self.pooling)

    def planner(self, stats: Optional[List] = None) -> EmbeddingShardingPlanner:
        """`stats`: TorchRec planner Stats objects that receive the chosen plan (the `plan`
        command's report); None keeps TorchRec's EmbeddingStats."""
        return EmbeddingShardingPlanner(topology=self.topology(), batch_size=self.per_rank_batch,
                                        constraints=self.constraints(), stats=stats, debug=False)


def prepare_sharding(cfg: Config, module: nn.Module, world_size: int, local_world_size: int,
                     device: torch.device) -> PlannerInputs:
    """Check the sharding section against what TorchRec offers on `device`, fuse the sparse
    optimizer into the tables' backward (the planner sizes the optimizer state from it),
    and gather the planner's inputs. `module`: the train module of `build_train_module`,
    tables still on the meta device. Reads the sharding, optimizer, data, embeddings and
    precision sections and the global batch size."""
    check_supported(cfg.sharding, device.type, cfg.optimizer.sparse)
    opt_cls, opt_kwargs, fused_params = sparse_optimizer(cfg.optimizer)
    ebc = module.model.sparse_arch
    apply_optimizer_in_backward(opt_cls, ebc.parameters(), opt_kwargs)
    return PlannerInputs(
        sharding=cfg.sharding, tables=list(module.model.tables), world_size=world_size,
        local_world_size=local_world_size, device_type=device.type,
        per_rank_batch=cfg.data.batch_size // world_size,
        pooling=pooling_factors(cfg.data, cfg.embeddings),
        sharders=sharders(fused_params, qcomm_codecs_registry(cfg.precision, device)))


def shard_model(module: nn.Module, inputs: PlannerInputs, device: torch.device, seed: int,
                plan: ShardingPlan) -> Tuple[DistributedModelParallel, ShardingPlan]:
    """Wrap `module` in DistributedModelParallel by `plan` (the same on every rank:
    `planning.collective_training_plan`) and fill the embedding shards with the seeded
    initial tables. Returns (dmp, plan)."""
    dmp = DistributedModelParallel(
        module=module, device=device, plan=plan, sharders=inputs.sharders,
        data_parallel_wrapper=_SingleProcess() if inputs.world_size == 1 else None)
    init_embedding_weights(dmp, inputs.tables, seed)
    return dmp, plan


def _table_index(tables: List[EmbeddingBagConfig]) -> Dict[str, int]:
    return {t.name: i for i, t in enumerate(tables)}


def embedding_state_keys(state_dict, tables: List[EmbeddingBagConfig]) -> Dict[str, str]:
    """Map state-dict key -> table name for every embedding weight."""
    names = {t.name for t in tables}
    out = {}
    for key in state_dict:
        parts = key.split(".")
        if key.endswith(".weight") and len(parts) >= 3 and parts[-2] in names:
            out[key] = parts[-2]
    return out


def local_shards(value):
    """(row_offset, col_offset, tensor) for each piece of an embedding weight this rank holds:
    the shards of a ShardedTensor or DTensor, or a whole replicated tensor."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return [(s.metadata.shard_offsets[0], s.metadata.shard_offsets[1], s.tensor)
                for s in value.local_shards()]
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()  # type: ignore
    if DTensor and isinstance(value, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            value.shape, value.device_mesh, value.placements)
        return [(offset[0], offset[1], value.to_local())]
    return [(0, 0, value)]


@torch.no_grad()
def init_embedding_weights(dmp: nn.Module, tables: List[EmbeddingBagConfig], seed: int) -> None:
    """Fill every local shard with its rows of the seeded initial tables."""
    index = _table_index(tables)
    by_name = {t.name: t for t in tables}
    sd = dmp.state_dict()
    keys = embedding_state_keys(sd, tables)
    for key, name in keys.items():
        t = by_name[name]
        for row0, col0, tensor in local_shards(sd[key]):
            if tensor.numel() == 0:
                continue
            rows = embedding_init_rows(seed, index[name], t.num_embeddings, t.embedding_dim,
                                       row0, row0 + tensor.shape[0])
            tensor.copy_(rows[:, col0: col0 + tensor.shape[1]].to(tensor.device, tensor.dtype))
    # the state-dict tensors are views of the kernels' weights for in-memory kernels; loading
    # them back also covers kernels (UVM caching) whose state dict is a copy
    dmp.load_state_dict(sd)
