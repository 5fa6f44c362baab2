"""Plan a cluster without it: `python -m dlrm_torchrec.plan --config FILE --nodes 2
--gpus-per-node 8 --hbm-gb 80 --ddr-gb 512 [key=value ...]`.

Runs TorchRec's EmbeddingShardingPlanner exactly as training would (same constraints,
sharders, fused optimizer, per-rank batch), on a topology of the target cluster, in this
single process, with the tables on the meta device: no GPU and no memory for the tables is
needed. Prints where each table goes, what every rank holds (weights, optimizer state, the
planner's HBM/DDR estimate) and the planner's cost estimates, or exits with
`error: ...` (status 2) when the tables do not fit.

GB here is 2^30 bytes, as in TorchRec's planner and `sharding.hbm_cap_gb`.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torchrec.distributed.planner.stats import EmbeddingStats
from torchrec.distributed.planner.types import PlannerError, PlannerErrorType, Stats
from torchrec.distributed.types import ShardingPlan

from dlrm_torchrec.config import Config, ConfigError, validate
from dlrm_torchrec.model.dlrm import build_train_module
from dlrm_torchrec.parallel.sharding import GB, PlannerInputs, prepare_sharding

SHORT_TYPES = {"table_wise": "TW", "row_wise": "RW", "column_wise": "CW", "table_row_wise": "TWRW",
               "table_column_wise": "TWCW", "data_parallel": "DP"}


def optimizer_state_bytes(optimizer: str, rows: int, cols: int, dtype_bytes: int = 4) -> int:
    """Bytes of fused-optimizer state for a rows x cols shard: FBGEMM keeps one value per row
    for rowwise Adagrad, one per weight for Adagrad and two for Adam, none for SGD."""
    per_weight = {"sgd": 0, "adagrad": 1, "adam": 2}
    if optimizer == "rowwise_adagrad":
        return rows * dtype_bytes
    return per_weight[optimizer] * rows * cols * dtype_bytes


@dataclass
class TablePlan:
    name: str
    rows: int
    dim: int
    sharding_type: str
    compute_kernel: str
    ranks: List[int]
    weight_bytes: int
    """Whole table (one replica for data parallel)."""
    est_hbm_bytes: int
    """The planner's estimate over all shards: weights, optimizer state, input/output buffers."""
    est_ddr_bytes: int
    est_ms: float
    """The planner's estimate over all shards: forward+backward compute and communication."""


@dataclass
class RankPlan:
    rank: int
    shards: Dict[str, int] = field(default_factory=dict)
    """Number of shards by sharding type abbreviation (TW, CW, ...)."""
    weight_bytes: int = 0
    optimizer_bytes: int = 0
    est_hbm_bytes: int = 0
    est_ddr_bytes: int = 0
    fwd_compute_ms: float = 0.0
    fwd_comms_ms: float = 0.0
    bwd_compute_ms: float = 0.0
    bwd_comms_ms: float = 0.0
    prefetch_ms: float = 0.0

    @property
    def est_ms(self) -> float:
        return (self.fwd_compute_ms + self.fwd_comms_ms + self.bwd_compute_ms + self.bwd_comms_ms
                + self.prefetch_ms)


@dataclass
class PlanReport:
    nodes: int
    gpus_per_node: int
    device: str
    hbm_bytes: int
    """Per device (0 on CPU)."""
    ddr_bytes: int
    """Per rank (host memory per node / ranks per node)."""
    per_rank_batch: int
    optimizer: str
    hbm_for_shards_bytes: int
    """Per device, what the planner leaves for embeddings after its reservations."""
    ddr_for_shards_bytes: int
    num_proposals: int
    num_plans: int
    run_seconds: float
    tables: List[TablePlan]
    ranks: List[RankPlan]

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


class _Recorder(Stats):
    """A planner Stats that keeps what TorchRec hands its stats: the chosen (or, on failure,
    the last tried) sharding options, with per-shard storage and perf estimates."""

    def __init__(self):
        self.calls: List[dict] = []

    def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals,
            num_plans, run_time, best_plan, constraints=None, sharders=None, enumerator=None,
            debug=False, debug_stats=None) -> None:
        self.calls.append(dict(plan=sharding_plan, best_plan=best_plan, num_proposals=num_proposals,
                               num_plans=num_plans, run_time=run_time,
                               storage_reservation=storage_reservation))


class DoesNotFit(Exception):
    """The planner found no placement; the message says why in the user's terms."""


def plan_cluster(cfg: Config, nodes: int, gpus_per_node: int, hbm_gb: float, ddr_gb: float,
                 device: str = "cuda", torchrec_stats: bool = False) -> PlanReport:
    """Plan `cfg`'s tables on nodes x gpus_per_node devices with hbm_gb each and ddr_gb host
    memory per node. Raises ConfigError for a bad config and DoesNotFit when no plan exists.
    `torchrec_stats` also logs TorchRec's EmbeddingStats table (logger
    torchrec.distributed.planner.stats, INFO)."""
    world = nodes * gpus_per_node
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: need at least one each")
    if hbm_gb <= 0 or ddr_gb <= 0:
        raise ConfigError(f"--hbm-gb {hbm_gb} --ddr-gb {ddr_gb}: memory sizes must be > 0")
    validate(cfg, world_size=world)
    # TorchRec's ddr_cap is per rank: the node's host memory is shared by its ranks
    cfg = dataclasses.replace(cfg, sharding=dataclasses.replace(
        cfg.sharding, hbm_cap_gb=hbm_gb if device == "cuda" else 0.0,
        ddr_cap_gb=ddr_gb / gpus_per_node))
    module = build_train_module(cfg)  # tables on the meta device
    # the same planner inputs as training's
    inputs = prepare_sharding(cfg, module, world, gpus_per_node, torch.device(device))
    stats: List[Stats] = [EmbeddingStats()] if torchrec_stats else []
    _, failure, call = _run_planner(inputs, module, stats)
    if call is None:
        raise DoesNotFit(f"TorchRec's planner failed: {_first_line(failure)}")
    report = _report_of(call, inputs, module, cfg.optimizer.sparse)
    if failure is not None:
        raise DoesNotFit(_failure_message(report, failure))
    return report


def _run_planner(inputs: PlannerInputs, module: torch.nn.Module, stats: List[Stats]
                 ) -> Tuple[Optional[ShardingPlan], Optional[PlannerError], Optional[dict]]:
    """Run TorchRec's planner on `inputs` (`stats`: more Stats to receive the plan): (plan,
    None, the recorded call) or (None, the PlannerError, the last tried call). Raises
    DoesNotFit when it failed before it had a plan to show, e.g. while enumerating."""
    recorder = _Recorder()
    try:
        plan = inputs.planner(stats=[recorder, *stats]).plan(module, inputs.sharders)
        failure: Optional[PlannerError] = None
    except PlannerError as e:
        plan, failure = None, e
    if failure is not None and not recorder.calls:
        raise DoesNotFit(f"TorchRec's planner failed: {_first_line(failure)}")
    return plan, failure, (recorder.calls[-1] if recorder.calls else None)


def _report_of(call: dict, inputs: PlannerInputs, module: torch.nn.Module,
               optimizer: str) -> PlanReport:
    """The report of a recorded planner call, with the storage the planner left per device
    for embeddings after its reservations (a margin, the dense model, the input features),
    asked of the same reservation object again."""
    topology = inputs.topology()
    reserved = call["storage_reservation"].reserve(
        topology=topology, batch_size=inputs.per_rank_batch, module=module,
        sharders=inputs.sharders, constraints=inputs.constraints())
    nodes = max(1, inputs.world_size // inputs.local_world_size)
    return _report(call, nodes, inputs.local_world_size, inputs.device_type,
                   inputs.per_rank_batch, optimizer, topology.devices[0].storage,
                   reserved.devices[0].storage)


def _training_plan(inputs: PlannerInputs, module: torch.nn.Module,
                   optimizer: str) -> ShardingPlan:
    """The plan, or DoesNotFit explaining the failure; the report (a second storage
    reservation estimate) is only worked out for a failure."""
    plan, failure, call = _run_planner(inputs, module, [EmbeddingStats()])
    if failure is None:
        return plan
    report = _report_of(call, inputs, module, optimizer)
    raise DoesNotFit(_failure_message(report, failure, for_training=True))


def collective_training_plan(inputs: PlannerInputs, module: torch.nn.Module,
                             optimizer: str) -> ShardingPlan:
    """The sharding plan for training: made on rank 0 and sent to every rank, as TorchRec's
    `collective_plan` does, except that a plan that cannot be made stops every rank with
    DoesNotFit naming what the tables need and what the ranks have (TorchRec's own
    PlannerError would leave the other ranks waiting for the broadcast)."""
    result: List[object] = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = [_training_plan(inputs, module, optimizer)]
        except DoesNotFit as e:
            result = [e]
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], DoesNotFit):
        raise result[0]
    return result[0]


def _report(call: dict, nodes: int, gpus_per_node: int, device: str, per_rank_batch: int,
            optimizer: str, caps, for_shards) -> PlanReport:
    """Per-table and per-rank sums over the recorded sharding options' shards."""
    world = nodes * gpus_per_node
    ranks = [RankPlan(r) for r in range(world)]
    tables = []
    for so in call["best_plan"]:
        rows, dim = so.tensor.shape
        esize = so.tensor.element_size()
        abbr = SHORT_TYPES.get(so.sharding_type, so.sharding_type)
        for shard in so.shards:
            if shard.rank is None or shard.rank < 0:
                continue
            r = ranks[shard.rank]
            r.shards[abbr] = r.shards.get(abbr, 0) + 1
            srows, scols = shard.size
            r.weight_bytes += srows * scols * esize
            r.optimizer_bytes += optimizer_state_bytes(optimizer, srows, scols, esize)
            if shard.storage is not None:
                r.est_hbm_bytes += shard.storage.hbm
                r.est_ddr_bytes += shard.storage.ddr
            if shard.perf is not None:
                r.fwd_compute_ms += shard.perf.fwd_compute
                r.fwd_comms_ms += shard.perf.fwd_comms
                r.bwd_compute_ms += shard.perf.bwd_compute
                r.bwd_comms_ms += shard.perf.bwd_comms
                r.prefetch_ms += shard.perf.prefetch_compute
        tables.append(TablePlan(
            name=so.name, rows=rows, dim=dim, sharding_type=so.sharding_type,
            compute_kernel=so.compute_kernel,
            ranks=sorted({s.rank for s in so.shards if s.rank is not None and s.rank >= 0}),
            weight_bytes=rows * dim * esize,
            est_hbm_bytes=sum(s.storage.hbm for s in so.shards if s.storage is not None),
            est_ddr_bytes=sum(s.storage.ddr for s in so.shards if s.storage is not None),
            est_ms=sum(s.perf.total for s in so.shards if s.perf is not None),
        ))
    return PlanReport(
        nodes=nodes, gpus_per_node=gpus_per_node, device=device,
        hbm_bytes=caps.hbm, ddr_bytes=caps.ddr, per_rank_batch=per_rank_batch,
        optimizer=optimizer, hbm_for_shards_bytes=for_shards.hbm,
        ddr_for_shards_bytes=for_shards.ddr,
        num_proposals=call["num_proposals"], num_plans=call["num_plans"],
        run_seconds=call["run_time"], tables=tables, ranks=ranks,
    )


# ---------------------------------------------------------------------- text


def _gb(n: float) -> str:
    return f"{n / GB:,.2f}"


def _first_line(e: Optional[BaseException]) -> str:
    return str(e).strip().splitlines()[0] if e is not None and str(e).strip() else repr(e)


def _ranges(ranks: List[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out: List[str] = []
    for r in ranks:
        if out and int(out[-1].split("-")[-1]) == r - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
    return ",".join(out)


def _failure_message(report: PlanReport, error: PlannerError,
                     for_training: bool = False) -> str:
    weights = sum(t.weight_bytes for t in report.tables)
    opt = sum(optimizer_state_bytes(report.optimizer, t.rows, t.dim) for t in report.tables)
    hbm = f"{_gb(report.hbm_bytes)} GB HBM and " if report.device == "cuda" else ""
    where = (f"{report.nodes}x{report.gpus_per_node} {report.device} devices with {hbm}"
             f"{_gb(report.ddr_bytes)} GB host memory each")
    left = report.hbm_for_shards_bytes if report.device == "cuda" else report.ddr_for_shards_bytes
    # the tables that make most of the weights (at most three)
    largest = [t for t in sorted(report.tables, key=lambda t: -t.weight_bytes)[:3]
               if t.weight_bytes * 10 >= weights] or report.tables[:1]
    named = ", ".join(f"{t.name} {t.rows:,} x {t.dim} ({_gb(t.weight_bytes)} GB)" for t in largest)
    if for_training:
        advice = ("Train on more ranks, give them more memory (sharding.hbm_cap_gb, "
                  "sharding.ddr_cap_gb), " + ("host memory (sharding.compute_kernel="
                  "fused_uvm_caching), " if report.device == "cuda" else "")
                  + "or use fewer rows (embeddings.max_ind_range, "
                  "embeddings.num_embeddings_per_feature); `python -m dlrm_torchrec.plan` "
                  "shows what fits")
    else:
        advice = ("Use more devices (--nodes, --gpus-per-node), larger ones (--hbm-gb), host "
                  "memory (sharding.compute_kernel=fused_uvm_caching), or fewer rows "
                  "(embeddings.max_ind_range)")
    if getattr(error, "error_type", None) == PlannerErrorType.INSUFFICIENT_STORAGE:
        return (f"the embedding tables do not fit on {where}: they need {_gb(weights)} GB of "
                f"weights + {_gb(opt)} GB of {report.optimizer} state (plus input/output "
                f"buffers; the largest: {named}), and the planner leaves {_gb(left)} GB per device for them after its "
                f"reservations ({_gb(left * report.world_size)} GB in all). {advice}")
    return (f"no sharding plan satisfies the constraints on {where} (sharding.sharding_type, "
            f"sharding.tables.*): {_first_line(error)}")


def format_report(report: PlanReport, title: str = "") -> str:
    """The plan as text: summary, one line per table, one line per rank."""
    w = report.world_size
    weights = sum(t.weight_bytes for t in report.tables)
    opt = sum(r.optimizer_bytes for r in report.ranks)
    slowest = max(report.ranks, key=lambda r: r.est_ms)
    mem = "HBM" if report.device == "cuda" else "DDR"
    left = report.hbm_for_shards_bytes if report.device == "cuda" else report.ddr_for_shards_bytes
    lines = [
        f"plan{' for ' + title if title else ''}: {report.nodes} node(s) x {report.gpus_per_node} "
        f"{report.device} devices = {w} ranks; {_gb(report.hbm_bytes)} GB HBM and "
        f"{_gb(report.ddr_bytes)} GB host memory per rank; batch {report.per_rank_batch} per rank",
        f"tables: {len(report.tables)}, {sum(t.rows for t in report.tables):,} rows, "
        f"{_gb(weights)} GB weights + {_gb(opt)} GB {report.optimizer} state",
        f"planner: {report.num_proposals} proposals, {report.num_plans} feasible, "
        f"{report.run_seconds:.1f} s; {mem} left for embeddings after its reservations: "
        f"{_gb(left)} GB per rank",
        f"estimated embedding time per step (planner's perf model, slowest rank {slowest.rank}): "
        f"{slowest.est_ms:.2f} ms",
        "",
        "sharding plan (est. = the planner's estimates, incl. optimizer state and I/O buffers):",
    ]
    rows = [["table", "rows x dim", "weights GB", "sharding", "kernel", "ranks",
             f"est. {mem} GB", "est. ms"]]
    for t in report.tables:
        est = t.est_hbm_bytes if report.device == "cuda" else t.est_ddr_bytes
        rows.append([t.name, f"{t.rows:,} x {t.dim}", _gb(t.weight_bytes), t.sharding_type,
                     t.compute_kernel, _ranges(t.ranks), _gb(est), f"{t.est_ms:.2f}"])
    lines += _table(rows)
    lines += ["", "per rank (ms: fwd compute / fwd comms / bwd compute / bwd comms):"]
    rows = [["rank", "shards", "weights GB", "optimizer GB", f"est. {mem} GB", "of left",
             "est. DDR GB" if report.device == "cuda" else "", "est. ms", "breakdown ms"]]
    for r in report.ranks:
        est = r.est_hbm_bytes if report.device == "cuda" else r.est_ddr_bytes
        rows.append([
            str(r.rank), " ".join(f"{k}:{v}" for k, v in sorted(r.shards.items())) or "-",
            _gb(r.weight_bytes), _gb(r.optimizer_bytes), _gb(est),
            f"{100 * est / left:.0f}%" if left else "-",
            _gb(r.est_ddr_bytes) if report.device == "cuda" else "",
            f"{r.est_ms:.2f}",
            f"{r.fwd_compute_ms:.2f} / {r.fwd_comms_ms:.2f} / {r.bwd_compute_ms:.2f} / "
            f"{r.bwd_comms_ms:.2f}",
        ])
    lines += _table(rows)
    return "\n".join(lines)


def _table(rows: List[List[str]]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


# ---------------------------------------------------------------------- command line
