"""The synthetic data's definition written plainly, feature by feature and bag by bag, as the
generator computed it before it was vectorised: `tests/test_synthetic_data.py` holds
`GeneratedSource.sample_arrays` to it bit for bit, and `bench/bench_synthetic.py` times it
as the baseline."""

import numpy as np

from dlrm_torchrec.data.hashing import hash_keys, normal, uniform01

SPLIT_CODES = {"train": 1, "val": 2, "test": 3}


def reference_sample_arrays(kind, table_sizes, num_dense, bag_sizes, fixed_bag_size, seed,
                            split, epoch, idx):
    """(dense n x D, ids per feature, lengths per feature, labels, probabilities or None)
    of samples `idx` (uint64) of `split` / `epoch`."""
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
