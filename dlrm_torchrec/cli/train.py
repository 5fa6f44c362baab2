"""The training command: `python -m dlrm_torchrec.train --config FILE key=value ...` (also
`dlrm-train`).

Works as a plain single process (world size 1) and under torchrun / torchx dist.ddp.
"""

import argparse
import os
import sys
from typing import List, Optional

from dlrm_torchrec.cli import quiet_libraries
from dlrm_torchrec.config import ConfigError, describe, load_config

DEFAULT_CONFIG = "configs/tiny_cpu.yaml"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dlrm_torchrec.train",
        description="Train DLRM with TorchRec sharding. Settings: a YAML file, then "
                    "key=value overrides (dotted keys, e.g. data.batch_size=256).",
        epilog="keys:\n" + "\n".join(describe()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help=f"YAML config file (default {DEFAULT_CONFIG})")
    p.add_argument("--eval-only", action="store_true",
                   help="load the checkpoint named by checkpoint.resume (a folder, or auto for "
                        "the newest) and evaluate --split; no training")
    p.add_argument("--split", default=None, choices=["val", "test"],
                   help="split evaluated by --eval-only (default: training.eval_split)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    # torch and torchrec load after the arguments parse: --help answers at once
    from dlrm_torchrec.parallel.planning import DoesNotFit
    from dlrm_torchrec.train.checkpoint import CheckpointError
    from dlrm_torchrec.train.job import train
    from dlrm_torchrec.train.preemption import Preempted
    from dlrm_torchrec.train.trainer import TrainingDiverged

    args = parse_args(argv)
    quiet_libraries()
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        train(cfg, eval_only=args.eval_only, split=args.split)
    except (ConfigError, DoesNotFit) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":  # every rank stopped at the same step
            print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        # checkpoints are published atomically: the newest complete one is intact
        print("interrupted; continue from the newest checkpoint with checkpoint.resume=auto",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
