"""End-to-end training: it learns the synthetic click model, sees every sample exactly once
(also with 2 ranks and a ragged last batch), stops early at a target, and runs as a plain
single process."""

import json

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from dlrm_torchrec.config import load_config
from dlrm_torchrec.data import build_data_source
from tests.helpers.dist_utils import run_cli, run_ranks
from tests.helpers.train_worker import train_worker

SMALL = [
    "data.train_samples=80100", "data.eval_samples=8192", "data.batch_size=256",
    "training.eval_every_n_steps=0", "logging.log_every_n_steps=40",
]


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def oracle_auc(overrides):
    """The best AUC achievable on the validation split: that of the click model's own
    probabilities."""
    cfg = load_config("configs/tiny_cpu.yaml", overrides)
    src = build_data_source(cfg.data, cfg.embeddings, cfg.model.dense_in_features, 0, 1)
    labels, prob = src.oracle_probabilities("val")
    return float(binary_auroc(torch.tensor(prob), torch.tensor(labels).long()))


def test_two_ranks_learn_the_click_model_and_see_every_sample_once(tmp_path):
    overrides = SMALL + [f"logging.run_dir={tmp_path}"]
    run_ranks(2, train_worker, overrides)
    m = _metrics(tmp_path)
    # 80100 = 312 full batches of 256 + 228: the last batch is kept, not dropped
    assert m["steps"] == 313
    assert m["train_samples_seen"] == 80100
    assert m["final"]["samples"] == 8192
    best = oracle_auc(overrides)
    auc = m["final"]["auc"]
    assert auc > 0.75, auc
    assert auc > best - 0.1, (auc, best)
    assert (tmp_path / "config.yaml").is_file()


def test_early_stop_at_target_auc(tmp_path):
    overrides = SMALL + ["training.target_auc=0.7", "training.eval_every_n_steps=20",
                         f"logging.run_dir={tmp_path}"]
    run_ranks(1, train_worker, overrides)
    m = _metrics(tmp_path)
    assert m["stopped_early"] is True
    assert m["steps"] < 313 and m["steps"] % 20 == 0
    assert m["final"]["auc"] >= 0.7
    # the evaluation before the last one had not reached the target
    assert all(e["auc"] < 0.7 for e in m["evals"][:-1])


def test_max_steps_bounds_the_run(tmp_path):
    run_ranks(1, train_worker, SMALL + ["training.max_steps=7", f"logging.run_dir={tmp_path}"])
    m = _metrics(tmp_path)
    assert m["steps"] == 7 and m["train_samples_seen"] == 7 * 256


def _train_and_list_live_models(rank, world_size, overrides, out_dir):
    import gc

    from torchrec.distributed.types import ShardedModule

    from dlrm_torchrec.train.job import train

    train(load_config("configs/tiny_cpu.yaml", overrides))
    # no gc.collect() here: what is alive now would otherwise die in the interpreter's exit
    live = sorted(type(o).__name__ for o in gc.get_objects() if isinstance(o, ShardedModule))
    (out_dir / f"live_{rank}.json").write_text(json.dumps(live))


def test_a_finished_run_lets_go_of_its_sharded_model_before_the_process_exits(tmp_path):
    """The sharded model's all-to-alls hold the gloo groups and sit in reference cycles; left
    to the interpreter's exit, the groups were torn down mid-finalisation and a rank now and
    then died of SIGABRT after a finished run. train() must release them itself."""
    run_ranks(2, _train_and_list_live_models,
              SMALL + ["training.max_steps=3", f"logging.run_dir={tmp_path}"], tmp_path)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"live_{rank}.json").read_text()) == [], rank


def test_plain_single_process_entry_point(tmp_path):
    proc = run_cli(
        ["-m", "dlrm_torchrec.train", "--config", "configs/tiny_cpu.yaml",
         "data.train_samples=2048", "data.eval_samples=1024", f"logging.run_dir={tmp_path}"],
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sharding plan (1 ranks, cpu)" in proc.stdout
    m = _metrics(tmp_path)
    assert m["train_samples_seen"] == 2048
    # the peak resident memory of the process: more than torch alone, less than the machine
    assert m["peak_memory"]["kind"] == "process rss"
    assert 0.2 < m["peak_memory"]["gb"] < 16, m["peak_memory"]
    assert f"peak memory {m['peak_memory']['gb']:.2f} GB (process rss, rank 0)" in proc.stdout


@pytest.mark.slow  # 50 s (6 processes on 2 cores): CI runs it; make test stays under 15 min
def test_loader_workers_train_exactly_as_the_training_process_alone(tmp_path):
    """Two ranks, batches built by 2 worker processes each vs by the ranks themselves:
    the same losses and the same final metrics."""
    runs = {}
    for workers in (0, 2):
        run_dir = tmp_path / f"w{workers}"
        run_ranks(2, train_worker, [
            "data.train_samples=4100", "data.eval_samples=1024", "data.batch_size=256",
            "logging.log_every_n_steps=4", f"data.num_workers={workers}",
            f"logging.run_dir={run_dir}"])
        runs[workers] = _metrics(run_dir)
    base, piped = runs[0], runs[2]
    assert piped["steps"] == base["steps"] == 17
    assert piped["train_samples_seen"] == 4100
    assert [h["train_loss"] for h in piped["history"]] == [h["train_loss"] for h in base["history"]]
    assert piped["final"]["auc"] == base["final"]["auc"]
    assert piped["final"]["log_loss"] == base["final"]["log_loss"]


def test_one_rank_moves_the_dense_modules_to_the_training_device():
    """With one rank the trainer skips DDP (sharding._SingleProcess), and DDP's wrapper is
    where TorchRec moves the dense MLPs to the device: skipping it left them on the CPU of a
    GPU machine. `meta` stands in for `cuda` here (a real move, on a CPU-only machine)."""
    from types import SimpleNamespace

    from torch import nn

    from dlrm_torchrec.parallel.sharding import _SingleProcess

    dmp = SimpleNamespace(_dmp_wrapped_module=nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)))
    _SingleProcess().wrap(dmp, env=None, device=torch.device("meta"))
    assert {p.device.type for p in dmp._dmp_wrapped_module.parameters()} == {"meta"}
