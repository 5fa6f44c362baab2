"""Evaluation metrics reduced across ranks: AUC, log loss, normalized entropy, calibration,
accuracy, the click rate (and, for evaluation-only runs, precision, recall, F1 and average
precision).

Normalized entropy (He et al., 2014, "Practical lessons from predicting clicks on ads at
Facebook") is the log loss divided by the entropy of the split's own click rate p,
-(p log p + (1 - p) log(1 - p)): the log loss of always predicting p. Below 1 the model
beats that constant; unlike log loss it can be compared across data with different click
rates. Calibration is the mean predicted probability over the click rate (1: predicted clicks
match observed clicks in total)."""

import math
from typing import Dict

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


class EvalMetrics:
    """Accumulates predictions of real (weight > 0) samples on this rank; `compute()` is a
    collective: every rank must call it. AUC and the threshold metrics come from
    torchmetrics, which gathers the predictions across ranks."""

    def __init__(self, device: torch.device, extended: bool = False):
        self.device = device
        self.auc = BinaryAUROC().to(device)
        self.extra = {}
        if extended:
            self.extra = {
                "precision": BinaryPrecision().to(device),
                "recall": BinaryRecall().to(device),
                "f1": BinaryF1Score().to(device),
                "average_precision": BinaryAveragePrecision().to(device),
            }
        # sums of: log loss, correct at 0.5, samples, positives, predicted probabilities
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        """logits, labels, weights: B (padding has weight 0 and is left out)."""
        mask = weights > 0
        logits, labels = logits[mask].float(), labels[mask].float()
        prob = torch.sigmoid(logits)
        targets = labels.round().long()
        self.auc.update(prob, targets)
        for m in self.extra.values():
            m.update(prob, targets)
        p = prob.double().clamp(LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
        y = labels.double()
        logloss = -(y * p.log() + (1 - y) * (1 - p).log()).sum()
        correct = ((prob > 0.5).double() == y.round()).sum()
        self.sums += torch.stack([logloss, correct, y.new_tensor(float(len(y))), y.sum(),
                                  prob.double().sum()])

    def compute(self) -> Dict[str, float]:
        sums = self.sums.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
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
        out["auc"] = float(self.auc.compute()) if both_classes else math.nan
        # a split of one class has zero entropy and no clicks to calibrate against
        entropy = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr)) if both_classes else 0.0
        out["ne"] = out["log_loss"] / entropy if both_classes else math.nan
        out["calibration"] = predicted / positives if positives > 0 else math.nan
        for name, m in self.extra.items():
            out[name] = float(m.compute())
        return out
