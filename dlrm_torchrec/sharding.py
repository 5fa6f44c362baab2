"""Planner, sharders and DistributedModelParallel.

Tables are built on the meta device; `shard_model` plans their placement with TorchRec's
planner (under per-table constraints from `ShardingConfig`), materialises each rank's
shards, and fills them with the seeded initial values (`embedding_init_rows`), so the
initial weights do not depend on the plan or the world size.
"""

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from dlrm_torchrec.config import SHARDING_TYPES, ConfigError, ShardingConfig

GB = 1024**3
CPU_DEFAULT_CAP_GB = 32.0


def constraints_for(cfg: ShardingConfig, tables: List[EmbeddingBagConfig]) -> Dict[str, ParameterConstraints]:
    """Per-table planner constraints: the global sharding type / kernel, then per-table
    overrides. Data-parallel tables need the dense kernel."""
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
        out[t.name] = ParameterConstraints(sharding_types=types, compute_kernels=kernels)
    return out


def check_supported(cfg: ShardingConfig, device_type: str, sparse_optimizer: str = "sgd") -> None:
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
            if ck == "fused" and sparse_optimizer == "adam":
                raise ConfigError(
                    f"optimizer.sparse='adam' with {key}='fused': FBGEMM's CPU kernels have no "
                    "fused Adam; on CPU use sharding.compute_kernel=dense (Adam as a plain "
                    "optimizer) or a sparse optimizer of sgd, adagrad, rowwise_adagrad")


def build_topology(cfg: ShardingConfig, world_size: int, local_world_size: int,
                   device_type: str) -> Topology:
    hbm = cfg.hbm_cap_gb or (CPU_DEFAULT_CAP_GB if device_type == "cpu" else 0.0)
    kwargs = {}
    if hbm:
        kwargs["hbm_cap"] = int(hbm * GB)
    if cfg.ddr_cap_gb:
        kwargs["ddr_cap"] = int(cfg.ddr_cap_gb * GB)
    return Topology(world_size=world_size, local_world_size=local_world_size,
                    compute_device=device_type, **kwargs)


def build_planner(cfg: ShardingConfig, tables: List[EmbeddingBagConfig], world_size: int,
                  local_world_size: int, device_type: str, per_rank_batch: int,
                  stats: Optional[List] = None) -> EmbeddingShardingPlanner:
    """`stats`: TorchRec planner Stats objects that receive the chosen plan (the `plan`
    command's report); None keeps TorchRec's EmbeddingStats."""
    return EmbeddingShardingPlanner(
        topology=build_topology(cfg, world_size, local_world_size, device_type),
        batch_size=per_rank_batch,
        constraints=constraints_for(cfg, tables),
        stats=stats,
        debug=False,
    )


def sharders(fused_params: Optional[Dict] = None) -> List:
    return [EmbeddingBagCollectionSharder(fused_params=fused_params or None)]


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


def shard_model(module: nn.Module, ebc: nn.Module, tables: List[EmbeddingBagConfig],
                cfg: ShardingConfig, sparse_opt_cls, sparse_opt_kwargs, fused_params: Dict,
                device: torch.device, world_size: int, local_world_size: int,
                per_rank_batch: int, seed: int, plan: Optional[ShardingPlan] = None):
    """Fuse the sparse optimizer into `ebc`'s backward (check_supported first), plan (collectively), wrap `module`
    in DistributedModelParallel and initialise the embedding shards. Returns (dmp, plan)."""
    apply_optimizer_in_backward(sparse_opt_cls, ebc.parameters(), sparse_opt_kwargs)
    module_sharders = sharders(fused_params)
    if plan is None:
        planner = build_planner(cfg, tables, world_size, local_world_size, device.type, per_rank_batch)
        if dist.is_initialized():
            plan = planner.collective_plan(module, module_sharders, dist.GroupMember.WORLD)
        else:
            plan = planner.plan(module, module_sharders)
    dmp = DistributedModelParallel(module=module, device=device, plan=plan,
                                   sharders=module_sharders)
    init_embedding_weights(dmp, tables, seed)
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
    from dlrm_torchrec.model import embedding_init_rows

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
