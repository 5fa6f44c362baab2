"""The batch that flows from every data source through TorchRec's train pipeline."""

from dataclasses import dataclass
from typing import List

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """One rank's share of a global batch.

    Attributes:
        dense_features: B x D float32.
        sparse_features: KJT with F keys and stride B (one bag per sample and feature).
        labels: B float32 in {0, 1}.
        weights: B float32; 0 for padding, else the sample's weight in the global-batch mean
            loss: 1, or B / n in the last global batch of an epoch when it holds only n < B
            real samples. That tail is padded to the full per-rank batch with weight-0
            samples whose bags are empty, so every rank runs the same shapes, every real
            sample is used exactly once, and the last step averages over its n samples.
    """

    dense_features: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor
    weights: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            weights=self.weights.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense_features.record_stream(stream)
        self.sparse_features.record_stream(stream)
        self.labels.record_stream(stream)
        self.weights.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            weights=self.weights.pin_memory(),
        )

    @property
    def num_real(self) -> int:
        """Samples that are not padding."""
        return int((self.weights > 0).sum().item())


def rank_slice(batch_index: int, global_batch: int, world_size: int, rank: int,
               num_samples: int) -> slice:
    """Sample range of `rank`'s share of global batch `batch_index` in an epoch of
    `num_samples`: contiguous, rank-major, clipped to the epoch (may be empty)."""
    per_rank = global_batch // world_size
    start = batch_index * global_batch + rank * per_rank
    stop = min(start + per_rank, num_samples)
    start = min(start, num_samples)
    return slice(start, stop)


def num_batches(num_samples: int, global_batch: int) -> int:
    """Global batches per epoch: the last, partial one is kept (padded), never dropped."""
    return -(-num_samples // global_batch)


def sample_weight(batch_index: int, global_batch: int, num_samples: int) -> float:
    """Loss weight of the real samples of global batch `batch_index`: B / n_real."""
    real = min(global_batch, num_samples - batch_index * global_batch)
    return global_batch / real if real > 0 else 0.0


def make_batch(dense: np.ndarray, values: np.ndarray, lengths: np.ndarray,
               labels: np.ndarray, feature_names: List[str], batch_size: int,
               weight: float = 1.0) -> Batch:
    """Assemble a Batch from numpy arrays of n <= batch_size real samples, padding to
    `batch_size` with weight-0 samples whose bags are empty.

    Args:
        dense: n x D float32.
        values: all ids, feature-major then sample-major (int64): feature 0's n bags, ...
        lengths: F x n bag lengths.
        labels: n labels.
        feature_names: the F KJT keys, in order.
        batch_size: the padded per-rank batch B.
        weight: loss weight of the real samples (see `sample_weight`).
    """
    n = len(labels)
    if n > batch_size:
        raise ValueError(f"{n} samples exceed the batch size {batch_size}")
    # numpy allocations: torch's parallel fill wakes its thread pool per call, which costs
    # milliseconds when the cores are busy
    dense_np = np.zeros((batch_size, dense.shape[1]), dtype=np.float32)
    dense_np[:n] = dense
    labels_np = np.zeros(batch_size, dtype=np.float32)
    labels_np[:n] = np.asarray(labels).reshape(-1)
    weights_np = np.zeros(batch_size, dtype=np.float32)
    weights_np[:n] = weight
    lengths_np = np.zeros((len(feature_names), batch_size), dtype=np.int64)
    lengths_np[:, :n] = lengths
    # per-key totals from numpy, so the KJT needs no reduction of its own
    length_per_key = lengths_np.sum(axis=1).tolist()
    kjt = KeyedJaggedTensor(
        keys=list(feature_names),
        values=torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)),
        lengths=torch.from_numpy(lengths_np.ravel()),
        stride=batch_size,
        length_per_key=length_per_key,
        offset_per_key=[0] + np.cumsum(length_per_key).tolist(),
    )
    return Batch(torch.from_numpy(dense_np), kjt, torch.from_numpy(labels_np),
                 torch.from_numpy(weights_np))
