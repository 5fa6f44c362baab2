"""The generated data sources: the fast generator computes exactly the plain definition."""

import numpy as np
import pytest

from dlrm_torchrec.data import synthetic
from dlrm_torchrec.data.synthetic import GeneratedSource
from tests.helpers.synthetic_reference import reference_sample_arrays

CASES = {
    # kind, table sizes, bag sizes, fixed bag size
    "synthetic one-hot, Criteo-like sizes": (
        "synthetic", [1460, 583, 10_000_000, 2_202_608, 305, 24, 12517, 3], [1] * 8, True),
    "random one-hot": ("random", [1000, 7, 123_457], [1, 1, 1], True),
    "synthetic multi-hot, fixed bags": ("synthetic", [100, 5000, 40, 9], [3, 1, 2, 5], True),
    "synthetic varying bags": ("synthetic", [100, 5000, 40, 9], [3, 1, 4, 1], False),
    "random varying bags": ("random", [100, 5000, 40], [3, 2, 1], False),
    "synthetic one feature": ("synthetic", [50], [1], True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generated_samples_equal_the_plain_definition_bit_for_bit(case, monkeypatch):
    monkeypatch.setattr(synthetic, "SAMPLE_CHUNK", 64)  # 300 samples: 5 chunks, the last partial
    kind, sizes, bags, fixed = CASES[case]
    src = GeneratedSource(kind, sizes, 5, 64, 64, 1000, 100, bags, fixed, seed=7,
                          rank=0, world_size=1)
    for split, epoch, idx in [("train", 0, np.arange(0, 300)), ("train", 3, np.arange(17, 40)),
                              ("val", 0, np.arange(5, 6)), ("test", 0, np.arange(0))]:
        idx = idx.astype(np.uint64)
        got = src.sample_arrays(split, epoch, idx)
        want = reference_sample_arrays(kind, sizes, 5, bags, fixed, 7, split, epoch, idx)
        np.testing.assert_array_equal(got[0], want[0])  # dense
        for f in range(len(sizes)):
            np.testing.assert_array_equal(got[1][f], want[1][f])  # ids
            np.testing.assert_array_equal(got[2][f], want[2][f])  # lengths
            assert got[1][f].dtype == np.int64 and got[2][f].dtype == np.int64
        np.testing.assert_array_equal(got[3], want[3])  # labels
        if kind == "synthetic":
            np.testing.assert_array_equal(got[4], want[4])  # click probabilities
        else:
            assert got[4] is None


def test_pareto_multi_hot_bags_follow_the_plain_definition():
    sizes, bags = [1000, 10**9 + 7, 50], [4, 30, 1]
    src = GeneratedSource("synthetic", sizes, 5, 64, 64, 1000, 100, bags, True, seed=3,
                          rank=0, world_size=1, multi_hot_distribution="pareto")
    idx = np.arange(2000, dtype=np.uint64)
    got = src.sample_arrays("train", 1, idx)
    want = reference_sample_arrays("synthetic", sizes, 5, bags, True, 3, "train", 1, idx,
                                   pareto=True)
    np.testing.assert_array_equal(got[3], want[3])  # labels: the click model sees first ids
    for f in range(3):
        g, w = got[1][f], want[1][f]
        np.testing.assert_array_equal(g[::bags[f]], w[::bags[f]])  # the one-hot ids
        # (1-u)^-4 by two squarings, not pow: a floor may land one off, or a few ulps off
        # where the draw is beyond 2^53 (floats a few integers apart), mod the table
        off = g != w
        assert off.mean() < 0.005
        d = np.abs(g[off] - w[off])
        assert np.minimum(d, sizes[f] - d).max(initial=0) <= 8
    uniform = GeneratedSource("synthetic", sizes, 5, 64, 64, 1000, 100, bags, True, seed=3,
                              rank=0, world_size=1).sample_arrays("train", 1, idx)
    assert (uniform[1][1] != got[1][1]).mean() > 0.9  # the distribution is honoured


def test_synthetic_ids_stay_below_their_tables_and_are_skewed():
    src = GeneratedSource("synthetic", [10, 1_000_000], 3, 64, 64, 1000, 100, [1, 1], True,
                          seed=0, rank=0, world_size=1)
    _, ids, _, labels, prob = src.sample_arrays("train", 0, np.arange(20000, dtype=np.uint64))
    assert ids[0].min() >= 0 and ids[0].max() == 9
    assert ids[1].max() < 1_000_000
    # floor(n u^3): P(id < n / 8) = P(u < 1/2) = 1/2
    assert abs(np.mean(ids[1] < 125_000) - 0.5) < 0.02
    assert set(np.unique(labels)) == {0.0, 1.0}
    assert abs(labels.mean() - prob.mean()) < 0.02


def _zipf_cdf(k, n, s):
    """P(rank < k) of the continuous power law x^-s on [1, n + 1), in closed form."""
    if s == 1.0:
        return np.log(k + 1.0) / np.log(n + 1.0)
    return ((k + 1.0) ** (1 - s) - 1) / ((n + 1.0) ** (1 - s) - 1)


@pytest.mark.parametrize("exponent", [0.5, 1.0, 1.05, 1.4])
def test_zipf_ids_follow_the_power_law_in_closed_form(exponent):
    sizes = [1000, 50_000, 7, 1]
    src = GeneratedSource("random", sizes, 2, 64, 64, 10**6, 100, [1] * 4, True, seed=5, rank=0,
                          world_size=1, id_distribution="zipf", zipf_exponent=exponent)
    m = 100_000
    _, ids, _, _, _ = src.sample_arrays("train", 0, np.arange(m, dtype=np.uint64))
    for f, n in enumerate(sizes):
        assert ids[f].min() >= 0 and ids[f].max() < n
        # ids are (rank * mult + offset) mod n: back to ranks with Python's modular inverse
        inv = pow(int(src.zipf.mult[f]), -1, n) if n > 1 else 0
        ranks = (ids[f] - int(src.zipf.offset[f])) % n * inv % n
        for k in sorted({1, 2, 10, 100, n // 2, n}):
            if k > n:
                continue
            p = _zipf_cdf(k, n, exponent)
            sigma = np.sqrt(p * (1 - p) / m)
            assert abs(np.mean(ranks < k) - p) <= 5 * sigma + 1e-12, (f, k)


def test_zipf_hot_ids_are_spread_over_row_wise_shards():
    n = 1_000_000
    src = GeneratedSource("random", [n], 2, 64, 64, 10**6, 100, [1], True, seed=0, rank=0,
                          world_size=1, id_distribution="zipf", zipf_exponent=1.05)
    _, ids, _, _, _ = src.sample_arrays("train", 0, np.arange(50_000, dtype=np.uint64))
    values, counts = np.unique(ids[0], return_counts=True)
    hottest = values[np.argsort(-counts)[:16]]
    assert len(set((hottest // (n // 8)).tolist())) >= 6  # of 8 equal row ranges
    uniform = GeneratedSource("random", [n], 2, 64, 64, 10**6, 100, [1], True, seed=0, rank=0,
                              world_size=1).sample_arrays("train", 0, np.arange(50_000,
                                                                                dtype=np.uint64))
    # the same hashes: only the id mapping differs, so dense values and labels are unchanged
    _, _, _, labels, _ = src.sample_arrays("train", 0, np.arange(50_000, dtype=np.uint64))
    np.testing.assert_array_equal(labels, uniform[3])
