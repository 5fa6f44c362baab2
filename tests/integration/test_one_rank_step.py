"""training.step=direct: one rank trains without TorchRec's pipeline and input distribution,
calling the sharded collection's FBGEMM kernel itself, and computes what the pipeline
computes, step by step. The CUDA-graph kind runs here with a CPU stand-in for the graph
(when it captures, what a replay computes), and on the GPU in tests/gpu."""

import json
import re
from types import SimpleNamespace

import pytest
import torch

from dlrm_torchrec.config import ConfigError, load_config
from dlrm_torchrec.train.one_rank_step import (
    StepUnsupported,
    check_one_rank_step,
    resolve_step_kind,
    single_fused_kernel,
)
from tests.helpers.dist_utils import run_cli, run_ranks
from tests.helpers.graph_on_cpu import CaptureFails, GraphOnCpu, install_graph_on_cpu
from tests.helpers.train_worker import train_worker

TINY = ["data.train_samples=4096", "data.eval_samples=1024", "data.batch_size=256",
        "logging.log_every_n_steps=1", "training.eval_every_n_steps=0",
        "logging.tensorboard=false", "logging.plot=false", "logging.progress_bar=false"]


def _train_each_worker(rank, world_size, runs):
    """train_worker for each (overrides, stand_in) of `runs`, in turn, in this process (one
    start for all). training.step=cuda_graph runs on the CPU stand-in `stand_in` for the
    graph, whose device check passes as on CUDA (every other condition of the step is
    checked as it is)."""
    for overrides, stand_in in runs:
        install_graph_on_cpu(stand_in)
        train_worker(rank, world_size, overrides)


# Adagrad (dense) and row-wise Adagrad (tables) with weight decay; SGD on fp16 tables, the
# DCN interaction and multi-hot bags (pooled sums of several ids). Both with warm-up and
# decay: the fused optimizer's zero_grad hands the tables each step's rate.
@pytest.mark.parametrize("optim", [
    ["optimizer.dense=adagrad", "optimizer.sparse=rowwise_adagrad", "optimizer.weight_decay=1e-4"],
    ["optimizer.dense=sgd", "optimizer.sparse=sgd", "precision.embedding_dtype=fp16",
     "model.interaction=dcn", "model.dcn_low_rank_dim=8", "data.multi_hot_sizes=[3,1,2,1,1,4,1,2]"],
], ids=["adagrad", "sgd-fp16-tables-dcn-multi-hot"])
def test_direct_and_cuda_graph_steps_train_as_the_pipeline_does(tmp_path, optim):
    """Every step's loss, the evaluations on the way and the final metrics of direct, and of
    cuda_graph on the CPU stand-in, against the pipeline's. For cuda_graph that checks its
    logic: when it captures, recaptures and replays, what it copies into the graph's buffers
    and reads out; the replay counts are worked out from the schedule and the data. A
    capture that fails (an operation that waits for the GPU, in some release) is reported
    and the run goes on direct: each batch trained once, as training.step=direct trains it."""
    stand_ins = {"pipeline": GraphOnCpu, "direct": GraphOnCpu, "cuda_graph": GraphOnCpu,
                 "cuda_graph_fails": CaptureFails}
    common = TINY + optim + [
        "optimizer.lr=0.5", "lr_schedule.warmup_steps=5", "lr_schedule.decay_start_step=30",
        "lr_schedule.num_decay_steps=5", "training.eval_every_n_steps=20",
        "data.train_samples=11420"]  # 44 steps of 256, then 156 samples padded to 256
    run_ranks(1, _train_each_worker, [
        (common + [f"training.step={name.removesuffix('_fails')}",
                   f"logging.run_dir={tmp_path / name}"], stand_in)
        for name, stand_in in stand_ins.items()])
    runs = {name: json.loads((tmp_path / name / "metrics.json").read_text())
            for name in stand_ins}
    pipe = runs["pipeline"]
    want = torch.tensor([h["train_loss"] for h in pipe["history"]], dtype=torch.float64)
    assert len(want) == pipe["steps"] == 45
    for name in ("direct", "cuda_graph", "cuda_graph_fails"):
        run = runs[name]
        assert run["steps"] == 45, name
        got = torch.tensor([h["train_loss"] for h in run["history"]], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)
        assert [h["lr"] for h in run["history"]] == [h["lr"] for h in pipe["history"]]
        assert run["train_samples_seen"] == 11420, name
        for key in ("auc", "log_loss", "accuracy"):
            assert run["final"][key] == pytest.approx(pipe["final"][key], rel=1e-6), (name, key)
        # evaluations between the steps (TorchRec's pipeline), then training goes on
        assert [e["step"] for e in run["evals"]] == [20, 40, 45], name
        assert [e["log_loss"] for e in run["evals"]] == pytest.approx(
            [e["log_loss"] for e in pipe["evals"]], rel=1e-6), name
    assert pipe["train_step"] == {"kind": "pipeline"}
    assert runs["direct"]["train_step"] == {"kind": "direct", "direct_steps": 45,
                                            "graph_replays": 0, "capture_failed": False}
    # multipliers (docs/reference.md's schedule): 0.2 0.4 0.6 0.8, 0.8 until step 29, then
    # 1.0 0.64 0.36 0.16 0.04 and 0.04 to the end. Direct: steps 1-4 (changing), 30-34,
    # and 45 (its 100 padding samples have empty bags: fewer ids); captured at step 5
    # (0.8 twice), again at 35 (0.04 twice): 25 + 10 replays
    assert runs["cuda_graph"]["train_step"] == {"kind": "cuda_graph", "direct_steps": 10,
                                                "graph_replays": 35, "capture_failed": False}
    # the capture at step 5 fails: that batch and every later one direct, losses as direct's
    assert [h["train_loss"] for h in runs["cuda_graph_fails"]["history"]] == [
        h["train_loss"] for h in runs["direct"]["history"]]
    assert runs["cuda_graph_fails"]["train_step"] == {
        "kind": "cuda_graph", "direct_steps": 45, "graph_replays": 0, "capture_failed": True,
        "capture_error": "CUDA error: operation not permitted when stream is capturing"}


def _cfg(*overrides):
    return load_config("configs/tiny_cpu.yaml", list(overrides))


@pytest.mark.parametrize("overrides, world, device, message", [
    (["training.step=direct"], 2, "cpu", "training.step=direct runs one rank"),
    (["training.step=cuda_graph"], 1, "cpu", "needs a CUDA device"),
    (["training.step=cuda_graph", "optimizer.dense=adam", "optimizer.sparse=adam"], 1, "cuda",
     "optimizer.dense=adam, optimizer.sparse=adam: use training.step=direct"),
    (["training.step=cuda_graph", "optimizer.dense=sgd", "optimizer.sparse=sgd",
      "training.compile=reduce-overhead"], 1, "cuda", "both make CUDA graphs"),
    (["training.step=direct", "embeddings.qr_threshold=100"], 1, "cpu", "QR/MD"),
    (["training.step=direct", "sharding.compute_kernel=dense"], 1, "cpu",
     "sharding.compute_kernel=['dense']"),
    (["training.step=direct", "sharding.tables.t_cat_0.compute_kernels=[fused_uvm_caching]"], 1,
     "cuda", "sharding.tables.t_cat_0.compute_kernels=['fused_uvm_caching']"),
    (["training.step=direct", "sharding.sharding_type=data_parallel"], 1, "cpu",
     "data_parallel tables"),
])
def test_what_the_one_rank_step_cannot_do_is_a_config_error(overrides, world, device, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_one_rank_step(_cfg(*overrides), world, device)


@pytest.mark.parametrize("overrides, world, device, kind", [
    ([], 2, "cpu", "pipeline"),
    ([], 1, "cpu", "direct"),
    ([], 1, "cuda", "cuda_graph"),  # the config's Adagrad and row-wise Adagrad
    (["optimizer.dense=adam"], 1, "cuda", "direct"),
    (["training.compile=default"], 1, "cuda", "direct"),
    (["training.compile=reduce-overhead"], 1, "cuda", "direct"),
    (["embeddings.md_alpha=0.3"], 1, "cuda", "pipeline"),
    (["sharding.compute_kernel=fused_uvm_caching"], 1, "cuda", "pipeline"),
    (["sharding.sharding_type=data_parallel"], 1, "cpu", "pipeline"),
])
def test_auto_step_picks_the_fastest_kind_the_run_allows(overrides, world, device, kind):
    assert resolve_step_kind(_cfg(*overrides), world, device) == kind


def test_a_configured_step_kind_is_checked_not_replaced():
    assert resolve_step_kind(_cfg("training.step=pipeline"), 1, "cuda") == "pipeline"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_step_kind(_cfg("training.step=cuda_graph"), 1, "cpu")


def test_cuda_graph_step_takes_the_configs_adagrad():
    check_one_rank_step(_cfg("training.step=cuda_graph"), 1, "cuda")  # adagrad, rowwise_adagrad


def test_pipeline_step_has_no_one_rank_conditions():
    check_one_rank_step(_cfg("optimizer.dense=adam", "embeddings.qr_threshold=100"), 8, "cpu")


def test_unknown_step_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="training.step='graph'"):
        _cfg("training.step=graph")


def test_a_plan_with_several_kernel_groups_is_refused_with_what_it_made():
    lookup = SimpleNamespace(_emb_modules=[object(), object()])
    with pytest.raises(StepUnsupported, match="the plan made 2"):
        single_fused_kernel(SimpleNamespace(_lookups=[lookup]), ["cat_0", "cat_1"])


def test_cuda_graph_step_on_cpu_stops_before_training_with_one_error_line(tmp_path):
    """From the entry point: one `error:` line naming the key, exit status 2."""
    proc = run_cli(
        ["-m", "dlrm_torchrec.train", "--config", "configs/tiny_cpu.yaml",
         *TINY, "training.step=cuda_graph", f"logging.run_dir={tmp_path}"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "training.step=cuda_graph needs a CUDA device" in proc.stderr
    assert "Traceback" not in proc.stderr


def _stop_and_resume_worker(rank, world_size, common, run_dirs, signal_step):
    """An uninterrupted direct run; then one that gets SIGTERM during step `signal_step` (in
    the middle of the data between two evaluations, while the step holds the next batch,
    taken ahead), and its resumed run."""
    import os
    import signal

    from dlrm_torchrec.train.preemption import Preempted
    from dlrm_torchrec.train.trainer import Trainer

    train_worker(rank, world_size, common + [f"logging.run_dir={run_dirs[0]}"])
    inject = Trainer._maybe_inject_crash

    def sigterm_at_step(self):
        if self.step == signal_step:
            os.kill(os.getpid(), signal.SIGTERM)

    Trainer._maybe_inject_crash = sigterm_at_step
    try:
        with pytest.raises(Preempted):
            train_worker(rank, world_size, common + [f"logging.run_dir={run_dirs[1]}"])
    finally:
        Trainer._maybe_inject_crash = inject
    train_worker(rank, world_size, common + [f"logging.run_dir={run_dirs[1]}",
                                              "checkpoint.resume=auto"])


def test_direct_step_stopped_between_evaluations_resumes_as_if_never_stopped(tmp_path):
    """The direct step takes each batch one step ahead: a run stopped by SIGTERM drops that
    batch, and the resumed run trains it (the checkpoint's data position), so every step's
    loss and the final metrics are the uninterrupted run's."""
    common = TINY + ["training.step=direct", "training.eval_every_n_steps=20",
                     "data.train_samples=10240", "optimizer.lr=0.5"]  # 40 steps
    dirs = [tmp_path / "whole", tmp_path / "stopped"]
    run_ranks(1, _stop_and_resume_worker, common, [str(d) for d in dirs], 13)
    whole, resumed = (json.loads((d / "metrics.json").read_text()) for d in dirs)
    # a lone process stops at the step its signal arrived in
    assert resumed["history"][12]["step"] == 13 and resumed["steps"] == 40
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx(
        [h["train_loss"] for h in whole["history"]], rel=1e-6)
    assert resumed["train_samples_seen"] == whole["train_samples_seen"] == 10240
    assert resumed["final"]["auc"] == pytest.approx(whole["final"]["auc"], rel=1e-6)


def test_a_pipeline_checkpoint_resumes_with_the_direct_step_as_it_would_with_the_pipeline(
        tmp_path):
    """training.step changes how a step runs, not what it computes or what the checkpoint
    holds: a pipeline run's checkpoint at step 20 (Adagrad and row-wise Adagrad state
    included) resumed with training.step=direct gives the uninterrupted pipeline run's
    losses for steps 21-40 and its final metrics."""
    common = TINY + ["data.train_samples=10240", "optimizer.lr=0.5", "training.step=pipeline",
                     "training.eval_every_n_steps=20"]  # 40 steps; adagrad, rowwise_adagrad
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_ranks(1, _train_each_worker, [
        (common + [f"logging.run_dir={whole}"], GraphOnCpu),
        (common + [f"logging.run_dir={part}", "training.max_steps=20"], GraphOnCpu),
        (common + [f"logging.run_dir={part}", "training.step=direct", "checkpoint.resume=auto"],
         GraphOnCpu)])
    want, got = (json.loads((d / "metrics.json").read_text()) for d in (whole, part))
    assert got["steps"] == 40 and got["train_step"]["direct_steps"] == 20
    assert [h["train_loss"] for h in got["history"]] == pytest.approx(
        [h["train_loss"] for h in want["history"]], rel=1e-6)
    assert got["final"]["auc"] == pytest.approx(want["final"]["auc"], rel=1e-6)


def _train_each_plain_worker(rank, world_size, runs):
    for overrides in runs:
        train_worker(rank, world_size, overrides)


def test_auto_step_trains_one_cpu_rank_direct_and_falls_back_to_the_pipeline_for_split_plans(
        tmp_path):
    """training.step=auto, the default: one CPU rank trains with the direct step; a plan
    that puts the tables in two kernel groups (one table table-wise, the others
    table-column-wise) has no single kernel to call, so the same run goes to TorchRec's
    pipeline instead of stopping. Both train every step (losses checked against the
    pipeline in the tests above)."""
    common = TINY + ["training.max_steps=6"]
    # both types pinned: left to itself the planner picks either for the other tables
    split = ["sharding.sharding_type=table_column_wise",
             "sharding.tables.t_cat_0.sharding_types=[table_wise]"]
    run_ranks(1, _train_each_plain_worker, [
        common + [f"logging.run_dir={tmp_path / 'plain'}"],
        common + split + [f"logging.run_dir={tmp_path / 'split'}"]])
    plain, fallback = (json.loads((tmp_path / d / "metrics.json").read_text())
                       for d in ("plain", "split"))
    assert plain["steps"] == fallback["steps"] == 6
    assert plain["train_step"] == {"kind": "direct", "configured": "auto", "direct_steps": 6,
                                   "graph_replays": 0, "capture_failed": False}
    assert fallback["train_step"] == {"kind": "pipeline", "configured": "auto"}
