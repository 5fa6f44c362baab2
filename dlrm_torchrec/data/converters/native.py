"""prepare_mlperf's compiled loops (`prepare_native.c`): built once per machine, loaded with
ctypes, called on numpy arrays.

The library is compiled with the C compiler (`$CC`, else `cc`) into a cache folder
(`$DLRM_TORCHREC_CACHE`, else `$XDG_CACHE_HOME/dlrm_torchrec`, else
`~/.cache/dlrm_torchrec`) under a name carrying the source's hash, so a changed source is
rebuilt and processes on one machine share one build. `make install` builds it; later
calls only load it.
"""

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare_native.c")
FLAGS = ["-O3", "-std=gnu99", "-shared", "-fPIC"]
ROW_WORDS = 1 + 13 + 26  # a parsed row (uint32 words): label, raw dense values, local ids
# a scattered row at its widest (every value in 4 bytes; the size of an unpacked parsed
# row); dest_label: the row in its bucket, the label in bit 31; dense: the day's shifted
# values (`dense_shift`), whose logarithm the place stage takes
RECORD_DTYPE = np.dtype([("dest_label", "<u4"), ("dense", "<i4", 13), ("sparse", "<i4", 26)])
RECORD_BYTES = RECORD_DTYPE.itemsize
RECORD_COLUMNS = 13 + 26  # a record's values after dest_label, each in its width


def id_width(largest: int) -> int:
    """The bytes (1 to 4) a record gives a column whose values are at most `largest`."""
    return 1 if largest < 1 << 8 else 2 if largest < 1 << 16 else 3 if largest < 1 << 24 else 4


def record_bytes(widths: Sequence[int]) -> int:
    """A record's bytes with these (RECORD_COLUMNS) widths."""
    return 4 + sum(int(w) for w in widths)


class NativeBuildError(Exception):
    """The library could not be compiled (no C compiler, or it failed)."""


def cache_dir() -> str:
    root = os.environ.get("DLRM_TORCHREC_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "dlrm_torchrec")
    return root


def library_path() -> str:
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + " ".join(FLAGS).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"prepare_native-{digest}.so")


def build() -> str:
    """The library's path, compiled first if this source has no build yet."""
    path = library_path()
    if os.path.exists(path):
        return path
    cc = os.environ.get("CC", "cc")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    except OSError as e:
        raise NativeBuildError(f"cannot write the compiled parser to {os.path.dirname(path)} "
                               f"({e.strerror}); set DLRM_TORCHREC_CACHE to a writable "
                               "folder") from None
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, SOURCE, "-o", tmp], capture_output=True, text=True)
    except OSError as e:
        os.unlink(tmp)
        raise NativeBuildError(f"no C compiler ({cc}: {e.strerror}); prepare_mlperf compiles "
                               "its parser once per machine: install gcc or set CC") from None
    if proc.returncode:
        os.unlink(tmp)
        raise NativeBuildError(f"{cc} failed on {SOURCE}:\n{proc.stderr[-2000:]}")
    os.replace(tmp, path)  # atomic: processes building at once each publish a whole file
    return path


_lib: Optional[ctypes.CDLL] = None
_P = ctypes.c_void_p
_I64 = ctypes.c_int64


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        so = ctypes.CDLL(build())
        sig = {
            "parse_lines": (_I64, [_P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P]),
            "table_new": (_P, [ctypes.c_uint32, ctypes.c_int]),
            "table_free": (None, [_P]),
            "table_assign": (_I64, [_P, _P, _I64, _I64, _P]),
            "table_size": (_I64, [_P]),
            "table_reserve": (_I64, [_P, _I64]),
            "table_clear": (None, [_P]),
            "table_lend": (None, [_P, _P, ctypes.c_uint64]),
            "table_order": (None, [_P, _P]),
            "pack_rows": (_I64, [_I64, _P, _P, _P, _I64, _P, _P, _P, _P]),
            "unpack_rows": (None, [_I64, _P, _P, _P, _P]),
            "bucket_rows": (_I64, [_I64, _P, _P, _I64, _P, _P]),
            "fill_records": (_I64, [_I64, _P, ctypes.c_int32, _P, ctypes.c_int, _P, _P, _P, _I64,
                                    _P, _I64, _P, _I64, _P]),
            "place_records": (_I64, [_P, _I64, _P, _I64, _I64, _P, _P, _P, _P, _P]),
            "destinations": (None, [_P, _I64, _I64, _I64, _P]),
            "legacy_shuffle": (None, [_P, _I64, ctypes.c_uint32]),
            "lookup_ids": (_I64, [_I64, _P, _P, _P, _P, _P]),
        }
        for name, (res, args) in sig.items():
            fn = getattr(so, name)
            fn.restype, fn.argtypes = res, args
        _lib = so
    return _lib


def _ptr(a: np.ndarray, dtype, writable: bool = False) -> int:
    """The data address of `a`, which must be C-contiguous with `dtype`."""
    if a.dtype != dtype or not a.flags.c_contiguous or (writable and not a.flags.writeable):
        raise TypeError(f"expected a contiguous {np.dtype(dtype)} array, got {a.dtype} "
                        f"{a.shape}")
    return a.ctypes.data


class ParseBuffers:
    """Row arrays for `parse_lines`: labels (rows,) int32, dense (rows, 13) int32 and the
    ids feature-major, sparse (26, rows) uint32, made by `empty(shape, dtype)`."""

    def __init__(self, rows: int, empty: Callable[[Tuple[int, ...], type], np.ndarray] = np.empty):
        self.max_rows = rows
        self.labels = empty((rows,), np.int32)
        self.dense = empty((rows, 13), np.int32)
        self.sparse = empty((26, rows), np.uint32)

    def parse(self, address: int, length: int) -> Tuple[int, int, int, int]:
        """Parse the plainly valid whole lines of the `length` bytes at `address` into the
        arrays' first rows: (rows, their bytes, why it stopped, the smallest dense value or
        2**62 without rows); it stopped at a line that needs the exact parser (1:
        malformed, or to be repaired), at a line the bytes end inside (0), or with the
        arrays full (2)."""
        low, consumed, stop = ctypes.c_int64(2 ** 62), ctypes.c_int64(), ctypes.c_int64()
        n = lib().parse_lines(address, length, self.max_rows, self.max_rows,
                              self.labels.ctypes.data, self.dense.ctypes.data,
                              self.sparse.ctypes.data, ctypes.byref(low),
                              ctypes.byref(consumed), ctypes.byref(stop))
        return n, consumed.value, stop.value, low.value


class IdTable:
    """uint32 values -> uint32 numbers base, base + 1, ... in order of first sight."""

    def __init__(self, base: int, keep_order: bool = False):
        self._lent: Optional[np.ndarray] = None
        self._t = lib().table_new(base, int(keep_order))
        if not self._t:
            raise MemoryError("id table")

    def assign(self, values: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """values: (n,) uint32, or a column of an (n, k) uint32 array (any row stride) ->
        their numbers, written to `out` (same shape and strides; may be `values`)."""
        if values.dtype != np.uint32 or values.ndim != 1 or values.strides[0] % 4:
            raise TypeError("assign takes a 1-d uint32 array")
        if out is None:
            out = np.empty(len(values), np.uint32)
        if out.strides != values.strides or out.shape != values.shape:
            raise TypeError("assign's out must have the values' shape and strides")
        stride = values.strides[0] // 4
        if lib().table_assign(self._t, values.ctypes.data, len(values), stride,
                              out.ctypes.data) < 0:
            raise MemoryError("id table: out of memory or more than 2**32 - 2 values")
        return out

    def lend(self, space: np.ndarray) -> None:
        """Give the table `space` (uint8, contiguous, 8-byte aligned) to grow its slots into
        (from its start on, while it lasts) instead of new memory; kept alive here. Once
        per table: its slots may lie in the memory lent first."""
        if space.dtype != np.uint8 or not space.flags.c_contiguous or space.ctypes.data % 8:
            raise TypeError("lend takes contiguous, 8-byte aligned uint8 memory")
        if self._lent is not None:
            raise RuntimeError("a table is lent memory once")
        self._lent = space
        lib().table_lend(self._t, space.ctypes.data, len(space))

    def clear(self) -> None:
        """Forget every value, keeping the memory for the next ones."""
        lib().table_clear(self._t)

    def reserve(self, count: int) -> None:
        """Room for `count` values in all, so the table does not grow until then."""
        if lib().table_reserve(self._t, count) < 0:
            raise MemoryError(f"id table of {count} values")

    def __len__(self) -> int:
        return lib().table_size(self._t)

    def order(self) -> np.ndarray:
        """(len,) uint32: the values in order of first sight."""
        out = np.empty(len(self), np.uint32)
        lib().table_order(self._t, out.ctypes.data)
        return out

    def close(self) -> None:
        if self._t:
            lib().table_free(self._t)
            self._t = None
        self._lent = None

    __del__ = close


class Pack(NamedTuple):
    """How a group of parsed rows is packed (see `pack_rows`): column c of a row (its
    label, 13 raw dense values, 26 local numbers) is bases[c] plus widths[c] bytes."""

    rows: int
    bases: np.ndarray  # (ROW_WORDS,) uint32
    widths: np.ndarray  # (ROW_WORDS,) uint8

    @property
    def row_bytes(self) -> int:
        return int(self.widths.sum())


PACK_ROOM = 4  # bytes a pack's buffer holds past its rows (each value is moved as a word)


def pack_rows(labels: np.ndarray, dense: np.ndarray, sparse: np.ndarray, id_top: np.ndarray,
              out: np.ndarray) -> Tuple[Pack, np.ndarray]:
    """Parser arrays of n rows (labels (n,) int32, dense (n, 13) int32, sparse (26, >= n)
    uint32 feature-major, its first n columns, feature f's values at most id_top[f], (26,)
    uint32) -> (their Pack, its bytes: the start of `out`, uint8 with room for n * 4 *
    ROW_WORDS + PACK_ROOM). The label and each dense column are stored less the column's
    smallest, in as few bytes as the largest difference needs (0 for a constant column);
    each id in the bytes its id_top needs: most take one to three bytes instead of four."""
    n = len(labels)
    if not (dense.shape == (n, 13) and sparse.shape[0] == 26 and sparse.shape[1] >= n
            and (sparse.strides[1] == 4 or n == 1) and sparse.strides[0] % 4 == 0
            and sparse.dtype == np.uint32 and id_top.shape == (26,)
            and out.nbytes >= n * 4 * ROW_WORDS + PACK_ROOM):
        raise ValueError("pack_rows: inconsistent shapes")
    bases, widths = np.empty(ROW_WORDS, np.uint32), np.empty(ROW_WORDS, np.uint8)
    row_bytes = lib().pack_rows(n, _ptr(labels, np.int32), _ptr(dense, np.int32),
                                sparse.ctypes.data, sparse.strides[0] // 4,
                                _ptr(id_top, np.uint32), bases.ctypes.data, widths.ctypes.data,
                                _ptr(out, np.uint8, True))
    if row_bytes < 0:
        raise ValueError("pack_rows: an id above its feature's id_top")
    return Pack(n, bases, widths), out[:n * row_bytes]


def unpack_rows(pack: Pack, packed: np.ndarray, out: np.ndarray) -> np.ndarray:
    """One pack's bytes (uint8, pack.rows * pack.row_bytes; readable for PACK_ROOM - 1
    bytes past them) -> `out` (pack.rows, ROW_WORDS) uint32: label, dense values (their
    int32 bits), local numbers. `out` may overlap `packed` if it starts at least
    out.nbytes - packed.nbytes bytes before it."""
    if packed.nbytes != pack.rows * pack.row_bytes or out.shape != (pack.rows, ROW_WORDS):
        raise ValueError(f"unpack_rows: {packed.nbytes} bytes for {pack.rows} rows of "
                         f"{pack.row_bytes}, out {out.shape}")
    lib().unpack_rows(pack.rows, _ptr(packed, np.uint8), _ptr(pack.bases, np.uint32),
                      _ptr(pack.widths, np.uint8), _ptr(out, np.uint32, True))
    return out


def _maps(maps: Sequence[np.ndarray]) -> ctypes.Array:
    """The 26 maps ((u_f,) uint32 each) as the C array of their addresses."""
    return (ctypes.c_void_p * 26)(*[_ptr(m, np.uint32) for m in maps])


def bucket_rows(dest: np.ndarray, bucket_starts: np.ndarray,
                bucket_of: Optional[np.ndarray] = None
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows going to global rows dest ((n,) uint32) -> (rows per bucket (nb,) int64, each
    row's bucket (n,) int32, into `bucket_of` if given, and the rows of the buckets before
    each (nb,) int64: where its records start when they are grouped by bucket): bucket b
    holds bucket_starts[b] <= dest < bucket_starts[b + 1] ((nb,) int64, ascending; the last
    bucket open-ended)."""
    counts = np.empty(len(bucket_starts), np.int64)
    bucket_of = np.empty(len(dest), np.int32) if bucket_of is None else bucket_of
    if bucket_of.shape != dest.shape:
        raise ValueError(f"bucket_rows: bucket_of {bucket_of.shape} for {dest.shape} rows")
    if lib().bucket_rows(len(dest), _ptr(dest, np.uint32), _ptr(bucket_starts, np.int64),
                         len(bucket_starts), counts.ctypes.data,
                         _ptr(bucket_of, np.int32, True)):
        raise RuntimeError("scatter_records: a destination outside the buckets")
    return counts, bucket_of, np.cumsum(counts) - counts


def fill_records(rows: np.ndarray, shift: int, maps: Sequence[np.ndarray], exact: bool,
                 dest: np.ndarray, bucket_of: np.ndarray, bucket_starts: np.ndarray,
                 widths: np.ndarray, records: np.ndarray, next_record: np.ndarray) -> None:
    """n parsed rows of a day ((n, ROW_WORDS) uint32; shift: the day's dense shift,
    `dense_shift`; each row going to global row dest (n,) uint32, in bucket bucket_of (n,)
    int32) -> records (raw bytes, uint8; column c, a shifted dense value or an id, in
    widths[c] bytes, (RECORD_COLUMNS,) uint8): row i's at record next_record[its bucket],
    which then moves on ((nb,) int64). Calls for the parts of a chunk in turn, next_record
    starting at each bucket's first record, group the chunk's records by bucket.
    maps[f]: (u_f,) uint32, the ids of the day's values of feature f in the day's order
    (indexed by the rows' local numbers)."""
    n, size = len(rows), record_bytes(widths)
    if not (rows.shape == (n, ROW_WORDS) and dest.shape == (n,) and bucket_of.shape == (n,)
            and len(maps) == 26 and widths.shape == (RECORD_COLUMNS,)
            and next_record.shape == bucket_starts.shape):
        raise ValueError("fill_records: inconsistent shapes")
    rc = lib().fill_records(n, _ptr(rows, np.uint32), shift, _maps(maps),
                            int(exact), _ptr(dest, np.uint32), _ptr(bucket_of, np.int32),
                            _ptr(bucket_starts, np.int64), len(bucket_starts),
                            _ptr(widths, np.uint8), size, _ptr(records, np.uint8, True),
                            records.nbytes // size, _ptr(next_record, np.int64, True))
    if rc == -4:
        raise ValueError("fill_records: a bucket outside bucket_starts, or records outside "
                         "the buffer")
    if rc == -3:
        raise RuntimeError("scatter_records: a value wider than its column's width")
    if rc:
        raise RuntimeError("scatter_records: a row's place in its bucket beyond 2**31")


def scatter_records(rows: np.ndarray, shift: int, maps: Sequence[np.ndarray], exact: bool,
                    dest: np.ndarray, bucket_starts: np.ndarray, widths: np.ndarray,
                    records: np.ndarray) -> np.ndarray:
    """`fill_records` for a whole chunk: its records grouped by bucket in bucket order, from
    the start of `records`; returns the rows per bucket (nb,) int64."""
    counts, bucket_of, next_record = bucket_rows(dest, bucket_starts)
    fill_records(rows, shift, maps, exact, dest, bucket_of, bucket_starts, widths, records,
                 next_record)
    return counts


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the disk blocks and page-cache pages of bytes offset .. offset + length of the
    open file `fd` (which keeps its size, reading zeros there): Linux's fallocate
    PUNCH_HOLE. Returns False where the system or file system cannot."""
    if length <= 0:
        return True
    libc = _libc()
    if libc is None:
        return False
    punch_keep_size = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    return libc.fallocate(fd, punch_keep_size, ctypes.c_int64(offset), ctypes.c_int64(length)) == 0


_LIBC: List[Optional[ctypes.CDLL]] = []


def _libc() -> Optional[ctypes.CDLL]:
    if not _LIBC:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            libc.fallocate.restype = ctypes.c_int
        except (OSError, AttributeError):  # no fallocate (not Linux)
            libc = None
        _LIBC.append(libc)
    return _LIBC[0]


def place_records(records: np.ndarray, widths: np.ndarray, shifted: np.ndarray,
                  sparse: np.ndarray, labels: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """Records (raw bytes, n * record_bytes(widths) uint8) of a bucket -> their rows of its
    output columns: shifted (rows, 13) int32 (the dense values as the records hold them,
    before their logarithm), sparse (rows, 26) int32, labels (rows, 1) int32; `filled`
    (rows,) uint8 marks the rows placed so far (zero before a bucket's first records), and
    no row may be placed twice. Returns each feature's largest id among the records, (26,)
    int64 (-1 for none)."""
    size = record_bytes(widths)
    rows, n = len(labels), records.nbytes // size
    if shifted.shape != (rows, 13) or sparse.shape != (rows, 26) or labels.shape != (rows, 1) \
            or filled.shape != (rows,) or records.nbytes != n * size \
            or widths.shape != (RECORD_COLUMNS,):
        raise ValueError(f"{records.nbytes} bytes of records of {size}; output columns "
                         f"{shifted.shape} {sparse.shape} {labels.shape} {filled.shape}")
    top = np.full(26, -1, np.int32)
    if lib().place_records(_ptr(records, np.uint8), n, _ptr(widths, np.uint8), size, rows,
                           _ptr(shifted, np.int32, True), _ptr(sparse, np.int32, True),
                           _ptr(labels, np.int32, True), _ptr(filled, np.uint8, True),
                           _ptr(top, np.int32, True)):
        raise RuntimeError("a bucket's work file places a row twice or outside it")
    return top.astype(np.int64)


def destinations(perm: np.ndarray, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    """(n,) uint32 permutation (shuffled row k is source row perm[k]) -> `out` (hi - lo,)
    uint32: where each of the source rows lo .. hi-1 goes (the inverse's slice lo:hi)."""
    if not (0 <= lo <= hi and out.shape == (hi - lo,)):
        raise ValueError(f"destinations of rows {lo} .. {hi}: out has shape {out.shape}")
    lib().destinations(_ptr(perm, np.uint32), len(perm), lo, hi, _ptr(out, np.uint32, True))
    return out


def lookup_ids(rows: np.ndarray, maps: Sequence[np.ndarray], out: np.ndarray,
               top: np.ndarray) -> np.ndarray:
    """n parsed rows ((n, ROW_WORDS) uint32) -> `out` (n, 26) int64: feature f's id of each
    row, maps[f][its local number] (maps[f]: (u_f,) uint32, the day's part of the map);
    `top` (26,) int64 rises to each feature's largest. Returns out."""
    n = len(rows)
    if rows.shape != (n, ROW_WORDS) or out.shape != (n, 26) or top.shape != (26,) \
            or len(maps) != 26:
        raise ValueError("lookup_ids: inconsistent shapes")
    sizes = np.array([len(m) for m in maps], np.int64)
    if lib().lookup_ids(n, _ptr(rows, np.uint32), _maps(maps), sizes.ctypes.data,
                        _ptr(out, np.int64, True), _ptr(top, np.int64, True)):
        raise RuntimeError("a parsed row's local number is outside its day's map")
    return out


def legacy_shuffle(x: np.ndarray, seed: int) -> np.ndarray:
    """(n,) uint32 shuffled in place as np.random.RandomState(seed).shuffle(x) shuffles it
    (the same MT19937 draws and swaps), nearly four times as fast on large arrays; returns
    x."""
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed {seed}: numpy's RandomState takes 0 .. 2**32 - 1")
    if x.ndim != 1 or len(x) > 2 ** 32:
        raise ValueError(f"legacy_shuffle: shape {x.shape}, not (n,) with n <= 2**32")
    if len(x):
        lib().legacy_shuffle(_ptr(x, np.uint32, True), len(x), seed)
    return x


if __name__ == "__main__":  # `python -m dlrm_torchrec.data.converters.native`: build it
    try:
        print(build())
    except NativeBuildError as e:
        sys.exit(f"error: {e}")
