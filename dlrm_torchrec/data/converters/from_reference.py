"""Train on Criteo data that the DLRM reference (`dlrm_s_pytorch.py`, `data_utils.py`)
already preprocessed, instead of preprocessing the raw text again.

    python -m dlrm_torchrec.data.from_reference /data/criteo_terabyte -o data/tb_ref
    python -m dlrm_torchrec.train --config configs/criteo_terabyte.yaml data.path=data/tb_ref

The reference's own data, its dictionary ids, negative sub-sampling and shuffle included,
is then trained on as it is. Layouts, found in SOURCE in this order (`--layout` chooses):

- `bin`, the MLPerf binary files (`--mlperf-bin-loader`): `<stem>_train.bin`,
  `<stem>_test.bin`, `<stem>_val.bin`, rows of 40 int32 (label, 13 dense counts, 26 ids).
  Read in place: OUTPUT/meta.json names them and nothing is copied; the dense transform
  log(x + 1) is applied at load. `<prefix>_day_count.npz` (the reference's
  `total_per_file`), when present, cuts train.bin into its days.
- `days`, the per-day files of `--memory-map`: `<prefix>_<d>_reordered.npz` (else
  `<prefix>_<d>_processed.npz`), prefix `day` (Terabyte) or `train_day` (Kaggle).
- `file`, the single file of `--processed-data-file` (`kaggleAdDisplayChallenge_processed.npz`,
  `terabyte_processed.npz`): cut into the days of `<prefix>_day_count.npz`.

The .npz files are compressed, so `days` and `file` are converted into OUTPUT in this
project's layout (`dlrm_torchrec.data.preprocess`; dense values stored as log(x + 1)), a day
per worker process, streamed: memory stays at a few chunks whatever the day's size. The
reference saves some arrays column-major; those columns pass through temporary files in
OUTPUT (4 bytes per value of one array of the day being converted).

Table sizes: the reference's `<prefix>_fea_count.npz` (`counts`, its `ln_emb`), or, without
it, each feature's largest id + 1. Every row is checked: ids whole numbers in [0, count),
labels 0 or 1, dense values whole numbers >= 0 (the reference clips negatives to 0 while
preprocessing). The first row that breaks one stops the adoption with its file, array and
row, and leaves no meta.json.

Splits, as the reference: the training days in their stored order (the reference shuffled
them already when it ran with --data-randomize), then the last day: "test" its first
ceil(n / 2) rows, "val" the rest; in the `bin` layout the test and val files are those
halves. Negative sub-sampling is in the data: the reference drops negatives on every day,
the evaluation day included, so evaluation sees the sub-sampled click rate.
"""

import glob
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from dlrm_torchrec.data.converters.from_torchrec import (
    AdoptError,
    check_input_file,
    check_output,
    map_in_workers,
    stored_name,
)
from dlrm_torchrec.data.converters.preprocess import (
    FORMAT_VERSION,
    NO_SPACE,
    NpyWriter,
    day_files,
    write_json,
)
from dlrm_torchrec.data.criteo import BIN_COLUMNS, open_bin_rows
from dlrm_torchrec.data.criteo_text import log_dense
from dlrm_torchrec.data.file_checks import fingerprint, fingerprint_change, read_npy_header

NUM_DENSE, NUM_SPARSE = 13, 26
CHUNK_ROWS = 1 << 18
SOURCE = "dlrm_reference"
LAYOUTS = ("bin", "days", "file")
# the reference's array names -> (our part, row width)
ARRAYS = {"X_int": ("dense", NUM_DENSE), "X_cat": ("sparse", NUM_SPARSE), "y": ("labels", 1)}
INT32_MAX = np.iinfo(np.int32).max
DAMAGED = (OSError, EOFError, zipfile.BadZipFile, zlib.error)  # reading a zip member


# --------------------------------------------------------------------------- checks


def check_block(part: str, block: np.ndarray, where: Callable[[int, int], str],
                counts: Optional[np.ndarray], col0: int = 0) -> np.ndarray:
    """Check rows of one part (any numeric dtype) and return them as int32.

    Args:
        part: "dense", "sparse" or "labels".
        block: (rows, columns) values; column c is the part's column col0 + c.
        where: (row in block, column) -> the file, array and row, for the error message.
        counts: the table sizes (sparse ids must be below them), or None.
    """
    if block.dtype.kind not in "iufb":
        raise AdoptError(f"{where(0, col0)}: {block.dtype} values, expected numbers")
    if block.dtype.kind == "f":
        bad = ~np.isfinite(block) | (block != np.floor(block))
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise AdoptError(f"{where(r, col0 + c)}: value {block[r, c].item()} is not a "
                             "whole number")
    if part == "labels":
        bad = (block != 0) & (block != 1)
        what = "label {} is not 0 or 1"
    elif part == "dense":
        bad = (block < 0) | (block > INT32_MAX)
        what = "dense value {} is outside 0 .. 2^31-1 (the reference clips negatives to 0)"
    else:
        high = INT32_MAX if counts is None else counts[col0:col0 + block.shape[1]] - 1
        bad = (block < 0) | (block > high)
        what = "id {} is outside 0 .. count - 1" if counts is not None else "negative id {}"
    if bad.any():
        r, c = np.argwhere(bad)[0]
        msg = what.format(block[r, c].item())
        if counts is not None and part == "sparse":
            msg += f" (count {counts[col0 + c]}, from the reference's counts)"
        raise AdoptError(f"{where(r, col0 + c)}: {msg}")
    return block.astype(np.int32, copy=False)


# --------------------------------------------------------------------------- npz arrays


class NpzArray:
    """One array of a reference .npz (compressed or not) as int32 rows, read front to back
    through the zip stream, never whole. Column-major arrays (the reference saves transposed
    arrays as they are) are first spilled column by column to temporary files in `tmp`.
    Values are checked (`check_block`) as they are read."""

    def __init__(self, path: str, key: str, tmp: str, counts: Optional[np.ndarray]):
        self.path, self.key, self.counts = path, key, counts
        self.part, self.width = ARRAYS[key]
        try:
            self.zf = zipfile.ZipFile(path)
            self.fp = self.zf.open(key + ".npy")
        except (OSError, zipfile.BadZipFile) as e:
            raise AdoptError(f"{path}: not a NumPy .npz file ({e})") from None
        except KeyError:
            names = ", ".join(n[:-4] for n in self.zf.namelist())
            raise AdoptError(f"{path}: no array {key!r} (it holds {names}); not the reference's "
                             "processed data") from None
        try:
            shape, fortran, self.dtype = read_npy_header(self.fp)
        except ValueError as e:
            raise AdoptError(f"{path}: array {key!r} is not a NumPy array ({e})") from None
        except DAMAGED as e:
            raise AdoptError(f"{path}: array {key!r} is damaged ({e})") from None
        if self.dtype.hasobject or len(shape) not in (1, 2) or \
                (shape[1:] or (1,))[0] != self.width:
            raise AdoptError(f"{path}: array {key!r} is {self.dtype} {shape}, expected "
                             f"n x {self.width} numbers")
        self.rows, self.pos = shape[0], 0
        self.columns: Optional[List[np.ndarray]] = None
        if fortran and self.width > 1:
            self.columns = [self._spill(c, tmp) for c in range(self.width)]

    def _where(self, first_row: int) -> Callable[[int, int], str]:
        return lambda r, c: (f"{self.path}: {self.key} row {first_row + r} (0-based)"
                             + (f", column {c}" if self.width > 1 else ""))

    def _read(self, count: int) -> np.ndarray:
        try:
            data = self.fp.read(count * self.dtype.itemsize)
        except DAMAGED as e:
            raise AdoptError(f"{self.path}: array {self.key!r} is damaged ({e})") from None
        if len(data) != count * self.dtype.itemsize:
            raise AdoptError(f"{self.path}: array {self.key!r} ends early (a truncated file)")
        return np.frombuffer(data, dtype=self.dtype)

    def _spill(self, col: int, tmp: str) -> np.ndarray:
        """Column `col` (the next in the stream), checked, to an int32 file; its memory map."""
        target = os.path.join(tmp, f"{self.key}_{col}.i32")
        with open(target, "wb") as f:
            for lo in range(0, self.rows, CHUNK_ROWS):
                n = min(CHUNK_ROWS, self.rows - lo)
                vals = check_block(self.part, self._read(n)[:, None], self._where(lo),
                                   self.counts, col)
                f.write(memoryview(np.ascontiguousarray(vals)).cast("B"))
        return np.memmap(target, dtype=np.int32, mode="r") if self.rows else \
            np.zeros(0, np.int32)

    def next_rows(self, n: int) -> np.ndarray:
        """The next n rows, checked, as (n, width) int32."""
        lo = self.pos
        self.pos += n
        if self.columns is not None:
            return np.stack([c[lo:lo + n] for c in self.columns], axis=1)
        block = self._read(n * self.width).reshape(n, self.width)
        return check_block(self.part, block, self._where(lo), self.counts)

    def close(self) -> None:
        self.columns = None
        self.fp.close()
        self.zf.close()


# --------------------------------------------------------------------------- layouts


@dataclass
class Found:
    """What SOURCE holds: the layout, dataset, files and the reference's bookkeeping."""
    layout: str
    dataset: str
    files: List[str]  # bin: train, test, val; days: one per day; file: the one file
    counts_file: Optional[str]
    day_count_file: Optional[str]


def _one(pattern: str, what: str) -> Optional[str]:
    hits = sorted(glob.glob(pattern))
    if len(hits) > 1:
        raise AdoptError(f"{len(hits)} {what} files ({', '.join(hits)}); name one with "
                         f"--{'counts' if 'fea' in pattern else 'day-counts'}")
    return hits[0] if hits else None


def _day_prefix_files(src: str) -> Tuple[Optional[str], List[str]]:
    """The per-day files: <prefix>_<d>_reordered.npz, else _processed.npz, d = 0, 1, ..."""
    for kind in ("reordered", "processed"):
        firsts = sorted(glob.glob(os.path.join(src, f"*_0_{kind}.npz")))
        if len(firsts) > 1:
            raise AdoptError(f"{src}: several sets of per-day files ({', '.join(firsts)})")
        if firsts:
            prefix = firsts[0][:-len(f"_0_{kind}.npz")]
            files = []
            while os.path.isfile(f"{prefix}_{len(files)}_{kind}.npz"):
                files.append(f"{prefix}_{len(files)}_{kind}.npz")
            return prefix, files
    return None, []


def find_layout(src: str, layout: Optional[str], dataset: Optional[str],
                counts_file: Optional[str], day_count_file: Optional[str]) -> Found:
    """The reference's preprocessed data in `src` (a folder, or the `file` layout's .npz)."""
    for given in (counts_file, day_count_file):
        if given:
            check_input_file(given)
    if os.path.isfile(src) and src.endswith(".npz"):
        layout, folder = layout or "file", os.path.dirname(src) or "."
    elif os.path.isdir(src):
        folder = src
    elif os.path.exists(src):
        raise AdoptError(f"{src}: a file, not the reference's data folder or its processed "
                         ".npz file")
    else:
        raise AdoptError(f"{src}: not found")
    bins = sorted(glob.glob(os.path.join(folder, "*_train.bin")))
    prefix, day_list = _day_prefix_files(folder)
    whole = [p for p in sorted(glob.glob(os.path.join(folder, "*_processed.npz")))
             if not re.search(r"_\d+_processed\.npz$", p)]
    if os.path.isfile(src):
        whole = [src]
    if layout is None:
        layout = "bin" if bins else "days" if day_list else "file" if whole else None
    if layout is None:
        raise AdoptError(
            f"{src}: no preprocessed data of the DLRM reference there; looked for "
            "<stem>_train.bin (--mlperf-bin-loader), <prefix>_0_reordered.npz or "
            "_0_processed.npz (--memory-map), and a single *_processed.npz "
            "(--processed-data-file)")
    if layout == "bin":
        if len(bins) != 1:
            raise AdoptError(f"{folder}: " + ("no *_train.bin" if not bins else
                             f"several *_train.bin ({', '.join(bins)}); adopt one folder each"))
        stem = bins[0][:-len("_train.bin")]
        files = [f"{stem}_{s}.bin" for s in ("train", "test", "val")]
        for f in files:
            if not os.path.isfile(f):
                raise AdoptError(f"{f}: not found (the bin layout needs train, test and val)")
        dataset = dataset or "terabyte"  # the reference writes .bin files for Terabyte only
    elif layout == "days":
        if not day_list:
            raise AdoptError(f"{folder}: no <prefix>_0_reordered.npz or _0_processed.npz")
        files = day_list
        base = os.path.basename(prefix)
        dataset = dataset or ("kaggle" if base.endswith("_day") or len(files) == 7
                              else "terabyte")
    else:
        if len(whole) != 1:
            raise AdoptError(f"{folder}: " + ("no *_processed.npz" if not whole else
                             f"several *_processed.npz ({', '.join(whole)}); name one as SOURCE"))
        files = whole
        dataset = dataset or ("terabyte" if "terabyte" in os.path.basename(whole[0])
                              else "kaggle")
    counts_file = counts_file or _one(os.path.join(folder, "*_fea_count.npz"), "*_fea_count.npz")
    day_count_file = day_count_file or _one(os.path.join(folder, "*_day_count.npz"),
                                            "*_day_count.npz")
    return Found(layout, dataset, files, counts_file, day_count_file)


def _load_small(path: str, key: str, required: bool = True) -> Optional[np.ndarray]:
    """A small array of an .npz, flattened to int64 (None: absent and not `required`)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if key not in z:
                if not required:
                    return None
                raise AdoptError(f"{path}: no array {key!r} (it holds {', '.join(z.files)})")
            return np.asarray(z[key]).reshape(-1).astype(np.int64)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise AdoptError(f"{path}: not a NumPy .npz file ({e})") from None


def read_counts(found: Found) -> Optional[np.ndarray]:
    """The reference's table sizes (`counts`): from the counts file, or the `file` layout's
    own `counts` array; None when neither exists."""
    where = found.counts_file or found.files[0]
    if found.counts_file:
        counts = _load_small(found.counts_file, "counts")
    elif found.layout == "file":
        counts = _load_small(found.files[0], "counts", required=False)
    else:
        counts = None
    if counts is not None and (len(counts) != NUM_SPARSE or (counts < 1).any()):
        raise AdoptError(f"{where}: counts {counts.tolist()}: expected {NUM_SPARSE} "
                         "positive table sizes")
    return counts


# --------------------------------------------------------------------------- conversion


def provenance(path: str, counts_file: Optional[str]) -> Dict:
    """What a converted day came from, recorded in its marker: the source file and the
    counts its ids were checked against, by path and content (`file_checks.fingerprint`)."""
    return {"source": os.path.realpath(path), "source_file": fingerprint(path),
            "counts_file": fingerprint(counts_file) if counts_file else None}


def convert_file(path: str, segments: List[Tuple[int, int, int]], out: str,
                 counts: Optional[np.ndarray],
                 origin: Dict) -> List[Tuple[int, int, np.ndarray]]:
    """Convert the rows of the reference's .npz `path` into this project's day files.

    Args:
        segments: (day, first row in `path`, rows) of each output day, consecutive from row 0
            and covering every row.
        origin: `provenance` of the conversion, written into each day's marker.
    Returns: per day (day, rows, each feature's largest id + 1).
    """
    try:
        return _convert_file(path, segments, out, counts, origin)
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        raise AdoptError(f"{out}: no space left on device ({e.strerror}) while converting "
                         f"{path}; the days finished so far are kept and the partial files "
                         "removed; free some space and rerun the same command to "
                         "continue") from None


def _convert_file(path: str, segments: List[Tuple[int, int, int]], out: str,
                  counts: Optional[np.ndarray],
                  origin: Dict) -> List[Tuple[int, int, np.ndarray]]:
    tmp = tempfile.mkdtemp(prefix=".from_reference_", dir=out)
    arrays: List[NpzArray] = []
    done = []
    try:
        for key in ARRAYS:
            arrays.append(NpzArray(path, key, tmp, counts))
        rows = {a.key: a.rows for a in arrays}
        if len(set(rows.values())) != 1:
            raise AdoptError(f"{path}: row counts differ: {rows}")
        n = arrays[0].rows
        if sum(s[2] for s in segments) != n:
            raise AdoptError(f"{path}: {n} rows, but the day counts add up to "
                             f"{sum(s[2] for s in segments)} (a *_day_count.npz of other data?)")
        for day, _, day_rows in segments:
            marker = os.path.join(out, f"day_{day}.json")
            if os.path.exists(marker):
                os.remove(marker)
            files = day_files(out, day)
            writers = {"dense": NpyWriter(files["dense"], np.float32, NUM_DENSE),
                       "sparse": NpyWriter(files["sparse"], np.int32, NUM_SPARSE),
                       "labels": NpyWriter(files["labels"], np.int32, 1)}
            top = np.zeros(NUM_SPARSE, dtype=np.int64)
            try:
                for lo in range(0, day_rows, CHUNK_ROWS):
                    k = min(CHUNK_ROWS, day_rows - lo)
                    for a in arrays:
                        block = a.next_rows(k)
                        if a.part == "dense":
                            block = log_dense(block)
                        elif a.part == "sparse" and k:
                            np.maximum(top, block.max(axis=0) + 1, out=top)
                        writers[a.part].write(block)
                for w in writers.values():
                    w.finish()
            finally:
                for w in writers.values():
                    w.abort()
            write_json(marker, {"rows": day_rows, "top": top.tolist(), **origin})
            done.append((day, day_rows, top))
        return done
    finally:
        for a in arrays:
            a.close()
        shutil.rmtree(tmp, ignore_errors=True)


def scan_bin(path: str, lo: int, hi: int, counts: Optional[np.ndarray]) -> np.ndarray:
    """Check rows lo..hi of a reference .bin file; each feature's largest id + 1."""
    rows = open_bin_rows(path)
    top = np.zeros(NUM_SPARSE, dtype=np.int64)
    names = {"labels": "", "dense": ", dense value {}", "sparse": ", feature {}"}
    for a in range(lo, hi, CHUNK_ROWS):
        block = np.asarray(rows[a:min(hi, a + CHUNK_ROWS)])
        for part, cols in BIN_COLUMNS.items():
            check_block(part, block[:, cols], lambda r, c, a=a, name=names[part]:
                        f"{path}: row {a + r} (0-based){name.format(c)}", counts)
        np.maximum(top, block[:, BIN_COLUMNS["sparse"]].max(axis=0).astype(np.int64) + 1,
                   out=top)
    return top


# --------------------------------------------------------------------------- adopt


def adopt(src: str, out: str, layout: Optional[str] = None, dataset: Optional[str] = None,
          counts_file: Optional[str] = None, day_count_file: Optional[str] = None,
          workers: int = 1, log=print) -> Dict:
    """Adopt the reference's preprocessed data in `src` into `out`; returns meta.json."""
    check_output(out, SOURCE)
    found = find_layout(src, layout, dataset, counts_file, day_count_file)
    counts = read_counts(found)
    day_sizes = (_load_small(found.day_count_file, "total_per_file").tolist()
                 if found.day_count_file else None)
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "meta.json")
    if found.layout != "bin" and os.path.exists(meta_path):
        os.remove(meta_path)  # it names day files that are about to be rewritten
    t0 = time.time()
    log(f"{src}: the reference's '{found.layout}' layout, {found.dataset}; table sizes from "
        + (found.counts_file or (found.files[0] if counts is not None else
                                 "the largest ids (no *_fea_count.npz found)")))
    meta = {"format_version": FORMAT_VERSION,
            "settings": {"dataset": found.dataset, "source": SOURCE, "layout": found.layout,
                         "source_files": [os.path.realpath(f) for f in found.files]},
            "complete": True, "sparse_dtype": "int32"}
    if found.layout == "bin":
        meta.update(_adopt_bin(found, out, counts, day_sizes, workers, log))
    else:
        meta.update(_adopt_npz(found, out, counts, day_sizes, workers, log))
    write_json(meta_path, meta)
    rows = sum(meta["rows_per_day"])
    log(f"{rows:,} rows in {meta['num_days']} days checked in {time.time() - t0:.1f} s; "
        f"wrote {meta_path}")
    log("stored table sizes: embeddings.num_embeddings_per_feature="
        + "[" + ",".join(str(n) for n in meta["table_sizes"]) + "]")
    return meta


def _adopt_bin(found: Found, out: str, counts, day_sizes, workers: int, log) -> Dict:
    train, test, val = found.files
    arrays = {}
    for f in found.files:
        try:
            arrays[f] = len(open_bin_rows(f))
        except ValueError as e:
            raise AdoptError(str(e)) from None
    n_train = arrays[train]
    if day_sizes is not None:
        train_days = list(day_sizes[:-1])
        eval_rows = day_sizes[-1]
        if (sum(train_days), -(-eval_rows // 2), eval_rows - -(-eval_rows // 2)) != \
                (n_train, arrays[test], arrays[val]):
            raise AdoptError(f"{found.day_count_file}: days {day_sizes} do not match the "
                             f"rows of {train} ({n_train:,}), {test} ({arrays[test]:,}) and "
                             f"{val} ({arrays[val]:,})")
    else:
        train_days = [n_train]
        log(f"no *_day_count.npz: {os.path.basename(train)} is one training day")
    tasks = [(f, lo, min(arrays[f], lo + (1 << 24)), counts) for f in found.files
             for lo in range(0, arrays[f], 1 << 24)]
    top = np.zeros(NUM_SPARSE, dtype=np.int64)
    for t in map_in_workers(scan_bin, tasks, workers):
        np.maximum(top, t, out=top)
    entries = []
    first = 0
    for n in train_days:
        entries.append((train, first, n))
        first += n
    entries += [(test, 0, arrays[test]), (val, 0, arrays[val])]
    name = {f: stored_name(f, out) for f in found.files}
    ev = len(train_days)
    return {"num_days": len(entries), "eval_day": ev,
            "split_days": {"test": [ev], "val": [ev + 1]},
            "rows_per_day": [n for _, _, n in entries],
            "table_sizes": (counts if counts is not None else top).tolist(),
            "dense_raw": True,
            "day_files": [{"dense": name[f], "sparse": name[f], "labels": name[f],
                           "first": a, "rows": n} for f, a, n in entries]}


def _origin_change(was, now: Optional[Dict]) -> Optional[str]:
    """How a file a day was converted from (fingerprint `was`, None: no such file) differs
    from the file used now (`now`), or None when it is the same."""
    if now is None:
        return None if was is None else "it is not used now"
    if not isinstance(was, dict):
        return "no fingerprint of it was recorded"
    return fingerprint_change(was, now)


def _converted_day(out: str, day: int, origin: Dict, log) -> Optional[Dict]:
    """The marker of `day` when an earlier run converted it from the same source file and
    counts (`origin`, by content), else None: the day is then converted again."""
    marker = os.path.join(out, f"day_{day}.json")
    try:
        with open(marker) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if not all(os.path.isfile(p) for p in day_files(out, day).values()) or \
            not isinstance(info, dict) or info.get("source") != origin["source"]:
        return None
    for key, what in (("source_file", origin["source"]), ("counts_file", "the counts file")):
        change = _origin_change(info.get(key), origin[key])
        if change:
            log(f"day {day}: {what} is not what it was converted from ({change}); "
                "converting it again")
            return None
    return info


def _adopt_npz(found: Found, out: str, counts, day_sizes, workers: int, log) -> Dict:
    top = np.zeros(NUM_SPARSE, dtype=np.int64)
    rows: Dict[int, int] = {}
    if found.layout == "days":
        if day_sizes is not None and len(day_sizes) != len(found.files):
            raise AdoptError(f"{found.day_count_file}: {len(day_sizes)} days, but "
                             f"{len(found.files)} per-day files")
        tasks = []
        for d, f in enumerate(found.files):
            origin = provenance(f, found.counts_file)
            done = _converted_day(out, d, origin, log)
            if done is not None:  # converted by an interrupted run of this adoption
                rows[d] = done["rows"]
                np.maximum(top, done["top"], out=top)
                log(f"day {d}: {done['rows']:,} rows (converted before)")
            else:
                tasks.append((f, [(d, 0, _rows_of(f))], out, counts, origin))
    else:
        n = _rows_of(found.files[0])
        if day_sizes is None:
            days = 7 if found.dataset == "kaggle" else 24
            base, extra = divmod(n, days)
            day_sizes = [base + (d < extra) for d in range(days)]
            log(f"no *_day_count.npz: {n:,} rows cut into {days} days of equal size, as the "
                "reference cuts them without sub-sampling")
        firsts = np.cumsum([0] + list(day_sizes[:-1])).tolist()
        tasks = [(found.files[0], [(d, a, int(k)) for d, (a, k) in
                                   enumerate(zip(firsts, day_sizes))], out, counts,
                  provenance(found.files[0], found.counts_file))]
    num_days = len(found.files) if found.layout == "days" else len(day_sizes)
    if num_days < 2:
        raise AdoptError(f"{found.files[0]}: one day only; the reference's data has training "
                         "days and an evaluation day")
    for done in map_in_workers(convert_file, tasks, workers):
        for day, n, t in done:
            rows[day] = n
            np.maximum(top, t, out=top)
            log(f"day {day}: {n:,} rows")
    return {"num_days": num_days, "eval_day": num_days - 1,
            "rows_per_day": [rows[d] for d in range(num_days)],
            "table_sizes": (counts if counts is not None else top).tolist()}


def _rows_of(path: str) -> int:
    """Rows of the reference .npz `path` (the length of its labels `y`)."""
    labels = NpzArray(path, "y", "", None)  # 1-D: never spilled
    labels.close()
    return labels.rows


# --------------------------------------------------------------------------- command line
