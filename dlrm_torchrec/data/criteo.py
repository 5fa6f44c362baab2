"""Preprocessed Criteo data (Kaggle or Terabyte) as a data source.

The folder `data.path` holds the output of `python -m dlrm_torchrec.data.preprocess`; its
layout is documented in `dlrm_torchrec.data.preprocess`. Every day file is memory-mapped and
each rank copies only the rows of its own share of each global batch (`rank_slice`), so no
rank reads the whole data set.

Splits: "train" is days 0 .. eval_day - 1 in order; the evaluation day is halved, the first
ceil(n / 2) rows "test", the rest "val" (the DLRM reference's order; meta.json's
`eval_halves` ["val", "test"] swaps them, as TorchRec orders them).

Files: `day_{d}_{dense,sparse,labels}.npy` in the folder, or, for adopted data
(`dlrm_torchrec.data.from_torchrec`, `dlrm_torchrec.data.from_reference`), meta.json's
`day_files`: per day the three files (relative to the folder, or absolute) and the day's
first row and rows in them. A `.bin` file is the DLRM reference's MLPerf binary layout, rows
of 40 int32 (label, 13 raw dense values, 26 ids) that serve all three parts; its raw dense
values get log(x + 1) at load (meta.json `dense_raw`). meta.json's `split_days` ({"test":
[d], "val": [d']}) names whole days as the evaluation splits instead of halving eval_day.

Shuffling (train only, data.shuffle_window = W > 0): the epoch's sample order is the
concatenation of consecutive windows of W samples, each permuted by a generator seeded with
(data.seed, epoch, window index). The order is a function of the global position only, so
it is the same whatever the world size, and each rank then takes its slice of it.

Ids: stored ids are below the stored table sizes (meta.json); a feature whose configured
table (embeddings.table_sizes(), i.e. after max_ind_range) is smaller gets id mod its size
at load time, as the reference applies --max-ind-range.

Multi-hot (data.multi_hot_sizes, the MLPerf DCNv2 setup): each one-hot id expands into a bag
of ids derived from it (`dlrm_torchrec.data.multi_hot`), or, where meta.json lists
materialised bags (`multi_hot_sizes`; MLPerf's `day_{d}_sparse_multi_hot.npz`, adopted by
`dlrm_torchrec.data.from_torchrec`), the stored bags are read as they are
(`dlrm_torchrec.data.materialised_bags`); data.multi_hot_sizes must then name their sizes.
"""

import json
import os
from typing import Dict, Iterator, List, Tuple

import numpy as np

from dlrm_torchrec.config import ConfigError, DataConfig, EmbeddingsConfig
from dlrm_torchrec.data.batch import Batch, make_batch, num_batches, rank_slice, sample_weight
from dlrm_torchrec.data.criteo_text import log_dense
from dlrm_torchrec.data.file_checks import open_npy
from dlrm_torchrec.data.materialised_bags import MaterialisedBags, NpzError
from dlrm_torchrec.data.multi_hot import MultiHotBags

NUM_DENSE = 13
NUM_SPARSE = 26
SPLITS = ("train", "val", "test")
BIN_WIDTH = 1 + NUM_DENSE + NUM_SPARSE  # the reference's MLPerf binary rows, int32
BIN_COLUMNS = {"labels": slice(0, 1), "dense": slice(1, 1 + NUM_DENSE),
               "sparse": slice(1 + NUM_DENSE, BIN_WIDTH)}


def open_bin_rows(path: str) -> np.ndarray:
    """A reference MLPerf .bin file as an (n, 40) int32 memory map; ValueError when its size
    is not a whole number of rows."""
    size = os.path.getsize(path)
    if size == 0 or size % (4 * BIN_WIDTH):
        raise ValueError(f"{path}: {size} bytes, not a whole number of {BIN_WIDTH}-int32 rows "
                         "(the DLRM reference's --mlperf-bin-loader layout)")
    return np.memmap(path, dtype=np.int32, mode="r").reshape(-1, BIN_WIDTH)


def read_meta(path: str) -> dict:
    """meta.json of a preprocessed folder; ConfigError when absent or incomplete."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise ConfigError(f"data.path={path!r}: no meta.json there; preprocess the raw data "
                          "first (python -m dlrm_torchrec.data.preprocess), or adopt TorchRec's "
                          ".npy files (python -m dlrm_torchrec.data.from_torchrec) or the DLRM "
                          "reference's (python -m dlrm_torchrec.data.from_reference)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"data.path={path!r}: {meta_path} is not readable JSON ({e}); "
                          "preprocess or adopt the data again") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"data.path={path!r}: {meta_path} holds {type(meta).__name__}, "
                          "not an object; preprocess or adopt the data again")
    if meta.get("format_version") != 1:
        raise ConfigError(f"data.path={path!r}: unknown format_version "
                          f"{meta.get('format_version')!r}")
    if not meta.get("complete"):
        raise ConfigError(f"data.path={path!r}: preprocessing did not finish; rerun the same "
                          "preprocess command to complete it")
    problem = _meta_problem(meta)
    if problem:
        raise ConfigError(f"data.path={path!r}: {meta_path}: {problem}; preprocess or adopt "
                          "the data again")
    return meta


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _meta_problem(meta: dict) -> str:
    """What a complete meta.json lacks or gets wrong ("" when nothing): the keys the loader
    reads, with their types."""
    settings = meta.get("settings")
    if not isinstance(settings, dict) or not isinstance(settings.get("dataset"), str):
        return "no settings.dataset"
    days = meta.get("num_days")
    if not _is_count(days) or days < 2:
        return f"num_days {days!r}: expected a whole number >= 2"
    if not _is_count(meta.get("eval_day")) or meta["eval_day"] >= days:
        return f"eval_day {meta.get('eval_day')!r}: expected a day below num_days ({days})"
    rows = meta.get("rows_per_day")
    if not isinstance(rows, list) or len(rows) != days or not all(map(_is_count, rows)):
        return f"rows_per_day {rows!r}: expected {days} row counts"
    sizes = meta.get("table_sizes")
    if not isinstance(sizes, list) or len(sizes) != NUM_SPARSE or \
            not all(_is_count(n) and n > 0 for n in sizes):
        return f"table_sizes {sizes!r}: expected {NUM_SPARSE} positive table sizes"
    listed = meta.get("day_files")
    if listed is not None and (not isinstance(listed, list) or len(listed) != days or not all(
            isinstance(e, dict) and all(isinstance(e.get(p), str) for p in
                                        ("dense", "sparse", "labels")) for e in listed)):
        return f"day_files: expected {days} entries naming dense, sparse and labels files"
    return ""


class RowEncoder:
    """Stored Criteo rows -> Batches, as training sees them: ids above a configured table
    folded mod its size (as the reference applies --max-ind-range), then one-hot ids
    expanded into their derived multi-hot bags, or materialised bags taken as stored.
    `meta` is the data folder's meta.json (stored table sizes, materialised bag sizes)."""

    def __init__(self, data: DataConfig, embeddings: EmbeddingsConfig, meta: dict):
        self.table_sizes = np.asarray(embeddings.table_sizes(), dtype=np.int64)
        if len(self.table_sizes) != NUM_SPARSE:
            raise ConfigError(f"embeddings.num_embeddings_per_feature: Criteo has {NUM_SPARSE} "
                              f"categorical features, got {len(self.table_sizes)} tables")
        stored = np.asarray(meta["table_sizes"], dtype=np.int64)
        self.mod_features = [f for f in range(NUM_SPARSE) if stored[f] > self.table_sizes[f]]
        self.multi_hot = list(data.multi_hot_sizes)
        # bags stored in the data (MLPerf's materialised multi-hot files): read, not derived
        self.materialised = meta.get("multi_hot_sizes")
        if self.materialised is not None and self.multi_hot != self.materialised:
            raise ConfigError(
                f"data.multi_hot_sizes={self.multi_hot}: data.path={data.path!r} holds "
                f"materialised multi-hot bags of sizes {self.materialised}; set "
                "data.multi_hot_sizes to them (the planner's pooling factors)")
        self.multi_hot_bags = MultiHotBags(data.seed, self.multi_hot or [1] * NUM_SPARSE,
                                           self.table_sizes, data.multi_hot_distribution)
        self.feature_names = [f"cat_{i}" for i in range(NUM_SPARSE)]
        self.dense_raw = bool(meta.get("dense_raw"))  # raw counts: log(x + 1) here

    def ids(self, sparse: np.ndarray) -> np.ndarray:
        """(n, 26) stored ids -> (26, n) int64 ids below the configured table sizes."""
        ids = np.ascontiguousarray(sparse.T, dtype=np.int64)
        for f in self.mod_features:
            ids[f] %= self.table_sizes[f]
        return ids

    def multi_hot_values(self, ids: np.ndarray) -> np.ndarray:
        """(26, n) one-hot ids -> the multi-hot bags' ids (`MultiHotBags.values`)."""
        return self.multi_hot_bags.values(ids)

    def make(self, dense: np.ndarray, sparse, labels: np.ndarray, per_rank: int,
             weight: float = 1.0) -> Batch:
        """n stored rows -> a Batch padded to per_rank (see `batch.make_batch`); `sparse`
        is (n, 26) ids, or MaterialisedBags."""
        n = len(labels)
        if self.dense_raw:
            dense = log_dense(dense)
        sizes = self.multi_hot or [1] * NUM_SPARSE
        if self.materialised:
            values = sparse.values(self.table_sizes, self.mod_features)
        elif self.multi_hot:
            values = self.multi_hot_values(self.ids(sparse))
        else:
            values = self.ids(sparse).ravel()
        lengths = np.broadcast_to(np.asarray(sizes, dtype=np.int64)[:, None], (NUM_SPARSE, n))
        return make_batch(dense, values, lengths, labels, self.feature_names, per_rank, weight)


class CriteoSource:
    """This rank's batches of preprocessed Criteo data (see the module docstring)."""

    def __init__(self, data: DataConfig, embeddings: EmbeddingsConfig, rank: int = 0,
                 world_size: int = 1):
        self.path = data.path
        self.meta = read_meta(data.path)
        want = {"criteo_kaggle": "kaggle", "criteo_terabyte": "terabyte"}.get(data.source)
        have = self.meta["settings"]["dataset"]
        if want and want != have:
            raise ConfigError(f"data.source={data.source!r} but data.path={data.path!r} holds "
                              f"preprocessed {have} data")
        self.rank, self.world_size = rank, world_size
        self.batch_size = data.batch_size
        self.eval_batch_size = data.eval_batch_size or data.batch_size
        self.shuffle_window = data.shuffle_window
        self.seed = data.seed
        self.encoder = RowEncoder(data, embeddings, self.meta)
        self.days = self._open_days()
        ev = self.meta["eval_day"]
        # split -> segments (day, first row, rows)
        self.segments: Dict[str, List[Tuple[int, int, int]]] = {
            "train": [(d, 0, len(self.days[d][2])) for d in range(ev)]}
        if "split_days" in self.meta:
            for split, days in self.meta["split_days"].items():
                self.segments[split] = [(d, 0, len(self.days[d][2])) for d in days]
        else:
            n_ev = len(self.days[ev][2])
            first_half, second_half = self.meta.get("eval_halves", ["test", "val"])
            n_first = -(-n_ev // 2)
            self.segments[first_half] = [(ev, 0, n_first)]
            self.segments[second_half] = [(ev, n_first, n_ev - n_first)]
        self.offsets = {k: np.cumsum([0] + [s[2] for s in v]) for k, v in self.segments.items()}
        self._perm_cache: Dict[Tuple[int, int], np.ndarray] = {}

    def _open_days(self) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Each day's (dense, sparse, labels) arrays, memory-mapped (views of its rows)."""
        parts = ("dense", "sparse", "labels")
        listed = self.meta.get("day_files")
        if listed is None:
            listed = [{p: f"day_{d}_{p}.npy" for p in parts}
                      for d in range(self.meta["num_days"])]
        maps: Dict[str, np.ndarray] = {}  # Kaggle's days are row ranges of one file
        days = []
        for d, entry in enumerate(listed):
            arrs = []
            for part in parts:
                fp = os.path.join(self.path, entry[part])  # an absolute name stays as it is
                if fp not in maps:
                    if not os.path.isfile(fp):
                        raise ConfigError(f"data.path={self.path!r}: {entry[part]} missing")
                    maps[fp] = self._open_file(fp)
                arr = maps[fp]
                if fp.endswith(".bin"):
                    arr = arr[:, BIN_COLUMNS[part]]
                if "first" in entry:
                    first, rows = entry["first"], entry["rows"]
                    if len(arr) < first + rows:
                        raise ConfigError(f"data.path={self.path!r}: {entry[part]} has "
                                          f"{len(arr)} rows, meta.json expects at least "
                                          f"{first + rows}; the file changed since it was "
                                          "adopted: adopt it again")
                    arr = arr[first:first + rows]
                elif len(arr) != self.meta["rows_per_day"][d]:
                    raise ConfigError(f"data.path={self.path!r}: {entry[part]} has {len(arr)} "
                                      f"rows, meta.json says day {d} has "
                                      f"{self.meta['rows_per_day'][d]}; the file was replaced "
                                      "or damaged since it was written: preprocess again")
                arrs.append(arr)
            days.append(tuple(arrs))
        return days

    @staticmethod
    def _open_file(path: str):
        if path.endswith(".bin"):
            try:
                return open_bin_rows(path)
            except ValueError as e:
                raise ConfigError(f"data.path: {e}") from None
        if not path.endswith(".npz"):
            try:
                return open_npy(path)
            except (ValueError, OSError) as e:
                raise ConfigError(f"data.path: {e}") from None
        try:
            return MaterialisedBags.open(path, NUM_SPARSE)
        except NpzError as e:
            raise ConfigError(f"data.path: {e}") from None

    def __getstate__(self):
        # loader workers that are not forked receive the source pickled: a memory map would
        # pickle as a copy of the whole file, so the maps are reopened on the other side
        state = dict(self.__dict__)
        state["days"] = None
        state["_perm_cache"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.days = self._open_days()

    # ----------------------------------------------------------------- layout
    def num_samples(self, split: str) -> int:
        return int(self.offsets[split][-1])

    def global_batch_size(self, split: str) -> int:
        return self.batch_size if split == "train" else self.eval_batch_size

    def num_batches(self, split: str) -> int:
        return num_batches(self.num_samples(split), self.global_batch_size(split))

    def batches(self, split: str, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        """This rank's batches of one epoch of `split`, from global batch `start_batch`."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        n = self.num_samples(split)
        gb = self.global_batch_size(split)
        per_rank = gb // self.world_size
        shuffle = split == "train" and self.shuffle_window > 0
        for b in range(start_batch, num_batches(n, gb)):
            sl = rank_slice(b, gb, self.world_size, self.rank, n)
            if shuffle:
                dense, sparse, labels = self._take(split, self.order(epoch, sl.start, sl.stop))
            else:
                dense, sparse, labels = self._range(split, sl.start, sl.stop)
            yield self.encoder.make(dense, sparse, labels, per_rank, sample_weight(b, gb, n))

    # ----------------------------------------------------------------- reading
    def order(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Training sample indices at shuffled positions start..stop of `epoch`."""
        w = self.shuffle_window
        n = self.num_samples("train")
        out = []
        pos = start
        while pos < stop:
            win = pos // w
            lo = win * w
            perm = self._perm(epoch, win, min(w, n - lo))
            end = min(stop, lo + len(perm))
            out.append(lo + perm[pos - lo:end - lo])
            pos = end
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _perm(self, epoch: int, win: int, size: int) -> np.ndarray:
        key = (epoch, win)
        p = self._perm_cache.get(key)
        if p is None:
            if len(self._perm_cache) >= 2:
                self._perm_cache.pop(next(iter(self._perm_cache)))
            p = np.random.default_rng([self.seed, epoch, win]).permutation(size)
            self._perm_cache[key] = p
        return p

    def _range(self, split: str, start: int, stop: int):
        parts = []
        off = self.offsets[split]
        for i, (d, first, rows) in enumerate(self.segments[split]):
            lo, hi = max(start, off[i]), min(stop, off[i] + rows)
            if lo < hi:
                dense, sparse, labels = self.days[d]
                a, b = first + lo - off[i], first + hi - off[i]
                parts.append((dense[a:b], sparse[a:b], labels[a:b]))
        return self._concat(parts)

    def _take(self, split: str, idx: np.ndarray):
        """Samples `idx` of `split`, in that order."""
        off = self.offsets[split]
        seg = np.searchsorted(off, idx, side="right") - 1
        if len(idx) and (seg == seg[0]).all():  # the usual case: one day
            d, first, _ = self.segments[split][seg[0]]
            return tuple(a[idx - off[seg[0]] + first] for a in self.days[d])
        parts, positions = [], []
        for s in np.unique(seg):
            d, first, _ = self.segments[split][s]
            sel = np.flatnonzero(seg == s)
            rows = idx[sel] - off[s] + first
            parts.append(tuple(a[rows] for a in self.days[d]))
            positions.append(sel)
        if not parts:
            return self._concat(parts)
        gathered = self._concat(parts)  # grouped by day: put the samples back in order
        back = np.empty(len(idx), dtype=np.int64)
        back[np.concatenate(positions)] = np.arange(len(idx))
        return tuple(a[back] for a in gathered)

    def _concat(self, parts):
        if len(parts) == 1:
            return parts[0]
        if not parts:
            bags = self.encoder.materialised
            sparse = (MaterialisedBags([np.zeros((0, k), np.int32) for k in bags])
                      if bags else np.zeros((0, NUM_SPARSE), np.int32))
            return (np.zeros((0, NUM_DENSE), np.float32), sparse, np.zeros((0, 1), np.int32))
        sparse = [p[1] for p in parts]
        return (np.concatenate([p[0] for p in parts]),
                (MaterialisedBags.concat(sparse) if self.encoder.materialised
                 else np.concatenate(sparse)),
                np.concatenate([p[2] for p in parts]))
