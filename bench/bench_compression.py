"""Memory against quality of compressed embeddings on the learnable synthetic data: plain
tables, quotient-remainder with two collision counts, mixed dimensions with two
temperatures; one training run each (world size 1, the real Trainer), then one table.

    python bench/bench_compression.py [--train-samples 131072] [--qr 4,16] [--md 0.2,0.4]

Memory is the fp32 embedding parameters (tables plus MD projections), without optimizer
state. AUC is on the validation split; the click model's own AUC there is the ceiling.

One run with the defaults (CPU, 2 cores shared with other jobs, so the times are noise;
torch 2.13, torchrec 1.8; QR on the 6 tables over 1000 rows; MD dims rounded up to
multiples of 4; click-model AUC 0.9171):

    variant          memory MiB  vs plain  val AUC  log loss
    plain                 9.296   100.0%   0.8017    0.5192
    QR mult c=4           2.431    26.1%   0.7739    0.5463
    QR mult c=16          0.719     7.7%   0.7625    0.5584
    MD alpha=0.2          4.692    50.5%   0.8028    0.5174
    MD alpha=0.4          2.368    25.5%   0.8036    0.5173
"""

import argparse
import os
import sys
import time

import torch
from torchmetrics.functional.classification import binary_auroc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dlrm_torchrec.cli import quiet_libraries  # noqa: E402
from dlrm_torchrec.config import load_config  # noqa: E402
from dlrm_torchrec.config.embedding_layout import memory_bytes  # noqa: E402
from dlrm_torchrec.data import build_data_source  # noqa: E402
from dlrm_torchrec.train.job import train  # noqa: E402

SIZES = [50000, 50000, 20000, 20000, 5000, 5000, 1000, 1000, 200, 100]


def base_overrides(args) -> list:
    return [
        "model.dense_in_features=13", "model.bottom_mlp=[64,16]", "model.top_mlp=[64,32,1]",
        "model.interaction=dot", "embeddings.dim=16",
        f"embeddings.num_embeddings_per_feature={SIZES}".replace(" ", ""),
        "data.source=synthetic", "data.batch_size=256", f"data.train_samples={args.train_samples}",
        f"data.eval_samples={args.eval_samples}", "optimizer.dense=adagrad",
        "optimizer.sparse=rowwise_adagrad", "optimizer.lr=0.05", "lr_schedule.warmup_steps=20",
        "training.epochs=1", "logging.log_every_n_steps=1000000", "logging.progress_bar=false",
        "sharding.backend=gloo", "sharding.device=cpu",
    ]


def variants(args) -> list:
    out = [("plain", [])]
    for c in args.qr.split(","):
        out.append((f"QR mult c={c}", ["embeddings.qr_threshold=1000", f"embeddings.qr_collisions={c}",
                                       "embeddings.qr_operation=mult"]))
    for a in args.md.split(","):
        out.append((f"MD alpha={a}", [f"embeddings.md_alpha={a}"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-samples", type=int, default=131072)
    p.add_argument("--eval-samples", type=int, default=16384)
    p.add_argument("--qr", default="4,16", help="collision counts (tables > 1000 rows)")
    p.add_argument("--md", default="0.2,0.4", help="MD temperatures")
    p.add_argument("--run-dir", default="runs/bench_compression")
    args = p.parse_args()
    quiet_libraries()
    rows = []
    for name, extra in variants(args):
        for k in ("MASTER_ADDR", "MASTER_PORT"):  # a fresh port for each process group
            os.environ.pop(k, None)
        run_dir = os.path.join(args.run_dir, name.replace(" ", "_").replace("=", ""))
        cfg = load_config(None, base_overrides(args) + extra + [f"logging.run_dir={run_dir}"])
        t = time.perf_counter()
        summary = train(cfg)
        used, proj, plain = memory_bytes(cfg.embeddings)
        rows.append((name, used + proj, plain, summary["final"].get("auc", float("nan")),
                     summary["final"].get("log_loss", float("nan")), time.perf_counter() - t))
    cfg = load_config(None, base_overrides(args))
    src = build_data_source(cfg.data, cfg.embeddings, cfg.model.dense_in_features, 0, 1)
    labels, prob = src.oracle_probabilities("val")
    ceiling = float(binary_auroc(torch.from_numpy(prob), torch.from_numpy(labels).long()))
    print(f"\nsynthetic data: {args.train_samples} training samples, 1 epoch, "
          f"{len(SIZES)} tables {SIZES}, dim 16; click-model AUC on validation {ceiling:.4f}")
    print(f"{'variant':<16} {'memory MiB':>10} {'vs plain':>9} {'val AUC':>8} {'log loss':>9} {'time s':>7}")
    for name, mem, plain, auc, ll, secs in rows:
        print(f"{name:<16} {mem / 2**20:>10.3f} {mem / plain:>8.1%} {auc:>8.4f} {ll:>9.4f} {secs:>7.1f}")


if __name__ == "__main__":
    main()
