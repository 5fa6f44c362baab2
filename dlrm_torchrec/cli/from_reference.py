"""`python -m dlrm_torchrec.data.from_reference` (also `dlrm-from-reference`): adopt data preprocessed by the DLRM reference (`data.converters.from_reference`)."""

import argparse
import os
import sys
from typing import Optional, Sequence

from dlrm_torchrec.cli import run_tool
from dlrm_torchrec.data.converters.from_reference import LAYOUTS, adopt
from dlrm_torchrec.data.converters.from_torchrec import AdoptError


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m dlrm_torchrec.data.from_reference",
        description="Adopt Criteo data preprocessed by the DLRM reference (dlrm_s_pytorch.py): "
                    "its MLPerf .bin files (read in place), its per-day *_reordered.npz or "
                    "*_processed.npz files, or its single --processed-data-file .npz "
                    "(converted). Writes OUTPUT/meta.json, which data.path then names.")
    ap.add_argument("source", help="the reference's data folder (or its processed .npz file)")
    ap.add_argument("-o", "--output", required=True, help="output folder")
    ap.add_argument("--layout", choices=LAYOUTS, help="default: the first found of bin, days, "
                    "file")
    ap.add_argument("--dataset", choices=("kaggle", "terabyte"),
                    help="default: from the file names (bin: terabyte)")
    ap.add_argument("--counts", default=None, metavar="FILE",
                    help="the reference's <prefix>_fea_count.npz (default: the one in SOURCE)")
    ap.add_argument("--day-counts", default=None, metavar="FILE",
                    help="the reference's <prefix>_day_count.npz (default: the one in SOURCE)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="days converted (or .bin parts checked) at once (default: up to 8)")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    rc, _ = run_tool(lambda: adopt(a.source, a.output, a.layout, a.dataset, a.counts,
                                   a.day_counts, a.workers,
                                   log=lambda m: print(m, file=sys.stderr)),
                     (AdoptError,), "interrupted; run the same command again")
    return rc


if __name__ == "__main__":
    sys.exit(main())
