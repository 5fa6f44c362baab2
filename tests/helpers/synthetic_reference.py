"""The synthetic data's definition written plainly, feature by feature and bag by bag, as the
generator computed it before it was vectorised: `tests/unit/test_synthetic_data.py` holds
`GeneratedSource.sample_arrays` to it bit for bit, and `bench/bench_synthetic.py` times it
as the baseline. Multi-hot bags of synthetic data are expanded entry by entry in plain
Python (`derived_bags`)."""

import math

import numpy as np

from dlrm_torchrec.data.hashing import hash_keys, normal, uniform01
from tests.helpers.hash_reference import ref_uniform

SPLIT_CODES = {"train": 1, "val": 2, "test": 3}


def derived_bags(seed, first_ids, bag_sizes, table_sizes, pareto=False):
    """Bags of the one-hot ids `first_ids` (F lists): each id, then for j = 1..k-1 u =
    hash(seed, 0x4D48, f, id, j) in [0, 1) and floor(u * rows), or floor((1 - u)^-4 - 1) mod
    rows (Pareto, a = 0.25)."""
    out = []
    for f, (ids, k, rows) in enumerate(zip(first_ids, bag_sizes, table_sizes)):
        bags = []
        for i in ids:
            bags.append(int(i))
            for j in range(1, k):
                u = ref_uniform(seed, 0x4D48, f, int(i), j)
                bags.append(math.floor(min((1.0 - u) ** -4 - 1.0, 2.0 ** 62)) % rows if pareto
                            else min(math.floor(u * rows), rows - 1))
        out.append(np.array(bags, dtype=np.int64))
    return out


def reference_sample_arrays(kind, table_sizes, num_dense, bag_sizes, fixed_bag_size, seed,
                            split, epoch, idx, pareto=False, derive_bags=True):
    """(dense n x D, ids per feature, lengths per feature, labels, probabilities or None)
    of samples `idx` (uint64) of `split` / `epoch`. Synthetic bags of a fixed size k > 1
    are the one-hot id and k - 1 ids derived from it; the click model sees the one-hot id.
    derive_bags=False: the definition before that (every id of a bag hashed on its own, the
    click model averaging their effects), the benchmark's baseline for multi-hot bags."""
    derived = kind == "synthetic" and fixed_bag_size and any(k > 1 for k in bag_sizes)
    if derived and derive_bags:
        dense, first, ones, labels, prob = reference_sample_arrays(
            kind, table_sizes, num_dense, [1] * len(bag_sizes), True, seed, split, epoch, idx)
        lengths = [np.full(len(idx), k, dtype=np.int64) for k in bag_sizes]
        return (dense, derived_bags(seed, first, bag_sizes, table_sizes, pareto), lengths,
                labels, prob)
    key = hash_keys(seed, SPLIT_CODES[split], epoch, idx)
    n = len(idx)
    d_idx = np.arange(num_dense, dtype=np.uint64)
    dense_u = uniform01(hash_keys(key[:, None], 1000 + d_idx[None, :]))
    ids, lengths = [], []
    for f, size in enumerate(np.asarray(table_sizes, dtype=np.uint64)):
        k = bag_sizes[f]
        if fixed_bag_size or k == 1:
            lens = np.full(n, k, dtype=np.int64)
        else:
            lens = 1 + (hash_keys(key, 2000 + f) % np.uint64(k)).astype(np.int64)
        pos = np.arange(lens.sum(), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        h = hash_keys(np.repeat(key, lens), 3000 + f, pos)
        if kind == "synthetic":
            u = uniform01(h)
            feat_ids = np.minimum((u ** 3 * float(size)).astype(np.uint64), size - np.uint64(1))
        else:
            feat_ids = h % size
        ids.append(feat_ids.astype(np.int64))
        lengths.append(lens)
    if kind == "random":
        labels = (uniform01(hash_keys(key, 4000)) < 0.5).astype(np.float32)
        return dense_u.astype(np.float32), ids, lengths, labels, None
    dense = np.log1p(dense_u * 100.0).astype(np.float32)
    w = 0.4 * normal(hash_keys(seed, 7000, d_idx), hash_keys(seed, 7001, d_idx))
    logit = -1.0 + (dense - dense.mean(axis=1, keepdims=True)) @ w
    seg = [np.repeat(np.arange(n), lens) for lens in lengths]
    for f, (fid, s) in enumerate(zip(ids, seg)):
        eff = 0.8 * normal(hash_keys(seed, 8000 + f, fid), hash_keys(seed, 9000 + f, fid))
        logit += np.bincount(s, weights=eff, minlength=n) / np.maximum(lengths[f], 1)
    if len(ids) >= 2:
        def pair_vector(field_u, field_v, f, r):
            v = normal(hash_keys(seed, field_u, ids[f], r), hash_keys(seed, field_v, ids[f], r))
            return np.bincount(seg[f], weights=v, minlength=n) / np.maximum(lengths[f], 1)

        logit += 0.5 * sum(pair_vector(11000, 11001, 0, r) * pair_vector(12000, 12001, 1, r)
                           for r in np.arange(4, dtype=np.uint64))
    prob = 1.0 / (1.0 + np.exp(-logit))
    labels = (uniform01(hash_keys(key, 5000)) < prob).astype(np.float32)
    return dense, ids, lengths, labels, prob
