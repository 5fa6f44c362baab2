"""Entry point: `python -m dlrm_torchrec.train --config FILE key=value ...`.

Works as a plain single process (world size 1) and under torchrun / torchx dist.ddp.
"""

import argparse
import os
import sys
from typing import List, Optional

from dlrm_torchrec.config import Config, ConfigError, describe, load_config, validate

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


def train(cfg: Config, eval_only: bool = False, split: Optional[str] = None) -> dict:
    """Train with `cfg` in this process (rank and world size from the environment), or
    with `eval_only` evaluate the checkpoint named by checkpoint.resume on `split`
    (default: training.eval_split)."""
    from dlrm_torchrec.distributed import init_distributed, shutdown
    from dlrm_torchrec.preemption import Preempted
    from dlrm_torchrec.trainer import Trainer

    info = init_distributed(cfg.sharding)
    trainer = None
    together = False  # every rank leaves at the same point (finished, or agreed to stop)
    try:
        validate(cfg, world_size=info.world_size)
        trainer = Trainer(cfg, info)
        if eval_only:
            result = trainer.evaluate_only(split or cfg.training.eval_split)
        else:
            result = trainer.fit()
        together = True
        return result
    except Preempted:
        together = True
        raise
    finally:
        if trainer is not None:  # after an error: stop the profiler, flush TensorBoard
            trainer.run_logger.close()
        # the sharded model holds the process groups: let it go before they are destroyed
        del trainer
        shutdown(together)


def quiet_libraries() -> None:
    """TorchRec and DDP log advice meant for their developers on every start; keep errors."""
    import logging
    import warnings

    for name in ("torchrec", "torch.fx._symbolic_trace", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(rec)?\.")


def main(argv: Optional[List[str]] = None) -> int:
    from dlrm_torchrec.checkpoint import CheckpointError
    from dlrm_torchrec.preemption import Preempted
    from dlrm_torchrec.trainer import TrainingDiverged

    args = parse_args(argv)
    quiet_libraries()
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        train(cfg, eval_only=args.eval_only, split=args.split)
    except ConfigError as e:
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
