"""The generated data sources: the fast generator computes exactly the plain definition."""

import numpy as np
import pytest

from dlrm_torchrec.data import synthetic
from dlrm_torchrec.data.synthetic import GeneratedSource
from tests.synthetic_reference import reference_sample_arrays

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
