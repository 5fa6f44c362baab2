"""Data as the DLRM reference's preprocessing leaves it: per day the processed arrays
(`reference_days`: raw categorical values numbered per feature by first appearance,
negative dense values clipped to 0) and the int32 .bin files of
data_loader_terabyte.numpy_to_binary (`write_bins`)."""

import numpy as np


def reference_days(day_rows, seed=0):
    """Per day the reference's processed (X_int, X_cat, y) and the table sizes `counts`:
    raw dense values with negatives clipped to 0; raw categorical values renumbered per
    feature in order of first appearance over the days."""
    rng = np.random.default_rng(seed)
    dicts = [{} for _ in range(26)]
    days = []
    for n in day_rows:
        x_int = rng.integers(-3, 5000, (n, 13)).astype(np.int32)
        x_int[rng.random((n, 13)) < 0.2] = 0  # missing values
        raw = rng.integers(0, 40 + np.arange(26) * 7, (n, 26)) * 2654435761 % (1 << 32)
        x_cat = np.zeros((n, 26), dtype=np.int64)
        for i in range(n):
            for j in range(26):
                x_cat[i, j] = dicts[j].setdefault(int(raw[i, j]), len(dicts[j]))
        y = (rng.random(n) < 0.3).astype(np.int32)
        days.append((np.maximum(x_int, 0), x_cat, y))
    return days, np.array([len(d) for d in dicts], dtype=np.int32)


def write_bins(folder, stem, days):
    """data_loader_terabyte.numpy_to_binary: int32 rows (y, X_int, X_cat); train = every day
    but the last; test = the last day's first ceil(n / 2) rows, val = the rest."""
    def rows(day):
        x_int, x_cat, y = day
        return np.concatenate([y.reshape(-1, 1), x_int, x_cat], axis=1).astype(np.int32)

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}_train.bin").write_bytes(
        b"".join(rows(d).tobytes() for d in days[:-1]))
    last = rows(days[-1])
    mid = int(np.ceil(len(last) / 2.0))
    (folder / f"{stem}_test.bin").write_bytes(last[:mid].tobytes())
    (folder / f"{stem}_val.bin").write_bytes(last[mid:].tobytes())
