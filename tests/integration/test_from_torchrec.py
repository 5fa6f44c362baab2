"""Criteo data preprocessed by TorchRec's own code (`BinaryCriteoUtils.tsv_to_npys`, as
`npy_preproc_criteo.py` runs it, and `sparse_to_contiguous`), adopted with
`python -m dlrm_torchrec.data.from_torchrec`: our loader must serve exactly the rows TorchRec's
own `InMemoryBinaryCriteoIterDataPipe` serves for each stage, and bad files must stop the
adoption with their name and row."""

import json

import numpy as np
import pytest
from torchrec.datasets.criteo import BinaryCriteoUtils, InMemoryBinaryCriteoIterDataPipe

from dlrm_torchrec.cli import from_torchrec as from_torchrec_cli
from dlrm_torchrec.config import ConfigError, DataConfig, EmbeddingsConfig
from dlrm_torchrec.data.criteo import CriteoSource
from tests.helpers.torchrec_preprocessing import torchrec_folder

TABLE = 97  # configured rows of every table: stored ids are folded mod 97 at load


def our_rows(path, split, batch_size=16, source="criteo_terabyte"):
    data = DataConfig(source=source, path=str(path), batch_size=batch_size)
    src = CriteoSource(data, EmbeddingsConfig(num_embeddings_per_feature=[TABLE] * 26))
    dense, ids, labels = [], [], []
    for b in src.batches(split):
        n = b.num_real
        dense.append(b.dense_features[:n].numpy())
        ids.append(np.stack([b.sparse_features[f"cat_{f}"].values().numpy() for f in range(26)]))
        labels.append(b.labels[:n].numpy())
    return np.concatenate(dense), np.concatenate(ids, axis=1), np.concatenate(labels)


def torchrec_rows(npy, stems, stage, batch_size=16):
    pipe = InMemoryBinaryCriteoIterDataPipe(
        stage, [str(npy / f"{s}_dense.npy") for s in stems],
        [str(npy / f"{s}_sparse.npy") for s in stems],
        [str(npy / f"{s}_labels.npy") for s in stems], batch_size=batch_size, rank=0,
        world_size=1, hashes=[TABLE] * 26)
    dense, ids, labels = [], [], []
    for b in pipe:
        dense.append(b.dense_features.numpy())
        ids.append(np.stack([b.sparse_features[f"cat_{f}"].values().numpy() for f in range(26)]))
        labels.append(b.labels.numpy())
    return np.concatenate(dense), np.concatenate(ids, axis=1), np.concatenate(labels)


def assert_same_rows(got, want):
    np.testing.assert_array_equal(got[0], want[0])  # dense: TorchRec's transform, unchanged
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])


def test_adopted_terabyte_days_serve_the_rows_torchrecs_own_loader_serves(tmp_path):
    stems = [("day_0", 70), ("day_1", 45), ("day_2", 51)]
    npy = torchrec_folder(tmp_path, stems)
    out = tmp_path / "adopted"
    assert from_torchrec_cli.main([str(npy), "-o", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    sparse = np.concatenate([np.load(npy / f"{s}_sparse.npy") for s, _ in stems])
    assert meta["table_sizes"] == (sparse.max(axis=0) + 1).tolist()
    assert meta["rows_per_day"] == [70, 45, 51] and meta["eval_day"] == 2
    # TorchRec's stages: train = days 0-1; val = the first ceil(51 / 2) rows of day 2, test
    # the rest
    assert_same_rows(our_rows(out, "train"), torchrec_rows(npy, ["day_0", "day_1"], "train"))
    for stage in ("val", "test"):
        assert_same_rows(our_rows(out, stage), torchrec_rows(npy, ["day_2"], stage))
    assert len(our_rows(out, "val")[2]) == 26


def test_reference_order_of_the_evaluation_halves_on_request(tmp_path):
    npy = torchrec_folder(tmp_path, [("day_0", 20), ("day_1", 31)])
    out = tmp_path / "adopted"
    assert from_torchrec_cli.main([str(npy), "-o", str(out), "--eval-halves", "test,val"]) == 0
    assert_same_rows(our_rows(out, "test"), torchrec_rows(npy, ["day_1"], "val"))
    assert_same_rows(our_rows(out, "val"), torchrec_rows(npy, ["day_1"], "test"))


def test_contiguous_ids_are_preferred_and_their_table_sizes_recorded(tmp_path):
    stems = [("day_0", 40), ("day_1", 30)]
    npy = torchrec_folder(tmp_path, stems)
    BinaryCriteoUtils.sparse_to_contiguous(
        [str(npy / f"{s}_sparse.npy") for s, _ in stems], str(npy), frequency_threshold=2)
    out = tmp_path / "adopted"
    assert from_torchrec_cli.main([str(npy), "-o", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    contig = [np.load(npy / f"{s}_sparse_contig_freq.npy") for s, _ in stems]
    assert meta["table_sizes"] == (np.concatenate(contig).max(axis=0) + 1).tolist()
    assert max(meta["table_sizes"]) < 80  # renumbered, not the raw 32-bit values
    got = our_rows(out, "train")[1]
    np.testing.assert_array_equal(got, contig[0].T % TABLE)


def test_kaggle_train_file_is_cut_into_seven_days_as_the_reference_cuts_it(tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    npy = torchrec_folder(tmp_path, [("train", 102)], dataset="criteo_kaggle")
    out = tmp_path / "adopted"
    assert from_torchrec_cli.main([str(npy), "-o", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    # 102 = 7 x 14 + 4: the first four days have 15 rows
    assert meta["rows_per_day"] == [15, 15, 15, 15, 14, 14, 14]
    dense = np.load(npy / "train_dense.npy")
    labels = np.load(npy / "train_labels.npy").reshape(-1)
    got = our_rows(out, "train", source="criteo_kaggle")
    np.testing.assert_array_equal(got[0], dense[:88])
    np.testing.assert_array_equal(got[2], labels[:88])
    # day 6 (rows 88-101) halved, TorchRec's order: validation first
    np.testing.assert_array_equal(our_rows(out, "val", source="criteo_kaggle")[0], dense[88:95])
    np.testing.assert_array_equal(our_rows(out, "test", source="criteo_kaggle")[0], dense[95:])


def _write_set(folder, stem, n=10, dense=None, sparse=None, labels=None):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(folder / f"{stem}_dense.npy",
            rng.random((n, 13), dtype=np.float32) if dense is None else dense)
    np.save(folder / f"{stem}_sparse.npy",
            rng.integers(0, 50, (n, 26)) if sparse is None else sparse)
    np.save(folder / f"{stem}_labels.npy",
            rng.integers(0, 2, (n, 1)).astype(np.int32) if labels is None else labels)


def _bad_sparse():
    s = np.random.default_rng(1).integers(0, 50, (10, 26))
    s[7, 3] = -4
    return s


def _bad_labels():
    lab = np.zeros((10, 1), np.int32)
    lab[4] = 2
    return lab


def _bad_dense():
    d = np.zeros((10, 13), np.float32)
    d[6, 0] = np.nan
    return d


@pytest.mark.parametrize("case, expect", [
    ("negative id", "day_1_sparse.npy: row 7 (0-based), feature 3: negative id -4"),
    ("label 2", "day_1_labels.npy: row 4 (0-based): label 2, not 0 or 1"),
    ("nan dense", "day_1_dense.npy: row 6 (0-based): non-finite dense value"),
    ("row counts", "row counts differ"),
    ("wrong width", "day_1_sparse.npy: expected integer n x 26, found int64 (10, 25)"),
    ("not npy", "day_1_dense.npy: not a NumPy .npy file"),
    ("missing sparse", "day_1_sparse.npy: not found"),
    ("compressed npz", "day_1_sparse_multi_hot.npz: member 0.npy is compressed"),
    ("npz member", "day_1_sparse_multi_hot.npz: no member 25.npy"),
    ("npz negative", "day_1_sparse_multi_hot.npz: row 3 (0-based), feature 2, bag position 1: "
                     "negative id -7"),
    ("npz bag sizes", "day_1_sparse_multi_hot.npz: bag sizes [2, 3, 4"),
    ("one day", "at least two days"),
    ("our own output", "holds data preprocessed by dlrm_torchrec.data.preprocess"),
    ("halves", "--eval-halves val,val: must be val,test or test,val"),
])
def test_bad_files_stop_with_their_name_and_row(tmp_path, capsys, case, expect):
    src, out = tmp_path / "npy", tmp_path / "out"
    _write_set(src, "day_0")
    args = [str(src), "-o", str(out)]
    kw = {"negative id": dict(sparse=_bad_sparse()), "label 2": dict(labels=_bad_labels()),
          "nan dense": dict(dense=_bad_dense()),
          "row counts": dict(labels=np.zeros((9, 1), np.int32)),
          "wrong width": dict(sparse=np.zeros((10, 25), np.int64))}.get(case, {})
    if case != "one day":
        _write_set(src, "day_1", **kw)
    if case == "not npy":
        (src / "day_1_dense.npy").write_text("dense,values\n1,2\n")
    if case == "missing sparse":
        (src / "day_1_sparse.npy").unlink()
    if "npz" in case:
        bags = {str(f): np.ones((10, 2 + f % 3), np.int32) for f in range(26)}
        np.savez(src / "day_0_sparse_multi_hot.npz", **bags)
        if case == "npz negative":
            bags["2"][3, 1] = -7
        if case == "npz member":
            del bags["25"]
        if case == "npz bag sizes":
            bags["3"] = np.ones((10, 1), np.int32)
        save = np.savez_compressed if case == "compressed npz" else np.savez
        save(src / "day_1_sparse_multi_hot.npz", **bags)
    if case == "our own output":
        out.mkdir()
        (out / "meta.json").write_text(json.dumps({"format_version": 1,
                                                   "settings": {"dataset": "terabyte"}}))
    if case == "halves":
        args += ["--eval-halves", "val,val"]
    assert from_torchrec_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "error: " in err and expect in err, err
    assert "Traceback" not in err
    if case != "our own output":
        assert not (out / "meta.json").exists()  # nothing half-written


def test_moved_or_shrunk_files_are_a_config_error_naming_the_file(tmp_path):
    src = tmp_path / "npy"
    _write_set(src, "day_0")
    _write_set(src, "day_1")
    out = tmp_path / "out"
    assert from_torchrec_cli.main([str(src), "-o", str(out)]) == 0
    _write_set(src, "day_1", n=6)
    with pytest.raises(ConfigError, match="day_1_dense.npy has 6 rows, meta.json expects"):
        our_rows(out, "val")
    (src / "day_0_labels.npy").unlink()
    with pytest.raises(ConfigError, match="day_0_labels.npy missing"):
        our_rows(out, "val")


def bag_folder(tmp_path, day_rows=(40, 35, 29), bag_sizes=None, seed=0):
    """Days whose dense[:, 0] numbers the samples, one-hot ids, and MLPerf-style materialised
    bags (np.savez, members 0.npy .. 25.npy, int32 rows x bag size)."""
    bag_sizes = bag_sizes or [1 + f % 4 for f in range(26)]
    rng = np.random.default_rng(seed)
    src, uid, bags = tmp_path / "npy", 0, []
    src.mkdir()
    for d, n in enumerate(day_rows):
        dense = rng.random((n, 13), dtype=np.float32)
        dense[:, 0] = np.arange(uid, uid + n)
        uid += n
        np.save(src / f"day_{d}_dense.npy", dense)
        np.save(src / f"day_{d}_labels.npy", rng.integers(0, 2, (n, 1)).astype(np.int32))
        np.save(src / f"day_{d}_sparse.npy", rng.integers(0, 1000, (n, 26)))
        day = {str(f): rng.integers(0, 500, (n, k)).astype(np.int32)
               for f, k in enumerate(bag_sizes)}
        np.savez(src / f"day_{d}_sparse_multi_hot.npz", **day)
        bags.append(day)
    return src, bag_sizes


def served(path, split, bag_sizes, **data_kw):
    """(sample numbers, per feature the (n, k) ids) of every real sample of `split`."""
    data_kw.setdefault("batch_size", 16)
    data = DataConfig(source="criteo_terabyte", path=str(path), multi_hot_sizes=bag_sizes,
                      **data_kw)
    src = CriteoSource(data, EmbeddingsConfig(num_embeddings_per_feature=[TABLE] * 26))
    uids, ids = [], [[] for _ in range(26)]
    for b in src.batches(split):
        n = b.num_real
        uids.append(b.dense_features[:n, 0].numpy().astype(np.int64))
        for f in range(26):
            jt = b.sparse_features[f"cat_{f}"]
            assert (jt.lengths()[:n] == bag_sizes[f]).all() and (jt.lengths()[n:] == 0).all()
            ids[f].append(jt.values().numpy().reshape(n, bag_sizes[f]))
    return np.concatenate(uids), [np.concatenate(x) for x in ids]


@pytest.mark.parametrize("window", [0, 23])
def test_materialised_multi_hot_bags_are_served_as_stored(tmp_path, window):
    """MLPerf's materialised bags (read here by numpy's own np.load, independently of the
    in-place memory maps), folded mod the table size; with a shuffle window that spans day
    boundaries each sample keeps its own bags."""
    src, sizes = bag_folder(tmp_path)
    out = tmp_path / "adopted"
    assert from_torchrec_cli.main([str(src), "-o", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["multi_hot_sizes"] == sizes
    assert meta["day_files"][0]["sparse"].endswith("day_0_sparse_multi_hot.npz")
    stored = [np.load(src / f"day_{d}_sparse_multi_hot.npz") for d in range(3)]
    by_uid = [np.concatenate([s[str(f)] for s in stored]) for f in range(26)]
    assert meta["table_sizes"] == [int(b.max()) + 1 for b in by_uid]
    for split, lo, hi in (("train", 0, 75), ("val", 75, 90), ("test", 90, 104)):
        uids, ids = served(out, split, sizes, shuffle_window=window)
        if split == "train" and window:
            assert sorted(uids) == list(range(75)) and list(uids) != list(range(75))
        else:
            np.testing.assert_array_equal(uids, np.arange(lo, hi))
        for f in range(26):
            np.testing.assert_array_equal(ids[f], by_uid[f][uids] % TABLE)


def test_materialised_bags_in_their_own_folder(tmp_path):
    """MLPerf's materialisation without --copy_labels_and_dense leaves dense and labels in
    TorchRec's folder and writes the bags elsewhere."""
    src, sizes = bag_folder(tmp_path)
    bags_dir = tmp_path / "bags"
    bags_dir.mkdir()
    for d in range(3):
        (src / f"day_{d}_sparse_multi_hot.npz").rename(bags_dir / f"day_{d}_sparse_multi_hot.npz")
    out = tmp_path / "adopted"
    assert from_torchrec_cli.main([str(src), "-o", str(out), "--sparse-dir", str(bags_dir)]) == 0
    assert json.loads((out / "meta.json").read_text())["multi_hot_sizes"] == sizes
    want = np.load(bags_dir / "day_2_sparse_multi_hot.npz")["20"][:15] % TABLE
    np.testing.assert_array_equal(served(out, "val", sizes)[1][20], want)


def test_materialised_bags_need_matching_multi_hot_sizes(tmp_path):
    src, sizes = bag_folder(tmp_path)
    out = tmp_path / "adopted"
    assert from_torchrec_cli.main([str(src), "-o", str(out)]) == 0
    for wrong in ([], [3] * 26):
        with pytest.raises(ConfigError, match=r"holds materialised multi-hot bags of sizes "
                                              r"\[1, 2, 3, 4, 1"):
            served(out, "val", wrong)
    # one-hot ids chosen explicitly: the bags are not used
    one_hot = tmp_path / "one_hot"
    assert from_torchrec_cli.main([str(src), "-o", str(one_hot), "--sparse-suffix", ""]) == 0
    assert "multi_hot_sizes" not in json.loads((one_hot / "meta.json").read_text())
