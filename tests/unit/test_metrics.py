"""Evaluation metrics against values computed by hand, and the same metrics from two gloo
ranks that each see half of the predictions."""

import math

import pytest
import torch

from dlrm_torchrec.train.metrics import EvalMetrics
from tests.dist_utils import run_ranks

# six real samples and two padding ones (weight 0, garbage logits, even NaN)
LOGITS = [2.0, -1.0, 0.5, -3.0, 1.0, 0.0, 9.0, float("nan")]
LABELS = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
WEIGHTS = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def by_hand():
    """Plain-Python metrics of the six real samples."""
    pairs = [(1 / (1 + math.exp(-z)), y) for z, y, w in zip(LOGITS, LABELS, WEIGHTS) if w > 0]
    n = len(pairs)
    log_loss = -sum(y * math.log(p) + (1 - y) * math.log(1 - p) for p, y in pairs) / n
    ctr = sum(y for _, y in pairs) / n  # 3 of 6
    entropy = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))  # log 2
    pos = [p for p, y in pairs if y == 1]
    neg = [p for p, y in pairs if y == 0]
    auc = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))
    return {
        "samples": n, "log_loss": log_loss, "ctr": ctr, "ne": log_loss / entropy,
        "calibration": sum(p for p, _ in pairs) / sum(y for _, y in pairs),
        "accuracy": sum((p > 0.5) == (y == 1) for p, y in pairs) / n, "auc": auc,
    }


def _update(metrics, sl=slice(None)):
    metrics.update(torch.tensor(LOGITS[sl]), torch.tensor(LABELS[sl]), torch.tensor(WEIGHTS[sl]))


def test_metrics_equal_hand_computed_values_and_ignore_padding():
    m = EvalMetrics(torch.device("cpu"))
    _update(m, slice(0, 3))  # two updates, as two batches
    _update(m, slice(3, None))
    got, want = m.compute(), by_hand()
    assert got["samples"] == 6
    for key in ("log_loss", "ctr", "ne", "calibration", "accuracy", "auc"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key  # float32 sigmoid
    # the predicted clicks (sum of probabilities) vs the 3 observed ones
    assert want["calibration"] == pytest.approx(
        (1 / (1 + math.exp(-2)) + 1 / (1 + math.exp(1)) + 1 / (1 + math.exp(-0.5))
         + 1 / (1 + math.exp(3)) + 1 / (1 + math.exp(-1)) + 0.5) / 3)


def test_predicting_the_click_rate_has_normalized_entropy_one():
    m = EvalMetrics(torch.device("cpu"))
    rate = 0.25  # every prediction is the split's own click rate
    logit = math.log(rate / (1 - rate))
    m.update(torch.full((8,), logit), torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0]), torch.ones(8))
    got = m.compute()
    assert got["ne"] == pytest.approx(1.0, rel=1e-6)
    assert got["calibration"] == pytest.approx(1.0, rel=1e-6)


def test_a_split_of_one_class_has_no_auc_ne_or_calibration_instead_of_an_error():
    m = EvalMetrics(torch.device("cpu"))
    m.update(torch.tensor([0.3, -0.2]), torch.zeros(2), torch.ones(2))
    got = m.compute()
    assert math.isnan(got["auc"]) and math.isnan(got["ne"]) and math.isnan(got["calibration"])
    assert got["ctr"] == 0.0 and got["accuracy"] == 0.5


def _two_rank_worker(rank, world_size, out_path):
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo")
    m = EvalMetrics(torch.device("cpu"))
    # rank 0 sees samples 0-3 (all real), rank 1 samples 4-7 (two real, two padding)
    _update(m, slice(4 * rank, 4 * rank + 4))
    got = m.compute()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(got, f)
    dist.destroy_process_group()


def test_two_ranks_compute_the_metrics_of_all_their_samples(tmp_path):
    import json

    out = tmp_path / "metrics.json"
    run_ranks(2, _two_rank_worker, str(out))
    got, want = json.loads(out.read_text()), by_hand()
    assert got["samples"] == 6
    for key in ("log_loss", "ctr", "ne", "calibration", "accuracy", "auc"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key  # float32 sigmoid


def _one_rank_worker(rank, world_size, out_path):
    import json

    import torch.distributed as dist

    def no_collectives(*args, **kwargs):
        raise AssertionError("a collective in a world of one rank")

    dist.init_process_group("gloo")
    dist.all_gather = dist.all_reduce = dist.all_gather_object = no_collectives
    m = EvalMetrics(torch.device("cpu"), extended=True)
    _update(m)
    with open(out_path, "w") as f:
        json.dump(m.compute(), f)
    dist.destroy_process_group()


def test_one_rank_computes_the_metrics_without_collectives(tmp_path):
    """A one-rank run (one GPU) has nothing to gather: torchmetrics' all-gather there cost two
    collectives per evaluation, and failed for metrics on the CPU under NCCL (seen on the
    H200). Under any collective the worker raises."""
    import json

    out = tmp_path / "metrics.json"
    run_ranks(1, _one_rank_worker, str(out))
    got, want = json.loads(out.read_text()), by_hand()
    assert got["samples"] == 6
    for key in ("log_loss", "ctr", "ne", "calibration", "accuracy", "auc"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
