"""CPU training throughput: the project (TorchRec, fused FBGEMM kernels, pipeline) with one
process (also with training.step=direct: no pipeline) and with two gloo ranks, beside a plain PyTorch DLRM built from nn.EmbeddingBag
with sparse gradients and SGD (the way the original reference works), in one run, on the
same pre-generated random batches.

    python bench/bench_cpu.py [--arch kaggle terabyte] [--steps 60] [--max-rows 1000000]

Every process uses one thread, so "per core" is samples/s divided by the number of ranks.
The last column runs two independent plain processes at once: the per-core throughput two
cores of this machine give with no communication at all, the ceiling for two ranks.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dlrm_torchrec.config import load_config  # noqa: E402
from dlrm_torchrec.data import build_data_source  # noqa: E402

ARCHS = {"kaggle": "configs/criteo_kaggle.yaml", "terabyte": "configs/criteo_terabyte.yaml"}


def bench_overrides(arch: str, max_rows: int, batch: int, steps: int):
    return [
        "data.source=random", f"data.batch_size={batch}", f"data.train_samples={batch * steps}",
        "data.eval_samples=0", f"embeddings.max_ind_range={max_rows}",
        "optimizer.dense=sgd", "optimizer.sparse=sgd", "optimizer.lr=0.01",
        "logging.log_every_n_steps=1000000", "logging.progress_bar=false",
        "sharding.sharding_type=table_wise",
    ]


# --------------------------------------------------------------------------- project


def project_worker(rank: int, world_size: int, port: int, cfg_path: str, overrides, warmup: int,
                   out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from dlrm_torchrec.cli import quiet_libraries
    from dlrm_torchrec.parallel.distributed import init_distributed, shutdown
    from dlrm_torchrec.train.trainer import Trainer

    quiet_libraries()
    cfg = load_config(cfg_path, overrides + [f"logging.run_dir={out}/run"])
    info = init_distributed(cfg.sharding)
    trainer = Trainer(cfg, info)
    batches = list(trainer.source.batches("train", 0))
    loss = torch.zeros((), dtype=torch.float64)
    trainer._run_steps(batches[:warmup], 0, loss)
    torch.distributed.barrier()
    start = time.perf_counter()
    trainer._run_steps(batches[warmup:], 0, loss)
    torch.distributed.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        n = (len(batches) - warmup) * cfg.data.batch_size
        Path(out, f"project_{world_size}.txt").write_text(f"{n / elapsed}")
    shutdown()


def run_project(world_size: int, cfg_path: str, overrides, warmup: int) -> float:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(project_worker, args=(world_size, port, cfg_path, overrides, warmup, out),
                           nprocs=world_size, join=True, start_method="spawn")
        return float(Path(out, f"project_{world_size}.txt").read_text())


# --------------------------------------------------------------------------- baseline


class PlainDLRM(nn.Module):
    """The reference's structure: nn.EmbeddingBag(sum, sparse=True) per feature, MLPs,
    dot interaction (strict lower triangle), no TorchRec."""

    def __init__(self, sizes, dim, dense_in, bottom, top):
        super().__init__()
        self.embs = nn.ModuleList(nn.EmbeddingBag(n, dim, mode="sum", sparse=True) for n in sizes)

        def mlp(widths, last_relu):
            layers = []
            for i, (a, b) in enumerate(zip(widths, widths[1:])):
                layers.append(nn.Linear(a, b))
                if last_relu or i < len(widths) - 2:
                    layers.append(nn.ReLU())
            return nn.Sequential(*layers)

        self.bottom = mlp([dense_in] + bottom, True)
        f = len(sizes) + 1
        self.li, self.lj = torch.tril_indices(f, f, offset=-1)
        self.top = mlp([dim + f * (f - 1) // 2] + top, False)

    def forward(self, dense, bags):
        x = self.bottom(dense)
        t = torch.stack([x] + [emb(ids, offs) for emb, (ids, offs) in zip(self.embs, bags)], dim=1)
        z = torch.bmm(t, t.transpose(1, 2))
        return self.top(torch.cat([x, z[:, self.li, self.lj]], dim=1)).squeeze(-1)


def run_plain(cfg, warmup: int) -> float:
    torch.set_num_threads(1)
    src = build_data_source(cfg.data, cfg.embeddings, cfg.model.dense_in_features, 0, 1)
    batches = []
    for b in src.batches("train", 0):
        kjt = b.sparse_features
        bags = [(kjt[k].values(), kjt[k].offsets()[:-1]) for k in kjt.keys()]
        batches.append((b.dense_features, bags, b.labels))
    model = PlainDLRM(cfg.embeddings.table_sizes(), cfg.embeddings.dim, cfg.model.dense_in_features,
                      cfg.model.bottom_mlp, cfg.model.top_mlp)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optimizer.lr)
    loss_fn = nn.BCEWithLogitsLoss()

    def step(batch):
        dense, bags, labels = batch
        opt.zero_grad()
        loss_fn(model(dense, bags), labels).backward()
        opt.step()

    for b in batches[:warmup]:
        step(b)
    start = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    return (len(batches) - warmup) * cfg.data.batch_size / (time.perf_counter() - start)


def _plain_worker(rank: int, cfg_path: str, overrides, warmup: int, out: str) -> None:
    rate = run_plain(load_config(cfg_path, overrides), warmup)
    Path(out, f"plain_{rank}.txt").write_text(f"{rate}")


def run_plain_pair(cfg_path: str, overrides, warmup: int) -> float:
    """Two independent plain processes at once: what two cores give without any
    communication (the ceiling for two ranks). Returns their summed samples/s."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_plain_worker, args=(cfg_path, overrides, warmup, out), nprocs=2,
                           join=True, start_method="spawn")
        return sum(float(Path(out, f"plain_{r}.txt").read_text()) for r in range(2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["kaggle", "terabyte"], choices=list(ARCHS))
    p.add_argument("--batch", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--steps", type=int, default=60, help="timed steps (after warmup)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--max-rows", type=int, default=1_000_000,
                   help="cap on each table's rows (the full Terabyte tables need ~19 GB)")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1 thread per process, "
          f"tables capped at {args.max_rows:,} rows, SGD, random data\n")
    head = (f"{'arch':<9}{'batch':>6}  {'plain 1p':>10}  {'project 1p':>11}  {'x plain':>8}  "
            f"{'1p direct':>10}  {'x plain':>8}  "
            f"{'project 2 ranks':>16}  {'per core / 1p':>14}  {'2 plain at once':>16}")
    print(head)
    print("-" * len(head))
    for arch in args.arch:
        for batch in args.batch:
            over = bench_overrides(arch, args.max_rows, batch, args.steps + args.warmup)
            cfg = load_config(ARCHS[arch], over)
            plain = run_plain(cfg, args.warmup)
            one = run_project(1, ARCHS[arch], over + ["training.step=pipeline"], args.warmup)
            # one process without TorchRec's pipeline and input distribution (training.step)
            direct = run_project(1, ARCHS[arch], over + ["training.step=direct"], args.warmup)
            two = run_project(2, ARCHS[arch], over, args.warmup)
            pair = run_plain_pair(ARCHS[arch], over, args.warmup)
            print(f"{arch:<9}{batch:>6}  {plain:>10,.0f}  {one:>11,.0f}  {one / plain:>7.2f}x  "
                  f"{direct:>10,.0f}  {direct / plain:>7.2f}x  "
                  f"{two:>16,.0f}  {two / 2 / one:>13.2f}x  {pair / 2 / plain:>15.2f}x", flush=True)


if __name__ == "__main__":
    main()
