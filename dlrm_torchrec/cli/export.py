"""`python -m dlrm_torchrec.export` (also `dlrm-export`): export a checkpoint to a single-host inference folder (`inference.export`)."""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from dlrm_torchrec.cli import quiet_libraries
from dlrm_torchrec.config import ConfigError, load_config, validate
from dlrm_torchrec.data.file_checks import output_folder_problem
from dlrm_torchrec.inference.export import (
    QUANTIZED_TABLES,
    ExportError,
    config_of_checkpoint,
    export,
    parse_onnx,
    parse_quantize,
    resolve_checkpoint,
)
from dlrm_torchrec.inference.onnx import OnnxUnavailable
from dlrm_torchrec.train import checkpoint


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dlrm_torchrec.export",
        description="Export a (sharded) checkpoint to a single-host inference model: "
                    "unsharded weights, a torch.export program, optionally quantized tables.")
    p.add_argument("--config", default=None,
                   help="YAML config of the model (default: the config stored in the checkpoint)")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder (step_<N>), or auto for the newest of the run")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quantize", default="", metavar="KINDS",
                   help="also write model_<kind>.pt2 with quantized embedding tables, for each "
                        "of the comma-separated " + ", ".join(QUANTIZED_TABLES)
                        + " (e.g. int8,int4)")
    p.add_argument("--onnx", default="", metavar="KINDS",
                   help="also write ONNX programs for ONNX Runtime, comma-separated: float "
                        "(model.onnx), mlp-int8 (model_mlp_int8.onnx: MLPs dynamically "
                        "quantized to int8), int8 (model_int8.onnx: int8 tables and MLPs)")
    p.add_argument("--eval-split", default="val", choices=["val", "test", "none"],
                   help="split on which the exported programs are checked (default val)")
    p.add_argument("--eval-batches", type=int, default=0,
                   help="check only the first N global batches (0: the whole split)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    try:
        parse_quantize(args.quantize)  # option mistakes first, before reading anything
        parse_onnx(args.onnx)
        problem = output_folder_problem(args.out)
        if problem is not None:
            raise ConfigError(f"--out {args.out}: {problem}")
        if args.config:
            cfg = load_config(args.config, args.overrides)
            ckpt = resolve_checkpoint(args.checkpoint, cfg)
        else:
            ckpt = resolve_checkpoint(args.checkpoint, None)
            cfg = config_of_checkpoint(ckpt, args.overrides)
        validate(cfg)
        export(cfg, ckpt, Path(args.out), args.quantize, args.eval_split, args.eval_batches,
               onnx=args.onnx)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (checkpoint.CheckpointError, ExportError, OnnxUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
