"""`python -m dlrm_torchrec.data.prepare_mlperf` (also `dlrm-prepare-mlperf`): the raw Criteo 1TB days to MLPerf DLRM-DCNv2's training files (`data.converters.prepare_mlperf`)."""

import os

# no BLAS routine runs here: OpenBLAS's threads (one per core, spinning a while after
# numpy's import) would only take time from the workers. Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from dlrm_torchrec.cli import positive_float, run_tool  # noqa: E402
from dlrm_torchrec.data.converters import mlperf_multi_hot as mh  # noqa: E402
from dlrm_torchrec.data.converters.prepare_mlperf import (  # noqa: E402
    STAGES,
    PrepareError,
    Settings,
    run,
)
from dlrm_torchrec.data.converters.preprocess import print_report  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> Settings:
    ap = argparse.ArgumentParser(
        prog="python -m dlrm_torchrec.data.prepare_mlperf",
        description="Write MLPerf DLRM-DCNv2's training data from the 24 raw Criteo 1TB days: "
                    "byte for byte what TorchRec's npy_preproc_criteo.py, "
                    "contiguous_preproc_criteo.py --frequency_threshold 0 and "
                    "shuffle_preproc_criteo.py --random_seed 0 write, in bounded memory, "
                    "resumable, and OUTPUT/meta.json for data.source=criteo_terabyte.")
    ap.add_argument("inputs", nargs="+", help="day_0 .. day_23 in order, plain or .gz")
    ap.add_argument("-o", "--output", required=True, help="output folder")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="worker processes (default: one per core)")
    ap.add_argument("--memory-gb", type=positive_float, default=8.0,
                    help="memory for the workers' chunks and buckets, all together "
                         "(besides the id maps and the permutation; default 8)")
    ap.add_argument("--exact-ids", action="store_true",
                    help="keep the shuffled days' ids exact instead of rounding them "
                         "through float32 as TorchRec's shuffle does (not MLPerf's data set)")
    ap.add_argument("--drop-malformed", action="store_true",
                    help="drop malformed rows and report them, instead of stopping at the "
                         "first with its file:line (TorchRec's scripts fail on them)")
    ap.add_argument("--random-seed", type=int, default=0,
                    help="seed of the shuffle, as shuffle_preproc_criteo.py (MLPerf: 0)")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep the work files in OUTPUT/.prepare")
    mhg = ap.add_argument_group(
        "multi-hot bags", "MLPerf's day_{d}_sparse_multi_hot.npz, as its "
        "materialize_synthetic_multihot_dataset.py writes them (defaults: MLPerf's)")
    mhg.add_argument("--multi-hot", action="store_true",
                     help="also write the multi-hot bags of every day")
    mhg.add_argument("--multi-hot-sizes",
                     help="bag size of each of the 26 features, comma-separated (default: "
                          "MLPerf's, data.multi_hot_sizes of configs/mlperf_dcnv2.yaml)")
    mhg.add_argument("--multi-hot-table-sizes",
                     help="rows of each of the 26 lookup tables (ids are taken mod it), "
                          "comma-separated (default: MLPerf's, "
                          "embeddings.num_embeddings_per_feature of configs/mlperf_dcnv2.yaml)")
    mhg.add_argument("--multi-hot-distribution",
                     help="uniform or pareto (default: uniform, as MLPerf)")
    dg = ap.add_argument_group(
        "several tasks", "each task takes every world-size-th task of a stage; started by "
        "torchrun (torchx's dist.ddp) the ranks come from its RANK and WORLD_SIZE")
    dg.add_argument("--stage", default="all",
                    help="all (with a barrier between stages when there are several tasks), "
                         "or one of " + ", ".join(STAGES) + " after the ones before it")
    dg.add_argument("--rank", type=int, default=None, help="this task's rank (default: $RANK or 0)")
    dg.add_argument("--world-size", type=int, default=None,
                    help="number of tasks (default: $WORLD_SIZE or 1)")
    a = ap.parse_args(argv)
    given = [flag for flag, v in (("--multi-hot-sizes", a.multi_hot_sizes),
                                  ("--multi-hot-table-sizes", a.multi_hot_table_sizes),
                                  ("--multi-hot-distribution", a.multi_hot_distribution))
             if v is not None]
    if given and not a.multi_hot:
        raise PrepareError(f"{given[0]} is given without --multi-hot")
    try:
        sizes = (mh.parse_sizes(a.multi_hot_sizes, "--multi-hot-sizes") if a.multi_hot_sizes
                 else list(mh.MLPERF_BAG_SIZES))
        tables = (mh.parse_sizes(a.multi_hot_table_sizes, "--multi-hot-table-sizes")
                  if a.multi_hot_table_sizes else list(mh.MLPERF_TABLE_SIZES))
        rank = a.rank if a.rank is not None else int(os.environ.get("RANK", "0"))
        world = (a.world_size if a.world_size is not None
                 else int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as e:
        raise PrepareError(str(e)) from None
    if not 0 <= rank < world:
        raise PrepareError(f"rank {rank} of {world} tasks: the rank must be in 0 .. {world - 1}")
    return Settings(inputs=list(a.inputs), output=a.output, workers=a.workers,
                    memory_gb=a.memory_gb, exact_ids=a.exact_ids,
                    drop_malformed=a.drop_malformed, seed=a.random_seed, keep_work=a.keep_work,
                    multi_hot=a.multi_hot, multi_hot_sizes=sizes, multi_hot_table_sizes=tables,
                    multi_hot_distribution=a.multi_hot_distribution or "uniform", stage=a.stage, rank=rank,
                    world_size=world)


def _barrier(s: Settings):
    """Between stages of `--stage all` on several tasks: a gloo barrier over the process
    group torchrun describes (MASTER_ADDR, MASTER_PORT). Stages take hours at full scale, so
    the group waits up to a week; the job's time limit ends a hung run first."""
    if s.world_size == 1 or s.stage != "all":
        return lambda: None
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        raise PrepareError(f"--stage all on {s.world_size} tasks needs their process group: "
                           "start them with torchrun (as launch/components.py:prepare_mlperf "
                           "does), or run one --stage at a time")
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=s.rank, world_size=s.world_size,
                                timeout=timedelta(days=7))
    return dist.barrier


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        s = parse_args(argv)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    rc, report = run_tool(lambda: run(s, _barrier(s)), (PrepareError,),
                          "interrupted; rerun the same command to resume")
    if rc:
        return rc
    if report is None:
        print(f"stage {s.stage}: task {s.rank} of {s.world_size} done in "
              f"{time.time() - t0:.1f} s", file=sys.stderr)
        return 0
    print_report(report, out=sys.stderr)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"{report.rows} rows written in {time.time() - t0:.1f} s; peak memory {rss:.0f} MB "
          f"(main), {kids:.0f} MB (largest worker)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
