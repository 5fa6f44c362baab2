"""`python -m dlrm_torchrec.score` (also `dlrm-score`): click probabilities of raw Criteo rows from an exported model (`inference.score`)."""

import argparse
import math
import sys
from typing import Optional, Sequence

from dlrm_torchrec.cli import run_tool
from dlrm_torchrec.config import ConfigError
from dlrm_torchrec.inference.export import QUANTIZED_TABLES
from dlrm_torchrec.inference.onnx import ONNX_KINDS
from dlrm_torchrec.inference.score import RawRowScorer, ScoreError, score_files


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m dlrm_torchrec.score",
        description="Click probabilities of raw Criteo rows (plain or gzip text) from an "
                    "exported model, through the transforms it was trained with.")
    ap.add_argument("export", help="folder written by python -m dlrm_torchrec.export")
    ap.add_argument("inputs", nargs="+", help="Criteo text files, plain or .gz")
    ap.add_argument("-o", "--output", required=True,
                    help="one probability per input line ('nan': malformed line)")
    ap.add_argument("--data-dir", default=None,
                    help="the preprocessed data the model was trained on (meta.json, vocab/); "
                         "default: data.path of the export's config")
    ap.add_argument("--program", default="float",
                    choices=["float", *QUANTIZED_TABLES, *ONNX_KINDS],
                    help="score with model.pt2 (float), model_<kind>.pt2 (quantized tables), "
                         "or an ONNX program in ONNX Runtime (onnx: model.onnx, onnx-mlp-int8: "
                         "model_mlp_int8.onnx, onnx-int8: model_int8.onnx)")
    ap.add_argument("--int8", action="store_const", dest="program", const="int8",
                    help="the same as --program int8")
    ap.add_argument("--no-labels", action="store_true",
                    help="rows have no label column (39 columns, as Kaggle's test.txt)")
    ap.add_argument("--batch-size", type=int, default=8192)
    a = ap.parse_args(argv)
    if a.batch_size < 1:
        ap.error(f"--batch-size {a.batch_size}: must be >= 1")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    rc, s = run_tool(lambda: score_files(RawRowScorer(a.export, a.data_dir, a.program), a.inputs,
                                         a.output, a.batch_size, not a.no_labels),
                     (ScoreError, ConfigError), "interrupted; no output written")
    if rc:
        return rc
    line = (f"{s['scored']:,} of {s['lines']:,} lines scored ({s['malformed']:,} malformed) in "
            f"{s['seconds']:.1f} s ({s['lines'] / max(s['seconds'], 1e-9):,.0f} lines/s) -> "
            f"{a.output}")
    if "log_loss" in s:
        line += (f"; auc {s.get('auc', math.nan):.5f} log_loss {s['log_loss']:.5f} "
                 f"accuracy {s['accuracy']:.5f}")
    print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
