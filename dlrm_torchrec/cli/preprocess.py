"""`python -m dlrm_torchrec.data.preprocess` (also `dlrm-preprocess`): raw Criteo text to the binary layout of the Criteo sources (`data.converters.preprocess`)."""

import argparse
import os
import resource
import sys
import time
from typing import Optional, Sequence

from dlrm_torchrec.cli import finite_float, positive_float, run_tool
from dlrm_torchrec.data.converters.preprocess import PreprocessError, Settings, print_report, run


def parse_args(argv: Optional[Sequence[str]] = None) -> Settings:
    ap = argparse.ArgumentParser(
        prog="python -m dlrm_torchrec.data.preprocess",
        description="Convert raw Criteo Kaggle/Terabyte text (plain or gzip) into the binary "
                    "layout read by data.source=criteo_kaggle / criteo_terabyte.")
    ap.add_argument("inputs", nargs="+", help="kaggle: train.txt; terabyte: day_0 .. day_23 "
                    "(the last is the evaluation day); plain or .gz")
    ap.add_argument("-o", "--output", required=True, help="output folder")
    ap.add_argument("--dataset", required=True, choices=("kaggle", "terabyte"))
    ap.add_argument("--max-ind-range", type=int, default=0, metavar="N",
                    help="hash mode: store each categorical value mod N (0: raw 32-bit ids)")
    ap.add_argument("--frequency-threshold", type=int, default=None, metavar="T",
                    help="vocab mode: number the values seen >= T times per feature, the rest "
                         "share one id (vocabularies saved in OUTPUT/vocab and reused)")
    ap.add_argument("--sub-sample-rate", type=finite_float, default=0.0, metavar="R",
                    help="drop each negative training row with probability R (seeded)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sub-sampling")
    ap.add_argument("--strict", action="store_true",
                    help="stop at the first malformed row (file:line) instead of dropping it")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="parser processes (0: parse in the main process)")
    ap.add_argument("--chunk-mb", type=positive_float, default=8.0,
                    help="MB of text per task; memory ~ (2 x workers + 2) chunks")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--allow-missing-days", action="store_true",
                    help="terabyte: go on (with a warning) when the day numbers have a gap; "
                         "the days given are numbered 0, 1, ... in the output")
    a = ap.parse_args(argv)
    return Settings(inputs=list(a.inputs), output=a.output, dataset=a.dataset,
                    max_ind_range=a.max_ind_range, frequency_threshold=a.frequency_threshold,
                    sub_sample_rate=a.sub_sample_rate, seed=a.seed, strict=a.strict,
                    workers=a.workers, chunk_bytes=int(a.chunk_mb * (1 << 20)),
                    progress=not a.no_progress, allow_missing_days=a.allow_missing_days)


def main(argv: Optional[Sequence[str]] = None) -> int:
    s = parse_args(argv)
    t0 = time.time()
    rc, report = run_tool(lambda: run(s), (PreprocessError,),
                          "interrupted; rerun the same command to resume")
    if rc:
        return rc
    dt = time.time() - t0
    print_report(report)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{report.rows} rows written ({report.lines} lines read, {report.sub_sampled} "
          f"sub-sampled) in {dt:.1f} s: {report.lines / max(dt, 1e-9):,.0f} lines/s; peak "
          f"memory {rss:.0f} MB (main), {report.worker_maxrss_kb / 1024:.0f} MB (worker)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
