"""Evaluation metrics against values computed by hand. (The same metrics from rank processes:
tests/integration/test_metrics_on_ranks.py.)"""

import math

import pytest
import torch

from dlrm_torchrec.train.metrics import EvalMetrics
from tests.helpers.metric_samples import by_hand, update


def test_metrics_equal_hand_computed_values_and_ignore_padding():
    m = EvalMetrics(torch.device("cpu"))
    update(m, slice(0, 3))  # two updates, as two batches
    update(m, slice(3, None))
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
