"""Eight predictions for the metrics tests, two of them padding (weight 0, garbage logits),
their metrics computed by hand in plain Python (`by_hand`), and `update`, which feeds a
slice of them to an EvalMetrics."""

import math

import torch

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


def update(metrics, sl=slice(None)):
    metrics.update(torch.tensor(LOGITS[sl]), torch.tensor(LABELS[sl]), torch.tensor(WEIGHTS[sl]))
