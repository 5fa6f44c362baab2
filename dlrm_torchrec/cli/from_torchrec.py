"""`python -m dlrm_torchrec.data.from_torchrec` (also `dlrm-from-torchrec`): adopt TorchRec's Criteo .npy files (`data.converters.from_torchrec`)."""

import argparse
import os
import sys
from typing import Optional, Sequence

from dlrm_torchrec.cli import run_tool
from dlrm_torchrec.data.converters.from_torchrec import AdoptError, adopt


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m dlrm_torchrec.data.from_torchrec",
        description="Adopt Criteo .npy files written by TorchRec's preprocessing scripts "
                    "(npy_preproc_criteo.py, contiguous_preproc_criteo.py, "
                    "shuffle_preproc_criteo.py): check them and write OUTPUT/meta.json, "
                    "which data.path then names. Nothing is copied.")
    ap.add_argument("source", help="the folder of TorchRec's .npy files")
    ap.add_argument("-o", "--output", required=True, help="folder for meta.json (may be SOURCE)")
    ap.add_argument("--dataset", choices=("kaggle", "terabyte"),
                    help="default: terabyte with day_0_*.npy, kaggle with train_*.npy")
    ap.add_argument("--days", type=int, default=0,
                    help="terabyte: adopt days 0 .. N-1, the last evaluates (0: all found)")
    ap.add_argument("--sparse-suffix", default=None, metavar="S",
                    help="read <day>_sparse<S>.npy (default: _contig_freq if present, else none)")
    ap.add_argument("--sparse-dir", default=None, metavar="DIR",
                    help="where the ids are when not beside dense and labels (MLPerf's "
                         "materialised bags written without --copy_labels_and_dense)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="days scanned at once, in worker processes (default: up to 8)")
    ap.add_argument("--eval-halves", default="val,test",
                    help="order of the evaluation day's halves: val,test (TorchRec's) or "
                         "test,val (the DLRM reference's)")
    a = ap.parse_args(argv)
    if a.days < 0 or a.days == 1:
        ap.error(f"--days {a.days}: must be 0 (all) or at least 2")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    rc, _ = run_tool(lambda: adopt(a.source, a.output, a.dataset, a.days, a.sparse_suffix,
                                   [h.strip() for h in a.eval_halves.split(",")],
                                   a.sparse_dir, a.workers,
                                   log=lambda m: print(m, file=sys.stderr)),
                     (AdoptError,), "interrupted; nothing was written")
    return rc


if __name__ == "__main__":
    sys.exit(main())
