"""Training throughput on one GPU, side by side, same data, same model.

    python bench/bench_gpu.py                       # GPU: Terabyte and DCNv2, batches 2048 8192 32768
    python bench/bench_gpu.py --smoke               # any machine: tiny tables, a few steps (CPU ok)

Rows, for each architecture and batch size:
  trainer ...      the project's Trainer (dlrm_torchrec.trainer): TorchRec's
                   TrainPipelineSparseDist, fused FBGEMM kernels, its own step loop
                   (`Trainer._run_steps`); one row per precision setting (see below).
  torchrec         a plain TorchRec loop: torchrec.models.dlrm.DLRM / DLRM_DCN in
                   DistributedModelParallel with fused kernels (fused SGD), no pipeline,
                   fp32, dense SGD; forward, backward, step.
  pytorch          plain PyTorch: one nn.EmbeddingBag(sparse=True) per feature, torch.optim.SGD
                   on the sparse gradients, the same MLPs and interaction written out.

Same data: every row trains on the same batches, generated once per architecture and batch
size on the device (random ids over the capped tables; DCNv2 uses the MLPerf multi-hot bag
sizes of configs/mlperf_dcnv2.yaml unless --one-hot). Same model: architecture from
configs/criteo_terabyte.yaml and configs/mlperf_dcnv2.yaml with the Criteo Kaggle
cardinalities of configs/criteo_kaggle.yaml capped at --max-rows (10M); SGD everywhere, as
the plain PyTorch baseline can only do sparse SGD.

Trainer precision rows reuse one built model where they can: tf32 is a process switch and
bf16 autocast an attribute the dense modules read on every call; fp16 tables need a second
build. "all" is tf32 + bf16 autocast + fp16 tables. (qcomms are not benchmarked: with one
GPU the all-to-alls move nothing.) The compiled rows build their own trainer with
training.compile: "trainer compile" (inductor), "trainer cudagraphs" (reduce-overhead:
inductor plus CUDA graphs), "trainer all+cudagraphs" (that and every precision option);
their warm-up steps include the compilation of each batch size. The one-rank step's rows
(training.step): "trainer direct", "trainer cuda_graph" (the whole step as one graph),
"trainer all+cuda_graph" (with every precision option), "trainer all+direct+cudagraphs"
(direct, with the dense part compiled into CUDA graphs: what is left if FBGEMM's kernels
cannot be captured) and "trainer auto" (the default, training.step=auto: the kind it
picks, cuda_graph on one GPU with SGD). Every other trainer row sets training.step=pipeline.

Each row: warm-up steps, a short probe to size the timed run to about --seconds, then the
timed run between two device synchronisations. samples/s = steps x batch / time. "peak GB"
is torch.cuda.max_memory_allocated during the row (model, optimizer state, the row's
activations, and the pre-generated batches of that architecture), reset before each row.

The bench skips the project's seeded, plan-independent table initialisation (slow for
54M rows, and irrelevant to speed): tables keep TorchRec's own initial values.

Rows print as they finish; --out FILE also writes them as JSON. --time-budget-s stops
starting new rows once spent (the rest print as skipped), so one device call always returns.
"""

import argparse
import gc
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout (the GPU machine has no install)

from dlrm_torchrec.config import Config, ConfigError, load_config  # noqa: E402
from dlrm_torchrec.data.batch import Batch  # noqa: E402

TRAINER_ROWS = ["trainer fp32", "trainer tf32", "trainer bf16", "trainer tf32+bf16",
                "trainer fp16-tables", "trainer all"]
ALL_PRECISION = ["precision.tf32=true", "precision.dense_autocast=bf16",
                 "precision.embedding_dtype=fp16"]
# rows whose trainer is built with its own settings from the start: training.compile (a
# compiled module guards on the precision attributes, so these are not toggled per row) and
# training.step (the one-rank direct step, and the whole step as one CUDA graph)
COMPILED_ROWS = {
    "trainer compile": ["training.compile=default"],
    "trainer cudagraphs": ["training.compile=reduce-overhead"],
    "trainer all+cudagraphs": ["training.compile=reduce-overhead"] + ALL_PRECISION,
    "trainer direct": ["training.step=direct"],
    # what is left when the whole step cannot be captured: no pipeline, dense part graphed
    "trainer all+direct+cudagraphs": ["training.step=direct", "training.compile=reduce-overhead"]
    + ALL_PRECISION,
    "trainer cuda_graph": ["training.step=cuda_graph"],
    "trainer all+cuda_graph": ["training.step=cuda_graph"] + ALL_PRECISION,
    # the default: what training.step=auto picks here (one GPU, SGD: cuda_graph)
    "trainer auto": ["training.step=auto"],
}
ALL_ROWS = TRAINER_ROWS + list(COMPILED_ROWS) + ["torchrec", "pytorch"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="terabyte,dcnv2", help="comma list of terabyte, dcnv2")
    p.add_argument("--batches", default="2048,8192,32768", help="comma list of batch sizes")
    p.add_argument("--rows", default=",".join(ALL_ROWS),
                   help=f"comma list of rows to run (default all: {', '.join(ALL_ROWS)})")
    p.add_argument("--max-rows", type=int, default=10_000_000, help="cap on table rows")
    p.add_argument("--one-hot", action="store_true", help="DCNv2 with one id per feature")
    p.add_argument("--seconds", type=float, default=1.0, help="target length of a timed run")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps per row")
    p.add_argument("--min-steps", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--num-batches", type=int, default=4, help="distinct pre-generated batches")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--time-budget-s", type=float, default=300.0,
                   help="start no new row after this many seconds")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--smoke", action="store_true",
                   help="tiny run for any machine: tables capped at 2000 rows, batches 128,256, "
                        "a few steps")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after each row's timed run, profile this many more steps and add "
                        "per-step counts: aten operator calls, CUDA kernel launches (graph "
                        "replays count one), host syncs, GPU kernel time (0: off). With --out, "
                        "each row's 15 heaviest operators go to <out>.ops.txt")
    p.add_argument("--out", default="", help="also write the rows as JSON here")
    p.add_argument("--report", default="",
                   help="print the rows of a JSON written by --out as a Markdown table (for "
                        "the README) and exit; runs nothing")
    a = p.parse_args(argv)
    if a.smoke:
        a.max_rows, a.batches = min(a.max_rows, 2000), "128,256"
        a.seconds, a.warmup, a.min_steps, a.max_steps = 0.05, 1, 2, 4
    return a


# --------------------------------------------------------------------------- configs and data


def arch_config(arch: str, args, device: str, max_batch: int, extra: Iterable[str] = ()) -> Config:
    """The project's config for `arch` with Kaggle cardinalities capped at --max-rows,
    random data, SGD and quiet logging."""
    kaggle = load_config(str(ROOT / "configs/criteo_kaggle.yaml"))
    base = {"terabyte": "configs/criteo_terabyte.yaml", "dcnv2": "configs/mlperf_dcnv2.yaml"}[arch]
    overrides = [
        f"embeddings.num_embeddings_per_feature={kaggle.embeddings.num_embeddings_per_feature}",
        f"embeddings.max_ind_range={args.max_rows}",
        "data.source=random", "data.path=", f"data.batch_size={max_batch}",
        f"data.train_samples={max_batch}", "data.eval_samples=0",
        "optimizer.dense=sgd", "optimizer.sparse=sgd", f"optimizer.lr={args.lr}",
        "lr_schedule.warmup_steps=0", "lr_schedule.num_decay_steps=0",
        "training.target_auc=0", "training.eval_every_n_steps=0",
        "sharding.compute_kernel=fused", f"sharding.device={device}",
        # rows that name no training.step time TorchRec's pipeline; the default (auto)
        # would pick a one-rank step, which has rows of its own
        "training.step=pipeline",
        "logging.tensorboard=false", "logging.plot=false", "logging.progress_bar=false",
        "logging.log_every_n_steps=1000000000", "logging.run_dir=/tmp/bench_gpu_run",
    ]
    if arch == "dcnv2" and args.one_hot:
        overrides.append("data.multi_hot_sizes=[]")
    return load_config(str(ROOT / base), overrides + list(extra))


@dataclass
class DeviceBatch:
    """One batch in the three shapes the implementations take (same tensors)."""

    ours: Batch
    torchrec: object  # torchrec.datasets.utils.Batch
    dense: torch.Tensor
    ids: List[torch.Tensor]  # per feature, B x k
    labels: torch.Tensor


def make_batches(cfg: Config, batch_size: int, n: int, device: torch.device,
                 seed: int) -> List[DeviceBatch]:
    """`n` random batches generated on `device`: dense features in [0, 1), ids uniform over
    each capped table, fixed bag sizes, labels 0/1."""
    from torchrec.datasets.utils import Batch as TorchRecBatch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from dlrm_torchrec.config import feature_names
    from dlrm_torchrec.data import bag_sizes

    sizes = cfg.embeddings.table_sizes()
    ks = bag_sizes(cfg.data, len(sizes))
    keys = feature_names(cfg.embeddings)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    out = []
    for _ in range(n):
        dense = torch.rand(batch_size, cfg.model.dense_in_features, generator=g, device=device)
        ids = [torch.randint(0, rows, (batch_size, k), generator=g, device=device)
               for rows, k in zip(sizes, ks)]
        labels = torch.randint(0, 2, (batch_size,), generator=g, device=device).float()
        per_key = [batch_size * k for k in ks]
        kjt = KeyedJaggedTensor(
            keys=keys, values=torch.cat([i.reshape(-1) for i in ids]),
            lengths=torch.cat([torch.full((batch_size,), k, dtype=torch.int64, device=device)
                               for k in ks]),
            stride=batch_size, length_per_key=per_key,
            offset_per_key=[0] + list(itertools.accumulate(per_key)))
        weights = torch.ones(batch_size, device=device)
        out.append(DeviceBatch(Batch(dense, kjt, labels, weights), TorchRecBatch(dense, kjt, labels),
                               dense, ids, labels))
    return out


# --------------------------------------------------------------------------- implementations


class Runner:
    """run(batches) trains on every batch of the iterable; close() frees the model."""

    def run(self, batches: Iterable[DeviceBatch]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def trainer_without_seeded_init(cfg: Config, info):
    """The project's Trainer, built without its seeded, plan-independent table initialisation
    (slow for tens of millions of rows, irrelevant to speed): tables keep TorchRec's own
    initial values."""
    import dlrm_torchrec.parallel.sharding as sharding
    from dlrm_torchrec.train.trainer import Trainer

    seeded_init = sharding.init_embedding_weights
    sharding.init_embedding_weights = lambda *a, **k: None
    try:
        return Trainer(cfg, info)
    finally:
        sharding.init_embedding_weights = seeded_init


class TrainerRunner(Runner):
    """The project's Trainer: its pipeline, optimizers and step loop."""

    def __init__(self, cfg: Config, info):
        self.trainer = trainer_without_seeded_init(cfg, info)  # see the module docstring
        self.device = info.device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)

    def set_precision(self, tf32: bool, bf16: bool) -> None:
        from dlrm_torchrec.config import PrecisionConfig
        from dlrm_torchrec.model.dlrm import MLP
        from dlrm_torchrec.model.interaction import Interaction
        from dlrm_torchrec.parallel.precision import apply_matmul_precision

        apply_matmul_precision(PrecisionConfig(tf32=tf32), self.device)
        for m in self.trainer.model.modules():
            if isinstance(m, (MLP, Interaction)):
                m.autocast_dtype = torch.bfloat16 if bf16 else None

    def run(self, batches):
        self.trainer._last_logged_step, self.trainer._last_log_time = 0, time.perf_counter()
        self.trainer._run_steps((b.ours for b in batches), 0, self.loss_sum)

    def step_counts(self) -> Dict[str, int]:
        """training.step direct / cuda_graph: its direct steps and graph replays so far, as
        metrics.json reports them (the pipeline: none)."""
        report = self.trainer._train_step_report()
        return {k: report[k] for k in ("direct_steps", "graph_replays") if k in report}

    def close(self):
        self.trainer.run_logger.close()
        del self.trainer


class TorchRecRunner(Runner):
    """Plain TorchRec: DLRM (or DLRM_DCN) + DLRMTrain from torchrec.models.dlrm in
    DistributedModelParallel, fused SGD in the embedding backward, dense SGD, no pipeline."""

    def __init__(self, cfg: Config, device: torch.device, lr: float):
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        from torchrec.distributed.planner.types import ParameterConstraints
        from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.embedding_modules import EmbeddingBagCollection
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
        from torchrec.optim.keyed import KeyedOptimizerWrapper
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        from dlrm_torchrec.config import feature_names
        from dlrm_torchrec.parallel.sharding import device_memory_bytes

        m = cfg.model
        tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=cfg.embeddings.dim,
                                     num_embeddings=n, feature_names=[f])
                  for f, n in zip(feature_names(cfg.embeddings), cfg.embeddings.table_sizes())]
        ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
        if m.interaction == "dcn":
            model = DLRM_DCN(ebc, m.dense_in_features, m.bottom_mlp, m.top_mlp, m.dcn_num_layers,
                             m.dcn_low_rank_dim, dense_device=device)
        else:
            model = DLRM(ebc, m.dense_in_features, m.bottom_mlp, m.top_mlp, dense_device=device)
        train = DLRMTrain(model)
        apply_optimizer_in_backward(torch.optim.SGD, train.model.sparse_arch.parameters(), {"lr": lr})
        sharders = [EmbeddingBagCollectionSharder()]
        hbm = device_memory_bytes(device.type)
        topology = Topology(world_size=1, compute_device=device.type,
                            **({"hbm_cap": hbm} if hbm else {}))
        constraints = {t.name: ParameterConstraints(sharding_types=["table_wise"],
                                                    compute_kernels=["fused"]) for t in tables}
        plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(
            train, sharders, dist.GroupMember.WORLD)
        self.dmp = DistributedModelParallel(train, device=device, plan=plan, sharders=sharders)
        dense = dict(in_backward_optimizer_filter(self.dmp.named_parameters()))
        self.opt = KeyedOptimizerWrapper(dense, lambda p: torch.optim.SGD(p, lr=lr))

    def run(self, batches):
        for b in batches:
            loss, _ = self.dmp(b.torchrec)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()

    def close(self):
        del self.dmp, self.opt


class PlainDLRM(nn.Module):
    """DLRM in plain PyTorch: nn.EmbeddingBag(sparse=True) per feature, ReLU MLPs, the dot
    interaction (pairs i > j of [x, e_1..e_F]) or a DCNv2 low-rank cross net."""

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__()
        m, d = cfg.model, cfg.embeddings.dim
        self.embs = nn.ModuleList(nn.EmbeddingBag(n, d, mode="sum", sparse=True, device=device)
                                  for n in cfg.embeddings.table_sizes())
        for e in self.embs:
            nn.init.uniform_(e.weight, -1 / math.sqrt(e.num_embeddings), 1 / math.sqrt(e.num_embeddings))
        num = len(self.embs) + 1
        self.bottom = self._mlp(m.dense_in_features, m.bottom_mlp, True, device)
        self.dot = m.interaction == "dot"
        if self.dot:
            rows, cols = torch.tril_indices(num, num, offset=-1, device=device)
            self.register_buffer("rows", rows)
            self.register_buffer("cols", cols)
            width = d + rows.numel()
        else:
            width = d * num
            self.down = nn.ModuleList(nn.Linear(width, m.dcn_low_rank_dim, bias=False, device=device)
                                      for _ in range(m.dcn_num_layers))
            self.up = nn.ModuleList(nn.Linear(m.dcn_low_rank_dim, width, device=device)
                                    for _ in range(m.dcn_num_layers))
        self.top = self._mlp(width, m.top_mlp, False, device)

    @staticmethod
    def _mlp(width: int, layers: List[int], last_relu: bool, device) -> nn.Sequential:
        mods: List[nn.Module] = []
        for i, w in enumerate(layers):
            mods.append(nn.Linear(width, w, device=device))
            if last_relu or i < len(layers) - 1:
                mods.append(nn.ReLU())
            width = w
        return nn.Sequential(*mods)

    def forward(self, dense: torch.Tensor, ids: List[torch.Tensor]) -> torch.Tensor:
        x = self.bottom(dense)
        pooled = [e(i) for e, i in zip(self.embs, ids)]
        if self.dot:
            t = torch.stack([x] + pooled, dim=1)
            z = torch.bmm(t, t.transpose(1, 2))
            feats = torch.cat([x, z[:, self.rows, self.cols]], dim=1)
        else:
            x0 = torch.cat([x] + pooled, dim=1)
            feats = x0
            for down, up in zip(self.down, self.up):
                feats = x0 * up(down(feats)) + feats
        return self.top(feats).squeeze(-1)


class PyTorchRunner(Runner):
    def __init__(self, cfg: Config, device: torch.device, lr: float):
        self.model = PlainDLRM(cfg, device)
        self.sparse_opt = torch.optim.SGD(list(self.model.embs.parameters()), lr=lr)
        dense = [p for n, p in self.model.named_parameters() if not n.startswith("embs.")]
        self.dense_opt = torch.optim.SGD(dense, lr=lr)
        self.loss = nn.BCEWithLogitsLoss()

    def run(self, batches):
        for b in batches:
            loss = self.loss(self.model(b.dense, b.ids), b.labels)
            self.sparse_opt.zero_grad()
            self.dense_opt.zero_grad()
            loss.backward()
            self.sparse_opt.step()
            self.dense_opt.step()

    def close(self):
        del self.model, self.sparse_opt, self.dense_opt


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def time_row(run: Callable, batches: List[DeviceBatch], args, device: torch.device) -> Dict:
    """samples/s of `run` over cycled `batches`: warm-up, probe, timed run."""
    def steps(n):
        return itertools.islice(itertools.cycle(batches), n)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run(steps(args.warmup))
    sync(device)
    probe = max(3, args.min_steps // 4)
    t0 = time.perf_counter()
    run(steps(probe))
    sync(device)
    per_step = (time.perf_counter() - t0) / probe
    n = int(min(args.max_steps, max(args.min_steps, args.seconds / max(per_step, 1e-6))))
    t0 = time.perf_counter()
    run(steps(n))
    sync(device)
    dt = time.perf_counter() - t0
    bs = batches[0].labels.shape[0]
    return {"samples_per_s": n * bs / dt, "steps": n, "ms_per_step": 1e3 * dt / n,
            "peak_gb": peak_gb(device)}


# launching work on the GPU: one kernel, or one whole CUDA graph
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                "cudaGraphLaunch", "cudaLaunchCooperativeKernel")


def is_host_sync(name: str) -> bool:
    """CUDA runtime calls that make the host wait for the device."""
    return "Synchronize" in name or name in ("cudaMemcpy", "cudaMemcpy2D", "cudaMemset",
                                             "cudaStreamWaitEvent_host")


def profile_row(run: Callable, batches: List[DeviceBatch], steps: int,
                device: torch.device) -> tuple:
    """(per-step counts, top-operator table) of `steps` more steps under torch.profiler.

    aten_ops counts every aten operator call, nested ones included (on CPU the closest
    measure of per-step host work; on CUDA most of them launch a kernel). launches and
    host_syncs count CUDA runtime calls (see LAUNCH_CALLS, is_host_sync), gpu_ms the kernels'
    device time: with the step's wall time it tells whether the GPU or the host bounds it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sync(device)
    with profile(activities=activities) as prof:
        run(itertools.islice(itertools.cycle(batches), steps))
        sync(device)
    table = prof.key_averages()
    counts = {e.key: e.count for e in table}
    # the kernels' own events, as torch's table totals them: an operator's self device time
    # is its kernels' again, and a user annotation spans kernels already counted
    device_us = sum(e.self_device_time_total for e in table
                    if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False))
    own_syncs = 2 if device.type == "cuda" else 0  # the sync() calls around the window
    per_step = {
        "aten_ops": sum(c for k, c in counts.items() if k.startswith("aten::")) / steps,
        "launches": sum(counts.get(k, 0) for k in LAUNCH_CALLS) / steps,
        "host_syncs": max(0, sum(c for k, c in counts.items() if is_host_sync(k)) - own_syncs)
        / steps,
        "gpu_ms": device_us / 1e3 / steps,
    }
    top = table.table(sort_by="self_cpu_time_total", row_limit=15)
    return per_step, top + "\n" + python_profile(run, batches, max(steps, 20), device)


def python_profile(run: Callable, batches: List[DeviceBatch], steps: int,
                   device: torch.device, limit: int = 30) -> str:
    """The Python functions `steps` more steps spend their host time in, by own time
    (cProfile). torch.profiler shows operators; on a host-bound GPU step the time can as well
    sit in the pipeline's Python (stream contexts, record_stream, awaitables) or in a call
    that waits for the GPU (Tensor.tolist, item, synchronize), which this names."""
    import cProfile
    import io
    import pstats

    sync(device)
    prof = cProfile.Profile()
    prof.enable()
    run(itertools.islice(itertools.cycle(batches), steps))
    sync(device)
    prof.disable()
    out = io.StringIO()
    out.write(f"Python functions over {steps} steps, by own time (cProfile: about 2x slower "
              "than without it, so compare the shares, not the seconds)\n")
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(limit)
    return out.getvalue()


# --------------------------------------------------------------------------- main


def build_runner(kind: str, arch: str, cfg: Config, args, info, max_batch: int) -> Runner:
    if kind == "torchrec":
        return TorchRecRunner(cfg, info.device, args.lr)
    if kind == "pytorch":
        return PyTorchRunner(cfg, info.device, args.lr)
    if kind == "trainer fp16":
        cfg = arch_config(arch, args, info.device.type, max_batch, ["precision.embedding_dtype=fp16"])
    if kind in COMPILED_ROWS:
        cfg = arch_config(arch, args, info.device.type, max_batch, COMPILED_ROWS[kind])
    return TrainerRunner(cfg, info)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def markdown_report(results: Dict) -> str:
    """A --out JSON as README Markdown: one table per architecture, a column per batch size,
    samples/s with the ratio to plain TorchRec and the peak GPU memory of the row."""
    rows = results["rows"]
    lines = [f"{results['device']}, torch {results['torch']}, fbgemm_gpu {results['fbgemm_gpu']}, "
             f"torchrec {results['torchrec']}; tables capped at {results['args']['max_rows']:,} "
             "rows; samples/s (x plain TorchRec) and peak GB per row.", ""]
    for arch in dict.fromkeys(r["arch"] for r in rows):
        batches = list(dict.fromkeys(r["batch"] for r in rows if r["arch"] == arch))
        lines += [f"**{arch}**", "", "| row | " + " | ".join(f"batch {b}" for b in batches) + " |",
                  "|---|" + "---|" * len(batches)]
        for name in dict.fromkeys(r["row"] for r in rows if r["arch"] == arch):
            cells = []
            for b in batches:
                r = next((x for x in rows if (x["arch"], x["batch"], x["row"]) == (arch, b, name)), None)
                base = next((x for x in rows if (x["arch"], x["batch"], x["row"]) == (arch, b, "torchrec")
                             and "samples_per_s" in x), None)
                if r is None or "samples_per_s" not in r:
                    cells.append((r or {}).get("error", "-").split(":")[0])
                    continue
                rel = f" ({r['samples_per_s'] / base['samples_per_s']:.2f}x)" if base else ""
                mem = f", {r['peak_gb']:.1f} GB" if r.get("peak_gb") is not None else ""
                cells.append(f"{r['samples_per_s']:,.0f}{rel}{mem}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        print(markdown_report(json.loads(Path(args.report).read_text())))
        return 0
    import logging
    import warnings

    for name in ("torchrec", "torch.fx._symbolic_trace", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    from dlrm_torchrec.config import ShardingConfig
    from dlrm_torchrec.parallel.distributed import init_distributed, shutdown

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device_name = "cuda" if use_cuda else "cpu"
    if args.device == "auto" and not use_cuda and not args.smoke:
        print("bench_gpu: no CUDA device; running the full sizes on CPU would take hours. "
              "Use --smoke for a quick check, or --device cpu with small --batches and "
              "--max-rows.", file=sys.stderr)
        return 2
    info = init_distributed(ShardingConfig(device=device_name))
    device = info.device
    import fbgemm_gpu
    import torchrec

    gpu = torch.cuda.get_device_name(device) if use_cuda else "cpu"
    print(f"bench_gpu: {gpu}, torch {torch.__version__}, fbgemm_gpu {fbgemm_gpu.__version__}, "
          f"torchrec {torchrec.__version__}, tables capped at {args.max_rows:,} rows", flush=True)
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows_wanted if r not in ALL_ROWS]
    if bad:
        print(f"bench_gpu: unknown rows {bad}; choose from {ALL_ROWS}", file=sys.stderr)
        return 2
    batch_sizes = [int(b) for b in args.batches.split(",")]
    results: List[Dict] = []
    if args.out and args.profile_steps:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.ops.txt").write_text("")  # this run's operator tables only
    start = time.perf_counter()
    header = f"{'arch':9s} {'batch':>6s}  {'row':22s} {'samples/s':>12s} {'vs torchrec':>11s} {'ms/step':>8s} {'peak GB':>8s}"
    print(header, flush=True)

    def record(arch, bs, row, res):
        res = dict(arch=arch, batch=bs, row=row, **res)
        results.append(res)
        base = next((r for r in results if r["arch"] == arch and r["batch"] == bs
                     and r["row"] == "torchrec" and "samples_per_s" in r), None)
        if "samples_per_s" in res:
            rel = f"{res['samples_per_s'] / base['samples_per_s']:.2f}x" if base else "-"
            pk = f"{res['peak_gb']:.2f}" if res.get("peak_gb") is not None else "-"
            ps = res.get("per_step")
            prof = (f"  per step: {ps['aten_ops']:.0f} aten ops, {ps['launches']:.0f} launches, "
                    f"{ps['host_syncs']:.1f} syncs, GPU {ps['gpu_ms']:.2f} ms") if ps else ""
            ts = res.get("train_step")
            graph = (f"  steps: {ts['graph_replays']} replayed, {ts['direct_steps']} direct"
                     if ts else "")
            if ts and ts.get("capture_error"):
                graph += f" (capture failed: {ts['capture_error']})"
            print(f"{arch:9s} {bs:6d}  {row:22s} {res['samples_per_s']:12,.0f} {rel:>11s} "
                  f"{res['ms_per_step']:8.2f} {pk:>8s}{graph}{prof}", flush=True)
        else:
            print(f"{arch:9s} {bs:6d}  {row:22s} {res.get('error', 'skipped')}", flush=True)
        write_out()  # after every row: a run killed at its time limit keeps what it measured

    def write_ops(title: str, top: str) -> None:
        if args.out:
            with open(f"{args.out}.ops.txt", "a") as f:
                f.write(f"== {title}\n{top}\n")

    def write_out() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({
                "device": gpu, "torch": torch.__version__, "fbgemm_gpu": fbgemm_gpu.__version__,
                "torchrec": torchrec.__version__, "args": vars(args), "rows": results}, indent=1))

    def over_budget() -> bool:
        return time.perf_counter() - start > args.time_budget_s

    for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
        try:
            cfg = arch_config(arch, args, device_name, max(batch_sizes))
        except (ConfigError, KeyError) as e:
            print(f"bench_gpu: arch {arch}: {e}", file=sys.stderr)
            return 2
        data = {bs: make_batches(cfg, bs, args.num_batches, device, seed=bs) for bs in batch_sizes}
        # baselines first, so the trainer rows print their ratio to plain TorchRec
        builds = [(["torchrec"], "torchrec"), (["pytorch"], "pytorch"),
                  (TRAINER_ROWS[:4], "trainer"), (TRAINER_ROWS[4:], "trainer fp16")]
        builds += [([row], row) for row in COMPILED_ROWS]
        # in the order of --rows, baselines first
        order = {r: i for i, r in enumerate(rows_wanted)}
        builds.sort(key=lambda b: (b[1] not in ("torchrec", "pytorch"),
                                   min(order.get(r, len(order)) for r in b[0])))
        for rows, kind in builds:
            rows = [r for r in rows if r in rows_wanted]
            if not rows:
                continue
            runner = None
            try:
                if not over_budget():
                    runner = build_runner(kind, arch, cfg, args, info, max(batch_sizes))
            except Exception as e:  # a failed build: report it, go on with the next
                msg = f"build failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                for bs in batch_sizes:
                    for r in rows:
                        record(arch, bs, r, {"error": msg})
                free(device)
                continue
            for bs in batch_sizes:
                for r in rows:
                    if runner is None or over_budget():
                        record(arch, bs, r, {"error": "skipped (time budget)"})
                        continue
                    if isinstance(runner, TrainerRunner) and kind not in COMPILED_ROWS:
                        runner.set_precision(tf32="tf32" in r or "all" in r,
                                             bf16="bf16" in r or "all" in r)
                    try:
                        counts = runner.step_counts() if isinstance(runner, TrainerRunner) else {}
                        res = time_row(runner.run, data[bs], args, device)
                        if counts:  # this row's steps (warm-up included): replayed or direct?
                            res["train_step"] = {k: v - counts[k]
                                                 for k, v in runner.step_counts().items()}
                            error = runner.trainer._train_step_report().get("capture_error")
                            if error:  # why the graph rows ran direct (one device call: say it)
                                res["train_step"]["capture_error"] = error
                        if args.profile_steps:
                            res["per_step"], top = profile_row(runner.run, data[bs],
                                                               args.profile_steps, device)
                            write_ops(f"{arch} batch {bs} {r}", top)
                        record(arch, bs, r, res)
                    except Exception as e:  # out of memory, a kernel error: report, go on
                        record(arch, bs, r, {"error": f"{type(e).__name__}: "
                                                      f"{str(e).splitlines()[0][:200]}"})
                        free(device)
            if runner is not None:
                if isinstance(runner, TrainerRunner):
                    runner.set_precision(False, False)
                    torch._dynamo.reset()  # the next build compiles its own modules
                runner.close()
            del runner
            free(device)
        del data
        free(device)
    print(f"bench_gpu: {len(results)} rows in {time.perf_counter() - start:.0f}s", flush=True)
    write_out()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
