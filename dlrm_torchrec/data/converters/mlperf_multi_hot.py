"""MLPerf DLRM-DCNv2's multi-hot bags (`day_{d}_sparse_multi_hot.npz`), written in bounded
memory from the one-hot days that `prepare_mlperf` writes.

What MLPerf's `materialize_synthetic_multihot_dataset.py` (with its `Multihot` class)
computes, and so what this reproduces:
- Lookup tables: the global NumPy RNG is seeded with 0 once, then for each feature f in
  order 0 .. 25, with n_f rows (its table size) and bag size k_f, one call draws an
  (n_f, k_f - 1) array: `randint(0, n_f)` (int64, the legacy bounded draw) for
  "uniform", or `pareto(a=0.25)` cast to int32 and taken mod n_f for "pareto". Row r of
  table f is [r, those k_f - 1 draws], kept as int32. Features with k_f = 1 draw nothing.
  Because the draws of one table follow those of the tables before it in one RNG stream
  (and the uniform draw rejects a data-dependent number of samples), the tables are drawn
  one after another in a single task; a table drawn in chunks of rows gives the same values
  as one call, since the legacy RNG fills an array element by element in C order.
- The pareto cast: np.float64 -> np.int32 truncates below 2**31, and on x86-64 (where
  MLPerf's data were made) gives -2**31 at or above it (about 0.5 % of pareto(0.25)
  draws); mod n_f then makes that (-2**31) mod n_f. Done here explicitly, so the result
  does not depend on the machine.
- Bags: every day 0 .. 23 (day 23 too): the day's one-hot id x of feature f (from
  `day_{d}_sparse.npy`) gives the row x mod n_f of table f, an int32 bag of k_f ids whose
  first is x mod n_f.
- File: `np.savez` (uncompressed zip, members `0.npy` .. `25.npy`, member f an int32
  (rows, k_f) array, zip64 headers, the zip's fixed 1980-01-01 timestamps), so the bytes
  are those `np.savez` writes for the same arrays.

Memory: tables take 4 * sum_f n_f * (k_f - 1) bytes on disk (23.1 GB for MLPerf's sizes),
memory-mapped by the day tasks; each task holds at most its budget of chunks besides.
"""

import json
import os
import shutil
import zipfile
from typing import List, Optional, Sequence

import numpy as np

from dlrm_torchrec.data.converters import direct_io
from dlrm_torchrec.data.converters.preprocess import NpyWriter, write_json

NUM_SPARSE = 26
# MLPerf's arguments to the materialize script, the sizes in configs/mlperf_dcnv2.yaml
MLPERF_TABLE_SIZES = (40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000,
                      3067956, 405282, 10, 2209, 11938, 155, 4, 976, 14, 40000000, 40000000,
                      40000000, 590152, 12973, 108, 36)
MLPERF_BAG_SIZES = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10,
                    3, 1, 1)
DISTRIBUTIONS = ("uniform", "pareto")
SEED = 0  # `Multihot` seeds the global RNG with 0 whatever the shuffle's seed
PARETO_A = 0.25
INT32_MIN = -(2 ** 31)
MAX_TABLE = 2 ** 31 - 1  # the tables are int32
DRAW_CHUNK_BYTES = 64 << 20


def problem(bag_sizes: Sequence[int], table_sizes: Sequence[int], distribution: str) -> Optional[str]:
    """Why these options cannot be used, or None."""
    for flag, sizes, top in (("--multi-hot-sizes", bag_sizes, None),
                             ("--multi-hot-table-sizes", table_sizes, MAX_TABLE)):
        if len(sizes) != NUM_SPARSE:
            return f"{flag}: {len(sizes)} values, expected {NUM_SPARSE} (one per sparse feature)"
        bad = [v for v in sizes if v < 1 or (top is not None and v > top)]
        if bad:
            limit = f" and at most {top}" if top is not None else ""
            return f"{flag}: {bad[0]} is not allowed; each value must be at least 1{limit}"
    if distribution not in DISTRIBUTIONS:
        return f"--multi-hot-distribution {distribution}: must be uniform or pareto"
    return None


def table_bytes(bag_sizes: Sequence[int], table_sizes: Sequence[int]) -> int:
    """Disk (and, for fast lookups, page cache) the lookup tables take."""
    return 4 * sum(int(n) * (k - 1) for n, k in zip(table_sizes, bag_sizes))


def npz_bytes(rows: int, bag_sizes: Sequence[int]) -> int:
    """About the size of a day's npz file (headers aside)."""
    return 4 * rows * sum(bag_sizes)


def pareto_ids(draws: np.ndarray, n: int) -> np.ndarray:
    """float64 pareto draws -> int32 ids as `draws.astype(np.int32) % n` gives on x86-64:
    truncation below 2**31, -2**31 at or above it (module docstring)."""
    v = np.where(draws < 2.0 ** 31, draws, float(INT32_MIN)).astype(np.int64)
    return (v % n).astype(np.int32)


def _table_path(folder: str, f: int) -> str:
    return os.path.join(folder, f"table_{f}.npy")


def _state_path(folder: str, f: int) -> str:
    return os.path.join(folder, f"state_{f}.json")


def tables_done(folder: str) -> bool:
    return os.path.exists(_state_path(folder, NUM_SPARSE - 1))


def draw_tables(folder: str, bag_sizes: Sequence[int], table_sizes: Sequence[int],
                distribution: str, budget: int) -> None:
    """The random columns of every lookup table into `folder`/table_{f}.npy (int32
    (n_f, k_f - 1); none for k_f = 1), drawing in chunks of about `budget` bytes.

    Resumable per table: after table f is renamed into place, the RNG state that follows
    it is saved (`state_{f}.json`), and a rerun continues from the first table without
    one, from the state saved before it."""
    os.makedirs(folder, exist_ok=True)
    rs = np.random.RandomState(SEED)
    start = 0
    while start < NUM_SPARSE and os.path.exists(_state_path(folder, start)):
        start += 1
    if start == NUM_SPARSE:
        return
    if start:
        with open(_state_path(folder, start - 1)) as fh:
            st = json.load(fh)
        rs.set_state(("MT19937", np.array(st["key"], dtype=np.uint32), st["pos"],
                      st["has_gauss"], st["gauss"]))
    for f in range(start, NUM_SPARSE):
        n, width = int(table_sizes[f]), bag_sizes[f] - 1
        if width:
            # 8 bytes per drawn value (int64 or float64), plus the int32 copy; chunks past
            # 64 MB draw no faster, so a larger budget is left unused
            step = max(1, min(budget, DRAW_CHUNK_BYTES) // (12 * width))
            w = NpyWriter(_table_path(folder, f), np.int32, width)
            try:
                for lo in range(0, n, step):
                    m = min(n, lo + step) - lo
                    if distribution == "uniform":
                        w.write(rs.randint(0, n, size=(m, width), dtype=np.int64))
                    else:
                        w.write(pareto_ids(rs.pareto(PARETO_A, size=(m, width)), n))
                w.finish()
            except BaseException:
                w.abort()
                raise
        _, key, pos, has_gauss, gauss = rs.get_state(legacy=True)
        write_json(_state_path(folder, f), {"key": key.tolist(), "pos": int(pos),
                                            "has_gauss": int(has_gauss), "gauss": float(gauss)})


def _npy_header_1_0(fh, rows: int, k: int) -> None:
    np.lib.format.write_array_header_1_0(
        fh, {"descr": np.lib.format.dtype_to_descr(np.dtype("<i4")), "fortran_order": False,
             "shape": (rows, k)})


def write_day(sparse_path: str, dst: str, tables: str, work: str, bag_sizes: Sequence[int],
              table_sizes: Sequence[int], budget: int) -> int:
    """One day's bags: `sparse_path` ((rows, 26) one-hot ids) -> the npz `dst`, renamed into
    place when complete; returns the rows.

    First the ids are split into one file per feature (x mod n_f, int32) under `work`, so
    each zip member is then written in one sequential pass with only a chunk in memory."""
    layout = np.load(sparse_path, mmap_mode="r")  # the header only
    rows, dtype, start = len(layout), layout.dtype, layout.offset
    del layout
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    cols = [os.path.join(work, f"ids_{f}.bin") for f in range(NUM_SPARSE)]
    step = max(1024, budget // (NUM_SPARSE * 8 * 3))
    handles = [open(p, "wb") for p in cols]
    row_bytes = NUM_SPARSE * dtype.itemsize
    space = np.empty(step * row_bytes + direct_io.PAGE, np.uint8)
    remainder, column = np.empty(step, np.int64), np.empty(step, np.int32)
    try:
        for lo in range(0, rows, step):
            # read past the page cache, as the day was written (prepare_mlperf)
            at = start + lo * row_bytes
            block = direct_io.in_phase(space, min(step, rows - lo) * row_bytes, at)
            if direct_io.read_at(sparse_path, block, at) != len(block):
                raise RuntimeError(f"{sparse_path}: shorter than its header says")
            block = block.view(dtype).reshape(-1, NUM_SPARSE)
            m = len(block)
            for f, fh in enumerate(handles):
                np.remainder(block[:, f], int(table_sizes[f]), out=remainder[:m])
                column[:m] = remainder[:m]
                column[:m].tofile(fh)
    finally:
        for fh in handles:
            fh.close()
    tmp = dst + ".tmp"
    largest = np.zeros(NUM_SPARSE, np.int64)
    # the bags (20 GB at 24 million rows) written past the page cache: meta.json takes the
    # table sizes found here instead of reading them back
    out = direct_io.DirectWriter(tmp)
    try:
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for f in range(NUM_SPARSE):
                k = bag_sizes[f]
                table = np.load(_table_path(tables, f), mmap_mode="r") if k > 1 else None
                step = max(1, budget // (8 * k + 8))
                space = _bag_space(step * k * 4)
                # np.savez opens every member this way (zip64 headers forced)
                with zf.open(f"{f}.npy", "w", force_zip64=True) as member:
                    _npy_header_1_0(member, rows, k)
                    for lo in range(0, rows, step):
                        m = min(rows, lo + step) - lo
                        ids = np.fromfile(cols[f], np.int32, count=m, offset=4 * lo)
                        bags = space[:m * k * 4].view(np.int32).reshape(m, k)
                        bags[:, 0] = ids
                        if table is not None:  # ids are in range: "clip" changes none
                            np.take(table, ids, axis=0, out=bags[:, 1:], mode="clip")
                        largest[f] = max(largest[f], int(bags.max()))
                        member.write(memoryview(bags).cast("B"))
    except BaseException:
        out.abort()
        raise
    out.close()
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    write_json(largest_ids_path(work), {"largest_ids": largest.tolist()}, sync=False)
    os.replace(tmp, dst)
    shutil.rmtree(work, ignore_errors=True)
    return rows


_BAG_SPACE: List[np.ndarray] = []


def _bag_space(nbytes: int) -> np.ndarray:
    """Memory for a chunk of bags, reused by a process's days (fresh memory costs a zeroed
    page every 4 KB: a third of this stage's time when each chunk had its own)."""
    if not _BAG_SPACE or len(_BAG_SPACE[0]) < nbytes:
        _BAG_SPACE[:] = []
        _BAG_SPACE.append(np.empty(nbytes, np.uint8))
    return _BAG_SPACE[0]


def release_scratch() -> None:
    """Free the memory kept for the next day's bags."""
    _BAG_SPACE.clear()


def largest_ids_path(work: str) -> str:
    """Where `write_day` notes each feature's largest id in the day's bags."""
    return work.rstrip(os.sep) + ".largest.json"


def parse_sizes(text: str, flag: str) -> List[int]:
    """'3,2,1,...' -> [3, 2, 1, ...]; ValueError names the flag."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text}: expected comma-separated integers") from None
