"""CriteoSource over a hand-written preprocessed folder: per-rank slices, padding,
windowed shuffling, splits, id folding and multi-hot bags."""

import math

import numpy as np
import pytest

from dlrm_torchrec.config import ConfigError, DataConfig, EmbeddingsConfig
from dlrm_torchrec.data.criteo import CriteoSource
from tests.helpers.criteo_folder import DAY_ROWS, make_folder, source
from tests.helpers.hash_reference import ref_uniform


def real(batch):
    """(uids, ids (26, n), labels) of a batch's real samples."""
    n = batch.num_real
    kjt = batch.sparse_features
    ids = np.stack([kjt[f"cat_{f}"].values().numpy() for f in range(26)])
    return batch.dense_features[:n, 0].numpy().astype(int), ids, batch.labels[:n].numpy()


@pytest.mark.parametrize("window", [0, 11])
def test_rank_slices_concatenate_to_single_rank_data(tmp_path, window):
    make_folder(tmp_path)
    single = [real(b) for b in source(tmp_path, shuffle_window=window).batches("train", 1)]
    for world in (2, 4):
        per_rank = [list(source(tmp_path, r, world, shuffle_window=window).batches("train", 1))
                    for r in range(world)]
        assert all(len(p) == len(single) for p in per_rank)
        for b, want in enumerate(single):
            parts = [real(per_rank[r][b]) for r in range(world)]
            np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), want[0])
            np.testing.assert_array_equal(np.concatenate([p[1] for p in parts], axis=1), want[1])
            np.testing.assert_array_equal(np.concatenate([p[2] for p in parts]), want[2])


def test_epoch_reads_every_training_row_once_and_pads_the_last_batch(tmp_path):
    make_folder(tmp_path)
    src = source(tmp_path, batch_size=8)
    n_train = sum(DAY_ROWS[:-1])
    assert src.num_samples("train") == n_train and src.num_batches("train") == 9
    batches = list(src.batches("train"))
    uids = np.concatenate([real(b)[0] for b in batches])
    np.testing.assert_array_equal(uids, np.arange(n_train))
    sparse = np.concatenate([np.load(tmp_path / f"day_{d}_sparse.npy") for d in range(3)])
    np.testing.assert_array_equal(np.concatenate([real(b)[1] for b in batches], axis=1),
                                  sparse.T)
    last = batches[-1]
    assert last.dense_features.shape == (8, 13) and last.num_real == n_train % 8
    # real samples of a 6-of-8 tail batch weigh 8 / 6: the step averages over its 6 samples
    assert last.weights.tolist() == pytest.approx([8 / 6] * 6 + [0.0] * 2)
    assert last.sparse_features.lengths().view(26, 8)[:, 6:].sum() == 0
    assert last.sparse_features.stride() == 8


def test_start_batch_resumes_mid_epoch(tmp_path):
    make_folder(tmp_path)
    src = source(tmp_path, shuffle_window=10)
    full = [real(b)[0] for b in src.batches("train", 3)]
    tail = [real(b)[0] for b in src.batches("train", 3, start_batch=4)]
    assert all((a == b).all() for a, b in zip(full[4:], tail)) and len(tail) == len(full) - 4


def test_shuffle_is_seeded_windowed_and_changes_per_epoch(tmp_path):
    make_folder(tmp_path)
    n_train = sum(DAY_ROWS[:-1])

    def order(epoch, seed=0):
        src = source(tmp_path, shuffle_window=16, seed=seed)
        return np.concatenate([real(b)[0] for b in src.batches("train", epoch)])

    a = order(0)
    np.testing.assert_array_equal(np.sort(a), np.arange(n_train))
    assert not (a == np.arange(n_train)).all()
    np.testing.assert_array_equal(a, order(0))
    assert not (a == order(1)).all() and not (a == order(0, seed=1)).all()
    for w in range(0, n_train, 16):  # samples stay inside their window
        assert set(a[w:w + 16]) == set(range(w, min(w + 16, n_train)))
    val = [real(b)[0] for b in source(tmp_path, shuffle_window=16).batches("val", 2)]
    assert (np.concatenate(val) == np.sort(np.concatenate(val))).all()  # eval not shuffled


def test_evaluation_day_is_halved_test_first_then_val(tmp_path):
    make_folder(tmp_path)
    src = source(tmp_path, eval_batch_size=4)
    first = sum(DAY_ROWS[:-1])
    assert src.num_samples("test") == 13 and src.num_samples("val") == 12
    assert src.global_batch_size("val") == 4 and src.num_batches("test") == 4
    test = np.concatenate([real(b)[0] for b in src.batches("test")])
    val = np.concatenate([real(b)[0] for b in src.batches("val")])
    np.testing.assert_array_equal(test, np.arange(first, first + 13))
    np.testing.assert_array_equal(val, np.arange(first + 13, first + 25))


def test_ids_above_the_configured_table_are_folded_at_load(tmp_path):
    make_folder(tmp_path, stored_size=1000)
    ids = np.concatenate([real(b)[1] for b in source(tmp_path, table=97).batches("train")],
                         axis=1)
    sparse = np.concatenate([np.load(tmp_path / f"day_{d}_sparse.npy") for d in range(3)])
    np.testing.assert_array_equal(ids, sparse.T % 97)


@pytest.mark.parametrize("dist", ["uniform", "pareto"])
def test_multi_hot_bags_start_with_the_one_hot_id_and_are_a_function_of_it(tmp_path, dist):
    make_folder(tmp_path)
    sizes = [3] * 13 + [1] * 12 + [5]
    src = source(tmp_path, multi_hot_sizes=sizes, multi_hot_distribution=dist, batch_size=32)
    batch = next(iter(src.batches("train")))
    sparse = np.load(tmp_path / "day_0_sparse.npy")
    bags_of = {}
    for f, k in enumerate(sizes):
        jt = batch.sparse_features[f"cat_{f}"]
        assert jt.lengths().tolist() == [k] * 23 + [k] * 9  # 23 rows of day 0, then day 1
        vals = jt.values().numpy().reshape(32, k)
        assert (vals >= 0).all() and (vals < 1000).all()
        np.testing.assert_array_equal(vals[:23, 0], sparse[:, f])
        for row in vals:
            assert bags_of.setdefault((f, row[0]), tuple(row)) == tuple(row)
    again = next(iter(src.batches("train", epoch=5)))
    assert (again.sparse_features.values() == batch.sparse_features.values()).all()
    if dist == "pareto":  # heavy head: small ids dominate the derived ids
        extra = batch.sparse_features["cat_0"].values().numpy().reshape(32, 3)[:, 1:]
        assert np.median(extra) < 50


@pytest.mark.parametrize("dist", ["uniform", "pareto"])
def test_derived_multi_hot_ids_match_the_hash_spec_computed_independently(tmp_path, dist):
    """Entry (i, j) of feature f's bag is u = hash(seed, 0x4D48, f, id, j) in [0, 1) and then
    floor(u * rows) (uniform) or floor((1 - u)^-4 - 1) mod rows (Pareto, a = 0.25), computed
    here in plain Python at random entries; enough rows that the loader works through
    several chunks of every feature."""
    make_folder(tmp_path)
    sizes = [3] * 13 + [1] * 12 + [70]
    rows = 10**9 + 7
    src = source(tmp_path, table=rows, multi_hot_sizes=sizes, multi_hot_distribution=dist,
                 seed=7)
    n = 20_000
    ids = np.random.default_rng(1).integers(0, 1000, (26, n))
    values = src.encoder.multi_hot_values(ids)
    assert len(values) == n * sum(sizes)
    starts = np.cumsum([0] + [n * k for k in sizes])
    rng = np.random.default_rng(2)
    got, want = [], []
    for f in [0, 12, 13, 25] * 400:
        i = int(rng.integers(n))
        j = int(rng.integers(1, sizes[f])) if sizes[f] > 1 else 0
        got.append(int(values[starts[f] + i * sizes[f] + j]))
        if j == 0:
            want.append(int(ids[f, i]))
            continue
        u = ref_uniform(7, 0x4D48, f, int(ids[f, i]), j)
        if dist == "uniform":
            want.append(math.floor(u * rows))
        else:
            want.append(math.floor(min((1.0 - u) ** -4 - 1.0, 2.0 ** 62)) % rows)
    got, want = np.array(got), np.array(want)
    if dist == "uniform":
        np.testing.assert_array_equal(got, want)
    else:  # (1-u)^-4 by two squarings, not pow: a floor may land one off at an integer
        off = got != want
        assert off.mean() < 0.005
        assert set(np.abs(got[off] - want[off]).tolist()) <= {1, rows - 1}


def test_unprepared_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="preprocess"):
        source(tmp_path)
    make_folder(tmp_path)
    with pytest.raises(ConfigError, match="terabyte|kaggle"):
        CriteoSource(DataConfig(source="criteo_terabyte", path=str(tmp_path)),
                     EmbeddingsConfig(num_embeddings_per_feature=[10] * 26))
