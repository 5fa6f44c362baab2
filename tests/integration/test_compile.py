"""training.compile: the data-parallel modules run through torch.compile (inductor) and
compute what the eager modules compute, alone and in a 2-rank sharded training run."""

import json

import pytest
import torch

from dlrm_torchrec.config import ConfigError, load_config
from dlrm_torchrec.data import build_data_source
from dlrm_torchrec.model.dlrm import build_train_module, compile_dense_modules
from tests.helpers.dist_utils import run_ranks
from tests.helpers.train_worker import train_worker

TINY = ["data.train_samples=3072", "data.eval_samples=512", "data.batch_size=256",
        "logging.log_every_n_steps=2", "embeddings.num_embeddings_per_feature=[300,50,700,20]"]


def _module_and_batch(overrides):
    cfg = load_config("configs/tiny_cpu.yaml", TINY + overrides)
    module = build_train_module(cfg, device=torch.device("cpu"))
    src = build_data_source(cfg.data, cfg.embeddings, cfg.model.dense_in_features, 0, 1)
    return module, next(iter(src.batches("train")))


@pytest.mark.parametrize("interaction", ["dot", "dcn"])
def test_compiled_modules_match_eager_loss_and_gradients(interaction):
    over = [f"model.interaction={interaction}", "model.dcn_low_rank_dim=8"]
    eager, batch = _module_and_batch(over)
    compiled, _ = _module_and_batch(over)
    names = [n for n, _ in compiled.named_parameters()]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    targets = compile_dense_modules(compiled, "default")
    assert len(targets) == 4
    # in place: the parameter names (checkpoints, DDP, optimizers) stay as they were
    assert [n for n, _ in compiled.named_parameters()] == names

    results = []
    for module in (eager, compiled):
        loss, (_, logits, _, _) = module(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append((loss.detach(), logits, grads))
    # every compiled module produced a graph (none fell back to eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 4
    (l0, z0, g0), (l1, z1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z1, z0, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g0.keys() and len(g0) > 6
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


def test_two_ranks_train_the_same_with_compiled_dense_modules(tmp_path):
    # SGD: Adagrad's first steps move every weight by about +-lr whatever the size of its
    # gradient, so rounding-level differences of near-zero gradients would grow into
    # visible ones and hide what is compared here
    sgd = ["optimizer.dense=sgd", "optimizer.sparse=sgd", "optimizer.lr=0.5"]
    hist = {}
    for mode in ("none", "default"):
        run_dir = tmp_path / mode
        run_ranks(2, train_worker, TINY + sgd + [f"training.compile={mode}",
                                                 f"logging.run_dir={run_dir}"])
        hist[mode] = json.loads((run_dir / "metrics.json").read_text())
    eager, compiled = hist["none"], hist["default"]
    assert compiled["steps"] == eager["steps"] == 12
    got = torch.tensor([h["train_loss"] for h in compiled["history"]])
    want = torch.tensor([h["train_loss"] for h in eager["history"]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for key in ("auc", "log_loss"):
        assert abs(compiled["final"][key] - eager["final"][key]) < 1e-5, key


def test_unknown_compile_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="training.compile='fast'"):
        load_config(None, ["training.compile=fast"])


def test_compile_without_a_cpp_compiler_is_a_config_error_not_a_traceback(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, CXX=str(tmp_path / "no-such-g++"), PATH="/nonexistent")
    env.pop("TORCH_INDUCTOR_INSTALL_GXX", None)
    proc = subprocess.run(
        [sys.executable, "-m", "dlrm_torchrec.train", "--config", "configs/tiny_cpu.yaml",
         *TINY, "training.compile=default", f"logging.run_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "training.compile='default': torch.compile on CPU needs a C++ compiler" in proc.stderr
    assert "Traceback" not in proc.stderr


def _train_each(rank, world_size, runs):
    for overrides in runs:
        train_worker(rank, world_size, overrides)


def test_one_rank_direct_step_with_compiled_dense_modules_trains_as_the_eager_pipeline(tmp_path):
    """training.step=direct calls the model's dense modules itself: compiled, they compute
    what the eager ones compute in TorchRec's pipeline."""
    sgd = ["optimizer.dense=sgd", "optimizer.sparse=sgd", "optimizer.lr=0.5"]
    runs = {"pipeline": ["training.compile=none"],
            "direct": ["training.step=direct", "training.compile=default"]}
    run_ranks(1, _train_each, [TINY + sgd + extra + [f"logging.run_dir={tmp_path / name}"]
                               for name, extra in runs.items()])
    eager, compiled = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in runs)
    assert compiled["steps"] == eager["steps"] == 12
    assert compiled["train_step"]["direct_steps"] == 12
    got = torch.tensor([h["train_loss"] for h in compiled["history"]])
    want = torch.tensor([h["train_loss"] for h in eager["history"]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert abs(compiled["final"]["auc"] - eager["final"]["auc"]) < 1e-5
