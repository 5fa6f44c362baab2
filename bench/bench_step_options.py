"""The step-overhead options side by side, one process, same model, same data: the
project's Trainer with batches built in the training process (the baseline) or by a loader
worker, with eager or compiled (training.compile=default) dense modules.

    python bench/bench_step_options.py [--arch terabyte] [--batches 256,2048] [--steps 150]

Each row builds a Trainer (world size 1) on `data.source=synthetic` (the learnable source:
hashing ids and computing labels from the click model is real per-batch CPU work, as reading
and expanding Criteo rows is), runs warm-up steps (which include any compilation), then
times `--steps` steps of its own data pipeline, loader included. Run on CPU it shows what the
options do on this machine; on a GPU machine (`--device cuda`) the same rows run there.
"""

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlrm_torchrec.config import load_config  # noqa: E402

ARCHS = {"kaggle": "configs/criteo_kaggle.yaml", "terabyte": "configs/criteo_terabyte.yaml"}
ROWS = {  # name -> overrides; the first is the baseline
    "eager + loader in process": ["data.num_workers=0", "training.compile=none"],
    "eager + 1 loader worker": ["data.num_workers=1", "training.compile=none"],
    "compiled + loader in process": ["data.num_workers=0", "training.compile=default"],
    "compiled + 1 loader worker": ["data.num_workers=1", "training.compile=default"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="terabyte", choices=sorted(ARCHS))
    p.add_argument("--batches", default="256,2048", help="comma list of batch sizes")
    p.add_argument("--steps", type=int, default=150, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (compilation)")
    p.add_argument("--max-rows", type=int, default=200_000, help="cap on table rows")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rows", default=",".join(ROWS), help="comma list of rows")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the training process (0: torch's default); with "
                        "1 on a 2-core machine a loader worker has a core of its own, as the "
                        "training process of a GPU job mostly does")
    return p.parse_args(argv)


def time_row(cfg, info, warmup: int, steps: int) -> float:
    """samples/s of `steps` training steps after `warmup`, from the trainer's own loader."""
    from bench_gpu import trainer_without_seeded_init  # this script's folder is on sys.path

    trainer = trainer_without_seeded_init(cfg, info)
    loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
    batches = trainer.source.batches("train", 0)
    trainer._run_steps(itertools.islice(batches, warmup), 0, loss_sum)
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    done = trainer._run_steps(itertools.islice(batches, steps), 0, loss_sum)
    sync()
    dt = time.perf_counter() - t0
    trainer.run_logger.close()
    del batches, trainer
    return done * cfg.data.batch_size / dt


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging
    import warnings

    for name in ("torchrec", "torch.fx._symbolic_trace", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from dlrm_torchrec.config import ShardingConfig
    from dlrm_torchrec.parallel.distributed import init_distributed, shutdown

    if args.threads:
        torch.set_num_threads(args.threads)
    info = init_distributed(ShardingConfig(device=args.device))
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    print(f"bench_step_options: {args.arch}, device {info.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, tables capped at {args.max_rows:,} rows")
    print(f"{'batch':>6s}  {'row':30s} {'samples/s':>10s} {'vs first':>9s}")
    for bs in [int(b) for b in args.batches.split(",")]:
        base = None
        for name in names:
            cfg = load_config(str(ROOT / ARCHS[args.arch]), [
                "data.source=synthetic", "data.path=", f"data.batch_size={bs}",
                f"data.train_samples={bs * (args.warmup + args.steps + 1)}",
                "data.eval_samples=0", f"embeddings.max_ind_range={args.max_rows}",
                f"sharding.device={args.device}", "training.target_auc=0",
                "logging.log_every_n_steps=1000000", "logging.progress_bar=false",
                "logging.tensorboard=false", "logging.run_dir=/tmp/bench_step_options",
                "training.step=pipeline",  # the figures in the README: TorchRec's pipeline
            ] + ROWS[name])
            rate = time_row(cfg, info, args.warmup, args.steps)
            base = base or rate
            print(f"{bs:6d}  {name:30s} {rate:10,.0f} {rate / base:8.2f}x", flush=True)
            torch._dynamo.reset()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
