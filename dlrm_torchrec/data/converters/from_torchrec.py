"""Train on Criteo data that TorchRec's own scripts preprocessed, without a second pass over
the raw text.

    python -m dlrm_torchrec.data.from_torchrec /data/criteo_npy -o data/criteo_tb
    python -m dlrm_torchrec.train --config configs/criteo_terabyte.yaml data.path=data/criteo_tb

What it adopts (`torchrec/datasets/scripts/`, the layout TorchRec's DLRM example and the MLPerf
DCNv2 instructions use):
- `npy_preproc_criteo.py`: per Terabyte day `day_{d}_dense.npy` (float32, n x 13),
  `day_{d}_sparse.npy` (int64 raw 32-bit ids, n x 26), `day_{d}_labels.npy` (int32, n x 1);
  for Kaggle `train_{dense,sparse,labels}.npy`.
- `contiguous_preproc_criteo.py`: `day_{d}_sparse_contig_freq.npy`, ids renumbered per
  feature (rare ones share id 1); taken instead of `day_{d}_sparse.npy` when present
  (`--sparse-suffix` chooses).
- `shuffle_preproc_criteo.py`: the same names, rows shuffled across training days.
- MLPerf DLRM-DCNv2's `materialize_synthetic_multihot_dataset.py`:
  `day_{d}_sparse_multi_hot.npz`, the bags the MLPerf quality target is defined on; taken
  first when present, read in place (`dlrm_torchrec.data.materialised_bags`), and their bag
  sizes recorded (`multi_hot_sizes`), which data.multi_hot_sizes must then equal. Written
  without `--copy_labels_and_dense`, they lie in another folder: `--sparse-dir`.

Nothing is copied: OUT/meta.json (the layout `dlrm_torchrec.data.criteo` reads) names the
files (`day_files`: path, first row and rows of each day) and records what one chunked scan
of every file finds: rows, each feature's largest id + 1 (the stored table sizes; larger ids
than a configured table are folded mod its size at load, as `embeddings.max_ind_range`), and
that ids are >= 0, labels 0/1 and dense values finite. A file that breaks one of these stops
the adoption with its name and row.

Kept as TorchRec made them, and recorded in meta.json:
- dense values: TorchRec computes log(x - m + 2) with m the smallest raw value of the day
  file (the reference: log(max(x, 0) + 1)); a model trained on one does not fit the other.
- the evaluation day's halves: TorchRec's first half is validation, the second test
  (`--eval-halves val,test`, the default here); `--eval-halves test,val` takes the
  reference's order, as `dlrm_torchrec.data.preprocess` writes it.
- Terabyte: days 0 .. N-2 train, day N-1 evaluates (all consecutive days found from 0, or
  `--days N`). Kaggle: `train_*` is cut into 7 consecutive days of equal size as the
  reference cuts train.txt (days 0-5 train, day 6 evaluates); TorchRec's Kaggle `test_*`
  files have no labels and are not used.
"""

import json
import mmap
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from dlrm_torchrec.data.converters.preprocess import FORMAT_VERSION, kaggle_day_sizes, write_json
from dlrm_torchrec.data.file_checks import input_problem, open_npy, output_folder_problem
from dlrm_torchrec.data.materialised_bags import MaterialisedBags, NpzError
from dlrm_torchrec.data.worker_exit import exit_with_parent

NUM_DENSE, NUM_SPARSE = 13, 26
SCAN_ROWS = 1 << 18  # rows per scanned chunk: 26 int64 ids x 256k = 54 MB
SOURCE = "torchrec_npy"
TORCHREC_DENSE = "torchrec: log(x - m + 2), m the smallest raw dense value of the day file"


class AdoptError(Exception):
    """A user-facing problem: printed as `error: ...` with exit status 2, no traceback."""


def check_input_file(path: str) -> None:
    """AdoptError naming `path` when it cannot be read as an input file."""
    problem = input_problem(path)
    if problem:
        raise AdoptError(f"{path}: {problem}")


def _open(path: str) -> np.ndarray:
    check_input_file(path)
    try:
        return open_npy(path)
    except (ValueError, OSError) as e:
        raise AdoptError(str(e)) from None


def find_stems(src: str, dataset: str, days: int) -> List[str]:
    """The file stems ("day_0", ...; "train") of the data set in `src`, in day order."""
    if dataset == "kaggle":
        return ["train"]
    if days:
        return [f"day_{d}" for d in range(days)]
    stems = []
    while os.path.isfile(os.path.join(src, f"day_{len(stems)}_labels.npy")):
        stems.append(f"day_{len(stems)}")
    if len(stems) < 2:
        raise AdoptError(f"{src}: needs day_0_*.npy, day_1_*.npy, ... (at least two days: "
                         f"training days, then the evaluation day); found {len(stems)}")
    return stems


def detect_dataset(src: str) -> str:
    has_days = os.path.isfile(os.path.join(src, "day_0_labels.npy"))
    has_train = os.path.isfile(os.path.join(src, "train_labels.npy"))
    if has_days == has_train:
        what = "both day_0_labels.npy and train_labels.npy" if has_days else \
            "neither day_0_labels.npy (Terabyte) nor train_labels.npy (Kaggle)"
        raise AdoptError(f"{src}: holds {what}; name the data set with --dataset")
    return "terabyte" if has_days else "kaggle"


def sparse_path(src: str, stem: str, suffix: Optional[str]) -> str:
    """The day's ids: with `suffix`, <stem>_sparse<suffix>.npz or .npy; else the first of
    the materialised multi-hot bags, the contiguous ids, the raw ids that exists."""
    names = ([f"_sparse{suffix}.npz", f"_sparse{suffix}.npy"] if suffix is not None else
             ["_sparse_multi_hot.npz", "_sparse_contig_freq.npy", "_sparse.npy"])
    for name in names:
        p = os.path.join(src, stem + name)
        if os.path.isfile(p):
            return p
    return os.path.join(src, stem + names[-1])


def _open_sparse(path: str) -> Tuple[List[np.ndarray], Optional[List[int]]]:
    """Per feature its (n, k) ids, and the bag sizes k (None: one-hot n x 26 ids)."""
    if not path.endswith(".npz"):
        sparse = _open(path)
        if sparse.ndim != 2 or sparse.shape[1] != NUM_SPARSE or sparse.dtype.kind not in "iu":
            raise AdoptError(f"{path}: expected integer n x {NUM_SPARSE}, found "
                             f"{sparse.dtype} {sparse.shape}")
        return [sparse], None
    check_input_file(path)
    try:
        columns = MaterialisedBags.open(path, NUM_SPARSE).columns
    except NpzError as e:
        raise AdoptError(str(e)) from None
    for f, c in enumerate(columns):
        if c.ndim != 2 or c.dtype.kind not in "iu" or len(c) != len(columns[0]):
            raise AdoptError(f"{path}: member {f}.npy: expected integer n x bag size with "
                             f"n = {len(columns[0])}, found {c.dtype} {c.shape}")
    return columns, [c.shape[1] for c in columns]


def _forget_pages(arrays: Sequence[np.ndarray]) -> None:
    """Drop the pages of memory-mapped arrays from this process (they stay in the page
    cache): a scan touches every page of its files, which would otherwise count as the
    process's memory until the files are closed."""
    for a in arrays:
        mm = getattr(a, "_mmap", None)  # np.memmap keeps its mmap.mmap there
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)


def _id_range(blocks: List[np.ndarray], lo: int, hi: int) -> Tuple[np.ndarray, np.ndarray]:
    """Each feature's smallest and largest id in rows lo..hi."""
    if len(blocks) == 1:  # one-hot: one (rows, 26) array, reduced along the rows at once
        ids = np.asarray(blocks[0][lo:hi])
        return ids.min(axis=0), ids.max(axis=0)
    cols = [np.asarray(b[lo:hi]) for b in blocks]
    return (np.array([c.min() if c.size else 0 for c in cols]),
            np.array([c.max() if c.size else 0 for c in cols]))


def _open_file_set(dense_p: str, sparse_p: str, labels_p: str):
    """One (dense, sparse, labels) set opened (memory-mapped) and its shapes checked;
    returns dense, labels, the id blocks, the bag sizes (None: one-hot) and the rows."""
    dense, labels = _open(dense_p), _open(labels_p)
    blocks, bag_sizes = _open_sparse(sparse_p)
    if dense.ndim != 2 or dense.shape[1] != NUM_DENSE or dense.dtype.kind != "f":
        raise AdoptError(f"{dense_p}: expected float n x {NUM_DENSE}, found "
                         f"{dense.dtype} {dense.shape}")
    if labels.ndim not in (1, 2) or labels.shape[1:] not in ((), (1,)) \
            or labels.dtype.kind not in "iuf":
        raise AdoptError(f"{labels_p}: expected numbers n x 1, found {labels.dtype} "
                         f"{labels.shape}")
    n = len(labels)
    if len(dense) != n or len(blocks[0]) != n:
        raise AdoptError(f"row counts differ: {dense_p} {len(dense)}, {sparse_p} "
                         f"{len(blocks[0])}, {labels_p} {n}")
    if n == 0:
        raise AdoptError(f"{labels_p}: no rows")
    return dense, labels, blocks, bag_sizes, n


def layout_file_set(dense_p: str, sparse_p: str, labels_p: str, sizes: np.ndarray
                    ) -> Tuple[int, np.ndarray, str, Optional[List[int]]]:
    """`scan_file_set`'s answer for a set whose table sizes (`sizes`, each feature's
    largest id + 1) its writer found while writing it: only the shapes are checked, no data
    page is read."""
    _, _, blocks, bag_sizes, n = _open_file_set(dense_p, sparse_p, labels_p)
    return n, np.asarray(sizes, np.int64), str(blocks[0].dtype), bag_sizes


def scan_file_set(dense_p: str, sparse_p: str, labels_p: str) -> Tuple[int, np.ndarray, str,
                                                                      Optional[List[int]]]:
    """Check one (dense, sparse, labels) set; returns its rows, each feature's largest
    id + 1, the ids' dtype and the materialised bag sizes (None: one-hot)."""
    dense, labels, blocks, bag_sizes, n = _open_file_set(dense_p, sparse_p, labels_p)
    top = np.zeros(NUM_SPARSE, dtype=np.int64)
    for lo in range(0, n, SCAN_ROWS):
        hi = min(n, lo + SCAN_ROWS)
        low, high = _id_range(blocks, lo, hi)
        if (low < 0).any():
            f = int(np.argmax(low < 0))
            ids = np.asarray(blocks[0][lo:hi, f:f + 1] if bag_sizes is None
                             else blocks[f][lo:hi])
            r, k = np.argwhere(ids < 0)[0]
            bag = f", bag position {k}" if bag_sizes else ""
            raise AdoptError(f"{sparse_p}: row {lo + r} (0-based), feature {f}{bag}: "
                             f"negative id {ids[r, k].item()}")
        np.maximum(top, high.astype(np.int64), out=top)
        lab = np.asarray(labels[lo:hi]).reshape(-1)
        bad = (lab != 0) & (lab != 1)
        if bad.any():
            r = lo + int(np.argmax(bad))
            hint = ("; TorchRec writes -1 for rows it reads as unlabelled (a Kaggle file "
                    "whose path contains 'test')") if lab[r - lo] == -1 else ""
            raise AdoptError(f"{labels_p}: row {r} (0-based): label {lab[r - lo].item()}, "
                             f"not 0 or 1{hint}")
        finite = np.isfinite(np.asarray(dense[lo:hi])).all(axis=1)
        if not finite.all():
            r = lo + int(np.argmin(finite))
            raise AdoptError(f"{dense_p}: row {r} (0-based): non-finite dense value "
                             f"{np.asarray(dense[r]).tolist()}")
        _forget_pages([dense, labels, *blocks])
    return n, top + 1, str(blocks[0].dtype), bag_sizes


def map_in_workers(fn: Callable, tasks: Sequence[tuple], workers: int) -> Iterator:
    """fn(*task) for each task, in order; up to `workers` tasks at once in worker processes
    (each adoption task reads its files once, at the disk's speed)."""
    if not tasks:
        return
    if workers <= 1 or len(tasks) == 1:
        yield from map(fn, *zip(*tasks))
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ex = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx,
                             initializer=exit_with_parent, initargs=(os.getpid(),))
    try:
        yield from ex.map(fn, *zip(*tasks))
    finally:  # on an error, tasks not yet started are dropped
        ex.shutdown(wait=True, cancel_futures=True)


def check_output(out: str, source: str) -> None:
    """`out` must be a folder that can be written (or created), and an adoption
    (settings.source `source`) may rewrite its own meta.json there, but not another tool's."""
    problem = output_folder_problem(out)
    if problem:
        raise AdoptError(f"-o {out}: {problem}")
    meta_path = os.path.join(out, "meta.json")
    if not os.path.exists(meta_path):
        return
    try:
        with open(meta_path) as f:
            old = json.load(f).get("settings", {}).get("source")
    except (OSError, ValueError, AttributeError) as e:
        raise AdoptError(f"{meta_path}: unreadable ({e}); remove it or choose another "
                         "output folder") from None
    if old != source:
        what = (f"data adopted from {old}" if old else
                "data preprocessed by dlrm_torchrec.data.preprocess")
        raise AdoptError(f"{out} holds {what}; choose another output folder")


def stored_name(path: str, out: str) -> str:
    """Paths inside the output folder are stored relative to it, others absolute."""
    path, out = os.path.realpath(path), os.path.realpath(out)
    return os.path.relpath(path, out) if os.path.dirname(path) == out else path


def adopt(src: str, out: str, dataset: Optional[str] = None, days: int = 0,
          sparse_suffix: Optional[str] = None, eval_halves: Sequence[str] = ("val", "test"),
          sparse_dir: Optional[str] = None, workers: int = 1, log=print,
          table_sizes: Optional[Sequence[np.ndarray]] = None) -> Dict:
    """Scan TorchRec's files in `src` (the ids in `sparse_dir`, default `src`) and write
    `out`/meta.json; returns the meta. `table_sizes`: per day, each feature's largest id + 1,
    where the writer of the files found them as it wrote them (prepare_mlperf): then only
    the files' shapes are checked, not their values."""
    sparse_dir = sparse_dir or src
    for folder in (src, sparse_dir):
        if not os.path.isdir(folder):
            raise AdoptError(f"{folder}: " + ("a file, not a folder" if os.path.exists(folder)
                                              else "not found"))
    if sorted(eval_halves) != ["test", "val"]:
        raise AdoptError(f"--eval-halves {','.join(eval_halves)}: must be val,test or test,val")
    dataset = dataset or detect_dataset(src)
    if dataset == "kaggle" and days:
        raise AdoptError(f"--days {days}: Kaggle's train_*.npy is always cut into 7 days")
    check_output(out, SOURCE)
    meta_path = os.path.join(out, "meta.json")
    os.makedirs(out, exist_ok=True)
    stems = find_stems(src, dataset, days)
    t0 = time.time()
    files, rows, sizes = [], [], np.zeros(NUM_SPARSE, dtype=np.int64)
    bag_sizes: Optional[List[int]] = None
    part_sets = [{"dense": os.path.join(src, f"{stem}_dense.npy"),
                  "sparse": sparse_path(sparse_dir, stem, sparse_suffix),
                  "labels": os.path.join(src, f"{stem}_labels.npy")} for stem in stems]
    for parts in part_sets:  # every file is there before the scan starts
        for path in parts.values():
            check_input_file(path)
    if table_sizes is not None:
        scans = map(layout_file_set, *zip(*[(p["dense"], p["sparse"], p["labels"], t)
                                            for p, t in zip(part_sets, table_sizes)]))
    else:
        scans = map_in_workers(scan_file_set, [(p["dense"], p["sparse"], p["labels"])
                                               for p in part_sets], workers)
    dtypes = set()
    for stem, parts, (n, top, dtype, day_bags) in zip(stems, part_sets, scans):
        dtypes.add(dtype)
        if stem != stems[0] and day_bags != bag_sizes:
            raise AdoptError(f"{parts['sparse']}: bag sizes {day_bags}, but "
                             f"{files[0]['sparse']} has {bag_sizes}")
        bag_sizes = day_bags
        np.maximum(sizes, top, out=sizes)
        files.append({k: stored_name(v, out) for k, v in parts.items()})
        rows.append(n)
        log(f"{stem}: {n:,} rows, ids < {top.max():,} ({os.path.basename(parts['sparse'])})")
    if dataset == "kaggle":
        day_sizes = kaggle_day_sizes(rows[0])
        if min(day_sizes) == 0:
            raise AdoptError(f"{src}: {rows[0]} rows cannot be cut into 7 days")
        firsts = np.cumsum([0] + day_sizes[:-1]).tolist()
        day_files = [dict(files[0], first=f, rows=r) for f, r in zip(firsts, day_sizes)]
    else:
        day_sizes = rows
        day_files = [dict(f, first=0, rows=r) for f, r in zip(files, rows)]
    meta = {
        "format_version": FORMAT_VERSION,
        "settings": {"dataset": dataset, "source": SOURCE, "source_dir": os.path.realpath(src),
                     "dense_transform": TORCHREC_DENSE},
        "complete": True,
        "num_days": len(day_files),
        "eval_day": len(day_files) - 1,
        "eval_halves": list(eval_halves),
        "rows_per_day": day_sizes,
        "table_sizes": sizes.tolist(),
        "sparse_dtype": ",".join(sorted(dtypes)),
        "day_files": day_files,
    }
    if bag_sizes is not None:
        meta["multi_hot_sizes"] = bag_sizes
    write_json(meta_path, meta)
    dt = time.time() - t0
    log(f"{sum(rows):,} rows in {len(day_files)} days checked in {dt:.1f} s; "
        f"wrote {meta_path}")
    log("stored table sizes: embeddings.num_embeddings_per_feature="
        + "[" + ",".join(str(n) for n in meta["table_sizes"]) + "]")
    if bag_sizes is not None:
        log("materialised multi-hot bags: data.multi_hot_sizes="
            + "[" + ",".join(str(k) for k in bag_sizes) + "]")
    if max(meta["table_sizes"]) > 1 << 31:
        log("raw 32-bit ids: cap the tables with embeddings.max_ind_range (ids are folded mod "
            "it at load; the MLPerf DCNv2 setup uses 40000000)")
    return meta
