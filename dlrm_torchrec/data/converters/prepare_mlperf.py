"""The 24 raw Criteo 1TB days -> MLPerf DLRM-DCNv2's training files, in bounded memory.

    python -m dlrm_torchrec.data.prepare_mlperf day_0.gz ... day_23.gz -o OUT --workers N \\
        --memory-gb M

writes exactly (byte for byte) what TorchRec's three scripts write one after the other:
`npy_preproc_criteo.py`, `contiguous_preproc_criteo.py --frequency_threshold 0` (its
`day_{d}_sparse_contig_freq.npy` renamed to `day_{d}_sparse.npy`, as the MLPerf
instructions do) and `shuffle_preproc_criteo.py --random_seed 0`, then OUT/meta.json
(`data.converters.from_torchrec.adopt`), so `data.source=criteo_terabyte` trains on OUT.

What those scripts do, and so what this reproduces (TorchRec 1.8.0,
`torchrec/datasets/criteo.py`):
- dense (`tsv_to_npys`): missing values are 0; the values of a day file go into an int32
  array, from which its smallest value m (over all 13 columns) minus 2 is subtracted in
  int32; then np.log(..., dtype=np.float32): log(x - m + 2) computed in float32.
- ids (`tsv_to_npys`, then `sparse_to_contiguous` with threshold 0): a missing id is 0, the
  same value as the id "00000000"; each feature's values are numbered 2, 3, ... in order of
  first occurrence over day_0 .. day_23 read in that order, row by row (1 would be the
  shared id of rare values, which threshold 0 does not make). They are int64.
- shuffle (`shuffle`): days 0-22 (4.2B rows: day 23 is not counted) are concatenated into
  one float32 array of 40 columns (13 dense, 26 ids, the label) and shuffled by
  np.random.seed(0); np.random.shuffle(array): the legacy MT19937 Fisher-Yates over rows.
  The ids pass through float32, so ids above 2**24 come back rounded to a multiple of a
  power of two, as int32. The shuffled rows are cut back into days of the original sizes.
- day 23 is copied unshuffled: its ids stay int64 (days 0-22: int32).

How: stages, each task's output published atomically (a folder or file renamed when
complete, or a marker written once the data is written), so a killed run restarted with
the same command redoes only unfinished tasks and writes the same bytes. The large files
(the raw days, the rows, the records, the output) are read and written past the page cache
(`direct_io`: O_DIRECT, by an I/O thread of each worker while it computes): each is read
back once at most, and a new page-cache page costs more than its disk write. Nothing is
synced to disk before the outputs are, just ahead of meta.json; a run on a machine that
restarted since it wrote work files starts over (`check_restart`). Work files lie in
OUT/.prepare; each is removed (or punched out) once the stage after it has consumed it,
the rest at the end (`--keep-work` keeps what is left). The loops over rows are compiled
C (`native`); the rules that decide the bytes stay here.
1. parse (one task per day): raw text -> the day's rows (label, raw int32 dense values,
   each id as its position in the day's first-occurrence order of its feature: its
   day-local number), packed a block at a time (each column in the bytes its range in the
   block needs, `native.pack_rows`), the day's smallest dense value, each dense column's
   largest and, per feature, the day's distinct ids in first-occurrence order.
2. vocab (one task per feature) and permute (one task): per feature, the contiguous id of
   each day's distinct values (`map_{f}.npy`: the days' parts one after another, each in
   the day's order, so a day-local number indexes it); TorchRec's permutation of days
   0-22 and, per day, where each of its rows goes (`destinations/day_{d}.npy`, uint32).
3. scatter (one task per worker of each rank, which claims the next of its rank's days
   as it gets to it: `claim`): transform each row (dense
   values shifted by the day's smallest, ids through the day's part of the maps) into a
   record (each column in as many bytes as its largest needs, `record_widths`) with its
   row in the bucket of its destination range (buckets are cut so one fits the memory
   share of a worker, and never span two output days), grouped by bucket within each
   chunk, into the day's records file; then the day's rows are removed. Day 23 is one
   more task: written as it is.
4. place (one task per bucket, the largest first; as many buckets as a multiple of the
   processes): read the bucket's records from every day (a few batches of about 8 MB at
   a time, two reads at once, the next batches read while one is placed), put each at
   its destination, take the dense values' logarithm, write them into the output day
   files at their offset, note each feature's largest id, punch the records' whole pages
   out (those no bucket still to be placed shares).
5. multi_hot (with --multi-hot; one task per day): MLPerf's multi-hot bags of the day
   (`mlperf_multi_hot`), from lookup tables drawn by one more task of the parse stage.
6. meta: `from_torchrec.adopt` checks the output files' shapes and writes meta.json with
   the table sizes noted as they were written (by the place stage, or the bags' writer).

Several tasks (`Settings.rank`, `world_size`; torchrun's ranks under torchx): each takes task
i of a stage when i mod world_size is its rank, a barrier separates the stages (`--stage
all`), or each stage is run on its own (`--stage NAME`) once the one before it has ended.
Steps that must happen once before a stage's tasks start on any rank (the settings and the
bucket plan; making the output files the place stage fills) are rank 0's, in the stage
before.

Worker processes (`_Pool`) serve every stage of a run, and each keeps one allocation of its
memory share for the large arrays of all its tasks (`StageMemory`), carved anew by each
stage: its pages are faulted in once per run, not once per stage.

Memory: each task holds at most its share of --memory-gb (chunks: two half-size ones in a
scatter task, which reads one while it works on the other; a bucket's output columns and
three batches of its records; a parse task's text blocks, a 16th of it within 8-32 MB,
held about five times over), plus, in a
parse task, a hash table per feature of the day's distinct values (8-byte slots, at most
70 % full, doubling: under 23 bytes a value, plus 4 for the order), in a vocab task one of
its feature's distinct values (sized for those so far plus the next day's before each day:
under 23 bytes × (distinct values + a day's distinct values)), in a scatter task the ids
of the day's distinct values (4 bytes each, two days' at a time), and, in the permute
task, 4 bytes per training row plus the destinations of the days it finds in one pass (4
bytes a row, as many days as its share holds, at least one). Each is taken from the
worker's share where it fits (`StageMemory`).

Testing aid: with DLRM_PREPARE_KILL_AFTER=STAGE:N in the environment the command SIGKILLs
its own process group once N tasks of STAGE are done (for the scatter, N days), to test
resumption.
"""

import bisect
import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import numpy as np

from dlrm_torchrec.data import criteo_text as ct
from dlrm_torchrec.data.converters import direct_io, native
from dlrm_torchrec.data.converters import mlperf_multi_hot as mh
from dlrm_torchrec.data.converters.from_torchrec import AdoptError, adopt
from dlrm_torchrec.data.converters.preprocess import (
    HEADER_BYTES,
    NpyWriter,
    Report,
    npy_header,
    write_json,
)
from dlrm_torchrec.data.file_checks import output_folder_problem
from dlrm_torchrec.data.worker_exit import exit_with_parent

DAYS = 24
TRAIN_DAYS = DAYS - 1
NUM_DENSE, NUM_SPARSE = ct.NUM_DENSE, ct.NUM_SPARSE
FIRST_ID = 2  # sparse_to_contiguous numbers from 2 (1 is its id of rare values)
# text per parsed chunk: a 16th of a worker's memory share, within these bounds (a chunk's
# text is held twice, its parsed values and rows 1.6 times, so about 5 times in all). Each
# feature's id table is looked up once per row of a chunk in a pass of its own: a larger
# chunk finds more of the table in the caches (32 MB against 8 MB: 10 % less parsing time)
CHUNK_BYTES, MAX_CHUNK_BYTES = 8 << 20, 32 << 20
MIN_CHUNK_ROWS = 1 << 10  # rows a scatter chunk holds at the least, whatever the memory
# a worker's thread for freeing disk space (`direct_io.thread`): the place stage's punched
# holes (a punch waits for the direct reads in flight on its file, the other workers'
# parts of the same chunks, a few milliseconds each, over a hundred per bucket, and the
# next bucket's reads need not wait with it) and the scatter's removal of a day's rows;
# `_release_scratch` waits for it as the next stage begins in the process (or as a process
# that ran tasks inline ends them); a worker also joins it as it exits
PUNCH_THREAD = "punch"
EXACT_BYTES = 1 << 16  # text the exact parser takes from a line the compiled one does not
DENSE_RANGE = "dense value outside int32 (TorchRec stores dense values as int32)"
ROW_BYTES = 4 * native.ROW_WORDS  # a parsed row: label, raw dense values, local ids
# bytes per row of a bucket that a place task holds: its output columns and a byte marking
# each row placed
PLACE_OUT_BYTES_PER_ROW = 4 * (NUM_DENSE + NUM_SPARSE + 1) + 1
# bytes per row the bucket plan counts: the output columns and a record at its widest. A
# place task reads the records a few batches at a time, so it holds less: its peak stays
# well under its share, where buckets twice as large would make them the run's peak
PLACE_BYTES_PER_ROW = native.RECORD_BYTES + PLACE_OUT_BYTES_PER_ROW
# the records a place task reads at once, and the arenas they take turns in: one batch is
# placed while the I/O thread reads the next two
PLACE_BATCH_BYTES, PLACE_BATCH_PARTS = 8 << 20, 64
# bytes per row of a scatter chunk: the packed row read (at most ROW_BYTES) and its
# destination (one arena), the record and its bucket (another); a scatter holds two of each
SCATTER_READ_BYTES_PER_ROW = ROW_BYTES + 4
SCATTER_WRITE_BYTES_PER_ROW = native.RECORD_BYTES + 4
# the scatter unpacks and transforms a chunk's rows this many at a time, into memory that
# stays in the core's cache (unpacked whole, a chunk's rows were written to and read back
# from the main memory: 40 ns a row)
SCATTER_BLOCK_ROWS = 16384
# rows of a bucket whose dense logarithm the place stage takes at once (numpy copies the
# shifted values it overwrites: 52 bytes a row beside the bucket's memory)
LOG_BLOCK_ROWS = 16384
# the same for day 23: the row read, the dense transform's arrays, int64 ids
EVAL_BYTES_PER_ROW = ROW_BYTES + 2 * 4 * NUM_DENSE + 8 * NUM_SPARSE
# disk per row at the peak: parsed rows (then records: a day's rows go once its records
# are written; a day being scattered has both, while no output is written yet), first
# occurrences (at most), output
DISK_BYTES_PER_ROW = ROW_BYTES + 4 * NUM_SPARSE + 160 + 8
PARTS = (("dense", NUM_DENSE), ("sparse", NUM_SPARSE), ("labels", 1))
OUT_DTYPES = {"dense": np.dtype("<f4"), "labels": np.dtype("<i4")}
# the layout of the work files (the parsed rows, the records); a work folder of another
# layout is not resumed
WORK_FORMAT = 4
# the stages in order; `--stage all` runs them all, with a barrier between two
STAGES = ("parse", "vocab", "scatter", "place", "multi_hot", "meta")


class PrepareError(Exception):
    """A user-facing problem: printed as `error: ...` with exit status 2, no traceback."""


@dataclass
class Settings:
    inputs: List[str]
    output: str
    workers: int = 1
    memory_gb: float = 8.0
    exact_ids: bool = False
    drop_malformed: bool = False
    seed: int = 0
    keep_work: bool = False
    multi_hot: bool = False
    multi_hot_sizes: List[int] = field(default_factory=lambda: list(mh.MLPERF_BAG_SIZES))
    multi_hot_table_sizes: List[int] = field(default_factory=lambda: list(mh.MLPERF_TABLE_SIZES))
    multi_hot_distribution: str = "uniform"
    stage: str = "all"
    rank: int = 0
    world_size: int = 1
    log: Callable[[str], None] = field(default=lambda m: print(m, file=sys.stderr))

    def identity(self) -> dict:
        """What the output bytes depend on: a rerun must match it to resume."""
        return {"work_format": WORK_FORMAT,
                "inputs": [[os.path.basename(p), os.path.getsize(p)] for p in self.inputs],
                "exact_ids": self.exact_ids, "drop_malformed": self.drop_malformed,
                "seed": self.seed, **({"multi_hot": {
                    "sizes": list(self.multi_hot_sizes),
                    "table_sizes": list(self.multi_hot_table_sizes),
                    "distribution": self.multi_hot_distribution}} if self.multi_hot else {})}

    @property
    def work(self) -> str:
        return os.path.join(self.output, ".prepare")


# --------------------------------------------------------------------------- checks


def day_number(path: str) -> Optional[int]:
    m = re.fullmatch(r"day_(\d+)(\.gz|\.txt)?", os.path.basename(path))
    return int(m.group(1)) if m else None


def estimate_rows(path: str, sample: int = 1 << 20) -> int:
    """Rows of a day file estimated from its first `sample` bytes (decompressed if gzip)."""
    with open(path, "rb") as f:
        head = f.read(sample)
    text = head
    if head[:2] == b"\x1f\x8b":
        try:
            text = zlib.decompressobj(wbits=31).decompress(head)
        except zlib.error:
            text = head  # reported when the file is parsed
    lines = max(text.count(b"\n"), 1)
    return int(os.path.getsize(path) * len(text) / max(len(head), 1) * lines / max(len(text), 1)) + 1


def _folder_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def check_inputs(s: Settings) -> None:
    """Every check that needs no parsing, so mistakes stop before any work."""
    if s.workers < 1:
        raise PrepareError(f"--workers {s.workers}: must be at least 1")
    if not s.memory_gb > 0:
        raise PrepareError(f"--memory-gb {s.memory_gb}: must be > 0")
    if s.multi_hot:
        problem = mh.problem(s.multi_hot_sizes, s.multi_hot_table_sizes,
                             s.multi_hot_distribution)
        if problem:
            raise PrepareError(problem)
    if s.stage != "all" and s.stage not in STAGES:
        raise PrepareError(f"--stage {s.stage}: must be all or one of {', '.join(STAGES)}")
    if not 0 <= s.rank < s.world_size:
        raise PrepareError(f"rank {s.rank} of {s.world_size} tasks: the rank must be in "
                           f"0 .. {s.world_size - 1}")
    missing = [p for p in s.inputs if not os.path.isfile(p)]
    if missing:
        raise PrepareError("input file(s) not found: " + ", ".join(missing))
    for p in s.inputs:
        if day_number(p) is None:
            raise PrepareError(f"{p}: not a Criteo 1TB day file (expected the name day_N, "
                               "day_N.gz or day_N.txt)")
    nums = [day_number(p) for p in s.inputs]
    absent = sorted(set(range(DAYS)) - set(nums))
    if absent:
        raise PrepareError("missing day(s) " + ", ".join(f"day_{d}" for d in absent)
                           + f": MLPerf's data needs all {DAYS} days, day_0 .. day_23")
    if len(nums) != DAYS:
        extra = sorted(n for n in set(nums) if nums.count(n) > 1 or n >= DAYS)
        raise PrepareError("expected the 24 days day_0 .. day_23 once each; also given: "
                           + ", ".join(f"day_{d}" for d in extra))
    for i, n in enumerate(nums):
        if n != i:
            raise PrepareError(f"{s.inputs[i]}: given as day {i}; give the days in order "
                               "day_0 .. day_23")
    empty = [p for p in s.inputs if os.path.getsize(p) == 0]
    if empty:
        raise PrepareError("input file(s) empty: " + ", ".join(empty))
    problem = output_folder_problem(s.output)  # a file there, or a file above it
    if problem is not None:
        raise PrepareError(f"-o {s.output}: {problem}")
    settings_path = os.path.join(s.work, "settings.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            old = json.load(f)
        if old.get("work_format") != WORK_FORMAT:
            raise PrepareError(f"{s.output} holds work files ({s.work}) of another version "
                               f"of this tool; remove {s.work} and the day files in "
                               f"{s.output}, or choose another output folder")
        if old != s.identity():
            diff = [k for k, v in s.identity().items() if old.get(k) != v]
            raise PrepareError(f"{s.output} holds a preparation with other settings ("
                               + ", ".join(diff) + "); rerun it with the same inputs and "
                               "options, or choose another output folder")
    elif os.path.exists(os.path.join(s.output, "meta.json")):
        raise PrepareError(f"{s.output} already holds data (meta.json); choose another "
                           "output folder")


def check_disk(s: Settings) -> None:
    """Enough free space for the estimated peak, less what earlier runs already wrote."""
    rows = sum(estimate_rows(p) for p in s.inputs)
    need = rows * DISK_BYTES_PER_ROW
    if s.multi_hot:
        # the bags, the per-feature id files of the days being expanded, the tables
        need += (mh.npz_bytes(rows, s.multi_hot_sizes) + rows * 4 * NUM_SPARSE
                 + mh.table_bytes(s.multi_hot_sizes, s.multi_hot_table_sizes))
    if os.path.isdir(s.output):
        need -= _folder_bytes(s.output)
    folder = s.output
    while not os.path.isdir(folder):
        folder = os.path.dirname(os.path.abspath(folder))
    free = shutil.disk_usage(folder).free
    if need > free:
        raise PrepareError(f"{folder}: {free / 1e9:.1f} GB free, but the preparation needs "
                           f"about {need / 1e9:.1f} GB more (about {DISK_BYTES_PER_ROW} bytes "
                           "per row at its peak, rows estimated from the input sizes)")


# --------------------------------------------------------------------------- restarts

# Work files (everything under OUT/.prepare, and the output days until meta.json) are not
# synced to disk as they are written: syncing them cost an eighth of the run, and most of
# them are deleted seconds later. A killed run loses nothing by it (what a process wrote is
# the kernel's, in the page cache or handed to the disk); a machine that went down may. So
# each machine that works on the folder records its boot, and a run on a machine that has
# restarted since does not trust what is there.
OUTPUT_FILE = re.compile(r"day_\d+_(dense|sparse|labels)\.npy(\.part)?|day_\d+_sparse_multi_hot\.npz")


def boot_id() -> str:
    """This boot of this machine (Linux: the kernel's boot id; elsewhere empty, and a
    restart goes unnoticed)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _boot_record(s: Settings) -> str:
    return os.path.join(s.work, "hosts", f"{os.uname().nodename}.json")


def check_restart(s: Settings) -> None:
    """Start over (one task) or stop (several) when this machine restarted after it wrote
    unsynced work files into s.output."""
    host, path, now = os.uname().nodename, _boot_record(s), boot_id()
    if os.path.exists(path) and not os.path.exists(os.path.join(s.output, "meta.json")):
        with open(path) as f:
            then = json.load(f).get("boot_id")
        if then != now:
            if s.world_size > 1:
                raise PrepareError(
                    f"{s.output}: its work files were written on {host} before the machine "
                    "restarted, and they are not synced to disk, so some may be incomplete; "
                    f"remove {s.work} and the day files in {s.output}, or run it again as "
                    "one task, which starts over by itself")
            s.log(f"{s.output}: written before this machine restarted (its work files are "
                  "not synced to disk, so some may be incomplete): starting over")
            shutil.rmtree(s.work)
            for name in os.listdir(s.output):
                if OUTPUT_FILE.fullmatch(name):
                    os.remove(os.path.join(s.output, name))


def record_boot(s: Settings) -> None:
    """Note this machine's boot in the work folder before it writes work files there."""
    path = _boot_record(s)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # several tasks of one machine may write it
        with open(tmp, "w") as f:
            json.dump({"boot_id": boot_id()}, f)
        _sync(tmp)  # the one record that must outlive a crash
        os.replace(tmp, path)
        for folder in (os.path.dirname(path), s.work):  # and its name, too
            _sync(folder)


def sync_outputs(out: str) -> None:
    """Sync the output files to disk, before meta.json declares them complete."""
    for name in sorted(os.listdir(out)):
        if OUTPUT_FILE.fullmatch(name):
            _sync(os.path.join(out, name))


def _sync(path: str) -> None:
    """fsync a file or a folder (its entries) by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- transforms


def dense_shift(day_min: int) -> int:
    """What `tsv_to_npys` subtracts from a day's raw dense values before their logarithm:
    m - 2 (m: the day's smallest raw value) in int32 arithmetic, wrapping as numpy does."""
    with np.errstate(over="ignore"):
        return int(np.int32(day_min) - np.int32(2))


def dense_log(shifted: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Shifted dense values (int32) -> their float32 logarithm into `out` (which may be
    their own memory), as `tsv_to_npys` takes it: numpy's float32 log of the int32 values
    (its own routine, whose results other libraries' logf need not match bit for bit)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(shifted, out=out, dtype=np.float32)


def torchrec_dense(raw: np.ndarray, day_min: int, arena: Optional["Arena"] = None) -> np.ndarray:
    """(n, 13) raw dense ints -> float32 as `tsv_to_npys`: log(x - m + 2) with the int32
    arithmetic and the float32 log it uses (m: the smallest raw value of the day); the
    temporaries in `arena` memory if given."""
    take = arena.take if arena is not None else np.empty
    shifted = take(raw.shape, np.int32)
    with np.errstate(over="ignore"):
        np.subtract(raw, np.int32(dense_shift(day_min)), out=shifted, dtype=np.int32,
                    casting="unsafe")
    return dense_log(shifted, take(raw.shape, np.float32))


# --------------------------------------------------------------------------- stages


def _fresh(path: str) -> str:
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _first_bad(bad: ct.BadRows) -> Optional[Tuple[int, str, str]]:
    best = None
    for reason, ex in bad.examples.items():
        if reason in ct.REPAIRED:
            continue  # repaired (as TorchRec's text reader takes these lines), and reported
        for line, detail in ex:
            if best is None or line < best[0]:
                best = (line, reason, detail)
    return best


def parse_day(day: int, path: str, dst: str, drop_malformed: bool,
              chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Stage 1 for one day, into folder `dst`: its rows (the label, the raw dense values,
    each id as its day-local number, the position of its value in the day's
    first-occurrence order of its feature), packed group by group (`rows.npy`, bytes, and
    `packs.npy`: see `_DayRows`), and those first-occurrence orders. The compiled parser
    takes the plainly valid lines; from a line it does not take (malformed, or to be
    repaired) the exact parser
    (`criteo_text.parse_chunk`) takes over for up to EXACT_BYTES, naming the problem. A
    plain file is read block by block past the page cache (`_parse_plain`); a gzip file
    (or one starting with a byte-order mark) through `criteo_text.read_chunks`."""
    tmp = _fresh(dst)
    rows_out = NpyWriter(os.path.join(tmp, "rows.npy"), np.uint8, 1, sync=False, direct=True)
    packs: List[List[int]] = []  # per pack: its first row, its first byte, then its Pack
    tables = _day_tables()
    buffers = _scratch(f"parse {chunk_bytes}",
                       lambda: native.ParseBuffers(chunk_bytes // 200, MEMORY.array))
    row_buffer = _scratch(f"rows {chunk_bytes}", lambda: MEMORY.take(
        buffers.max_rows * ROW_BYTES + native.PACK_ROOM))
    rows_so_far = 0
    day_min: Optional[int] = None
    day_max = np.full(NUM_DENSE, -2 ** 31, np.int64)  # each dense column's largest
    bad = ct.BadRows()

    def stop_if_bad(found: ct.BadRows) -> None:
        first = _first_bad(found)
        if first and not drop_malformed:
            line, reason, detail = first
            raise PrepareError(f"{path}:{line}: {reason}{': ' + detail if detail else ''} "
                               "(--drop-malformed drops such rows)")

    def take(dense: np.ndarray, columns: np.ndarray, labels: np.ndarray, low: int) -> None:
        """Rows: dense (n, 13) int32, the raw ids feature-major (26, n) uint32 (numbered
        in place), labels (n,) int32; low: their smallest dense value."""
        nonlocal day_min, rows_so_far
        if not len(labels):
            return
        day_min = low if day_min is None else min(day_min, low)
        np.maximum(day_max, dense.max(axis=0), out=day_max)
        for f in range(NUM_SPARSE):
            tables[f].assign(columns[f], out=columns[f])
        room = len(labels) * ROW_BYTES + native.PACK_ROOM
        out = row_buffer if room <= len(row_buffer) else np.empty(room, np.uint8)
        # a day-local number is below its table's size
        id_top = np.array([max(len(t), 1) - 1 for t in tables], np.uint32)
        pack, packed = native.pack_rows(labels, dense, columns, id_top, out)
        packs.append([rows_so_far, rows_out.rows, pack.rows, *pack.bases.tolist(),
                      *pack.widths.tolist()])
        rows_so_far += pack.rows
        if len(packed):  # rows all alike take no bytes
            rows_out.write(packed)

    def exact(data: bytes, first_line: int) -> int:
        """Whole lines parsed by the exact parser; returns their number."""
        p = ct.parse_chunk(data, first_line, raw_dense=True)
        dense, sparse, labels = p.dense_raw, p.sparse, p.labels
        outside = ((dense < -2 ** 31) | (dense >= 2 ** 31)).any(axis=1)
        if outside.any():
            for r in np.flatnonzero(outside):
                c = int(np.flatnonzero((dense[r] < -2 ** 31) | (dense[r] >= 2 ** 31))[0])
                p.bad.add(DENSE_RANGE, int(p.lines[r]), f"column I{c + 1} = {dense[r, c]}")
            keep = ~outside
            dense, sparse, labels = dense[keep], sparse[keep], labels[keep]
        stop_if_bad(p.bad)
        bad.merge(p.bad)
        if len(labels):
            take(dense.astype(np.int32), np.ascontiguousarray(sparse.T), labels, int(dense.min()))
        return p.num_lines

    def parse_text(text: np.ndarray, line: int) -> Tuple[int, int]:
        """The whole lines at the start of `text` (uint8) parsed and taken; returns (their
        bytes, their number)."""
        pos, first = 0, line
        while pos < len(text):
            n, used, stop, low = buffers.parse(text.ctypes.data + pos, len(text) - pos)
            take(buffers.dense[:n], buffers.sparse[:, :n], buffers.labels[:n], low)
            pos, line = pos + used, line + n
            if stop == 0:
                break
            if stop == 1:
                part = text[pos:pos + EXACT_BYTES].tobytes()
                cut = part.rfind(b"\n") + 1
                if not cut:  # a line longer than EXACT_BYTES
                    newline = np.flatnonzero(text[pos:] == 10)
                    if not len(newline):
                        break  # it ends in the next read
                    cut = int(newline[0]) + 1
                    part = text[pos:pos + cut].tobytes()
                line += exact(part[:cut], line)
                pos += cut
        return pos, line - first

    ends: List[ct.StreamEnd] = []
    try:
        with open(path, "rb", buffering=0) as f:
            plain = f.read(3) != ct.UTF8_BOM and not ct.is_gzip(path)
        if plain:
            end = _parse_plain(path, parse_text, chunk_bytes)
        else:
            for chunk in ct.read_chunks(path, chunk_bytes, ends):
                if chunk.bom_removed:
                    bad.add(ct.BOM, 1)
                parse_text(np.frombuffer(chunk.data, np.uint8), chunk.first_line)
            end = ends[0] if ends else ct.StreamEnd(1)
    except ValueError as e:  # an endless line
        raise PrepareError(f"{path}: {e}: not Criteo text") from None
    lines = end.next_line - 1
    tail = ct.BadRows()
    if end.partial:
        if end.error is None and end.partial.count(b"\t") == NUM_DENSE + NUM_SPARSE:
            lines += exact(end.partial + b"\n", end.next_line)  # lacks only its newline
        else:
            tail.add(ct.TRUNCATED_LINE, end.next_line, f"{len(end.partial)} bytes after the "
                     "last newline")
            lines += 1
    if end.error is not None:
        tail.add(end.error.reason, end.next_line + bool(end.partial), end.error.detail)
    stop_if_bad(tail)
    bad.merge(tail)
    if day_min is None:
        raise PrepareError(f"{path}: no valid rows")
    rows_out.finish()
    firsts, counts = NpyWriter(os.path.join(tmp, "first.npy"), np.uint32, 1, sync=False,
                               direct=True), [0]
    for t in tables:
        firsts.write(t.order()[:, None])
        counts.append(len(t))
    firsts.finish()
    np.save(os.path.join(tmp, "first_offsets.npy"), np.cumsum(counts).astype(np.int64))
    np.save(os.path.join(tmp, "packs.npy"), np.array(packs, np.int64).reshape(
        len(packs), 3 + 2 * native.ROW_WORDS))
    stats = {"day": day, "rows": rows_so_far, "row_bytes": rows_out.rows,  # uint8 "rows"
             "lines": lines, "dense_min": day_min, "dense_max": day_max.tolist(),
             "bad_counts": bad.counts,
             "bad_examples": bad.examples}
    write_json(os.path.join(tmp, "stats.json"), stats, sync=False)
    os.replace(tmp, dst)
    return stats


_DAY_TABLES: List[native.IdTable] = []


def _day_tables() -> List[native.IdTable]:
    """The per-feature tables of a parse task, emptied: a process's parse tasks reuse one
    set, whose memory is already paged in at the size the largest day needed."""
    if not _DAY_TABLES:
        _DAY_TABLES.extend(native.IdTable(0, keep_order=True) for _ in range(NUM_SPARSE))
    for t in _DAY_TABLES:
        t.clear()
    return _DAY_TABLES


_VOCAB_TABLE: List[native.IdTable] = []


def _vocab_table() -> native.IdTable:
    """The table of a vocab task, emptied: a process's vocab tasks reuse one, already
    paged in at the size the largest feature so far needed (a fresh one faulted in and
    filled every slot again at each of its doublings)."""
    if not _VOCAB_TABLE:
        _VOCAB_TABLE.append(native.IdTable(FIRST_ID))
        _VOCAB_TABLE[0].lend(MEMORY.rest())
    _VOCAB_TABLE[0].clear()
    return _VOCAB_TABLE[0]


_SCRATCH: Dict[str, object] = {}


def _scratch(name: str, make: Callable[[], object]) -> object:
    """A buffer a process's tasks reuse in turn (one task at a time): a fresh one is paged
    in (a fault and a zeroed page every 4 KB) at every task."""
    if name not in _SCRATCH:
        _SCRATCH[name] = make()
    return _SCRATCH[name]


def _release_scratch() -> None:
    """Free the memory a process's tasks keep between tasks of one stage (the holes they
    left to punch punched first)."""
    direct_io.finish_thread(PUNCH_THREAD)
    for t in _DAY_TABLES + _VOCAB_TABLE:
        t.close()
    _DAY_TABLES.clear()
    _VOCAB_TABLE.clear()
    _SCRATCH.clear()
    direct_io.release_buffers()
    mh.release_scratch()
    for arena in (ARENA, SPARE_ARENA, RECORDS_ARENA, SPARE_RECORDS_ARENA) + MAP_ARENAS:
        arena.release()


def _parse_plain(path: str, parse_text: Callable[[np.ndarray, int], Tuple[int, int]],
                 chunk_bytes: int) -> ct.StreamEnd:
    """Feed a plain text file to `parse_text` block by block, each read past the page cache
    (`direct_io.read_at`: the raw days are read once, and a page-cache page costs more than
    the read) by the I/O thread while the block before is parsed; returns what follows the
    last whole line. A block is read into one of two reused buffers, after room for the
    unfinished line of the block before, which is copied in front of it."""
    room = -(-ct.MAX_LINE_BYTES // direct_io.PAGE) * direct_io.PAGE
    buffers = [_scratch(f"text {i} {chunk_bytes}",
                        lambda: direct_io.phase_aligned(room + chunk_bytes, 0, MEMORY.take))
               for i in range(2)]
    io = direct_io.background()
    blocks = [io.submit(direct_io.read_at, path, buffers[0][room:], 0)]
    tail = np.empty(0, np.uint8)  # the unfinished line so far
    line, at, k = 1, 0, 0
    try:
        while True:
            got = blocks[k].result()
            buf = buffers[k % 2]
            buf[room - len(tail):room] = tail
            at += got
            if got:  # the other buffer is free: its unfinished line is copied
                blocks.append(io.submit(direct_io.read_at, path, buffers[(k + 1) % 2][room:], at))
            text = buf[room - len(tail):room + got]
            used, lines = parse_text(text, line)
            line += lines
            if len(text) - used > ct.MAX_LINE_BYTES:
                raise ValueError(f"line {line} is longer than {ct.MAX_LINE_BYTES} bytes")
            tail = text[used:].copy()
            if not got:
                return ct.StreamEnd(line, tail.tobytes())
            k += 1
    except BaseException:
        _settle(blocks, drop=True)
        raise


def _trim_heap() -> None:
    """Return the C heap's free pages to the system (glibc's malloc_trim): the id tables of
    one stage, freed, would otherwise stay in a kept worker's memory through the next."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class StageMemory:
    """A worker's memory for its tasks' large arrays: one allocation of its memory share,
    kept for the whole run and carved anew by each stage (`begin`).

    A page a process touches for the first time costs a fault and a zeroed page, and on a
    virtual machine often the host's backing first (measured on a 2-core VM: 0.4-0.7 GB/s,
    against 10 GB/s into a page in use). Workers made per stage faulted every stage's
    buffers in afresh. Kept workers that freed their buffers to the C heap between stages,
    told to keep its pages (mallopt), kept them, but the heap was too broken up for the next
    stage's buffers: the largest worker's peak grew from 297 to 496 MB. Carved from here, a
    worker's pages are faulted in once, by the stage that touches the most of them.

    Arrays are taken as from a stack (`take`, at 64-byte boundaries) and given back only
    from its top (`give_back`), or all at once when the next stage begins. What takes from
    here takes once per stage (arenas, `_scratch` buffers, a vocabulary table's slots) or
    gives back at its end (the permutation). Past the share, `take` allocates afresh, so
    nothing fails for want of room here."""

    ALIGN = 64

    def __init__(self):
        self.buf = np.empty(0, np.uint8)
        self.starts: List[int] = []  # where each array taken and not given back starts
        self.used = 0
        self.stage = ""

    def begin(self, stage: str, share: int) -> None:
        """Start `stage` (a no-op within one): what the stage before kept is let go, and
        the memory is `share` bytes (allocated once; its pages are faulted in as touched)."""
        if stage == self.stage:
            return
        _release_scratch()
        _trim_heap()
        self.stage, self.starts, self.used = stage, [], 0
        if share > len(self.buf):
            self.buf = np.empty(0, np.uint8)
            space = np.empty(share + self.ALIGN, np.uint8)
            skip = -space.ctypes.data % self.ALIGN
            self.buf = space[skip:skip + share]

    def end(self) -> None:
        """Give the memory back (a process that runs tasks only now and then)."""
        _release_scratch()
        self.buf, self.starts, self.used, self.stage = np.empty(0, np.uint8), [], 0, ""

    def take(self, nbytes: int, grow: Optional[np.ndarray] = None) -> np.ndarray:
        """(nbytes,) uint8. `grow`: an array taken here before, which this one replaces
        (its bytes are not kept): where it is the latest taken, this one starts where it
        did."""
        if grow is not None:
            self.give_back(grow)
        at = self.used
        if at + nbytes > len(self.buf):
            return np.empty(nbytes, np.uint8)
        self.starts.append(at)
        self.used = at + -(-nbytes // self.ALIGN) * self.ALIGN
        return self.buf[at:at + nbytes]

    def rest(self) -> np.ndarray:
        """All the memory not taken (uint8), taken."""
        return self.take(len(self.buf) - self.used)

    def give_back(self, array: np.ndarray) -> None:
        """Let the stage take `array`'s bytes again, where it is the latest taken (else
        they stay taken until the stage ends)."""
        if len(array) and self.starts and \
                array.ctypes.data == self.buf.ctypes.data + self.starts[-1]:
            self.used = self.starts.pop()

    def array(self, shape: Tuple[int, ...], dtype) -> np.ndarray:
        """A `take` as an array of `shape` and `dtype`."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        return self.take(count * dtype.itemsize).view(dtype).reshape(shape)


MEMORY = StageMemory()


class Arena:
    """Scratch memory a process's tasks reuse in turn, in `MEMORY`: `reset(need)` before a
    chunk (no array taken before may be in use then), `take` for each of its arrays; the
    buffer grows to the largest need, which the memory share bounds."""

    ALIGN = StageMemory.ALIGN

    def __init__(self):
        self.buf = np.empty(0, np.uint8)
        self.used = 0

    def reset(self, need: int) -> None:
        """Room for arrays of `need` bytes in all (plus ALIGN for each)."""
        if need > len(self.buf):
            self.buf = MEMORY.take(need, grow=self.buf)
        self.used = 0

    def release(self) -> None:
        MEMORY.give_back(self.buf)
        self.buf = np.empty(0, np.uint8)
        self.used = 0

    def take(self, shape: Tuple[int, ...], dtype, phase: Optional[int] = None) -> np.ndarray:
        """An array; with `phase`, at an address whose remainder mod direct_io.PAGE is
        phase's (an O_DIRECT write of it to file offset `phase`; `need` then counts a PAGE
        more for it)."""
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        at = self.used
        if phase is not None:
            at += direct_io.to_phase(self.buf.ctypes.data + at, phase)
        if at + size > len(self.buf):  # more than the chunk's `need`: not reused
            if phase is not None:
                return direct_io.phase_aligned(size, phase).view(dtype).reshape(shape)
            return np.empty(shape, dtype)
        out = self.buf[at:at + size].view(dtype).reshape(shape)
        self.used = at + -(-size // self.ALIGN) * self.ALIGN
        return out


ARENA = Arena()
# the scatter's other arenas: one chunk is read while another is worked on and a third
# written (`scatter_days`)
SPARE_ARENA, RECORDS_ARENA, SPARE_RECORDS_ARENA = Arena(), Arena(), Arena()
PLACE_BATCH_ARENAS = (SPARE_ARENA, RECORDS_ARENA, SPARE_RECORDS_ARENA)
# the maps of a scatter's days, which take turns: the next day's are read while this day's
# last chunk is worked on
MAP_ARENAS = (Arena(), Arena())


def read_rows(path: str, lo: int, hi: int, arena: Optional[Arena] = None,
              direct: bool = False) -> np.ndarray:
    """Rows lo .. hi of a .npy file, read (not memory-mapped: mapped pages a task touches
    count as its memory, and at full scale these files are gigabytes), into `arena` memory
    if given; with `direct`, past the page cache (`direct_io.read_at`; `arena`'s need then
    counts a PAGE more)."""
    shape, dtype, at = _npy_layout(path)
    lo, hi = min(lo, shape[0]), min(hi, shape[0])
    rows = (hi - lo,) + tuple(shape[1:])
    at += lo * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    if not direct:
        out = arena.take(rows, dtype) if arena is not None else np.empty(rows, dtype)
        with open(path, "rb", buffering=0) as f:
            f.seek(at)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
                raise RuntimeError(f"{path}: shorter than its header says")
        return out
    out = arena.take(rows, dtype, phase=at) if arena is not None else \
        direct_io.phase_aligned(int(np.prod(rows, dtype=np.int64)) * dtype.itemsize,
                                at).view(dtype).reshape(rows)
    _read_exactly(path, out, at)
    return out


def _npy_layout(path: str) -> Tuple[Tuple[int, ...], np.dtype, int]:
    """A .npy file's shape, dtype and where its data starts (its header read, no data page
    touched)."""
    layout = np.load(path, mmap_mode="r")
    return layout.shape, layout.dtype, layout.offset


def _read_exactly(path: str, out: np.ndarray, at: int) -> None:
    """Fill `out` from `path` at `at` (`direct_io.read_at`)."""
    if direct_io.read_at(path, out, at) != out.nbytes:
        raise RuntimeError(f"{path}: shorter than its header says")


def _day_firsts_offsets(parse_dir: str, day: int) -> np.ndarray:
    return np.load(os.path.join(parse_dir, f"day_{day}", "first_offsets.npy"))


def build_vocab(f: int, parse_dir: str, vocab_dir: str) -> int:
    """Stage 2 for one feature: the contiguous id of each of its values, numbered from
    FIRST_ID in order of first occurrence over the days, written as `map_{f}.npy`: for day
    0, 1, ... in turn, the ids of the day's distinct values in the day's order (so a day's
    local number indexes its part of the map)."""
    table = _vocab_table()
    path = os.path.join(vocab_dir, f"map_{f}.npy")
    spans = [_day_firsts_offsets(parse_dir, d)[f:f + 2].tolist() for d in range(DAYS)]
    total = sum(hi - lo for lo, hi in spans)
    writer = NpyWriter(path + ".tmp", np.uint32, 1, sync=False, direct=True)

    def read(day: int) -> Future:  # the next day's values read while this day's are numbered
        return direct_io.background().submit(
            read_rows, os.path.join(parse_dir, f"day_{day}", "first.npy"), *spans[day], None,
            True)

    ahead = read(0)
    try:
        for day in range(DAYS):
            values = ahead.result()[:, 0]
            if day + 1 < DAYS:
                ahead = read(day + 1)
            # room for every value of the day being new: one resize instead of several (the
            # table never holds more than twice what growing one value at a time would)
            table.reserve(len(table) + len(values))
            writer.write(table.assign(values, out=values)[:, None])
    except BaseException:
        _settle([ahead], drop=True)
        writer.abort()
        raise
    writer.finish()
    if writer.rows != total:
        raise RuntimeError(f"feature {f}: {writer.rows} map entries, expected {total}")
    count = len(table)
    write_json(os.path.join(vocab_dir, f"count_{f}.json"), {"distinct": count}, sync=False)
    os.replace(path + ".tmp", path)  # last: the map marks the task done
    return count


def record_widths(work: str) -> np.ndarray:
    """(39,) uint8: the bytes a record gives each of its columns, as few as the column's
    largest needs (`native.id_width`). The dense columns hold the training days' shifted
    values, x - m + 2 at most their largest less their day's smallest (from the parse's
    stats); the ids the contiguous ids, below FIRST_ID + the vocabulary's count. Both come
    from files every task of a run finds the same, resumed or not."""
    parse_dir = os.path.join(work, "parse")
    shifted = np.zeros(NUM_DENSE, np.int64)
    for d in range(TRAIN_DAYS):
        with open(os.path.join(parse_dir, f"day_{d}", "stats.json")) as fh:
            st = json.load(fh)
        np.maximum(shifted, np.array(st["dense_max"]) - st["dense_min"] + 2, out=shifted)
    widths = [native.id_width(int(x)) for x in shifted]
    for f in range(NUM_SPARSE):
        with open(os.path.join(work, "vocab", f"count_{f}.json")) as fh:
            widths.append(native.id_width(FIRST_ID + json.load(fh)["distinct"] - 1))
    return np.array(widths, np.uint8)


def permute(rows: List[int], seed: int, dst: str, budget: int) -> None:
    """Stage 2: TorchRec's permutation of the training rows (days 0-22, `rows` a day;
    shuffled row k is row perm[k]) and, per day d, where each of its rows goes
    (`dst/day_{d}.npy`, uint32: the inverse permutation's slice of the day), written
    into folder `dst` at once. Shuffling indices makes the same swaps as shuffling the
    rows: the legacy shuffle draws random_interval(i) for i = n-1 .. 1 whatever the array
    holds (`native.legacy_shuffle` makes numpy's draws and swaps, its element fetches
    overlapped, in a quarter of numpy's time). Holds the permutation (4 bytes a row) and
    the destinations of as many days as `budget` bytes hold (at least one), found in one
    pass over the permutation."""
    n = sum(rows)
    if n > 2 ** 32:
        raise PrepareError(f"{n} training rows: more than this tool's uint32 permutation holds")
    perm = MEMORY.array((n,), np.uint32)
    step = 1 << 22
    for lo in range(0, n, step):  # np.arange would fault in memory of its own
        perm[lo:lo + step] = np.arange(lo, min(n, lo + step), dtype=np.uint32)
    native.legacy_shuffle(perm, seed)
    tmp = _fresh(dst)
    starts = np.cumsum([0] + list(rows)).tolist()
    passes, day = [], 0
    while day < len(rows):
        last = day + 1  # the days of a pass: as many as the budget holds
        while last < len(rows) and 4 * (starts[last + 1] - starts[day]) <= budget:
            last += 1
        passes.append((day, last))
        day = last
    space = MEMORY.array((max(starts[last] - starts[day] for day, last in passes),), np.uint32)
    for day, last in passes:
        found = native.destinations(perm, starts[day], starts[last],
                                    space[:starts[last] - starts[day]])
        for d in range(day, last):  # read once, by the day's scatter: past the page cache
            writer = NpyWriter(os.path.join(tmp, f"day_{d}.npy"), np.uint32, 1, sync=False,
                               direct=True)
            writer.write(found[starts[d] - starts[day]:starts[d + 1] - starts[day]])
            writer.finish()
    os.replace(tmp, dst)
    for array in (space, perm):  # for the vocabulary tasks after it in this process
        MEMORY.give_back(array.view(np.uint8))


def day_maps(work: str, day: int, arena: Optional[Arena] = None) -> List[np.ndarray]:
    """Per feature f, (u_f,) uint32: the contiguous ids of day `day`'s distinct values, in
    the day's order (indexed by its local numbers): its part of `map_{f}.npy`, read into
    `arena` memory if given (reset here; its need: `maps_bytes`)."""
    parse_dir = os.path.join(work, "parse")
    counts = np.array([np.diff(_day_firsts_offsets(parse_dir, d)) for d in range(day + 1)])
    starts = counts[:day].sum(axis=0)
    if arena is not None:
        arena.reset(maps_bytes(counts[day]))
    return [read_rows(os.path.join(work, "vocab", f"map_{f}.npy"), int(starts[f]),
                      int(starts[f] + counts[day, f]), arena, direct=True)[:, 0]
            for f in range(NUM_SPARSE)]


def maps_bytes(counts: np.ndarray) -> int:
    """The arena bytes a day's maps need, its distinct values per feature `counts`."""
    return int(counts.sum()) * 4 + len(counts) * (direct_io.PAGE + Arena.ALIGN)


class _DayRows:
    """A parsed day's folder: its stats, and its rows, read a chunk at a time.
    `rows.npy` holds the packed rows (uint8), pack after pack; `packs.npy` ((packs, 3 + 2 *
    ROW_WORDS) int64) per pack its first row, its first byte, its rows, then its
    `native.Pack` bases and widths. The scatter writes the day's records, bucket by
    bucket within each chunk (`records.partial.npy` while it does, `records.npy` once
    done, each record in the bytes `record_widths` gives), with `index.npy` ((chunks, 1 +
    buckets) int64: per chunk its first row, then its rows of each bucket); then the rows
    are removed."""

    def __init__(self, parse_dir: str, day: int):
        self.folder = os.path.join(parse_dir, f"day_{day}")
        with open(self.at("stats.json")) as f:
            self.stats = json.load(f)
        self.rows = self.stats["rows"]
        table = np.load(self.at("packs.npy"))
        self.first_row, self.first_byte = table[:, 0].tolist(), table[:, 1].tolist()
        self.packs = [native.Pack(int(t[2]), t[3:3 + native.ROW_WORDS].astype(np.uint32),
                                  t[3 + native.ROW_WORDS:].astype(np.uint8)) for t in table]
        self.first_row.append(self.rows)
        self.first_byte.append(self.stats["row_bytes"])

    def at(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def chunks(self, most_rows: int) -> List[Tuple[int, int]]:
        """The rows (lo, hi) of each chunk of at most `most_rows` rows. A chunk need not
        start or end with a pack: a pack's rows all have its row bytes."""
        return [(lo, min(lo + most_rows, self.rows)) for lo in range(0, self.rows, most_rows)]

    def byte_at(self, row: int) -> int:
        """Where row `row` (or, for self.rows, the end) starts among the packed bytes."""
        p = bisect.bisect_right(self.first_row, row) - 1
        if p == len(self.packs):
            return self.first_byte[p]
        return self.first_byte[p] + (row - self.first_row[p]) * self.packs[p].row_bytes

    def take(self, chunk: Tuple[int, int], arena: Arena) -> Tuple[np.ndarray, np.ndarray, int]:
        """Memory for the rows lo .. hi of `chunk`: (rows (n, ROW_WORDS) uint32, the packed
        bytes to read into, their file offset). The packed bytes lie at the end of the
        rows' memory (so that `unpack` may fill the rows over them), at their offset's
        phase (`arena`'s need counts a PAGE and PACK_ROOM more)."""
        lo, hi = chunk
        at = HEADER_BYTES + self.byte_at(lo)
        size = self.byte_at(hi) - self.byte_at(lo)
        space = arena.take(((hi - lo) * ROW_BYTES + direct_io.PAGE + native.PACK_ROOM,),
                           np.uint8)
        start = (hi - lo) * ROW_BYTES - size
        start += direct_io.to_phase(space.ctypes.data + start, at)
        rows = space[:(hi - lo) * ROW_BYTES].view(np.uint32).reshape(hi - lo, native.ROW_WORDS)
        return rows, space[start:start + size], at

    def take_packed(self, chunk: Tuple[int, int], arena: Arena) -> Tuple[np.ndarray, int]:
        """Memory for the packed bytes of the rows of `chunk` alone: (the bytes to read into,
        at their file offset's phase, with PACK_ROOM after them; their file offset)."""
        at = HEADER_BYTES + self.byte_at(chunk[0])
        size = self.byte_at(chunk[1]) - self.byte_at(chunk[0])
        space = arena.take((size + native.PACK_ROOM,), np.uint8, phase=at)
        return space[:size], at

    def unpack(self, chunk: Tuple[int, int], packed: np.ndarray, rows: np.ndarray) -> None:
        """The chunk's packed bytes (read into `take`'s memory) -> its rows, pack by pack."""
        lo, hi = chunk
        first = bisect.bisect_right(self.first_row, lo) - 1
        for p in range(first, len(self.packs)):
            a, b = max(lo, self.first_row[p]), min(hi, self.first_row[p + 1])
            if a >= hi:
                break
            start, end = self.byte_at(a) - self.byte_at(lo), self.byte_at(b) - self.byte_at(lo)
            native.unpack_rows(self.packs[p]._replace(rows=b - a), packed[start:end],
                               rows[a - lo:b - lo])

    def read(self, chunk: Tuple[int, int], arena: Arena) -> np.ndarray:
        rows, packed, at = self.take(chunk, arena)
        _read_exactly(self.at("rows.npy"), packed, at)
        self.unpack(chunk, packed, rows)
        return rows

    def remove(self) -> None:
        """Remove the rows and records (stats.json and the first occurrences stay: the
        vocabulary and the checks read them)."""
        _remove([self.at(name) for name in ("rows.npy", "packs.npy", "records.npy",
                                            "records.partial.npy")])


def scattered(parse_dir: str, day: int) -> bool:
    return os.path.exists(os.path.join(parse_dir, f"day_{day}", "records.npy"))


def write_eval_day(work: str, out: str, chunk_rows: int) -> None:
    """Stage 3 for day 23: copied unshuffled, with its int64 contiguous ids, past the page
    cache; each feature's largest id goes to `place/eval.json` (for meta.json)."""
    day = _DayRows(os.path.join(work, "parse"), TRAIN_DAYS)
    maps = day_maps(work, TRAIN_DAYS, MAP_ARENAS[0])
    final = {p: os.path.join(out, f"day_{TRAIN_DAYS}_{p}.npy") for p, _ in PARTS}
    # synced with the other days' files before meta.json is written
    writers = {"dense": NpyWriter(final["dense"], np.float32, NUM_DENSE, sync=False, direct=True),
               "sparse": NpyWriter(final["sparse"], np.int64, NUM_SPARSE, sync=False,
                                   direct=True),
               "labels": NpyWriter(final["labels"], np.int32, 1, sync=False, direct=True)}
    top = np.full(NUM_SPARSE, -1, np.int64)
    for chunk in day.chunks(chunk_rows):
        lo, hi = chunk
        ARENA.reset((hi - lo) * EVAL_BYTES_PER_ROW + 64 * 64 + direct_io.PAGE + native.PACK_ROOM)
        rows = day.read(chunk, ARENA)
        ids = native.lookup_ids(rows, maps, ARENA.take((len(rows), NUM_SPARSE), np.int64), top)
        dense = rows[:, 1:1 + NUM_DENSE].view(np.int32)
        writers["dense"].write(torchrec_dense(dense, day.stats["dense_min"], ARENA))
        writers["sparse"].write(ids)
        writers["labels"].write(rows[:, 0].view(np.int32))
    write_json(os.path.join(work, "place", "eval.json"), {"largest_ids": top.tolist()},
               sync=False)
    for w in writers.values():
        w.finish()
    day.remove()
    # its chunks (int64 ids) are the largest of the stage: the scatter tasks that follow
    # in this process split their memory over four arenas, and would keep this one whole
    # (and the maps' beneath it), as the writers' buffers, which they do not use
    del maps
    ARENA.release()
    MAP_ARENAS[0].release()
    direct_io.release_buffers()


class _DayScatter:
    """A training day as a scatter run goes through it: its rows (`_DayRows`), chunks, the
    index of its records, and its maps (read on the I/O thread when its first chunk is,
    until the day takes them)."""

    def __init__(self, day: int, work: str, buckets: int, chunk_rows: int):
        self.day, self.work = day, work
        self.rows = _DayRows(os.path.join(work, "parse"), day)
        self.destinations = os.path.join(work, "destinations", f"day_{day}.npy")
        self.dest_at = _npy_layout(self.destinations)[2]
        self.partial, self.source = self.rows.at("records.partial.npy"), self.rows.at("rows.npy")
        self.chunks = self.rows.chunks(chunk_rows)
        self.index = np.zeros((len(self.chunks), 1 + buckets), np.int64)
        self.index[:, 0] = [lo for lo, _ in self.chunks]
        self.maps: Optional[Future] = None

    def begin(self, record_size: int) -> None:
        with open(self.partial, "wb") as fh:
            fh.write(npy_header(np.dtype(np.uint8), (self.rows.rows, record_size)))

    def finish(self) -> None:
        """Its records complete: the index, then the records renamed (the day is scattered),
        then its rows removed on the freeing thread (a large file takes a while)."""
        tmp = self.rows.at("index.npy.tmp.npy")
        np.save(tmp, self.index)
        os.replace(tmp, self.rows.at("index.npy"))
        os.replace(self.partial, self.rows.at("records.npy"))
        direct_io.thread(PUNCH_THREAD).submit(_remove, [self.source, self.rows.at("packs.npy")])
        if os.environ.get(KILL_AFTER):
            parse_dir = os.path.join(self.work, "parse")
            _kill_hook("scatter", sum(scattered(parse_dir, d) for d in range(TRAIN_DAYS)),
                       at_least=True)


def scatter_days(days: List[int], work: str, bucket_starts: np.ndarray, exact: bool,
                 chunk_rows: int, most_rows: int) -> None:
    """Stage 3 for training days, one after another: each row, transformed, as a record
    (its row in its bucket, then its shifted dense values and its ids, each column in
    `record_widths` bytes: the bytes its largest needs, so the records cross the disk
    twice in fewer bytes) grouped
    by bucket within its chunk (`_DayRows`). The days are taken from `days` as the task
    gets to them, each claimed (`claim`) so that the stage's other tasks, which share the
    list, pass it over: a worker that is ahead takes more. The chunks of the days a task
    takes are one stream:
    chunk j+1 (the next day's first, with that day's maps) is read while chunk j is worked
    on and chunk j-1 written, so a day starts without waiting for its reads, nor the next
    for this one's last write. A day's rows are removed once its records are complete: a
    scatter killed half-way starts the day again. `most_rows`: the largest chunk of any day
    in `days`, which the arenas are sized for."""
    widths = record_widths(work)
    record_size = native.record_bytes(widths)
    parse_dir = os.path.join(work, "parse")
    todo: List[_DayScatter] = []  # the days claimed, in turn
    steps: List[Tuple[_DayScatter, int]] = []  # their chunks, as far as claimed

    def step(j: int) -> Optional[Tuple[_DayScatter, int]]:
        """The task's j-th chunk (day, chunk), a day claimed when j reaches its first;
        None once every day is claimed."""
        if j == len(steps):
            k = claim()
            if k >= len(days):
                return None
            todo.append(_DayScatter(days[k], work, len(bucket_starts), chunk_rows))
            steps.extend((todo[-1], c) for c in range(len(todo[-1].chunks)))
        return steps[j]

    if step(0) is None:
        return
    # two pairs of arenas taking turns: chunk j+1 is read (the I/O thread) while chunk j
    # is transformed and chunk j-1's records written (the writer thread). A records arena
    # is reset only once the records it held two chunks before are written. Each arena
    # grows here, to the largest chunk, so no later reset frees memory in use.
    read_need = most_rows * SCATTER_READ_BYTES_PER_ROW + 64 * 4 + 2 * direct_io.PAGE + native.PACK_ROOM
    write_need = most_rows * SCATTER_WRITE_BYTES_PER_ROW + 64 * 4 + direct_io.PAGE
    block = _scratch("scatter block", Arena)
    inputs, outputs = (ARENA, SPARE_ARENA), (RECORDS_ARENA, SPARE_RECORDS_ARENA)
    maps_need = max(maps_bytes(np.diff(_day_firsts_offsets(parse_dir, d))) for d in days)
    for arena, need in ((inputs[0], read_need), (inputs[1], read_need),
                        (outputs[0], write_need), (outputs[1], write_need),
                        (MAP_ARENAS[0], maps_need), (MAP_ARENAS[1], maps_need)):
        arena.reset(need)
    io, writer = direct_io.background(), direct_io.writer_thread()
    handed: List[Future] = []  # every read and write given to the two threads
    writes: List[Future] = []
    written: List[Tuple[_DayScatter, int]] = []  # days all written out: (day, its last write)

    def start(j: int):
        day, c = step(j)
        if c == 0:  # not in `handed`, which would keep every day's maps to the end
            day.maps = io.submit(day_maps, work, day.day, MAP_ARENAS[todo.index(day) % 2])
        lo, hi = day.chunks[c]
        arena = inputs[j % 2]
        arena.reset(read_need)
        packed, at = day.rows.take_packed(day.chunks[c], arena)
        dest = arena.take((hi - lo,), np.uint32)
        reads = [io.submit(_read_exactly, day.source, packed, at),
                 io.submit(_read_exactly, day.destinations, dest, day.dest_at + 4 * lo)]
        handed.extend(reads)
        return packed, dest, reads

    try:
        ahead = start(0)
        j = 0
        while (at_step := step(j)) is not None:
            day, c = at_step
            packed, dest, reads = ahead
            for r in reads:
                r.result()
            if step(j + 1) is not None:
                ahead = start(j + 1)
            if j >= 2:
                writes[j - 2].result()  # so every write before it is done, and succeeded
            while written and written[0][1] <= j - 2:
                written.pop(0)[0].finish()
            if c == 0:
                maps, day.maps = day.maps.result(), None
                shift = dense_shift(day.rows.stats["dense_min"])
                day.begin(record_size)
            lo, hi = day.chunks[c]
            at = HEADER_BYTES + lo * record_size
            arena = outputs[j % 2]
            arena.reset(write_need)
            records = arena.take((hi - lo, record_size), np.uint8, phase=at)
            counts, bucket_of, next_record = native.bucket_rows(
                dest, bucket_starts, arena.take((hi - lo,), np.int32))
            # unpacked, transformed and scattered a block at a time, in the caches
            first = day.rows.byte_at(lo)
            for a in range(lo, hi, SCATTER_BLOCK_ROWS):
                b = min(hi, a + SCATTER_BLOCK_ROWS)
                block.reset(SCATTER_BLOCK_ROWS * ROW_BYTES + 64)
                parsed = block.take((b - a, native.ROW_WORDS), np.uint32)
                day.rows.unpack((a, b), packed[day.rows.byte_at(a) - first:
                                               day.rows.byte_at(b) - first], parsed)
                native.fill_records(parsed, shift, maps, exact, dest[a - lo:b - lo],
                                    bucket_of[a - lo:b - lo], bucket_starts, widths, records,
                                    next_record)
            day.index[c, 1:] = counts
            writes.append(writer.submit(direct_io.write_at, day.partial, records, at))
            handed.append(writes[-1])
            if c == len(day.chunks) - 1:
                written.append((day, j))
            j += 1
        _settle(handed)
    except BaseException:
        _settle(handed + [day.maps for day in todo if day.maps is not None], drop=True)
        raise
    for day, _ in written:
        day.finish()


def _remove(paths: List[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _settle(handed: List[Future], drop: bool = False) -> None:
    """Wait for reads and writes given to the I/O thread, raising the first failure: a task
    ends with its writes done and no read still filling its memory. With `drop` (the task
    failed), those not started are dropped and the failures of the rest ignored."""
    if drop:
        for fut in handed:
            fut.cancel()
        wait([f for f in handed if not f.cancelled()])
        return
    for fut in handed:
        fut.result()


def _part_path(out: str, day: int, part: str) -> str:
    return os.path.join(out, f"day_{day}_{part}.npy.part")


def _out_dtype(part: str) -> np.dtype:
    return OUT_DTYPES.get(part, np.dtype("<i4"))  # sparse: int32 after the shuffle


def place_bucket(b: int, work: str, out: str, widths: np.ndarray, most_rows: int, day: int,
                 first_row: int, rows: int) -> None:
    """Stage 4: bucket b (rows first_row .. first_row + rows of output day `day`) from every
    day's records (its part of each chunk, `_DayRows`, each column in `widths` bytes:
    `record_widths`) into the day's output files, past
    the page cache (`direct_io`); its marker, with each feature's largest id in the
    bucket, is written last, then its records' pages and blocks are freed (a hole punched)
    for the next buckets' writes."""
    offsets = [HEADER_BYTES + first_row * width * _out_dtype(part).itemsize
               for part, width in PARTS]
    size = native.record_bytes(widths)
    parse_dir = os.path.join(work, "parse")
    segments = []  # (records file, offset, bytes): the bucket's part of each chunk
    files = []  # (records file, its parts: `_record_parts`)
    for d in range(TRAIN_DAYS):
        path = os.path.join(parse_dir, f"day_{d}", "records.npy")
        parts = _record_parts(np.load(os.path.join(parse_dir, f"day_{d}", "index.npy")), size)
        files.append((path, parts))
        starts, ends, owners = parts
        mine = owners == b
        segments += [(path, lo, hi - lo)
                     for lo, hi in zip(starts[mine].tolist(), ends[mine].tolist())]
    scattered_rows = sum(part for _, _, part in segments) // size
    if scattered_rows != rows:
        raise RuntimeError(f"bucket {b}: {scattered_rows} rows scattered to it, expected {rows}")
    # the same need for every bucket (`most_rows`), so the arena never grows in the stage
    ARENA.reset(most_rows * PLACE_OUT_BYTES_PER_ROW + 64 * 8
                + len(PARTS) * (direct_io.PAGE + Arena.ALIGN))
    columns = [ARENA.take((rows, width), _out_dtype(part), phase=at)
               for (part, width), at in zip(PARTS, offsets)]
    filled, top = ARENA.take((rows,), np.uint8), np.full(NUM_SPARSE, -1, np.int64)
    filled[:] = 0
    # the parts are read in batches, each into one of the batch arenas in turn, past the
    # page cache into memory of its offset's phase: the read threads read the next two
    # batches, two parts at a time, while one is placed
    batches, need = _read_batches(segments, size)
    reads: List[Future] = []

    def read_batch(k: int) -> List[Tuple[np.ndarray, Future]]:
        arena = PLACE_BATCH_ARENAS[k % len(PLACE_BATCH_ARENAS)]
        arena.reset(need)
        parts = []
        for path, at, part_bytes in batches[k]:
            part = arena.take((part_bytes,), np.uint8, phase=at)
            parts.append((part, direct_io.parallel_reads().submit(_read_exactly, path,
                                                                    part, at)))
        reads.extend(read for _, read in parts)
        return parts

    # the dense values arrive shifted, in the dense column's memory, and their logarithm
    # replaces them once all are placed, a block at a time (numpy copies its input when
    # it overlaps the output)
    shifted = columns[0].view(np.int32)
    try:
        ahead = [read_batch(k) for k in range(min(len(batches), len(PLACE_BATCH_ARENAS) - 1))]
        for k in range(len(batches)):
            if k + len(ahead) < len(batches):  # the arena placed from before this one
                ahead.append(read_batch(k + len(ahead)))
            for part, read in ahead.pop(0):
                read.result()
                np.maximum(top, native.place_records(part, widths, shifted, *columns[1:],
                                                     filled), out=top)
    except BaseException:
        _settle(reads, drop=True)
        raise
    if not filled.all():
        raise RuntimeError(f"bucket {b}: a row is missing from the work files")
    for lo in range(0, rows, LOG_BLOCK_ROWS):
        dense_log(shifted[lo:lo + LOG_BLOCK_ROWS], columns[0][lo:lo + LOG_BLOCK_ROWS])
    for (part, _), data, at in zip(PARTS, columns, offsets):
        direct_io.write_at(_part_path(out, day, part), data, at)
    write_json(os.path.join(work, "place", f"bucket_{b}.done"),
               {"rows": rows, "largest_ids": top.tolist()}, sync=False)
    placed = _placed_buckets(work)  # listed after this bucket's marker: see `_freed_pages`
    direct_io.thread(PUNCH_THREAD).submit(_punch_out, [
        (path, lo, hi - lo) for path, parts in files
        for lo, hi in _freed_pages(parts, b, placed)])


def _read_batches(segments: List[Tuple[str, int, int]], size: int
                  ) -> Tuple[List[List[Tuple[str, int, int]]], int]:
    """Record parts (file, offset, bytes; records of `size` bytes) cut into batches of
    reads: at most PLACE_BATCH_BYTES (rounded down to whole records, at least one) and
    PLACE_BATCH_PARTS reads each, a part larger than that read in pieces of whole
    records. Returns the batches and the arena bytes one needs, the same for any parts."""
    most = max(1, PLACE_BATCH_BYTES // size) * size
    batches: List[List[Tuple[str, int, int]]] = []
    held = 0  # bytes in the last batch
    for path, at, part_bytes in segments:
        for lo in range(0, part_bytes, most):
            piece = min(most, part_bytes - lo)
            if not batches or held + piece > most or len(batches[-1]) == PLACE_BATCH_PARTS:
                batches.append([])
                held = 0
            batches[-1].append((path, at + lo, piece))
            held += piece
    return batches, most + PLACE_BATCH_PARTS * (direct_io.PAGE + Arena.ALIGN)


def _placed_buckets(work: str) -> Set[int]:
    """The buckets whose place markers are written."""
    names = os.listdir(os.path.join(work, "place"))
    return {int(n[len("bucket_"):-len(".done")]) for n in names
            if n.startswith("bucket_") and n.endswith(".done")}


def _record_parts(index: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A day's records file as its parts, in file order (chunk by chunk, bucket by bucket;
    empty ones left out), from its chunk index (`_DayRows`; records of `size` bytes): each
    part's first byte, its end and its bucket."""
    first, counts = index[:, 0], index[:, 1:]
    # a chunk's records follow the chunks' before it, its buckets' one after another
    starts = HEADER_BYTES + (first[:, None] + np.cumsum(counts, axis=1) - counts) * size
    kept = counts.reshape(-1) > 0
    starts = starts.reshape(-1)[kept]
    ends = starts + counts.reshape(-1)[kept] * size
    owners = np.broadcast_to(np.arange(counts.shape[1]), counts.shape).reshape(-1)[kept]
    return starts, ends, owners


def _freed_pages(parts: Tuple[np.ndarray, np.ndarray, np.ndarray], b: int, placed: Set[int]
                 ) -> List[Tuple[int, int]]:
    """The byte ranges (start, end), whole pages, of a day's records file (its `parts`:
    `_record_parts`) that bucket b, placed, frees: the pages its parts cover, less those
    holding bytes of the header or of a bucket not in `placed`. A page that two buckets share is thus freed by the second to be placed, or
    by both where each lists the other's marker: each lists the markers after writing its
    own, so at least one sees the other's. Freeing only whole pages leaves no page for the
    file system to read and zero in part, and the file few extents: with a page kept at
    each part's ends, unlinking the 23 files took 0.2 s at the run's end."""
    starts, ends, owners = parts
    done = np.isin(owners, list(placed))
    page = direct_io.PAGE

    def free(at: int) -> bool:  # the page from `at`: no header, every part in it placed
        inside = slice(np.searchsorted(ends, at, "right"), np.searchsorted(starts, at + page))
        return at >= HEADER_BYTES and bool(done[inside].all())

    out: List[Tuple[int, int]] = []
    for lo, hi in zip(starts[owners == b].tolist(), ends[owners == b].tolist()):
        lo_page, hi_page = lo // page * page, -(-hi // page) * page
        lo = lo_page if free(lo_page) else lo_page + page
        hi = hi_page if free(hi_page - page) else hi_page - page
        if lo < hi:
            out.append((lo, hi))
    return out


def _punch_out(segments: List[Tuple[str, int, int]]) -> None:
    """Free the disk blocks of records placed for good (file, offset, bytes). Only
    frees space early (the work files go at the end in any case), so a file already gone
    is passed over. A file's parts are consecutive in `segments` (gathered day by day)."""
    for path, parts in itertools.groupby(segments, key=lambda segment: segment[0]):
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            continue
        try:
            for _, at, size in parts:
                native.punch_hole(fd, at, size)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- driver


KILL_AFTER = "DLRM_PREPARE_KILL_AFTER"


def _kill_hook(stage: str, done: int, at_least: bool = False) -> None:
    """For the tests: kill the run (its whole process group) once `done` tasks of `stage`
    are done, as DLRM_PREPARE_KILL_AFTER=stage:count asks (with `at_least`, once they are
    that many or more: the scatter's days, each run of them one task)."""
    spec = os.environ.get(KILL_AFTER, "")
    if spec.partition(":")[0] == stage and (
            int(spec.partition(":")[2]) <= done if at_least else spec == f"{stage}:{done}"):
        os.killpg(os.getpgrp(), signal.SIGKILL)


_CLAIMS = None  # the count `claim` takes from: a multiprocessing Value the pool's workers share


def claim() -> int:
    """The next number of the stage's count, from 0: no other task of the stage, in any
    worker of the pool, gets the same (`_Pool.run` sets the count back as a stage starts)."""
    with _CLAIMS.get_lock():
        number = _CLAIMS.value
        _CLAIMS.value = number + 1
    return number


def _worker_start(owner_pid: int, claims) -> None:
    global _CLAIMS
    exit_with_parent(owner_pid)
    _CLAIMS = claims


def _stage_task(stage: str, share: int, fn: Callable, *args):
    """`fn(*args)`, a task of `stage`, in a process whose tasks hold `share` bytes."""
    MEMORY.begin(stage, share)
    return fn(*args)


class _Pool:
    """Tasks in forked worker processes (or inline with one worker), results as they end;
    the first error cancels the rest and is raised. The workers serve every stage of the
    run: each keeps its memory (`StageMemory`, `share` bytes) from one stage to the next."""

    def __init__(self, workers: int, share: int):
        import multiprocessing as mp

        self.workers, self.share = workers, share
        self.ex = None
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.claims = ctx.Value("q", 0)
        if workers > 1:
            self.ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_start,
                                          initargs=(os.getpid(), self.claims))

    def run(self, stage: str, tasks: Iterable[Tuple[str, Callable, tuple]]) -> Dict[str, object]:
        results: Dict[str, object] = {}
        tasks = list(tasks)
        self.claims.value = 0  # no task is running: the stage's count starts afresh
        if self.ex is None:
            global _CLAIMS
            _CLAIMS = self.claims  # the tasks run here
            for key, fn, args in tasks:
                results[key] = _stage_task(stage, self.share, fn, *args)
                _kill_hook(stage, len(results))
            return results
        futures: Dict[Future, str] = {
            self.ex.submit(_stage_task, stage, self.share, fn, *args): key
            for key, fn, args in tasks}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    results[futures[fut]] = fut.result()
                    _kill_hook(stage, len(results))
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        return results

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True, cancel_futures=True)
        MEMORY.end()  # this process's, where it ran the tasks itself


def bucket_plan(rows_per_day: List[int], bucket_rows: int, processes: int = 1
                ) -> Tuple[np.ndarray, List[Tuple[int, int, int]]]:
    """Global first rows of the buckets, and per bucket (output day, first row in it, rows).
    A day has as many buckets of equal rows (within one) as keep them at most `bucket_rows`,
    and then more, one at a time to the day whose buckets are largest, until the buckets'
    count is a multiple of `processes`: the place stage's last round of tasks then keeps
    every process busy, instead of one placing the last bucket while the others wait."""
    per_day = [max(1, -(-rows // bucket_rows)) for rows in rows_per_day]
    while sum(per_day) % processes:
        largest = max(range(len(per_day)), key=lambda d: rows_per_day[d] / per_day[d])
        per_day[largest] += 1
    starts, buckets, base = [], [], 0
    for (day, rows), k in zip(enumerate(rows_per_day), per_day):
        cuts = [rows * i // k for i in range(k + 1)]
        for lo, hi in zip(cuts, cuts[1:]):
            starts.append(base + lo)
            buckets.append((day, lo, hi - lo))
        base += rows
    return np.array(starts, dtype=np.int64), buckets


def _stage_error(stage: str, missing: str, before: str) -> PrepareError:
    return PrepareError(f"--stage {stage}: {missing}; run --stage {before} first (all its "
                        "tasks), or --stage all")


class _Run:
    """One process's part of a run: the stages it is asked for, its share of each stage's
    tasks (task i of a stage belongs to rank i mod world_size) and the shared layout."""

    def __init__(self, s: Settings):
        self.s, self.log = s, s.log
        self.work, self.out = s.work, s.output
        self.parse_dir = os.path.join(self.work, "parse")
        self.budget = int(s.memory_gb * (1 << 30)) // s.workers
        self.chunk_rows = max(MIN_CHUNK_ROWS,
                              min(1 << 20, self.budget // (4 * PLACE_BYTES_PER_ROW)))
        # the scatter holds two chunks at once (one read while the other is worked on)
        self.scatter_rows = max(MIN_CHUNK_ROWS, self.chunk_rows // 2)
        self.chunk_bytes = min(MAX_CHUNK_BYTES, max(CHUNK_BYTES, self.budget // 16 >> 20 << 20))
        self.t0 = time.time()
        self.pool: Optional[_Pool] = None

    def share(self, stage: str, tasks: List[Tuple[str, Callable, tuple, Callable[[], bool]]]) -> None:
        """Run this rank's share of `tasks` (key, function, arguments, done?), skipping those
        done. The share is cut from the whole list, so every rank agrees on it however far
        the others have got."""
        mine = tasks[self.s.rank::self.s.world_size]
        record_boot(self.s)
        if self.pool is None:  # started by the first stage, for all of them (`close`)
            self.pool = _Pool(self.s.workers, self.budget)
        self.pool.run(stage, [(k, fn, args) for k, fn, args, done in mine if not done()])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def say(self, msg: str) -> None:
        if self.s.rank == 0:
            self.log(f"{msg} ({time.time() - self.t0:.2f} s)")

    # -- what earlier stages left
    def stats(self, stage: str) -> List[dict]:
        out = []
        for d in range(DAYS):
            path = os.path.join(self.parse_dir, f"day_{d}", "stats.json")
            if not os.path.exists(path):
                raise _stage_error(stage, f"day {d} is not parsed", "parse")
            with open(path) as f:
                out.append(json.load(f))
        return out

    def rows(self, stage: str) -> List[int]:
        return [st["rows"] for st in self.stats(stage)]

    def buckets(self, stage: str):
        rows = self.rows(stage)
        with open(os.path.join(self.work, "buckets.json")) as f:
            plan = json.load(f)
        return bucket_plan(rows[:TRAIN_DAYS], plan["bucket_rows"], plan["processes"])

    # -- the stages
    def parse(self) -> None:
        s = self.s
        if s.rank == 0:
            check_disk(s)
            for sub in ("parse", "vocab", "place"):
                os.makedirs(os.path.join(self.work, sub), exist_ok=True)
            write_json(os.path.join(self.work, "settings.json"), s.identity())
            # the bucket plan of the first run is kept, so resumed scatters agree
            plan_path = os.path.join(self.work, "buckets.json")
            if not os.path.exists(plan_path):
                write_json(plan_path, {"bucket_rows": max(1, self.budget // PLACE_BYTES_PER_ROW),
                                       "processes": s.world_size * s.workers})
        else:
            os.makedirs(self.parse_dir, exist_ok=True)
        stats_path = lambda d: os.path.join(self.parse_dir, f"day_{d}", "stats.json")  # noqa: E731
        tasks = [(str(d), parse_day, (d, s.inputs[d], os.path.join(self.parse_dir, f"day_{d}"),
                                      s.drop_malformed, self.chunk_bytes),
                  lambda d=d: os.path.exists(stats_path(d))) for d in range(DAYS)]
        if s.multi_hot:
            # the lookup tables need nothing but the options: drawn beside the parsing
            tables = os.path.join(self.work, "multi_hot", "tables")
            tasks.insert(0, ("tables", mh.draw_tables,
                             (tables, s.multi_hot_sizes, s.multi_hot_table_sizes,
                              s.multi_hot_distribution, self.budget),
                             lambda: mh.tables_done(tables)))
        self.share("parse", tasks)
        if s.world_size == 1:
            stats = self.stats("parse")
            rows, packed = sum(st["rows"] for st in stats), sum(st["row_bytes"] for st in stats)
            self.say(f"parse: {rows:,} rows in {DAYS} days, {packed / rows:.1f} bytes a row")

    def eval_written(self) -> bool:
        return all(os.path.exists(os.path.join(self.out, f"day_{TRAIN_DAYS}_{p}.npy"))
                   for p, _ in PARTS)

    def all_scattered(self) -> bool:
        """Every day scattered (day 23 written): the maps and the destinations, which the
        place stage removes as it starts, are not needed again."""
        return all(scattered(self.parse_dir, d) for d in range(TRAIN_DAYS)) and self.eval_written()

    def vocab(self) -> None:
        rows = self.rows("vocab")
        vocab_dir = os.path.join(self.work, "vocab")
        destinations = os.path.join(self.work, "destinations")
        if self.all_scattered():  # a resumed run: what this stage made is used and gone
            self.say("vocab and permutation")
            return
        tasks = [("permute", permute, (rows[:TRAIN_DAYS], self.s.seed, destinations,
                                       self.budget), lambda: os.path.isdir(destinations))]
        tasks += [(f"vocab {f}", build_vocab, (f, self.parse_dir, vocab_dir),
                   lambda f=f: os.path.exists(os.path.join(vocab_dir, f"map_{f}.npy")))
                  for f in range(NUM_SPARSE)]
        self.share("vocab", tasks)
        self.say("vocab and permutation")

    def scatter(self) -> None:
        vocab_dir = os.path.join(self.work, "vocab")
        made = os.path.isdir(os.path.join(self.work, "destinations")) and all(
            os.path.exists(os.path.join(vocab_dir, f"map_{f}.npy")) for f in range(NUM_SPARSE))
        if not made and not self.all_scattered():
            raise _stage_error("scatter", "the vocabularies or the permutation are missing",
                               "vocab")
        rows = self.rows("scatter")
        starts, buckets = self.buckets("scatter")
        out, work = self.out, self.work
        tasks = [("eval", write_eval_day, (work, out, self.scatter_rows), self.eval_written)]
        # a task per worker of each rank, streaming through the chunks of the days it
        # claims from its rank's (task i is rank i mod world_size's; the eval task first,
        # so rank 0, which runs it, has a day fewer where the days do not divide evenly)
        ranks = self.s.world_size
        rank_days = [[d for d in range(TRAIN_DAYS) if (d + 1) % ranks == r]
                     for r in range(ranks)]
        for k in range(1, 1 + ranks * self.s.workers):
            days = rank_days[k % ranks]
            todo = [d for d in days if not scattered(self.parse_dir, d)]
            most_rows = min(self.scatter_rows, max((rows[d] for d in todo), default=0))
            tasks.append((f"days {k}", scatter_days,
                          (todo, work, starts, self.s.exact_ids, self.scatter_rows, most_rows),
                          lambda days=days: all(scattered(self.parse_dir, d) for d in days)))
        if self.s.rank == 0:
            # the place stage writes into these at offsets; made here, before it starts on
            # any rank, because making them there could replace a file another rank fills
            self.allocate(rows)
        self.share("scatter", tasks)
        self.say(f"scatter: {len(buckets)} buckets, "
                 f"{native.record_bytes(record_widths(self.work))} bytes a record")

    def allocate(self, rows: List[int]) -> None:
        for day in range(TRAIN_DAYS):
            if os.path.exists(os.path.join(self.out, f"day_{day}_labels.npy")):
                continue
            for part, width in PARTS:
                if os.path.exists(os.path.join(self.out, f"day_{day}_{part}.npy")):
                    continue  # published by a run killed while it renamed the day's parts
                path, dtype = _part_path(self.out, day, part), _out_dtype(part)
                header = npy_header(dtype, (rows[day], width))
                size = len(header) + rows[day] * width * dtype.itemsize
                if not (os.path.exists(path) and os.path.getsize(path) == size):
                    with open(path + ".tmp", "wb") as fh:
                        fh.write(header)
                        fh.truncate(size)
                    os.replace(path + ".tmp", path)

    def place(self) -> None:
        work, out = self.work, self.out
        missing = [d for d in range(TRAIN_DAYS)
                   if not scattered(self.parse_dir, d)]
        if missing:
            raise _stage_error("place", f"day {missing[0]} is not scattered", "scatter")
        _, buckets = self.buckets("place")
        for day in range(TRAIN_DAYS):
            if not os.path.exists(os.path.join(out, f"day_{day}_labels.npy")) and not \
                    os.path.exists(_part_path(out, day, "labels")):
                raise _stage_error("place", f"the output files of day {day} are not made",
                                   "scatter")

        def done(b: int) -> bool:
            return (os.path.exists(os.path.join(work, "place", f"bucket_{b}.done"))
                    or os.path.exists(os.path.join(out, f"day_{buckets[b][0]}_labels.npy")))

        # what only the scatter read is removed while the buckets are placed: the workers
        # wait on the disk, and this process on them (removing it at the end took 0.2 s)
        widths = record_widths(work)  # read once here, not by every bucket
        cleaner = None
        if self.s.rank == 0 and not self.s.keep_work:
            cleaner = threading.Thread(target=self.remove_scatter_inputs, name="remove")
            cleaner.start()
        try:
            most_rows = max(rows for _, _, rows in buckets)
            # the largest first, so the stage ends on the smallest (`bucket_plan`)
            order = sorted(range(len(buckets)), key=lambda b: -buckets[b][2])
            self.share("place", [(str(b), place_bucket, (b, work, out, widths, most_rows)
                                  + buckets[b],
                                  lambda b=b: done(b)) for b in order])
        finally:
            if cleaner is not None:
                cleaner.join()
        self.say("place")

    def remove_scatter_inputs(self) -> None:
        """The vocabulary maps (not their counts: the place reads those), the destinations
        and the days' first occurrences."""
        paths = [os.path.join(self.work, "vocab", f"map_{f}.npy") for f in range(NUM_SPARSE)]
        paths += [os.path.join(self.parse_dir, f"day_{d}", "first.npy") for d in range(DAYS)]
        _remove(paths)
        shutil.rmtree(os.path.join(self.work, "destinations"), ignore_errors=True)

    def publish(self, stage: str) -> None:
        """Rename the placed days into place, each once all its buckets are placed. Any rank
        may do it, several at once: a part another rank has just renamed is skipped; labels
        go last, as their presence marks the day published."""
        _, buckets = self.buckets(stage)
        placed = os.path.join(self.work, "place")
        for day in range(TRAIN_DAYS):
            if os.path.exists(os.path.join(self.out, f"day_{day}_labels.npy")):
                continue
            if any(d == day and not os.path.exists(os.path.join(placed, f"bucket_{b}.done"))
                   for b, (d, _, _) in enumerate(buckets)):
                raise _stage_error(stage, f"day {day} is not placed", "place")
            for part in ("dense", "sparse", "labels"):
                try:
                    os.replace(_part_path(self.out, day, part),
                               os.path.join(self.out, f"day_{day}_{part}.npy"))
                except FileNotFoundError:
                    pass
        if not os.path.exists(os.path.join(self.out, f"day_{TRAIN_DAYS}_labels.npy")):
            raise _stage_error(stage, f"day {TRAIN_DAYS} is not written", "scatter")

    def multi_hot(self) -> None:
        s = self.s
        if not s.multi_hot:
            return
        tables = os.path.join(self.work, "multi_hot", "tables")
        self.publish("multi_hot")
        if not mh.tables_done(tables):
            raise _stage_error("multi_hot", "the multi-hot lookup tables are not drawn", "parse")
        npz = lambda d: os.path.join(self.out, f"day_{d}_sparse_multi_hot.npz")  # noqa: E731
        self.share("multi_hot", [
            (str(d), mh.write_day, (os.path.join(self.out, f"day_{d}_sparse.npy"), npz(d),
                                    tables, os.path.join(self.work, "multi_hot", f"day_{d}"),
                                    s.multi_hot_sizes, s.multi_hot_table_sizes, self.budget),
             lambda d=d: os.path.exists(npz(d))) for d in range(DAYS)])
        self.say("multi-hot bags")

    def table_sizes(self) -> Optional[List[np.ndarray]]:
        """Per output day, each feature's largest id + 1, as noted where the day was
        written: by its buckets (`place_bucket`) and day 23's writer (`write_eval_day`),
        or, for multi-hot bags, by `mlperf_multi_hot.write_day`; None where a note is
        missing."""
        if self.s.multi_hot:
            notes = [(d, mh.largest_ids_path(os.path.join(self.work, "multi_hot", f"day_{d}")))
                     for d in range(DAYS)]
        else:
            _, buckets = self.buckets("meta")
            place = os.path.join(self.work, "place")
            notes = [(day, os.path.join(place, f"bucket_{b}.done"))
                     for b, (day, _, _) in enumerate(buckets)]
            notes.append((TRAIN_DAYS, os.path.join(place, "eval.json")))
        largest = np.full((DAYS, NUM_SPARSE), -1, np.int64)
        for day, path in notes:
            try:
                with open(path) as f:
                    np.maximum(largest[day], json.load(f)["largest_ids"], out=largest[day])
            except (OSError, ValueError, KeyError):
                return None
        return list(np.maximum(largest, 0) + 1)

    def meta(self) -> Report:
        s, out = self.s, self.out
        self.publish("meta")
        if s.multi_hot:
            missing = [d for d in range(DAYS)
                       if not os.path.exists(os.path.join(out, f"day_{d}_sparse_multi_hot.npz"))]
            if missing:
                raise _stage_error("meta", f"the multi-hot bags of day {missing[0]} are not "
                                   "written", "multi_hot")
        stats = self.stats("meta")
        sync_outputs(out)
        # the table sizes as the files' writers found them: the files are not read again
        sizes = self.table_sizes()
        try:
            adopt(out, out, "terabyte", DAYS, None, ("val", "test"), None, s.workers,
                  log=self.log, table_sizes=sizes)
        except AdoptError as e:
            raise RuntimeError(f"the prepared files fail their check: {e}") from None
        report = Report()
        for d, st in enumerate(stats):
            bad = ct.BadRows(st["bad_counts"], {k: [tuple(x) for x in v]
                                                for k, v in st["bad_examples"].items()})
            report.bad[s.inputs[d]] = bad
            report.lines += st["lines"]
            report.rows += st["rows"]
        if not s.keep_work:
            shutil.rmtree(self.work)
        return report


def run(s: Settings, barrier: Callable[[], None] = lambda: None) -> Optional[Report]:
    """Prepare according to `s`: every stage (s.stage "all") or one, this rank's share of
    each; `barrier` returns once every rank has reached it (between stages). Returns the
    report where meta.json was written (rank 0 of "all" or "meta"), else None. Raises
    PrepareError for user mistakes."""
    check_inputs(s)
    try:
        native.lib()  # built (once per machine) and loaded before the workers fork
    except native.NativeBuildError as e:
        raise PrepareError(str(e)) from None
    check_restart(s)
    r = _Run(s)
    stages = STAGES[:-1] if s.stage == "all" else [s.stage] if s.stage != "meta" else []
    try:
        for i, stage in enumerate(stages):
            if i:
                barrier()
            getattr(r, stage)()
    finally:
        r.close()
    if s.stage == "all":
        barrier()  # every rank's last tasks are done before rank 0 checks the files
    if s.stage == "meta" or (s.stage == "all" and s.rank == 0):
        return r.meta()
    return None
