"""Generated data: `random` (uniform, like the reference's --data-generation=random) and
`synthetic` (learnable: labels drawn from a known click model).

Every value is a counter-based hash of (seed, split, epoch, sample index, field), so a
sample is the same whatever the world size, and each rank computes only its own share.
"""

import math
from typing import Iterator, List, Optional

import numpy as np

from dlrm_torchrec.data.batch import Batch, make_batch, num_batches, rank_slice, sample_weight
from dlrm_torchrec.data.hashing import hash_keys, normal, splitmix64, splitmix64_, uniform01
from dlrm_torchrec.data.multi_hot import MultiHotBags

_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
SAMPLE_CHUNK = 2048  # samples generated at a time (bench/bench_synthetic.py)


class ZipfIds:
    """Power-law ids for random data (data.id_distribution=zipf), for benchmarks where the
    id skew matters (embedding caches, row-wise load balance).

    A uniform u in [0, 1) becomes a rank r in 0 .. N-1 through the inverse CDF of a
    continuous power law x^-s on [1, N + 1): P(r < k) = ((k + 1)^(1-s) - 1) /
    ((N + 1)^(1-s) - 1) (for s = 1: log(k + 1) / log(N + 1)). Rank r is then id
    (r * mult + offset) mod N, a bijection (mult is coprime with N, near N / golden ratio),
    so the hot ids lie spread over the table rather than in its first rows, as a real
    vocabulary's do.

    Args:
        table_sizes: N per feature (each below 2^40).
        exponent: s > 0.
        seed: picks each feature's offset.
    """

    MAX_ROWS = 1 << 40  # mulmod below stays within uint64

    def __init__(self, table_sizes: List[int], exponent: float, seed: int):
        self.exponent = float(exponent)
        self.sizes = np.asarray(table_sizes, dtype=np.uint64)
        mult, offset = [], []
        for f, n in enumerate(int(n) for n in table_sizes):
            if n >= self.MAX_ROWS:
                raise ValueError(f"table of {n} rows: zipf ids need fewer than 2^40")
            m = max(1, int(n / 1.618033988749895)) | 1
            while math.gcd(m, n) != 1:
                m += 2
            mult.append(m % n)
            offset.append(int(hash_keys(seed, 6000 + f)) % n)
        self.mult = np.asarray(mult, dtype=np.uint64)
        self.offset = np.asarray(offset, dtype=np.uint64)

    def ranks(self, u: np.ndarray, feats) -> np.ndarray:
        """Uniform u (broadcast against feats' sizes) -> uint64 ranks below those sizes."""
        size = self.sizes[feats]
        n1 = size.astype(np.float64) + 1.0
        s = self.exponent
        if s == 1.0:
            x = n1 ** u
        else:
            x = ((n1 ** (1.0 - s) - 1.0) * u + 1.0) ** (1.0 / (1.0 - s))
        r = np.floor(np.maximum(x, 1.0)).astype(np.uint64) - np.uint64(1)
        return np.minimum(r, size - np.uint64(1))

    def ids(self, u: np.ndarray, feats) -> np.ndarray:
        """Uniform u -> int64 ids of features `feats` (an index, or an F1 x 1 array)."""
        size, mult = self.sizes[feats], self.mult[feats]
        r = self.ranks(u, feats)
        # (r * mult) mod size without overflow: mult split into two 20-bit halves
        hi, lo = mult >> np.uint64(20), mult & np.uint64((1 << 20) - 1)
        prod = ((r * hi) % size << np.uint64(20)) + r * lo
        return ((prod % size + self.offset[feats]) % size).astype(np.int64)


def _bag_means(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Mean of each bag's values (bags are consecutive runs of `lengths`; an empty bag's
    mean is 0); bags of one value are their value."""
    if (lengths == 1).all():
        return values
    seg = np.repeat(np.arange(len(lengths)), lengths)
    return np.bincount(seg, weights=values, minlength=len(lengths)) / np.maximum(lengths, 1)


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
        multi_hot_distribution: synthetic bags of a fixed size k > 1 (the MLPerf DCNv2
            setup) are the sample's id followed by k - 1 ids derived from it, uniform or
            pareto, exactly as the Criteo loader expands one-hot ids
            (`dlrm_torchrec.data.multi_hot`); the click model sees the first id. Random
            data and bags of varying size draw every id independently instead.
    """

    def __init__(self, kind: str, table_sizes: List[int], dense_in_features: int,
                 batch_size: int, eval_batch_size: int, train_samples: int,
                 eval_samples: int, bag_sizes: List[int], fixed_bag_size: bool,
                 seed: int, rank: int, world_size: int, multi_hot_distribution: str = "uniform",
                 id_distribution: str = "uniform", zipf_exponent: float = 1.05):
        if kind not in ("random", "synthetic"):
            raise ValueError(kind)
        self.kind = kind
        self.zipf: Optional[ZipfIds] = None
        if id_distribution == "zipf":
            if kind != "random":
                raise ValueError("zipf ids are for random data")
            self.zipf = ZipfIds(table_sizes, zipf_exponent, seed)
        self.table_sizes = np.asarray(table_sizes, dtype=np.uint64)
        self.num_dense = dense_in_features
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.train_samples = train_samples
        self.eval_samples = eval_samples
        self.bag_sizes = list(bag_sizes)
        self.multi_hot_bags: Optional[MultiHotBags] = None
        self._hashed_bag_sizes = self.bag_sizes  # ids hashed per sample (the rest derived)
        if kind == "synthetic" and fixed_bag_size and any(k > 1 for k in bag_sizes):
            self.multi_hot_bags = MultiHotBags(seed, bag_sizes, table_sizes,
                                               multi_hot_distribution)
            self._hashed_bag_sizes = [1] * len(bag_sizes)
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
        and (synthetic only) the click model's true probabilities (else None).

        Computed in chunks of SAMPLE_CHUNK samples, whose intermediate arrays (F x chunk
        hashes) stay in the CPU cache."""
        if len(idx) <= SAMPLE_CHUNK:
            dense, ids, lengths, labels, prob = self._sample_chunk(split, epoch, idx)
        else:
            parts = [self._sample_chunk(split, epoch, idx[i:i + SAMPLE_CHUNK])
                     for i in range(0, len(idx), SAMPLE_CHUNK)]
            dense, ids, lengths, labels, prob = zip(*parts)
            num_features = len(self.table_sizes)
            dense, labels = np.concatenate(dense), np.concatenate(labels)
            prob = None if prob[0] is None else np.concatenate(prob)
            ids = [np.concatenate([p[f] for p in ids]) for f in range(num_features)]
            lengths = [np.concatenate([p[f] for p in lengths]) for f in range(num_features)]
        if self.multi_hot_bags is not None:  # expand the one-hot ids into their bags
            n = len(idx)
            values = self.multi_hot_bags.values(np.stack(ids))
            ids = np.split(values, np.cumsum([n * k for k in self.bag_sizes])[:-1])
            lengths = [np.full(n, k, dtype=np.int64) for k in self.bag_sizes]
        return dense, ids, lengths, labels, prob

    def _sample_chunk(self, split: str, epoch: int, idx: np.ndarray):
        """`sample_arrays` of at most SAMPLE_CHUNK samples.

        Each value is a hash of its keys (module docstring): dense j of a sample from
        (sample key, 1000 + j); id p of feature f's bag from (sample key, 3000 + f, p); the
        bag length, when not fixed, 1 + (sample key, 2000 + f) mod k. Features with one id
        per bag (every Criteo-shaped config) are hashed together as one F x n array, which
        is what makes this fast (`tests/unit/test_synthetic_data.py` holds it to a plain
        per-feature computation of the same definition, bit for bit)."""
        key = self._key(split, epoch, idx)  # n
        d_idx = np.arange(self.num_dense, dtype=np.uint64)
        dense_u = uniform01(hash_keys(key[:, None], 1000 + d_idx[None, :]))
        lengths = [self._bag_lengths(key, f) for f in range(len(self.table_sizes))]
        # hash_keys(key, 3000 + f, pos) continues from hash_keys(key), the same for every f
        key_hash = hash_keys(key)
        ids: List[Optional[np.ndarray]] = [None] * len(lengths)
        one_hot = [f for f, k in enumerate(self._hashed_bag_sizes) if k == 1]
        if one_hot:
            feats = np.asarray(one_hot, dtype=np.uint64)
            h = key_hash[None, :] ^ (3000 + feats)[:, None]  # F1 x n
            scratch = np.empty_like(h)
            splitmix64_(h, scratch)
            splitmix64_(h, scratch)  # ^ position 0 leaves h as it is
            block = self._ids_from_hashes(h, feats[:, None].astype(np.intp))
            for row, f in enumerate(one_hot):
                ids[f] = block[row]
        for f, lens in enumerate(lengths):
            if ids[f] is None:
                pos = np.arange(lens.sum(), dtype=np.uint64) - np.repeat(
                    np.cumsum(lens) - lens, lens).astype(np.uint64)
                h = splitmix64(np.repeat(key_hash, lens) ^ np.uint64(3000 + f))
                h = splitmix64(h ^ pos)
                ids[f] = self._ids_from_hashes(h, f)
        if self.kind == "random":
            dense = dense_u.astype(np.float32)
            labels = (uniform01(hash_keys(key, 4000)) < 0.5).astype(np.float32)
            return dense, ids, lengths, labels, None
        dense = np.log1p(dense_u * 100.0).astype(np.float32)  # log-transformed counts, as Criteo
        prob = self.click_probability(dense, ids, lengths)
        labels = (uniform01(hash_keys(key, 5000)) < prob).astype(np.float32)
        return dense, ids, lengths, labels, prob

    def _bag_lengths(self, key: np.ndarray, f: int) -> np.ndarray:
        k = self._hashed_bag_sizes[f]
        if self.fixed_bag_size or k == 1:
            return np.full(len(key), k, dtype=np.int64)
        return 1 + (hash_keys(key, 2000 + f) % np.uint64(k)).astype(np.int64)

    def _ids_from_hashes(self, h: np.ndarray, feats) -> np.ndarray:
        """int64 ids of features `feats` (an index, or an F1 x 1 array broadcast against h)
        from uint64 hashes: uniform or power law (random), or skewed like real categorical
        data, floor(size u^3) (synthetic)."""
        if self.zipf is not None:
            return self.zipf.ids(uniform01(h), feats)
        size = self.table_sizes[feats]
        if self.kind == "random":
            return (h % size).astype(np.int64)
        u = uniform01(h)
        return np.minimum((u ** 3 * size.astype(np.float64)).astype(np.uint64),
                          size - np.uint64(1)).astype(np.int64)

    def click_probability(self, dense: np.ndarray, ids: List[np.ndarray],
                          lengths: List[np.ndarray]) -> np.ndarray:
        """The synthetic click model: logit = bias + w . dense + sum_f mean effect of the
        bag's ids + a pairwise term <u(id_0), v(id_1)> between the first two features.
        Effects are normals hashed from (seed, 8000 + f, id) and (seed, 9000 + f, id); the
        pairwise vectors' component r from (seed, 11000 or 12000, id, r). No table is stored."""
        d_idx = np.arange(self.num_dense, dtype=np.uint64)
        w = 0.4 * normal(hash_keys(self.seed, 7000, d_idx), hash_keys(self.seed, 7001, d_idx))
        logit = -1.0 + (dense - dense.mean(axis=1, keepdims=True)) @ w
        one_hot = [f for f, lens in enumerate(lengths) if (lens == 1).all()]
        effects = {}
        if one_hot:  # one F1 x n computation; a bag of one id has its id's effect as mean
            feats = np.asarray(one_hot, dtype=np.uint64)
            block = np.stack([ids[f] for f in one_hot]).astype(np.uint64)
            for row, e in enumerate(0.8 * self._id_normals(8000 + feats, 9000 + feats, block)):
                effects[one_hot[row]] = e
        for f, lens in enumerate(lengths):
            if f in effects:
                logit += effects[f]
            else:
                eff = 0.8 * self._id_normals(8000 + f, 9000 + f, ids[f].astype(np.uint64))
                logit += _bag_means(eff, lens)
        if len(ids) >= 2:
            pair = None
            rank_k = np.arange(4, dtype=np.uint64)[:, None]
            first = self._id_normals(11000, 11001, ids[0].astype(np.uint64), rank_k)
            second = self._id_normals(12000, 12001, ids[1].astype(np.uint64), rank_k)
            for a, b in zip(first, second):
                term = _bag_means(a, lengths[0]) * _bag_means(b, lengths[1])
                pair = term if pair is None else pair + term
            logit += 0.5 * pair
        return 1.0 / (1.0 + np.exp(-logit))

    def _id_normals(self, field_u, field_v, ids: np.ndarray, last=None) -> np.ndarray:
        """Standard normals from the hashes (seed, field_u, ids[, last]) and (seed, field_v,
        ids[, last]); fields broadcast as a column against rows of ids (F x n, or n)."""
        def hashes(field):
            prefix = hash_keys(self.seed, field)  # continued below with the ids
            h = (prefix[:, None] if prefix.ndim else prefix) ^ ids
            splitmix64_(h, np.empty_like(h))
            if last is not None:
                h = splitmix64(h ^ last)
            return h
        return normal(hashes(field_u), hashes(field_v))

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
