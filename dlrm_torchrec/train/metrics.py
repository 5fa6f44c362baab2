"""Evaluation metrics reduced across ranks: AUC, log loss, normalized entropy, calibration,
accuracy, the click rate (and, for evaluation-only runs, precision, recall, F1 and average
precision).

Normalized entropy (He et al., 2014, "Practical lessons from predicting clicks on ads at
Facebook") is the log loss divided by the entropy of the split's own click rate p,
-(p log p + (1 - p) log(1 - p)): the log loss of always predicting p. Below 1 the model
beats that constant; unlike log loss it can be compared across data with different click
rates. Calibration is the mean predicted probability over the click rate (1: predicted clicks
match observed clicks in total).

`update` makes no host synchronisation, so on a GPU the evaluation loop runs ahead like the
training loop: padding is left out of the sums with `torch.where` (a boolean index would wait
for the device to know the count) and out of the AUC by one boolean index in `compute`, and
torchmetrics gets every prediction in one update there, without its per-update argument
checks (`torch.unique` of the labels, another synchronisation).
"""

import math
from typing import Dict, List

import torch
import torch.distributed as dist
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryAveragePrecision,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
)

LOG_LOSS_EPS = 1e-12


def _several_ranks() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


class EvalMetrics:
    """Accumulates predictions of real (weight > 0) samples on this rank; `compute()`, called
    once at the end, is a collective: every rank must call it. AUC and the threshold metrics come from
    torchmetrics, which gathers the predictions across ranks."""

    def __init__(self, device: torch.device, extended: bool = False, gather: bool = True):
        """gather: reduce over every rank of the process group (False: this process alone)."""
        self.device = device
        self.gather = gather and _several_ranks()
        # labels are checked to be 0/1 here (rounded), not by torchmetrics per update; with one
        # rank there is nothing to gather (torchmetrics would still all-gather over the world
        # of one, and a CPU metric under NCCL cannot)
        kw = {"validate_args": False, "sync_on_compute": self.gather}
        self.auc = BinaryAUROC(**kw).to(device)
        self.extra = {}
        if extended:
            self.extra = {
                "precision": BinaryPrecision(**kw).to(device),
                "recall": BinaryRecall(**kw).to(device),
                "f1": BinaryF1Score(**kw).to(device),
                "average_precision": BinaryAveragePrecision(**kw).to(device),
            }
        # sums of: log loss, correct at 0.5, samples, positives, predicted probabilities
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        # per batch: probabilities (B, float32), 0/1 targets (B, uint8), real-sample mask (B)
        self._probs: List[torch.Tensor] = []
        self._targets: List[torch.Tensor] = []
        self._real: List[torch.Tensor] = []

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        """logits, labels, weights: B (padding has weight 0 and is left out)."""
        self.update_probabilities(torch.sigmoid(logits.float()), labels, weights)

    @torch.no_grad()
    def update_probabilities(self, prob: torch.Tensor, labels: torch.Tensor,
                             weights: torch.Tensor) -> None:
        """prob, labels, weights: B; as `update`, from click probabilities."""
        real = weights > 0
        y = labels.double()
        p = prob.double().clamp(LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
        logloss = torch.where(real, y * p.log() + (1 - y) * (1 - p).log(), 0.0).sum().neg()
        correct = (real & ((prob > 0.5) == (y.round() == 1))).sum()
        self.sums += torch.stack([logloss, correct.double(), real.sum().double(),
                                  torch.where(real, y, 0.0).sum(),
                                  torch.where(real, prob.double(), 0.0).sum()])
        self._probs.append(prob.float())
        self._targets.append(y.round().to(torch.uint8))
        self._real.append(real)

    def compute(self) -> Dict[str, float]:
        sums = self.sums.clone()
        if self.gather:
            dist.all_reduce(sums)
        logloss, correct, count, positives, predicted = sums.tolist()
        out = {"samples": int(count)}
        if count == 0:
            return out
        out["log_loss"] = logloss / count
        out["accuracy"] = correct / count
        ctr = positives / count
        out["ctr"] = ctr
        both_classes = 0 < positives < count
        # this rank's real predictions, handed to torchmetrics once (every rank has the same
        # number of batches, so count > 0 means each has some); compute() gathers them
        real = torch.cat(self._real)
        prob, target = torch.cat(self._probs)[real], torch.cat(self._targets)[real].long()
        for m in [self.auc, *self.extra.values()]:
            m.update(prob, target)
        # the same decision on every rank (all-reduced sums): they gather together
        out["auc"] = float(self.auc.compute()) if both_classes else math.nan
        # a split of one class has zero entropy and no clicks to calibrate against
        entropy = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr)) if both_classes else 0.0
        out["ne"] = out["log_loss"] / entropy if both_classes else math.nan
        out["calibration"] = predicted / positives if positives > 0 else math.nan
        for name, m in self.extra.items():
            out[name] = float(m.compute())
        return out


def prediction_metrics(prob: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Samples, AUC, log loss and accuracy of click probabilities `prob` against `labels` (both
    N, every sample real) in this process alone: how export checks its programs and how
    scoring reports labelled rows, computed by `EvalMetrics` as evaluation computes them."""
    metrics = EvalMetrics(prob.device, gather=False)
    metrics.update_probabilities(prob, labels, torch.ones_like(labels))
    out = metrics.compute()
    return {k: out[k] for k in ("samples", "log_loss", "accuracy", "auc") if k in out}
