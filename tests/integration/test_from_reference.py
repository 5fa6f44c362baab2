"""`python -m dlrm_torchrec.data.from_reference`: data the DLRM reference preprocessed is
served as the reference's own loaders read it.

The files are written here the way the reference's `data_utils.py` and
`data_loader_terabyte.py` write them (per-feature dictionaries numbered by first occurrence,
negatives clipped to 0, float64 ids saved transposed, compressed .npz, int32 .bin rows), and
the expected rows are computed with the reference's transform, in torch:
log(float32(x) + 1), ids as int64, the last day halved with its first ceil(n / 2) rows as
"test"."""

import json
import os

import numpy as np
import pytest
import torch

from dlrm_torchrec.cli import from_reference as from_reference_cli
from dlrm_torchrec.config import DataConfig, EmbeddingsConfig
from dlrm_torchrec.data.converters import from_reference as fr
from dlrm_torchrec.data.criteo import CriteoSource
from tests.helpers.dist_utils import run_cli
from tests.helpers.reference_preprocessing import reference_days, write_bins


def write_processed_days(folder, prefix, days, kind="reordered"):
    """`<prefix>_<d>_processed.npz` (ids float64, stored transposed: column-major) or
    `<prefix>_<d>_reordered.npz` (the memory-map path's second pass: float64, row-major)."""
    folder.mkdir(parents=True, exist_ok=True)
    for d, (x_int, x_cat, y) in enumerate(days):
        if kind == "processed":
            arrays = dict(X_cat=np.transpose(x_cat.T.astype(np.float64)), X_int=x_int, y=y)
        else:
            arrays = dict(X_cat=x_cat.astype(np.float64), X_int=x_int.astype(np.float64),
                          y=y.astype(np.float64))
        np.savez_compressed(folder / f"{prefix}_{d}_{kind}.npz", **arrays)


def write_counts(folder, d_file, days, counts):
    np.savez_compressed(folder / f"{d_file}_day_count.npz",
                        total_per_file=[len(y) for _, _, y in days])
    np.savez_compressed(folder / f"{d_file}_fea_count.npz", counts=counts)


def reference_rows(days, split):
    """What the reference's loader gives for `split`: (dense, ids (26, n), labels)."""
    if split == "train":
        x_int, x_cat, y = (np.concatenate(a) for a in zip(*days[:-1]))
    else:
        x_int, x_cat, y = days[-1]
        mid = int(np.ceil(len(y) / 2.0))
        part = slice(0, mid) if split == "test" else slice(mid, None)
        x_int, x_cat, y = x_int[part], x_cat[part], y[part]
    dense = torch.log(torch.tensor(x_int, dtype=torch.float) + 1).numpy()
    return dense, torch.tensor(x_cat, dtype=torch.long).numpy().T, y.astype(np.float32)


def served_rows(path, split, counts, source="criteo_terabyte", batch_size=16):
    data = DataConfig(source=source, path=str(path), batch_size=batch_size)
    src = CriteoSource(data, EmbeddingsConfig(num_embeddings_per_feature=[int(c) for c in counts]))
    dense, ids, labels = [], [], []
    for b in src.batches(split):
        n = b.num_real
        dense.append(b.dense_features[:n].numpy())
        ids.append(np.stack([b.sparse_features[f"cat_{f}"].values().numpy() for f in range(26)]))
        labels.append(b.labels[:n].numpy())
    return np.concatenate(dense), np.concatenate(ids, axis=1), np.concatenate(labels)


def assert_served_as_the_reference(out, days, counts, source="criteo_terabyte"):
    for split in ("train", "test", "val"):
        got, want = served_rows(out, split, counts, source), reference_rows(days, split)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=0)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])


def test_mlperf_bin_files_are_read_in_place_as_the_reference_reads_them(tmp_path):
    days, counts = reference_days([60, 45, 37, 41])
    src = tmp_path / "ref"
    write_bins(src, "terabyte_processed", days)
    write_counts(src, "day", days, counts)
    out = tmp_path / "out"
    meta = fr.adopt(str(src), str(out), log=lambda m: None)
    assert os.listdir(out) == ["meta.json"]  # nothing copied
    assert meta["rows_per_day"] == [60, 45, 37, 21, 20]  # train.bin cut by the day counts
    assert meta["table_sizes"] == counts.tolist()
    assert_served_as_the_reference(out, days, counts)


def test_without_day_counts_train_bin_is_one_day_and_sizes_come_from_the_ids(tmp_path):
    days, counts = reference_days([50, 33, 27], seed=1)
    src = tmp_path / "ref"
    write_bins(src, "terabyte_processed", days)
    lines = []
    meta = fr.adopt(str(src), str(tmp_path / "out"), log=lines.append)
    assert meta["rows_per_day"] == [83, 14, 13]
    all_ids = np.concatenate([c for _, c, _ in days])
    assert meta["table_sizes"] == (all_ids.max(axis=0) + 1).tolist()
    assert any("no *_day_count.npz" in m for m in lines)
    assert_served_as_the_reference(tmp_path / "out", days, counts)


@pytest.mark.parametrize("kind", ["reordered", "processed"])
def test_per_day_npz_files_are_converted_to_the_rows_the_reference_reads(tmp_path, kind):
    days, counts = reference_days([40, 52, 31], seed=2)
    src = tmp_path / "ref"
    write_processed_days(src, "day", days, kind)
    write_counts(src, "day", days, counts)
    out = tmp_path / "out"
    meta = fr.adopt(str(src), str(out), log=lambda m: None)
    assert meta["settings"]["layout"] == "days" and meta["rows_per_day"] == [40, 52, 31]
    assert not [p for p in os.listdir(out) if p.startswith(".from_reference")]  # temp gone
    assert_served_as_the_reference(out, days, counts)


def test_kaggle_single_file_is_cut_into_the_days_of_its_day_counts(tmp_path):
    """--processed-data-file: the days concatenated, with `counts` inside; the day sizes
    (here uneven, as after sub-sampling) come from train_day_count.npz."""
    day_rows = [30, 27, 33, 29, 31, 26, 25]
    days, counts = reference_days(day_rows, seed=3)
    src = tmp_path / "ref"
    src.mkdir()
    np.savez_compressed(src / "kaggleAdDisplayChallenge_processed.npz",
                        X_cat=np.concatenate([np.transpose(c.T.astype(np.float64))
                                              for _, c, _ in days]),
                        X_int=np.concatenate([x for x, _, _ in days]),
                        y=np.concatenate([y for _, _, y in days]), counts=counts)
    np.savez_compressed(src / "train_day_count.npz", total_per_file=day_rows)
    out = tmp_path / "out"
    meta = fr.adopt(str(src), str(out), log=lambda m: None)
    assert meta["settings"]["dataset"] == "kaggle" and meta["rows_per_day"] == day_rows
    assert_served_as_the_reference(out, days, counts, source="criteo_kaggle")


def test_an_interrupted_conversion_keeps_the_days_already_converted(tmp_path):
    days, counts = reference_days([20, 22, 19], seed=4)
    src = tmp_path / "ref"
    write_processed_days(src, "day", days)
    write_counts(src, "day", days, counts)
    out = tmp_path / "out"
    fr.adopt(str(src), str(out), log=lambda m: None)
    os.remove(out / "meta.json")  # as if stopped while converting day 1
    os.remove(out / "day_1_sparse.npy")
    lines = []
    fr.adopt(str(src), str(out), log=lines.append)
    assert [m for m in lines if "converted before" in m] == [
        "day 0: 20 rows (converted before)", "day 2: 19 rows (converted before)"]
    assert_served_as_the_reference(out, days, counts)


def _bad_source(tmp_path, case):
    days, counts = reference_days([12, 10, 9], seed=5)
    src = tmp_path / "ref"
    if case in ("id over count", "label 2", "negative dense", "missing val", "bin size"):
        if case == "id over count":
            days[1][1][4, 7] = counts[7]
        if case == "label 2":
            days[2][2][3] = 2
        if case == "negative dense":
            days[0][0][5, 2] = -1
        write_bins(src, "terabyte_processed", days)
        write_counts(src, "day", days, counts)
        if case == "missing val":
            os.remove(src / "terabyte_processed_val.bin")
        if case == "bin size":
            with open(src / "terabyte_processed_train.bin", "ab") as f:
                f.write(b"\0" * 8)
    elif case in ("fractional id", "npz label 2", "truncated npz", "damaged npz", "not npz",
                  "wrong array"):
        if case == "npz label 2":
            days[1][2][6] = 2
        write_processed_days(src, "day", days, "processed")
        write_counts(src, "day", days, counts)
        if case == "fractional id":
            ids = np.transpose(days[1][1].T.astype(np.float64))
            ids[3, 4] = 2.5
            np.savez_compressed(src / "day_1_processed.npz", X_cat=ids, X_int=days[1][0],
                                y=days[1][2])
        if case == "truncated npz":
            data = (src / "day_2_processed.npz").read_bytes()
            (src / "day_2_processed.npz").write_bytes(data[:len(data) // 2])
        if case == "damaged npz":  # bytes inside X_cat's compressed stream (the first member)
            data = bytearray((src / "day_2_processed.npz").read_bytes())
            data[200:260] = bytes(60)
            (src / "day_2_processed.npz").write_bytes(bytes(data))
        if case == "not npz":
            (src / "day_2_processed.npz").write_text("label,I1,C1\n")
        if case == "wrong array":
            np.savez_compressed(src / "day_2_processed.npz", X_cat=days[2][1],
                                X_int=days[2][0][:, :12], y=days[2][2])
    else:
        src.mkdir()
    return src


@pytest.mark.parametrize("case, expect", [
    ("id over count", "terabyte_processed_train.bin: row 16 (0-based), feature 7: id"),
    ("label 2", "terabyte_processed_test.bin: row 3 (0-based): label 2 is not 0 or 1"),
    ("negative dense", "terabyte_processed_train.bin: row 5 (0-based), dense value 2"),
    ("missing val", "terabyte_processed_val.bin: not found"),
    ("bin size", "not a whole number of 40-int32 rows"),
    ("fractional id", "day_1_processed.npz: X_cat row 3 (0-based), column 4: value 2.5 is "
                      "not a whole number"),
    ("npz label 2", "day_1_processed.npz: y row 6 (0-based): label 2 is not 0 or 1"),
    ("truncated npz", "day_2_processed.npz"),
    ("damaged npz", "day_2_processed.npz: array 'X_cat' is damaged"),
    ("not npz", "day_2_processed.npz: not a NumPy .npz file"),
    ("wrong array", "array 'X_int' is int32 (9, 12), expected n x 13"),
    ("empty folder", "no preprocessed data of the DLRM reference there"),
    ("our own output", "holds data preprocessed by dlrm_torchrec.data.preprocess"),
])
def test_bad_input_stops_with_file_and_row_and_writes_no_meta(tmp_path, capsys, case, expect):
    src = _bad_source(tmp_path, case)
    out = tmp_path / "out"
    if case == "our own output":
        write_bins(src, "terabyte_processed", reference_days([5, 4])[0])
        out.mkdir()
        (out / "meta.json").write_text(json.dumps({"format_version": 1,
                                                   "settings": {"dataset": "terabyte"}}))
    assert from_reference_cli.main([str(src), "-o", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and expect in err, err
    assert "Traceback" not in err
    if case != "our own output":
        assert not (out / "meta.json").exists()


def test_bin_data_trains_end_to_end(tmp_path):
    """The command line adopts .bin files; a short training run on them evaluates the
    reference's test half."""
    days, counts = reference_days([300, 260, 211], seed=6)
    src = tmp_path / "ref"
    write_bins(src, "terabyte_processed", days)
    write_counts(src, "day", days, counts)
    out, run_dir = tmp_path / "out", tmp_path / "run"
    adopt = run_cli(["-m", "dlrm_torchrec.data.from_reference", str(src), "-o", str(out)],
                    timeout=120)
    assert adopt.returncode == 0, adopt.stderr[-2000:]
    sizes = ",".join(str(c) for c in counts)
    train = run_cli(
        ["-m", "dlrm_torchrec.train", "--config", "configs/criteo_terabyte.yaml",
         f"data.path={out}", f"embeddings.num_embeddings_per_feature=[{sizes}]",
         "embeddings.dim=8", "model.bottom_mlp=[16,8]", "model.top_mlp=[16,1]",
         "data.batch_size=64", "data.eval_batch_size=128", "training.eval_every_n_steps=0",
         f"logging.run_dir={run_dir}", "logging.progress_bar=false", "checkpoint.at_end=false"],
        timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["train_samples_seen"] == 560 and m["final"]["split"] == "test"
    assert m["final"]["samples"] == 106  # ceil(211 / 2)
