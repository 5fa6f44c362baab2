"""GPU-only tests, skipped without CUDA. Run on the device machine with
scripts/gpu_check.sh (one call: these tests, then bench/bench_gpu.py).

World size 1 on NCCL: the trainer's entry point with fused FBGEMM kernels and TorchRec's
TrainPipelineSparseDist; a table over its HBM budget that the planner puts in UVM with an
HBM cache; every precision option; the Terabyte and MLPerf DCNv2 configs with capped tables
on random data.
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["logging.tensorboard=false", "logging.plot=false", "logging.progress_bar=false"]
TINY = ["sharding.device=cuda", "sharding.compute_kernel=fused", "data.train_samples=65536",
        "data.eval_samples=8192", "training.eval_every_n_steps=0", "logging.log_every_n_steps=10"]
ENTRY_POINT_TIMEOUT_S = 120  # 200 tiny steps take seconds; leaves the one device call time


def _cfg(tmp_path, overrides, config="configs/tiny_cpu.yaml"):
    from dlrm_torchrec.config import load_config

    return load_config(str(ROOT / config), overrides + QUIET + [f"logging.run_dir={tmp_path}"])


def _plan_kernels(plan):
    """table name -> compute kernel of the plan."""
    return {table: ps.compute_kernel for module_plan in plan.plan.values()
            for table, ps in module_plan.items()}


def _assert_trained_alike(got, want, steps, rtol, atol, auc):
    """Two runs' summaries: the same number of steps, every logged loss within rtol/atol, the
    final AUC within `auc`."""
    assert got["steps"] == want["steps"] == steps
    torch.testing.assert_close(torch.tensor([h["train_loss"] for h in got["history"]]),
                               torch.tensor([h["train_loss"] for h in want["history"]]),
                               rtol=rtol, atol=atol)
    assert abs(got["final"]["auc"] - want["final"]["auc"]) < auc


def _finite_losses(summary):
    losses = [h["train_loss"] for h in summary["history"]]
    return bool(losses) and all(math.isfinite(x) for x in losses)


# runs first, in its own process, before this process starts its process group; with
# cuda_graph (what training.step=auto, the default, picks on one GPU with the config's
# Adagrad), its loader workers and pin-memory thread run while the step is captured
@pytest.mark.parametrize("step", [["training.step=pipeline"], []], ids=["pipeline", "auto"])
def test_entry_point_trains_on_one_gpu_with_fused_kernels(tmp_path, step):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "dlrm_torchrec.train", "--config", "configs/tiny_cpu.yaml",
           *TINY, "training.max_steps=200", f"logging.run_dir={tmp_path}", *QUIET, *step]
    # its own process session: on a timeout the loader workers it forked die with it (they
    # hold its pipes, so killing the trainer alone would leave communicate() waiting)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=ENTRY_POINT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"no exit after {ENTRY_POINT_TIMEOUT_S} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    assert "1 ranks, cuda" in out and "kernel=fused" in out, out[-4000:]
    # data.num_workers auto: batches come from worker processes forked after CUDA started
    assert "; 0 loader worker(s)" not in out and "loader worker(s)" in out, out[-4000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["steps"] == 200
    assert m["final"]["auc"] > 0.6, m["final"]
    assert m["peak_memory"]["kind"] == "cuda allocated" and 0 < m["peak_memory"]["gb"] < 80
    if not step:  # auto: the config's 20 warm-up steps run direct, the rest replay one graph
        assert m["train_step"] == {"kind": "cuda_graph", "configured": "auto", "direct_steps": 20,
                                   "graph_replays": 180, "capture_failed": False}, m["train_step"]
    else:
        assert m["train_step"] == {"kind": "pipeline"}, m["train_step"]


@pytest.fixture(scope="module")
def info():
    from dlrm_torchrec.config import ShardingConfig
    from dlrm_torchrec.parallel.distributed import init_distributed, shutdown

    info = init_distributed(ShardingConfig(device="cuda"))
    assert (info.world_size, info.backend, info.device.type) == (1, "nccl", "cuda")
    yield info
    shutdown()


def test_pipeline_and_topology_use_the_gpu(info, tmp_path):
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from dlrm_torchrec.config import ShardingConfig
    from dlrm_torchrec.parallel.sharding import build_topology
    from dlrm_torchrec.train.trainer import Trainer

    total = torch.cuda.get_device_properties(info.device).total_memory
    assert build_topology(ShardingConfig(), 1, 1, "cuda").devices[0].storage.hbm == total
    tr = Trainer(_cfg(tmp_path, TINY + ["training.max_steps=20", "training.step=pipeline"]), info)
    assert isinstance(tr.pipeline, TrainPipelineSparseDist)
    assert set(_plan_kernels(tr.plan).values()) == {"fused"}
    summary = tr.fit()
    assert summary["steps"] == 20 and _finite_losses(summary)


def test_table_over_its_hbm_budget_goes_to_uvm_caching(info, tmp_path):
    from dlrm_torchrec.train.trainer import Trainer

    # t_cat_0: 4M x 64 fp32 = 1 GiB, over the 0.5 GiB budget; its 10% cache fits
    cfg = _cfg(tmp_path, TINY + [
        "embeddings.num_embeddings_per_feature=[4000000,1000,1000,1000]",
        "sharding.hbm_cap_gb=0.5", "sharding.cache_load_factor=0.1",
        "sharding.tables.t_cat_0.compute_kernels=[fused,fused_uvm_caching]",
        "embeddings.dim=64", "model.bottom_mlp=[64,64]", "data.batch_size=1024",
        "training.max_steps=30"])
    tr = Trainer(cfg, info)
    kernels = _plan_kernels(tr.plan)
    assert kernels["t_cat_0"] == "fused_uvm_caching", kernels
    assert {kernels[f"t_cat_{i}"] for i in (1, 2, 3)} == {"fused"}, kernels
    summary = tr.fit()
    assert summary["steps"] == 30 and _finite_losses(summary)
    assert summary["final"]["auc"] > 0.5


def test_prefetch_pipeline_trains_uvm_cached_tables_as_hbm_tables(info, tmp_path):
    """sharding.prefetch_pipeline: TorchRec's PrefetchTrainPipelineSparseDist fetches the
    next batch's rows into the cache while the current one trains, evaluations go through
    it too; every logged loss and the evaluations equal those of the same tables in HBM
    (the same initial weights, whatever the plan)."""
    from torchrec.distributed.train_pipeline import PrefetchTrainPipelineSparseDist

    from dlrm_torchrec.train.trainer import Trainer

    common = TINY + ["embeddings.num_embeddings_per_feature=[4000000,1000,1000,1000]",
                     "embeddings.dim=64", "model.bottom_mlp=[64,64]", "data.batch_size=1024",
                     "training.max_steps=30", "training.eval_every_n_steps=10",
                     "logging.log_every_n_steps=1", "optimizer.dense=sgd",
                     "optimizer.sparse=sgd", "optimizer.lr=0.5"]
    hbm = Trainer(_cfg(tmp_path / "hbm", common), info).fit()
    tr = Trainer(_cfg(tmp_path / "cached", common + [
        "sharding.hbm_cap_gb=0.5", "sharding.cache_load_factor=0.1",
        "sharding.tables.t_cat_0.compute_kernels=[fused_uvm_caching]",
        "sharding.prefetch_pipeline=true"]), info)
    assert _plan_kernels(tr.plan)["t_cat_0"] == "fused_uvm_caching"
    assert isinstance(tr.pipeline, PrefetchTrainPipelineSparseDist)
    cached = tr.fit()
    _assert_trained_alike(cached, hbm, 30, rtol=1e-5, atol=1e-6, auc=1e-4)
    assert [e["step"] for e in cached["evals"]] == [10, 20, 30]


@pytest.mark.parametrize("options", [
    ["precision.tf32=true"],
    ["precision.dense_autocast=bf16", "precision.embedding_dtype=fp16"],
    ["precision.tf32=true", "precision.dense_autocast=bf16", "precision.embedding_dtype=fp16",
     "precision.comms_forward=bf16", "precision.comms_backward=fp16"],
    ["precision.comms_forward=fp16", "precision.comms_backward=bf16"],
])
@pytest.mark.parametrize("step", ["pipeline", "auto"])
def test_precision_options_train(info, tmp_path, options, step):
    """Each precision option trains with TorchRec's pipeline and with what training.step=auto
    picks on one GPU (the whole step as one CUDA graph: the casts of bf16 autocast and the
    fp16 tables' update are replayed with it)."""
    from dlrm_torchrec.config.embedding_layout import embedding_layout, table_specs
    from dlrm_torchrec.parallel.sharding import embedding_state_keys, local_shards
    from dlrm_torchrec.train.trainer import Trainer

    tr = Trainer(_cfg(tmp_path, TINY + ["training.max_steps=100", f"training.step={step}"]
                      + options), info)
    seen = set()
    for m in tr.model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
    summary = tr.fit()
    assert summary["steps"] == 100 and _finite_losses(summary)
    assert summary["final"]["auc"] > 0.55, summary["final"]
    if step == "auto":  # 20 warm-up steps direct, then one capture replayed
        assert (tr.step_kind, tr.train_step.replays) == ("cuda_graph", 80), tr.train_step.capture_error
    bf16 = "precision.dense_autocast=bf16" in options
    assert seen == ({torch.bfloat16} if bf16 else {torch.float32})
    tf32 = "precision.tf32=true" in options
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
    sd = tr.model.state_dict()
    tables = table_specs(embedding_layout(tr.cfg.embeddings))
    dtypes = {t.dtype for key in embedding_state_keys(sd, tables) for _, _, t in local_shards(sd[key])}
    fp16 = "precision.embedding_dtype=fp16" in options
    assert dtypes == ({torch.float16} if fp16 else {torch.float32})


@pytest.mark.parametrize("config,batch", [("configs/criteo_terabyte.yaml", 2048),
                                          ("configs/mlperf_dcnv2.yaml", 8192)])
def test_reference_configs_with_capped_tables(info, tmp_path, config, batch):
    from dlrm_torchrec.train.trainer import Trainer

    cfg = _cfg(tmp_path, [
        "data.source=random", "data.path=", "embeddings.max_ind_range=1000000",
        f"data.batch_size={batch}", f"data.eval_batch_size={batch}",
        f"data.train_samples={batch * 5}", f"data.eval_samples={batch}",
        "training.eval_every_n_steps=0", "training.target_auc=0", "training.max_steps=5",
        "logging.log_every_n_steps=1", "sharding.device=cuda"], config=config)
    summary = Trainer(cfg, info).fit()
    assert summary["steps"] == 5 and _finite_losses(summary)
    assert summary["final"]["samples"] == batch


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_dense_modules_train_as_eager(info, tmp_path, mode):
    """training.compile (inductor; reduce-overhead adds CUDA graphs) against the eager
    modules: the same losses within float noise (SGD: no step amplifies rounding), and a
    CUDA graph was in fact replayed for reduce-overhead."""
    from dlrm_torchrec.train.trainer import Trainer

    sgd = ["optimizer.dense=sgd", "optimizer.sparse=sgd", "optimizer.lr=0.5",
           "training.max_steps=40", "data.num_workers=0", "training.step=pipeline"]
    runs, trainers = {}, {}
    for m in ("none", mode):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        trainers[m] = Trainer(_cfg(tmp_path / m, TINY + sgd + [f"training.compile={m}"]), info)
        runs[m] = trainers[m].fit()  # the trainer stays alive: its graphs with it
    _assert_trained_alike(runs[mode], runs["none"], steps=40, rtol=2e-3, atol=1e-5, auc=5e-3)
    if mode == "reduce-overhead":
        from torch._inductor.cudagraph_trees import get_container

        manager = get_container(info.device.index).tree_manager
        skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
        assert manager is not None and manager.roots, f"no CUDA graph recorded ({skips} skips)"


@pytest.mark.parametrize("step, optim", [
    ("direct", "sgd"), ("cuda_graph", "sgd"), ("cuda_graph", "adagrad")])
def test_one_rank_steps_train_as_the_pipeline(info, tmp_path, step, optim):
    """training.step direct / cuda_graph against TorchRec's pipeline: the same losses within
    float noise. cuda_graph: the warm-up and the decay (rates change each step) run direct;
    the constant phase and the end after the decay replay graphs (captured twice). With
    Adagrad (dense) and row-wise Adagrad (tables), the replays advance their sums on the
    device."""
    from dlrm_torchrec.train.trainer import Trainer

    sparse = "rowwise_adagrad" if optim == "adagrad" else optim
    sgd = [f"optimizer.dense={optim}", f"optimizer.sparse={sparse}", "optimizer.lr=0.5",
           "lr_schedule.warmup_steps=5", "lr_schedule.decay_start_step=30",
           "lr_schedule.num_decay_steps=5", "training.max_steps=45",
           "logging.log_every_n_steps=1", "data.num_workers=0"]
    runs, trainers = {}, {}
    for kind in ("pipeline", step):
        trainers[kind] = Trainer(_cfg(tmp_path / kind, TINY + sgd + [f"training.step={kind}"]),
                                 info)
        runs[kind] = trainers[kind].fit()
    _assert_trained_alike(runs[step], runs["pipeline"], steps=45, rtol=1e-4, atol=1e-6, auc=1e-4)
    if step == "cuda_graph":
        ts = trainers[step].train_step
        assert not ts.capture_failed, ts.capture_error
        # multipliers (docs/reference.md's schedule): 0.2 0.4 0.6 0.8, 0.8 until step 29, then
        # 1.0 0.64 0.36 0.16 0.04 and 0.04 to the end. Direct: steps 1-4 (changing) and
        # 30-34; captured at step 5 (0.8 twice), again at 35 (0.04 twice): 25 + 11 replays
        assert (ts.replays, ts.direct_steps) == (36, 9)


def test_evaluation_metrics_update_without_a_host_sync():
    """EvalMetrics.update must not wait for the GPU (no boolean index, no torchmetrics
    argument checks): torch's sync debug mode turns any synchronisation into an error. The
    results equal those computed on the CPU."""
    from dlrm_torchrec.train.metrics import EvalMetrics

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(512, generator=g), (torch.rand(512, generator=g) < 0.3).float(),
                torch.ones(512)) for _ in range(4)]
    batches[-1][2][300:] = 0  # padding in the last batch
    on_gpu, on_cpu = EvalMetrics(torch.device("cuda")), EvalMetrics(torch.device("cpu"))
    gpu_batches = [tuple(t.cuda() for t in b) for b in batches]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in gpu_batches:
            on_gpu.update(*b)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for b in batches:
        on_cpu.update(*b)
    got, want = on_gpu.compute(), on_cpu.compute()
    assert got["samples"] == want["samples"] == 4 * 512 - 212
    for key in ("auc", "log_loss", "ne", "calibration", "accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
