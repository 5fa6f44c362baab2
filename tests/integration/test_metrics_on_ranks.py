"""Evaluation metrics from rank processes: two gloo ranks that each see half of the
predictions compute the metrics of all of them, and one rank computes them without a
collective. (The metrics against values computed by hand: tests/unit/test_metrics.py.)"""

import pytest
import torch

from dlrm_torchrec.train.metrics import EvalMetrics
from tests.helpers.dist_utils import run_ranks
from tests.helpers.metric_samples import by_hand, update


def _two_rank_worker(rank, world_size, out_path):
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo")
    m = EvalMetrics(torch.device("cpu"))
    # rank 0 sees samples 0-3 (all real), rank 1 samples 4-7 (two real, two padding)
    update(m, slice(4 * rank, 4 * rank + 4))
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
    update(m)
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
