"""Generated data: `random` (uniform, like the reference's --data-generation=random) and
`synthetic` (learnable: labels drawn from a known click model).

Every value is a counter-based hash of (seed, split, epoch, sample index, field), so a
sample is the same whatever the world size, and each rank computes only its own share.
"""

from typing import Iterator, List, Optional

import numpy as np

from dlrm_torchrec.data.batch import Batch, make_batch, num_batches, rank_slice, sample_weight
from dlrm_torchrec.data.hashing import hash_keys, normal, uniform01

_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}

class GeneratedSource:
    """Random or synthetic data, each rank producing only its own share of each batch.

    Args:
        kind: "random" or "synthetic".
        table_sizes: rows of each feature's table (ids are drawn below these).
        dense_in_features: D.
        batch_size / eval_batch_size: global batch sizes.
        train_samples / eval_samples: samples per epoch / per evaluation split.
        bag_sizes: per feature, the (maximum) ids per bag.
        fixed_bag_size: every bag has exactly its bag size; otherwise 1..size at random.
        seed: data seed.
        rank / world_size: this process's share.
    """

    def __init__(self, kind: str, table_sizes: List[int], dense_in_features: int,
                 batch_size: int, eval_batch_size: int, train_samples: int,
                 eval_samples: int, bag_sizes: List[int], fixed_bag_size: bool,
                 seed: int, rank: int, world_size: int):
        if kind not in ("random", "synthetic"):
            raise ValueError(kind)
        self.kind = kind
        self.table_sizes = np.asarray(table_sizes, dtype=np.uint64)
        self.num_dense = dense_in_features
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.train_samples = train_samples
        self.eval_samples = eval_samples
        self.bag_sizes = list(bag_sizes)
        self.fixed_bag_size = fixed_bag_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.feature_names = [f"cat_{i}" for i in range(len(table_sizes))]

    # ----------------------------------------------------------------- layout
    def num_samples(self, split: str) -> int:
        return self.train_samples if split == "train" else self.eval_samples

    def global_batch_size(self, split: str) -> int:
        return self.batch_size if split == "train" else self.eval_batch_size

    def num_batches(self, split: str) -> int:
        return num_batches(self.num_samples(split), self.global_batch_size(split))

    def batches(self, split: str, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        """This rank's batches of one epoch of `split`, from global batch `start_batch`."""
        n = self.num_samples(split)
        gb = self.global_batch_size(split)
        per_rank = gb // self.world_size
        # evaluation data does not change between epochs
        stream_epoch = epoch if split == "train" else 0
        for b in range(start_batch, num_batches(n, gb)):
            sl = rank_slice(b, gb, self.world_size, self.rank, n)
            idx = np.arange(sl.start, sl.stop, dtype=np.uint64)
            yield self.make(split, stream_epoch, idx, per_rank, sample_weight(b, gb, n))

    # ----------------------------------------------------------------- samples
    def _key(self, split: str, epoch: int, idx: np.ndarray) -> np.ndarray:
        return hash_keys(self.seed, _SPLIT_CODES[split], epoch, idx)

    def sample_arrays(self, split: str, epoch: int, idx: np.ndarray):
        """Samples `idx` as numpy arrays: dense n x D, per-feature ids and lengths, labels,
        and (synthetic only) the click model's true probabilities (else None)."""
        key = self._key(split, epoch, idx)  # n
        n = len(idx)
        d_idx = np.arange(self.num_dense, dtype=np.uint64)
        dense_u = uniform01(hash_keys(key[:, None], 1000 + d_idx[None, :]))
        ids, lengths = [], []
        for f, size in enumerate(self.table_sizes):
            k = self.bag_sizes[f]
            if self.fixed_bag_size or k == 1:
                lens = np.full(n, k, dtype=np.int64)
            else:
                lens = 1 + (hash_keys(key, 2000 + f) % np.uint64(k)).astype(np.int64)
            pos = np.arange(lens.sum(), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
            row_key = np.repeat(key, lens)
            h = hash_keys(row_key, 3000 + f, pos)
            if self.kind == "synthetic":
                # skewed popularity (like real categorical data): id = floor(n u^3)
                u = uniform01(h)
                feat_ids = np.minimum((u ** 3 * float(size)).astype(np.uint64), size - np.uint64(1))
            else:
                feat_ids = h % size
            ids.append(feat_ids.astype(np.int64))
            lengths.append(lens)
        if self.kind == "random":
            dense = dense_u.astype(np.float32)
            labels = (uniform01(hash_keys(key, 4000)) < 0.5).astype(np.float32)
            return dense, ids, lengths, labels, None
        dense = np.log1p(dense_u * 100.0).astype(np.float32)  # log-transformed counts, as Criteo
        prob = self.click_probability(dense, ids, lengths)
        labels = (uniform01(hash_keys(key, 5000)) < prob).astype(np.float32)
        return dense, ids, lengths, labels, prob

    def click_probability(self, dense: np.ndarray, ids: List[np.ndarray],
                          lengths: List[np.ndarray]) -> np.ndarray:
        """The synthetic click model: logit = bias + w . dense + sum_f mean effect of the
        bag's ids + a pairwise term <u(id_0), v(id_1)> between the first two features.
        Effects are hashes of (seed, feature, id), so no table is stored."""
        n = dense.shape[0]
        d_idx = np.arange(self.num_dense, dtype=np.uint64)
        w = 0.4 * normal(hash_keys(self.seed, 7000, d_idx), hash_keys(self.seed, 7001, d_idx))
        logit = -1.0 + (dense - dense.mean(axis=1, keepdims=True)) @ w
        seg = [np.repeat(np.arange(n), lens) for lens in lengths]
        for f, (fid, s) in enumerate(zip(ids, seg)):
            eff = 0.8 * normal(hash_keys(self.seed, 8000 + f, fid), hash_keys(self.seed, 9000 + f, fid))
            logit += np.bincount(s, weights=eff, minlength=n) / np.maximum(lengths[f], 1)
        if len(ids) >= 2:
            rank_k = np.arange(4, dtype=np.uint64)
            first = [np.bincount(seg[0], weights=normal(hash_keys(self.seed, 11000, ids[0], r),
                                                        hash_keys(self.seed, 11001, ids[0], r)),
                                 minlength=n) / np.maximum(lengths[0], 1) for r in rank_k]
            second = [np.bincount(seg[1], weights=normal(hash_keys(self.seed, 12000, ids[1], r),
                                                         hash_keys(self.seed, 12001, ids[1], r)),
                                  minlength=n) / np.maximum(lengths[1], 1) for r in rank_k]
            logit += 0.5 * sum(a * b for a, b in zip(first, second))
        return 1.0 / (1.0 + np.exp(-logit))

    def make(self, split: str, epoch: int, idx: np.ndarray, per_rank: int,
             weight: float = 1.0) -> Batch:
        dense, ids, lengths, labels, _ = self.sample_arrays(split, epoch, idx)
        return make_batch(dense, np.concatenate(ids), np.stack(lengths), labels,
                          self.feature_names, per_rank, weight)

    def oracle_probabilities(self, split: str, limit: Optional[int] = None):
        """Labels and the click model's own probabilities for a whole split (synthetic only):
        the best achievable AUC on that split is the AUC of these probabilities."""
        n = self.num_samples(split) if limit is None else min(limit, self.num_samples(split))
        idx = np.arange(n, dtype=np.uint64)
        _, _, _, labels, prob = self.sample_arrays(split, 0, idx)
        return labels, prob
