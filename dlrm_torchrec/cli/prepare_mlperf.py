"""`python -m dlrm_torchrec.data.prepare_mlperf` (also `dlrm-prepare-mlperf`): the raw Criteo 1TB days to MLPerf DLRM-DCNv2's training files (`data.converters.prepare_mlperf`)."""

import argparse
import os
import resource
import sys
import time
from typing import Optional, Sequence

from dlrm_torchrec.cli import run_tool
from dlrm_torchrec.data.converters.prepare_mlperf import PrepareError, Settings, run
from dlrm_torchrec.data.converters.preprocess import print_report


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
    ap.add_argument("--memory-gb", type=float, default=8.0,
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
    a = ap.parse_args(argv)
    return Settings(inputs=list(a.inputs), output=a.output, workers=a.workers,
                    memory_gb=a.memory_gb, exact_ids=a.exact_ids,
                    drop_malformed=a.drop_malformed, seed=a.random_seed, keep_work=a.keep_work)


def main(argv: Optional[Sequence[str]] = None) -> int:
    s = parse_args(argv)
    t0 = time.time()
    rc, report = run_tool(lambda: run(s), (PrepareError,),
                          "interrupted; rerun the same command to resume")
    if rc:
        return rc
    print_report(report, out=sys.stderr)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"{report.rows} rows written in {time.time() - t0:.1f} s; peak memory {rss:.0f} MB "
          f"(main), {kids:.0f} MB (largest worker)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
