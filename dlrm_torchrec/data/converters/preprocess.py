"""Raw Criteo text -> the binary layout that `dlrm_torchrec.data.criteo.CriteoSource` reads.

    python -m dlrm_torchrec.data.preprocess --dataset kaggle train.txt -o data/kaggle \\
        --max-ind-range 10000000
    python -m dlrm_torchrec.data.preprocess --dataset terabyte day_{0..23}.gz -o data/tb \\
        --frequency-threshold 3 --sub-sample-rate 0.875

Inputs are read as downloaded, plain or gzip (recognised by content, not by name), streamed
in chunks; worker processes parse chunks (vectorised numpy, `criteo_text.parse_chunk`) while
the main process reads ahead and writes results in input order. Memory is bounded by
(2 x workers + 2) chunks in flight, independent of the input size (vocab mode also holds the
id counts, which grow with the number of distinct ids).

Days: Terabyte inputs are days in the order given (numbered names day_N sorted by N; a gap
in the numbers is refused unless --allow-missing-days, since the days are numbered 0, 1, ...
in the output); the last one is the evaluation day, the others train. Kaggle's single file is cut into 7
consecutive days of equal line count (the first `lines % 7` days one line longer); days 0-5
train, day 6 evaluates. The loader halves the evaluation day: the first ceil(n / 2) rows are
"test", the rest "val" (as the DLRM reference).

Binary layout of the output folder (format_version 1):

    meta.json             settings, number of days, evaluation day, rows per day,
                          table_sizes (an upper bound of each feature's ids + 1),
                          sparse_dtype; "complete": true once every day is written
    day_{d}_dense.npy     float32 (n_d, 13): log(max(x, 0) + 1), missing values 0
    day_{d}_sparse.npy    (n_d, 26) categorical ids, int32 (int64 for raw 32-bit ids)
    day_{d}_labels.npy    int32 (n_d, 1), 0 or 1
    day_{d}.json          the day's counts (lines, rows kept, rejected, sub-sampled);
                          written last, so its presence marks the day done
    vocab/cat_{i}.npy     vocab mode: uint32 sorted raw values that got an id (id = index)
    vocab/cat_{i}_counts.npy  their occurrence counts; vocab/meta.json: the threshold

The .npy files are standard NumPy format (a 128-byte header, row-major data), the same
shapes and names as TorchRec's `BinaryCriteoUtils` / `InMemoryBinaryCriteoIterDataPipe`
expect (`day_{d}_{dense,sparse,labels}.npy`); note that TorchRec puts validation before
test in the last day and log-transforms dense values differently.

Categorical ids: hash mode (--max-ind-range N > 0) stores value mod N; N = 0 stores the raw
32-bit value (int64). Vocab mode (--frequency-threshold T) numbers each feature's values
seen at least T times (counted over every day, after training-day sub-sampling, as the
reference counts over all days) 0..K-1 in increasing raw order; with T > 1 all rarer values
share id K (table size K + 1), with T <= 1 every value is kept (table size K).

Malformed rows (wrong column count, empty, label not 0/1, non-integer dense value, non-hex
or over-long categorical value, a last line cut short, a truncated or corrupt gzip stream)
are dropped, counted and reported with their first line numbers; CRLF rows and a UTF-8
byte-order mark are repaired and kept (but reported), and so is a complete last row that
lacks its newline. --strict stops at the first with file:line.

Resuming: output of a day goes to *.tmp names and is renamed only when complete; a rerun
skips the days already done. meta.json records the settings and each input's fingerprint
(`file_checks.fingerprint`: size, modification time, a hash of sampled blocks), and a rerun
onto an output started from other settings or another input content is refused, so days
of two different inputs are never mixed. A full disk stops the run with the finished days
kept and the partial files removed.
"""

import errno
import io
import json
import os
import re
import resource
import sys
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from dlrm_torchrec.data import criteo_text as ct
from dlrm_torchrec.data.converters.direct_io import DirectWriter
from dlrm_torchrec.data.file_checks import (
    fingerprint,
    fingerprint_change,
    input_problem,
    output_folder_problem,
)
from dlrm_torchrec.data.hashing import hash_keys, uniform01
from dlrm_torchrec.data.worker_exit import exit_with_parent

FORMAT_VERSION = 1
KAGGLE_DAYS = 7
HEADER_BYTES = 128
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or the user's quota reached


class PreprocessError(Exception):
    """A user-facing problem (bad arguments, missing or malformed input): printed as
    `error: ...` with exit status 2, no traceback."""


# --------------------------------------------------------------------------- npy files


def npy_header(dtype: np.dtype, shape: Tuple[int, ...]) -> bytes:
    """A NumPy format 1.0 header of exactly HEADER_BYTES bytes."""
    d = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (
        np.dtype(dtype).str, tuple(shape))
    pad = HEADER_BYTES - 10 - len(d) - 1
    if pad < 0:
        raise ValueError("shape too large for the header")
    d = d + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + len(d).to_bytes(2, "little") + d.encode("latin1")


class NpyWriter:
    """Append rows to `path`.tmp; `finish` writes the real header and renames (after an
    fsync unless `sync` is False: a work file that a crash of the machine may lose). With
    `direct`, the rows bypass the page cache (`direct_io.DirectWriter`): for a large file
    that is read back once at most."""

    def __init__(self, path: str, dtype, width: int, sync: bool = True, direct: bool = False):
        self.path, self.dtype, self.width, self.sync = path, np.dtype(dtype), width, sync
        self.rows = 0
        self.f = DirectWriter(path + ".tmp") if direct else open(path + ".tmp", "wb")
        self.f.write(npy_header(self.dtype, (0, width)))

    def write(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype).reshape(-1, self.width)
        self.f.write(memoryview(arr).cast("B"))
        self.rows += len(arr)

    def finish(self) -> None:
        header = npy_header(self.dtype, (self.rows, self.width))
        if isinstance(self.f, io.IOBase):
            self.f.seek(0)
            self.f.write(header)
            self.f.flush()
            if self.sync:
                os.fsync(self.f.fileno())
            self.f.close()
        else:
            self.f.close()
            with open(self.path + ".tmp", "r+b") as f:
                f.write(header)
                f.flush()
                if self.sync:
                    os.fsync(f.fileno())
        os.replace(self.path + ".tmp", self.path)

    def abort(self) -> None:
        if isinstance(self.f, io.IOBase):
            if not self.f.closed:
                try:
                    self.f.close()
                except OSError:  # flushing the buffer fails again on a full disk
                    pass
        else:
            self.f.abort()
        if os.path.exists(self.path + ".tmp"):
            os.remove(self.path + ".tmp")


def write_json(path: str, obj, sync: bool = True) -> None:
    """Write `obj` to `path` atomically (a temporary name, then a rename; synced to disk
    first unless `sync` is False); nothing is left under the temporary name when writing
    fails."""
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
            f.flush()
            if sync:
                os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise
    os.replace(path + ".tmp", path)


def day_files(out: str, day: int) -> Dict[str, str]:
    return {part: os.path.join(out, f"day_{day}_{part}.npy") for part in
            ("dense", "sparse", "labels")}


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    inputs: List[str]
    output: str
    dataset: str
    max_ind_range: int = 0
    frequency_threshold: Optional[int] = None
    sub_sample_rate: float = 0.0
    seed: int = 0
    strict: bool = False
    workers: int = 1
    chunk_bytes: int = 8 << 20
    progress: bool = True
    allow_missing_days: bool = False

    @property
    def mode(self) -> str:
        return "vocab" if self.frequency_threshold is not None else "hash"

    def identity(self) -> dict:
        """What the output depends on: a rerun must match it to resume."""
        return {
            "dataset": self.dataset, "mode": self.mode, "max_ind_range": self.max_ind_range,
            "frequency_threshold": self.frequency_threshold,
            "sub_sample_rate": self.sub_sample_rate, "seed": self.seed,
            "inputs": [os.path.basename(p) for p in self.inputs],
        }

    @property
    def sparse_dtype(self) -> np.dtype:
        if self.mode == "hash" and (self.max_ind_range == 0 or self.max_ind_range > 2 ** 31):
            return np.dtype(np.int64)
        return np.dtype(np.int32)


@dataclass
class DayPlan:
    day: int
    input_index: int
    first_line: int  # 1-based, in its input file
    stop_line: Optional[int]  # exclusive; None: to the end of the file
    train: bool


def _day_number(path: str) -> Optional[int]:
    m = re.fullmatch(r"day_(\d+)(\.gz|\.txt)?", os.path.basename(path))
    return int(m.group(1)) if m else None


def order_days(s: Settings) -> None:
    """Terabyte: sort inputs named day_N by N. Two files of one day, or a gap in the numbers
    (the days are renumbered 0, 1, ... in the output, so a missing day would shift the
    rest silently), are refused; with --allow-missing-days a gap is a warning."""
    nums = [_day_number(p) for p in s.inputs]
    if s.dataset != "terabyte" or any(n is None for n in nums):
        return
    by_day: Dict[int, List[str]] = {}
    for n, p in zip(nums, s.inputs):
        by_day.setdefault(n, []).append(p)
    twice = [ps for ps in by_day.values() if len(ps) > 1]
    if twice:
        raise PreprocessError(f"{' and '.join(twice[0])} are the same day; give each day once")
    s.inputs = [p for _, p in sorted(zip(nums, s.inputs))]
    missing = sorted(set(range(min(nums), max(nums) + 1)) - set(nums))
    if not missing:
        return
    names = ", ".join(f"day_{d}" for d in missing)
    what = (f"{names} missing between day_{min(nums)} and day_{max(nums)}; the "
            f"{len(nums)} days given become days 0 .. {len(nums) - 1} of the output")
    if not s.allow_missing_days:
        raise PreprocessError(f"--dataset terabyte: {what}; give every day, or "
                              "--allow-missing-days to go on without them")
    print(f"warning: {what} (--allow-missing-days)", file=sys.stderr)


def check_inputs(s: Settings) -> List[dict]:
    """Every check that needs no reading of the data, so mistakes stop before any work;
    returns the inputs' fingerprints (in the order they are processed)."""
    missing = [p for p in s.inputs if input_problem(p) == "not found"]
    if missing:
        raise PreprocessError("input file(s) not found: " + ", ".join(missing))
    for p in s.inputs:
        problem = input_problem(p)
        if problem:
            raise PreprocessError(f"input {p}: {problem}")
    empty = [p for p in s.inputs if os.path.getsize(p) == 0]
    if empty:
        raise PreprocessError("input file(s) empty: " + ", ".join(empty))
    if s.dataset == "kaggle" and len(s.inputs) != 1:
        raise PreprocessError(f"--dataset kaggle takes one file (train.txt), got {len(s.inputs)}")
    if s.dataset == "terabyte" and len(s.inputs) < 2:
        raise PreprocessError("--dataset terabyte needs at least two day files (training days, "
                              "then the evaluation day last)")
    order_days(s)
    if not 0.0 <= s.sub_sample_rate < 1.0:
        raise PreprocessError(f"--sub-sample-rate {s.sub_sample_rate}: must be in [0, 1)")
    if s.max_ind_range < 0:
        raise PreprocessError(f"--max-ind-range {s.max_ind_range}: must be >= 0")
    if s.frequency_threshold is not None:
        if s.frequency_threshold < 0:
            raise PreprocessError(f"--frequency-threshold {s.frequency_threshold}: must be >= 0")
        if s.max_ind_range:
            raise PreprocessError("choose one mode: --max-ind-range (hash) or "
                                  "--frequency-threshold (vocab), not both")
    if s.chunk_bytes < 1 << 16:
        raise PreprocessError("--chunk-mb: must be at least 0.0625 (64 KB)")
    problem = output_folder_problem(s.output)
    if problem:
        raise PreprocessError(f"-o {s.output}: {problem}")
    fingerprints = [fingerprint(p) for p in s.inputs]
    meta_path = os.path.join(s.output, "meta.json")
    if os.path.exists(meta_path):
        check_resume(s, meta_path, fingerprints)
    return fingerprints


def check_resume(s: Settings, meta_path: str, fingerprints: List[dict]) -> None:
    """An existing output is resumed only with the same settings and the same inputs: its
    finished days would otherwise mix with days of other data."""
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        old = meta.get("settings")
    except (OSError, ValueError, AttributeError) as e:
        raise PreprocessError(f"{meta_path}: unreadable ({e}); remove it or choose another "
                              "output folder") from None
    start_over = f"to start over, delete {s.output} or choose another output folder"
    if old != s.identity():
        diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in s.identity().items()
                if not isinstance(old, dict) or old.get(k) != v]
        raise PreprocessError(f"{s.output} holds data preprocessed with other settings ("
                              + "; ".join(diff) + "); choose another output folder or "
                              "delete it")
    recorded = meta.get("input_files")
    if not isinstance(recorded, list) or len(recorded) != len(fingerprints):
        raise PreprocessError(f"{meta_path} records no fingerprints of its input files (an "
                              "earlier version wrote it), so a rerun cannot tell whether they "
                              f"changed; {start_over}")
    for path, was, now in zip(s.inputs, recorded, fingerprints):
        change = fingerprint_change(was if isinstance(was, dict) else {}, now)
        if change:
            raise PreprocessError(f"{path} is not the file {s.output} was started from: "
                                  f"{change}; the days already written there came from the "
                                  f"old file, so they are not resumed; {start_over}")


def count_lines(path: str) -> int:
    """Lines of a file, a last line without newline included."""
    n, last = 0, b"\n"
    try:
        for block in ct._raw_blocks(path, 16 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    except ct.StreamError:
        pass  # reported when the file is processed
    return n + (last != b"\n")


def kaggle_day_sizes(total: int) -> List[int]:
    """Kaggle's rows cut into KAGGLE_DAYS consecutive days of equal size (the first
    `total % KAGGLE_DAYS` one longer), as the reference cuts train.txt."""
    per, extra = divmod(total, KAGGLE_DAYS)
    return [per + (d < extra) for d in range(KAGGLE_DAYS)]


def plan_days(s: Settings) -> List[DayPlan]:
    if s.dataset == "terabyte":
        n = len(s.inputs)
        return [DayPlan(d, d, 1, None, d < n - 1) for d in range(n)]
    total = count_lines(s.inputs[0])
    s._kaggle_lines = total  # the progress bar's total
    plans, line = [], 1
    for d, size in enumerate(kaggle_day_sizes(total)):
        plans.append(DayPlan(d, 0, line, line + size, d < KAGGLE_DAYS - 1))
        line += size
    plans[-1].stop_line = None
    return plans


def day_done(out: str, day: int) -> bool:
    return os.path.exists(os.path.join(out, f"day_{day}.json"))


# --------------------------------------------------------------------------- workers

_W: dict = {}


def _init_worker(s: Settings, vocab: Optional[List[np.ndarray]],
                 parent_pid: Optional[int] = None) -> None:
    if parent_pid is not None:
        exit_with_parent(parent_pid)
    _W["s"] = s
    _W["vocab"] = vocab


@dataclass
class ChunkResult:
    day: int
    num_lines: int
    bad: ct.BadRows
    bad_in_head: int
    head_lines: int
    sub_sampled: int
    labels: Optional[np.ndarray] = None
    dense: Optional[np.ndarray] = None
    sparse: Optional[np.ndarray] = None
    counts: Optional[List[Tuple[np.ndarray, np.ndarray]]] = None
    maxrss_kb: int = 0


def map_ids(raw: np.ndarray, s: Settings, vocab: Optional[List[np.ndarray]]) -> np.ndarray:
    """(n, 26) uint32 raw values -> stored ids."""
    if s.mode == "hash":
        if s.max_ind_range == 0:
            return raw.astype(np.int64)
        if s.max_ind_range >= 2 ** 32:
            return raw.astype(np.int64)
        return (raw % np.uint32(s.max_ind_range)).astype(s.sparse_dtype)
    out = np.empty(raw.shape, dtype=np.int32)
    for f, keys in enumerate(vocab):
        col = raw[:, f]
        pos = np.searchsorted(keys, col)
        found = pos < len(keys)
        found[found] = keys[pos[found]] == col[found]
        out[:, f] = np.where(found, pos, len(keys))
    return out


def sub_sample_keep(labels: np.ndarray, lines: np.ndarray, day: int, s: Settings) -> np.ndarray:
    """Negative down-sampling: a label-0 row is dropped when u < rate, u a uniform hash of
    (seed, day, line number), so the choice depends on neither workers nor chunking."""
    u = uniform01(hash_keys(s.seed, day, lines))
    return (labels != 0) | (u >= s.sub_sample_rate)


def _work(task: Tuple[str, int, bool, int, bytes]) -> ChunkResult:
    kind, day, train, first_line, data = task
    s: Settings = _W["s"]
    p = ct.parse_chunk(data, first_line)
    labels, dense, raw = p.labels, p.dense, p.sparse
    dropped = 0
    if train and s.sub_sample_rate > 0 and len(labels):
        keep = sub_sample_keep(labels, p.lines, day, s)
        dropped = int(len(keep) - keep.sum())
        labels, dense, raw = labels[keep], dense[keep], raw[keep]
    r = ChunkResult(day, p.num_lines, p.bad, p.bad_in_head, p.head_lines, dropped)
    if kind == "count":
        r.counts = [np.unique(raw[:, f], return_counts=True) for f in range(ct.NUM_SPARSE)]
    else:
        r.labels, r.dense, r.sparse = labels, dense, map_ids(raw, s, _W["vocab"])
    r.maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r


class _InlineExecutor(Executor):
    """--workers 0: run tasks in this process (debugging, tests)."""

    def submit(self, fn, *args, **kwargs):
        fut: Future = Future()
        fut.set_result(fn(*args, **kwargs))
        return fut


# --------------------------------------------------------------------------- main loop


@dataclass
class Report:
    bad: Dict[str, ct.BadRows] = field(default_factory=dict)  # per input file
    lines: int = 0
    rows: int = 0
    sub_sampled: int = 0
    input_bytes: int = 0
    worker_maxrss_kb: int = 0


def _tasks(s: Settings, plans: List[DayPlan], skip_done: bool, kind: str) -> Iterator[tuple]:
    """Markers and chunk tasks in input order: ("start", plan), ("chunk", plan, task),
    ("bom", input_index) (a byte-order mark was removed), ("end", input_index, StreamEnd),
    ("finish", plan)."""
    by_input: Dict[int, List[DayPlan]] = {}
    for p in plans:
        by_input.setdefault(p.input_index, []).append(p)
    for i, days in by_input.items():
        todo = [p for p in days if not (skip_done and day_done(s.output, p.day))]
        if not todo:
            continue
        path = s.inputs[i]
        di = 0
        ends: List[ct.StreamEnd] = []
        pending = {p.day for p in todo}
        started = False
        try:
            for chunk in ct.read_chunks(path, s.chunk_bytes, ends):
                data, line = chunk.data, chunk.first_line
                if chunk.bom_removed:
                    yield ("bom", i)
                while data:
                    p = days[di]
                    if not started:
                        if p.day in pending:
                            yield ("start", p)
                        started = True
                    if p.stop_line is not None and line + data.count(b"\n") > p.stop_line:
                        k = p.stop_line - line  # lines of this chunk still in day p
                        nl = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
                        cut = int(nl[k - 1]) + 1 if k > 0 else 0
                        part, data = data[:cut], data[cut:]
                    else:
                        part, data = data, b""
                    if part and p.day in pending:
                        yield ("chunk", p, (kind, p.day, p.train, line, part))
                    line += part.count(b"\n")
                    if p.stop_line is not None and line >= p.stop_line:
                        if p.day in pending:
                            yield ("finish", p)
                        di += 1
                        started = False
        except ValueError as e:  # an endless line
            raise PreprocessError(f"{path}: {e}: not Criteo text") from None
        # days that got no (more) lines, and the file's end
        yield ("end", i, ends[0] if ends else ct.StreamEnd(1))
        while di < len(days):
            p = days[di]
            if p.day in pending:
                if not started:
                    yield ("start", p)
                yield ("finish", p)
            di += 1
            started = False


def _check_head(path: str, r: ChunkResult) -> None:
    if r.head_lines and r.bad_in_head * 2 > r.head_lines:
        line, reason, detail = r.bad.first() or (1, "?", "")
        raise PreprocessError(
            f"{path} does not look like Criteo data: {r.bad_in_head} of its first "
            f"{r.head_lines} lines are malformed (line {line}: {reason}"
            f"{': ' + detail if detail else ''}); expected 40 tab-separated columns: a 0/1 "
            "label, 13 integers, 26 hexadecimal ids")


def _strict_check(path: str, bad: ct.BadRows) -> None:
    first = bad.first()
    if first:
        line, reason, detail = first
        raise PreprocessError(f"{path}:{line}: {reason}{': ' + detail if detail else ''} "
                              "(--strict)")


class _Counts:
    """Running occurrence counts of one feature's raw values (sorted keys)."""

    def __init__(self):
        self.keys = np.zeros(0, np.uint32)
        self.counts = np.zeros(0, np.int64)
        self.pending: List[Tuple[np.ndarray, np.ndarray]] = []
        self.pending_len = 0

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self.pending.append((keys, counts))
        self.pending_len += len(keys)
        if self.pending_len > max(1 << 22, len(self.keys)):
            self.merge()

    def merge(self) -> None:
        if not self.pending:
            return
        keys = np.concatenate([self.keys] + [k for k, _ in self.pending])
        counts = np.concatenate([self.counts] + [c for _, c in self.pending])
        self.keys, inv = np.unique(keys, return_inverse=True)
        self.counts = np.bincount(inv, weights=counts, minlength=len(self.keys)).astype(np.int64)
        self.pending, self.pending_len = [], 0


def _run_pass(s: Settings, plans: List[DayPlan], kind: str, executor: Executor,
              report: Report, window: int, counters: Optional[List[_Counts]] = None) -> None:
    from tqdm import tqdm

    total = getattr(s, "_kaggle_lines", None)
    bar = tqdm(total=None if kind == "count" else total, unit=" rows", unit_scale=True,
               disable=not s.progress, desc="counting ids" if kind == "count" else "preprocessing",
               file=sys.stderr, dynamic_ncols=True)
    writers: Dict[int, Dict[str, NpyWriter]] = {}
    day_stats: Dict[int, dict] = {}
    first_chunk_seen: set = set()
    queue: deque = deque()
    gen = _tasks(s, plans, skip_done=(kind == "write"), kind=kind)

    def fill() -> None:
        while sum(1 for q in queue if q[0] == "chunk") < window:
            item = next(gen, None)
            if item is None:
                return
            if item[0] == "chunk":
                queue.append(("chunk", item[1], executor.submit(_work, item[2])))
                report.input_bytes += len(item[2][4])
            else:
                queue.append(item)

    try:
        fill()
        while queue:
            item = queue.popleft()
            tag = item[0]
            if tag == "start" and kind == "write":
                p = item[1]
                files = day_files(s.output, p.day)
                writers[p.day] = {
                    "dense": NpyWriter(files["dense"], np.float32, ct.NUM_DENSE),
                    "sparse": NpyWriter(files["sparse"], s.sparse_dtype, ct.NUM_SPARSE),
                    "labels": NpyWriter(files["labels"], np.int32, 1),
                }
                day_stats[p.day] = {"lines": 0, "rows": 0, "rejected": 0, "sub_sampled": 0}
            elif tag == "chunk":
                p, fut = item[1], item[2]
                r: ChunkResult = fut.result()
                path = s.inputs[p.input_index]
                if p.input_index not in first_chunk_seen:
                    first_chunk_seen.add(p.input_index)
                    _check_head(path, r)
                if s.strict:
                    _strict_check(path, r.bad)
                report.worker_maxrss_kb = max(report.worker_maxrss_kb, r.maxrss_kb)
                if kind == "count":
                    for c, (k, n) in zip(counters, r.counts):
                        c.add(k, n)
                else:
                    report.bad.setdefault(path, ct.BadRows()).merge(r.bad)
                    w = writers[p.day]
                    w["dense"].write(r.dense)
                    w["sparse"].write(r.sparse)
                    w["labels"].write(r.labels)
                    st = day_stats[p.day]
                    st["lines"] += r.num_lines
                    st["rows"] += len(r.labels)
                    st["rejected"] += r.bad.rejected()
                    st["sub_sampled"] += r.sub_sampled
                    report.lines += r.num_lines
                    report.rows += len(r.labels)
                    report.sub_sampled += r.sub_sampled
                bar.update(r.num_lines)
            elif tag == "bom":
                path = s.inputs[item[1]]
                bad = ct.BadRows()
                bad.add(ct.BOM, 1)
                if s.strict:
                    _strict_check(path, bad)
                if kind == "write":
                    report.bad.setdefault(path, ct.BadRows()).merge(bad)
            elif tag == "end":
                i, end = item[1], item[2]
                path = s.inputs[i]
                bad = ct.BadRows()
                if end.partial:
                    bad.add(ct.TRUNCATED_LINE, end.next_line,
                            f"{len(end.partial)} bytes after the last newline")
                if end.error is not None:
                    bad.add(end.error.reason, end.next_line + bool(end.partial), end.error.detail)
                if s.strict:
                    _strict_check(path, bad)
                if kind == "write":
                    report.bad.setdefault(path, ct.BadRows()).merge(bad)
                    last = [p for p in plans if p.input_index == i][-1]
                    if last.day in day_stats:
                        day_stats[last.day]["rejected"] += bad.rejected()
                        day_stats[last.day]["lines"] += bool(end.partial)
                    report.lines += bool(end.partial)
            elif tag == "finish" and kind == "write":
                p = item[1]
                for w in writers.pop(p.day).values():
                    w.finish()
                write_json(os.path.join(s.output, f"day_{p.day}.json"), day_stats[p.day])
            fill()
    finally:
        bar.close()
        for ws in writers.values():
            for w in ws.values():
                w.abort()


def load_vocab(out: str) -> Optional[List[np.ndarray]]:
    d = os.path.join(out, "vocab")
    if not os.path.exists(os.path.join(d, "meta.json")):
        return None
    return [np.load(os.path.join(d, f"cat_{f}.npy")) for f in range(ct.NUM_SPARSE)]


def _save_vocab(s: Settings, counters: List[_Counts]) -> List[np.ndarray]:
    d = os.path.join(s.output, "vocab")
    os.makedirs(d, exist_ok=True)
    vocab = []
    for f, c in enumerate(counters):
        c.merge()
        keep = c.counts >= max(s.frequency_threshold, 1)
        keys = c.keys[keep].astype(np.uint32)
        for name, arr in ((f"cat_{f}.npy", keys), (f"cat_{f}_counts.npy", c.counts[keep])):
            tmp = os.path.join(d, name + ".tmp")
            try:
                with open(tmp, "wb") as fh:
                    np.save(fh, arr)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
            os.replace(tmp, os.path.join(d, name))
        vocab.append(keys)
    write_json(os.path.join(d, "meta.json"), {"frequency_threshold": s.frequency_threshold,
                                              "sizes": [len(v) for v in vocab]})
    return vocab


def table_sizes(s: Settings, vocab: Optional[List[np.ndarray]]) -> List[int]:
    if s.mode == "vocab":
        rare = 1 if s.frequency_threshold > 1 else 0
        return [len(v) + rare for v in vocab]
    return [s.max_ind_range or 2 ** 32] * ct.NUM_SPARSE


def print_report(report: Report, out=sys.stderr, verb: str = "dropped") -> None:
    for path, bad in report.bad.items():
        if not bad.counts:
            continue
        print(f"{path}: {bad.rejected()} malformed row(s) {verb}", file=out)
        for reason, n in sorted(bad.counts.items(), key=lambda kv: -kv[1]):
            ex = ", ".join(f"{line}" + (f" ({d})" if d else "") for line, d in
                           bad.examples.get(reason, []))
            print(f"  {n} x {reason}: line {ex}{' ...' if n > len(bad.examples[reason]) else ''}",
                  file=out)


def run(s: Settings) -> Report:
    """Preprocess according to `s`; raises PreprocessError for user mistakes and for a full
    disk (the finished days are kept, partial files removed: a rerun resumes)."""
    fingerprints = check_inputs(s)
    try:
        return _run_checked(s, fingerprints)
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        _remove_partial_files(s.output)
        done = [d for d in range(_num_days(s)) if day_done(s.output, d)]
        kept = (f"kept the {len(done)} finished day(s) ({', '.join(map(str, done))})" if done
                else "no day was finished")
        raise PreprocessError(f"{s.output}: no space left on device ({e.strerror}); {kept} "
                              "and removed the partial files; free some space and rerun the "
                              "same command to resume") from None


def _num_days(s: Settings) -> int:
    return KAGGLE_DAYS if s.dataset == "kaggle" else len(s.inputs)


def _remove_partial_files(out: str) -> None:
    """The temporary files of an unfinished write (every writer removes its own; this also
    catches one that failed while being closed)."""
    for folder in (out, os.path.join(out, "vocab")):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.endswith(".tmp"):
                    os.remove(os.path.join(folder, name))


def _run_checked(s: Settings, fingerprints: List[dict]) -> Report:
    os.makedirs(s.output, exist_ok=True)
    plans = plan_days(s)
    meta_path = os.path.join(s.output, "meta.json")
    meta = {"format_version": FORMAT_VERSION, "settings": s.identity(), "complete": False,
            "num_days": len(plans), "eval_day": len(plans) - 1,
            "sparse_dtype": s.sparse_dtype.name, "input_files": fingerprints}
    write_json(meta_path, meta)
    report = Report()
    window = 2 * max(s.workers, 1) + 1
    vocab = None
    if s.mode == "vocab":
        vocab = load_vocab(s.output)
    if s.mode == "vocab" and vocab is None:
        counters = [_Counts() for _ in range(ct.NUM_SPARSE)]
        with _executor(s, None) as ex:
            _run_pass(s, plans, "count", ex, report, window, counters)
        vocab = _save_vocab(s, counters)
        report.input_bytes = 0
    with _executor(s, vocab) as ex:
        _run_pass(s, plans, "write", ex, report, window)
    for path, was in zip(s.inputs, fingerprints):
        change = fingerprint_change(was, fingerprint(path))
        if change:  # the days just written may hold parts of both versions
            raise PreprocessError(f"{path} changed while it was being read ({change}); "
                                  f"delete {s.output} and run again on the settled file")
    rows = {}
    for p in plans:
        with open(os.path.join(s.output, f"day_{p.day}.json")) as f:
            rows[p.day] = json.load(f)["rows"]
    meta.update({"complete": True, "rows_per_day": [rows[p.day] for p in plans],
                 "table_sizes": table_sizes(s, vocab)})
    write_json(meta_path, meta)
    return report


def _executor(s: Settings, vocab) -> Executor:
    if s.workers <= 0:
        _init_worker(s, vocab)
        return _InlineExecutor()
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    return ProcessPoolExecutor(s.workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(s, vocab, os.getpid()))
