"""Criteo pipeline benchmark: preprocessing rows/s, MB/s and peak memory, and loader
samples/s per process, each beside a plain line-by-line Python baseline, on a generated
Kaggle-shaped file; then the adopted formats (TorchRec's materialised bags, the DLRM
reference's .npz and .bin files) beside this project's own layout.

    python bench/bench_criteo.py [--rows 1000000] [--workers N] [--dir /tmp/criteo_bench]
"""

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dlrm_torchrec.config import DataConfig, EmbeddingsConfig, load_config  # noqa: E402
from dlrm_torchrec.data.converters import preprocess as pp  # noqa: E402
from dlrm_torchrec.data.criteo import CriteoSource  # noqa: E402

N_IDS = 10_000_000


def generate(path: str, rows: int, seed: int = 0) -> None:
    """Criteo-like rows: skewed ids, ~20% missing values, some negative integers."""
    rng = np.random.default_rng(seed)
    hex_pool = np.array([f"{v:08x}" for v in rng.integers(0, 2 ** 32, 200_000)] + [""],
                        dtype=object)
    dec_pool = np.array([str(v) for v in range(-2, 5000)] + [""] * 1500, dtype=object)
    with open(path, "w") as f:
        for start in range(0, rows, 100_000):
            m = min(100_000, rows - start)
            cols = np.concatenate([
                rng.integers(0, 2, (m, 1)).astype(str).astype(object),
                dec_pool[rng.zipf(1.2, (m, 13)) % len(dec_pool)],
                hex_pool[rng.zipf(1.1, (m, 26)) % len(hex_pool)],
            ], axis=1)
            f.write("\n".join("\t".join(r) for r in cols.tolist()) + "\n")


def baseline_preprocess(path: str, limit: int) -> float:
    """The straightforward approach: one line at a time in Python. Returns rows/s."""
    t = time.perf_counter()
    labels, dense, sparse = [], [], []
    with open(path) as f:
        for i, line in enumerate(f):
            if i == limit:
                break
            x = line.rstrip("\n").split("\t")
            labels.append(int(x[0]))
            dense.append([math.log1p(max(int(v or 0), 0)) for v in x[1:14]])
            sparse.append([int(v or "0", 16) % N_IDS for v in x[14:]])
    np.array(dense, np.float32), np.array(sparse, np.int32), np.array(labels, np.int32)
    return limit / (time.perf_counter() - t)


def baseline_loader(src: CriteoSource, limit: int, batch: int) -> float:
    """Sample by sample from the memory maps into Python lists, then tensors."""
    import torch

    dense_m, sparse_m, labels_m = src.days[0]
    t = time.perf_counter()
    for start in range(0, limit, batch):
        d, s, lab = [], [[] for _ in range(26)], []
        for i in range(start, min(start + batch, limit)):
            d.append(dense_m[i].tolist())
            for f, v in enumerate(sparse_m[i].tolist()):
                s[f].append(v)
            lab.append(int(labels_m[i, 0]))
        torch.tensor(d), torch.tensor(s), torch.tensor(lab)
    return limit / (time.perf_counter() - t)


def loader_rate(out: str, batch: int, window: int, multi_hot=None,
                distribution: str = "uniform", source: str = "criteo_kaggle") -> float:
    data = DataConfig(source=source, path=out, batch_size=batch,
                      shuffle_window=window, multi_hot_sizes=multi_hot or [],
                      multi_hot_distribution=distribution)
    src = CriteoSource(data, EmbeddingsConfig(num_embeddings_per_feature=[N_IDS] * 26))
    n = 0
    t = time.perf_counter()
    for b in src.batches("train"):
        n += b.labels.shape[0]
    return n / (time.perf_counter() - t)


# the MLPerf DCNv2 bag sizes (214 ids per sample), from the project's config for it
MLPERF_MULTI_HOT = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                            "configs", "mlperf_dcnv2.yaml")).data.multi_hot_sizes


def baseline_multi_hot(seed: int, ids: np.ndarray, sizes, table_sizes, pareto: bool):
    """Multi-hot expansion as whole-batch numpy expressions (how the loader did it before
    it worked through cache-sized chunks): every derived id hashed at once, then mod rows."""
    from dlrm_torchrec.data.hashing import hash_keys, uniform01
    from dlrm_torchrec.data.multi_hot import MULTI_HOT_KEY

    out = []
    for f, k in enumerate(sizes):
        if k == 1:
            out.append(ids[f])
            continue
        pos = np.arange(1, k, dtype=np.uint64)
        h = hash_keys(seed, MULTI_HOT_KEY, f, ids[f].astype(np.uint64)[:, None], pos[None, :])
        size = np.uint64(table_sizes[f])
        if pareto:
            x = np.minimum((1.0 - uniform01(h)) ** -4.0 - 1.0, 2.0 ** 62)
            extra = x.astype(np.uint64) % size
        else:
            extra = h % size
        out.append(np.concatenate([ids[f][:, None], extra.astype(np.int64)], axis=1).ravel())
    return np.concatenate(out)


def multi_hot_rates(out: str, batch: int, pareto: bool, batches: int = 8, repeats: int = 3):
    """samples/s of the loader's multi-hot expansion and of the baseline, on the ids of the
    same `batches` batches (MLPerf bag sizes); best of `repeats`, alternating the two."""
    data = DataConfig(source="criteo_kaggle", path=out, batch_size=batch,
                      multi_hot_sizes=MLPERF_MULTI_HOT,
                      multi_hot_distribution="pareto" if pareto else "uniform")
    src = CriteoSource(data, EmbeddingsConfig(num_embeddings_per_feature=[N_IDS] * 26))
    enc = src.encoder
    ids = [enc.ids(src.days[0][1][i * batch:(i + 1) * batch]) for i in range(batches)]
    expanders = (enc.multi_hot_values,
                 lambda x: baseline_multi_hot(src.seed, x, MLPERF_MULTI_HOT, enc.table_sizes,
                                              pareto))
    for expand in expanders:  # warm-up: first-touch page faults of the output arrays
        expand(ids[0])
    best = [0.0, 0.0]
    for _ in range(repeats):
        for e, expand in enumerate(expanders):
            t = time.perf_counter()
            for x in ids:
                expand(x)
            best[e] = max(best[e], batch * batches / (time.perf_counter() - t))
    return best


def materialise_bags(out: str, work: str) -> str:
    """Write MLPerf-style materialised bags (np.savez, members 0.npy .. 25.npy) beside the
    preprocessed days and adopt them with from_torchrec; returns the adopted folder."""
    from dlrm_torchrec.data.converters import from_torchrec

    rng = np.random.default_rng(0)
    for d in range(pp.KAGGLE_DAYS):
        n = len(np.load(os.path.join(out, f"day_{d}_labels.npy"), mmap_mode="r"))
        np.savez(os.path.join(out, f"day_{d}_sparse_multi_hot.npz"),
                 **{str(f): rng.integers(0, N_IDS, (n, k), dtype=np.int32)
                    for f, k in enumerate(MLPERF_MULTI_HOT)})
    adopted = os.path.join(work, "adopted")
    shutil.rmtree(adopted, ignore_errors=True)
    t = time.perf_counter()
    from_torchrec.adopt(out, adopted, "terabyte", log=lambda m: None)
    rows = sum(json.load(open(os.path.join(adopted, "meta.json")))["rows_per_day"])
    print(f"from_torchrec scan of materialised bags: {rows / (time.perf_counter() - t):,.0f} "
          "rows/s")
    return adopted


def reference_formats(out: str, work: str, batch: int) -> None:
    """The DLRM reference's preprocessed formats, written from the preprocessed days (dense
    counts recovered from log(x + 1)), adopted with from_reference: conversion rows/s of its
    compressed per-day .npz, and loader samples/s of its .bin files read in place, beside
    the loader on this project's own layout in the same run."""
    from dlrm_torchrec.data.converters import from_reference

    ref = os.path.join(work, "reference")
    shutil.rmtree(ref, ignore_errors=True)
    os.makedirs(ref)
    days = []
    for d in range(pp.KAGGLE_DAYS):
        arrs = [np.load(os.path.join(out, f"day_{d}_{p}.npy")) for p in ("dense", "sparse",
                                                                          "labels")]
        days.append((np.rint(np.expm1(arrs[0].astype(np.float64))).astype(np.int32),
                     arrs[1].astype(np.int32), arrs[2].reshape(-1).astype(np.int32)))
        # as data_utils writes the memory-map path's days: float64, compressed
        np.savez_compressed(os.path.join(ref, f"day_{d}_reordered.npz"),
                            X_cat=days[-1][1].astype(np.float64),
                            X_int=days[-1][0].astype(np.float64),
                            y=days[-1][2].astype(np.float64))
    rows = [np.concatenate([y[:, None], x, c], axis=1) for x, c, y in days]
    with open(os.path.join(ref, "terabyte_processed_train.bin"), "wb") as f:
        for r in rows[:-1]:
            f.write(r.tobytes())
    mid = -(-len(rows[-1]) // 2)
    rows[-1][:mid].tofile(os.path.join(ref, "terabyte_processed_test.bin"))
    rows[-1][mid:].tofile(os.path.join(ref, "terabyte_processed_val.bin"))
    np.savez_compressed(os.path.join(ref, "day_day_count.npz"),
                        total_per_file=[len(r) for r in rows])
    total = sum(len(r) for r in rows)
    for layout in ("days", "bin"):
        target = os.path.join(work, f"adopted_{layout}")
        shutil.rmtree(target, ignore_errors=True)
        t = time.perf_counter()
        from_reference.adopt(ref, target, layout=layout, dataset="kaggle", workers=1,
                             log=lambda m: None)
        what = "convert compressed per-day .npz" if layout == "days" else "check .bin files"
        print(f"from_reference {what} (1 worker): {total / (time.perf_counter() - t):,.0f} "
              "rows/s")
    for window, label in ((0, "sequential"), (1 << 20, "shuffle window 1M")):
        own = loader_rate(out, batch, window)
        binary = loader_rate(os.path.join(work, "adopted_bin"), batch, window)
        print(f"loader {label}, batch {batch}: reference .bin in place {binary:,.0f} "
              f"samples/s per process; this project's layout {own:,.0f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dir", default="/tmp/criteo_bench")
    ap.add_argument("--batch", type=int, default=4096)
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    raw = os.path.join(a.dir, "train.txt")
    if not os.path.exists(raw) or sum(1 for _ in open(raw, "rb")) != a.rows:
        t = time.perf_counter()
        generate(raw, a.rows)
        print(f"generated {a.rows:,} rows in {time.perf_counter() - t:.1f} s")
    size_mb = os.path.getsize(raw) / 1e6
    with open(raw, "rb") as f:  # warm the page cache, as for a file just downloaded
        while f.read(1 << 24):
            pass
    out = os.path.join(a.dir, "out")
    shutil.rmtree(out, ignore_errors=True)
    s = pp.Settings(inputs=[raw], output=out, dataset="kaggle", max_ind_range=N_IDS,
                    workers=a.workers, progress=False)
    t = time.perf_counter()
    report = pp.run(s)
    dt = time.perf_counter() - t
    main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base_rows = min(a.rows, 200_000)
    base = baseline_preprocess(raw, base_rows)
    print(f"machine: {os.cpu_count()} CPUs; input {a.rows:,} rows, {size_mb:.0f} MB")
    print(f"preprocess ({a.workers} workers): {dt:.2f} s, {report.lines / dt:,.0f} rows/s, "
          f"{size_mb / dt:.0f} MB/s (line count + parse + write, fsync included)")
    print(f"  peak RSS: main {main_mb:.0f} MB (torch import included), worker "
          f"{report.worker_maxrss_kb / 1024:.0f} MB (inherited by fork)")
    print(f"baseline line-by-line Python ({base_rows:,} rows): {base:,.0f} rows/s -> "
          f"{report.lines / dt / base:.1f}x")
    for window, mh, label in ((0, None, "sequential"), (1 << 20, None, "shuffle window 1M"),
                              (0, [10] * 26, "multi-hot 10/feature")):
        r = loader_rate(out, a.batch, window, mh)
        print(f"loader {label}, batch {a.batch}: {r:,.0f} samples/s per process")
    for dist in ("uniform", "pareto"):
        r = loader_rate(out, a.batch, 0, MLPERF_MULTI_HOT, dist)
        print(f"loader multi-hot MLPerf sizes ({dist}), batch {a.batch}: {r:,.0f} samples/s "
              "per process")
        for batch in (a.batch, 4 * a.batch):  # 4096 and 16384: per-GPU batches of MLPerf runs
            new, old = multi_hot_rates(out, batch, dist == "pareto")
            print(f"  expansion alone, batch {batch}: {new:,.0f} samples/s; whole-batch "
                  f"baseline {old:,.0f} ({new / old:.1f}x)")
    adopted = materialise_bags(out, a.dir)
    for window, label in ((0, "sequential"), (1 << 20, "shuffle window 1M")):
        r = loader_rate(adopted, a.batch, window, MLPERF_MULTI_HOT, source="criteo_terabyte")
        print(f"loader materialised MLPerf bags (.npz, from_torchrec), {label}, batch "
              f"{a.batch}: {r:,.0f} samples/s per process")
    reference_formats(out, a.dir, a.batch)
    src = CriteoSource(DataConfig(source="criteo_kaggle", path=out, batch_size=a.batch),
                       EmbeddingsConfig(num_embeddings_per_feature=[N_IDS] * 26))
    print(f"baseline loader sample by sample: {baseline_loader(src, 50_000, a.batch):,.0f} "
          "samples/s")


if __name__ == "__main__":
    main()
