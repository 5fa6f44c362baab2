"""Evaluation metrics reduced across ranks: AUC, log loss, accuracy (and, for
evaluation-only runs, precision, recall, F1 and average precision)."""

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
        # sum of log loss, number correct at 0.5, number of samples, number of positives
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

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
        self.sums += torch.stack([logloss, correct, y.new_tensor(float(len(y))), y.sum()])

    def compute(self) -> Dict[str, float]:
        sums = self.sums.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        logloss, correct, count, positives = sums.tolist()
        out = {"samples": int(count)}
        if count == 0:
            return out
        out["log_loss"] = logloss / count
        out["accuracy"] = correct / count
        out["ctr"] = positives / count
        out["auc"] = float(self.auc.compute()) if 0 < positives < count else math.nan
        for name, m in self.extra.items():
            out[name] = float(m.compute())
        return out
