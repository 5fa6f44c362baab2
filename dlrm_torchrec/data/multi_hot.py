"""Multi-hot bags derived from one-hot ids (data.multi_hot_sizes, the MLPerf DCNv2 setup),
for the Criteo loader and the synthetic source alike.

Feature f's bag is the one-hot id followed by k_f - 1 ids derived from it, so a given id
always expands to the same bag. The MLPerf reference draws a lookup table of k - 1 ids per
id; here entry j (1..k-1) comes from u in [0, 1), a counter-based hash of (seed, 0x4D48,
feature, id, j), so no table is stored: floor(u * rows), uniform over the table, or the floor
of a Pareto(a = 0.25) draw (numpy's Lomax form, (1 - u)^(-1/a) - 1) mod rows, as the
reference's `np.random.pareto(a=0.25)`.
"""

from typing import Sequence

import numpy as np

from dlrm_torchrec.data.hashing import hash_keys, splitmix64, splitmix64_

PARETO_A = 0.25  # as the MLPerf reference; `derive` computes (1 - u)^(-1/a) as ((1 - u)^2)^-2
MULTI_HOT_KEY = 0x4D48  # separates multi-hot hashes from other uses of the seed
_DERIVE_CHUNK = 1 << 15  # multi-hot ids derived per numpy call: 256 KiB scratch arrays


class MultiHotBags:
    """Expands one-hot ids into bags of `bag_sizes[f]` ids per feature.

    Args:
        seed: data seed.
        bag_sizes: ids per bag of each feature (1: the one-hot id alone).
        table_sizes: rows of each feature's table (derived ids stay below them).
        distribution: "uniform" or "pareto".
    """

    def __init__(self, seed: int, bag_sizes: Sequence[int], table_sizes: Sequence[int],
                 distribution: str = "uniform"):
        self.bag_sizes = list(bag_sizes)
        self.table_sizes = [int(n) for n in table_sizes]
        self.pareto = distribution == "pareto"
        self._feature_keys = [hash_keys(seed, MULTI_HOT_KEY, f) for f in range(len(bag_sizes))]

    def values(self, ids: np.ndarray) -> np.ndarray:
        """(F, n) one-hot ids -> the bags' ids, feature-major then sample-major
        (n * sum(bag_sizes) int64): feature f's row i is ids[f, i] then k_f - 1 derived ids."""
        n = ids.shape[1]
        values = np.empty(n * sum(self.bag_sizes), dtype=np.int64)
        start = 0
        for f, k in enumerate(self.bag_sizes):
            bags = values[start:start + n * k].reshape(n, k)
            bags[:, 0] = ids[f]
            if k > 1:
                self.derive(f, ids[f], bags[:, 1:])
            start += n * k
        return values

    def derive(self, f: int, ids: np.ndarray, out: np.ndarray) -> None:
        """Derived ids of feature f's bags into out (n, k - 1): entry (i, j) from the hash of
        (seed, feature, ids[i], j + 1) (module docstring).

        Works through chunks of about _DERIVE_CHUNK entries with in-place numpy operations:
        the scratch arrays stay in cache, which makes it about 2x faster than whole-batch
        expressions (bench/bench_criteo.py; MLPerf bags are 214 ids per sample, so this is
        the loader's hot loop)."""
        n, k1 = out.shape
        size = self.table_sizes[f]
        feature_key = self._feature_keys[f]
        positions = np.arange(1, k1 + 1, dtype=np.uint64)
        rows = max(1, _DERIVE_CHUNK // k1)
        h = np.empty((min(rows, n), k1), dtype=np.uint64)
        scratch = np.empty_like(h)
        x = np.empty(h.shape, dtype=np.float64)
        for r0 in range(0, n, rows):
            m = min(rows, n - r0)
            hh, xx = h[:m], x[:m]
            id_hash = splitmix64(feature_key ^ ids[r0:r0 + m].astype(np.uint64))
            np.bitwise_xor(id_hash[:, None], positions[None, :], out=hh)
            splitmix64_(hh, scratch[:m])
            # u = top 53 bits / 2^53, uniform in [0, 1) (as hashing.uniform01)
            np.right_shift(hh, np.uint64(11), out=hh)
            np.copyto(xx, hh.view(np.int64), casting="unsafe")
            np.multiply(xx, 2.0 ** -53, out=xx)
            if self.pareto:  # (1 - u)^(-1/a) - 1 with 1/a = 4, capped, floored, mod size
                np.subtract(1.0, xx, out=xx)
                np.multiply(xx, xx, out=xx)
                np.multiply(xx, xx, out=xx)
                np.divide(1.0, xx, out=xx)
                np.subtract(xx, 1.0, out=xx)
                np.minimum(xx, 2.0 ** 62, out=xx)
                np.floor(xx, out=xx)
                wraps = xx >= size  # the heavy tail: ~rows^-0.25 of the draws
                if wraps.any():  # fmod is exact, but slow on large quotients: only these
                    xx[wraps] = np.fmod(xx[wraps], float(size))
            else:  # floor(u * size); the min guards u * size rounding up to size
                np.multiply(xx, float(size), out=xx)
                np.minimum(xx, size - 1, out=xx)
            out[r0:r0 + m] = xx  # truncation toward zero = floor (non-negative)
