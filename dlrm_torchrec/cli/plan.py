"""`python -m dlrm_torchrec.plan` (also `dlrm-plan`): plan the sharding of a cluster without it (`parallel.planning`)."""

import argparse
import sys
from typing import List, Optional

from dlrm_torchrec.cli import positive_float, quiet_libraries
from dlrm_torchrec.config import ConfigError, load_config
from dlrm_torchrec.parallel.planning import DoesNotFit, format_report, plan_cluster


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dlrm_torchrec.plan",
        description="Run TorchRec's sharding planner for a target cluster without it (no GPU "
                    "needed) and print the plan, per-rank memory and cost estimates.")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="devices per node (default 8)")
    p.add_argument("--hbm-gb", type=positive_float, default=80.0,
                   help="memory per GPU in GB of 2^30 bytes (default 80: an H100)")
    p.add_argument("--ddr-gb", type=positive_float, default=512.0,
                   help="host memory per node in GB, shared by its GPUs (default 512)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="compute device of the ranks (default cuda)")
    p.add_argument("--torchrec-stats", action="store_true",
                   help="also print TorchRec's own EmbeddingStats table")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    import logging

    args = parse_args(argv)
    quiet_libraries()
    if args.torchrec_stats:
        stats_logger = logging.getLogger("torchrec.distributed.planner.stats")
        stats_logger.setLevel(logging.INFO)
        stats_logger.addHandler(logging.StreamHandler(sys.stdout))
    try:
        cfg = load_config(args.config, args.overrides)
        report = plan_cluster(cfg, args.nodes, args.gpus_per_node, args.hbm_gb, args.ddr_gb,
                              args.device, torchrec_stats=args.torchrec_stats)
    except (ConfigError, DoesNotFit) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report, title=args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
