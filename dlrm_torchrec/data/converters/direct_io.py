"""Reads and writes that bypass the page cache (Linux O_DIRECT), for prepare_mlperf's large
files.

A buffered write of data that is not cached yet makes a page-cache page for every 4 KB, and
on a virtual machine whose host takes freed memory back (free page reporting) each such page
is backed afresh: measured on a 2-core VM, 2 GB written took 6.2 s of kernel time through
the cache and 0.25 s with O_DIRECT, which hands the pages to the disk from the process's own
(reused) memory. The files are then read back once at most, so the cache gains nothing.

O_DIRECT moves whole, aligned pages only: the data's memory address and its file offset
must both be multiples of PAGE. So each write here sends its whole pages direct and the
partial pages at either end through the cache (two processes filling the two sides of one
page both write it buffered, which the kernel merges), and a data buffer must have its
offset's phase: address % PAGE == offset % PAGE (`phase_aligned`). Where the file system
refuses O_DIRECT (tmpfs, some network file systems) or the data is out of phase, everything
goes through the cache: the same bytes, at the old cost.
"""

import errno
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

PAGE = 4096  # the alignment O_DIRECT needs here: the page size, a multiple of any block size


def to_phase(address: int, phase: int) -> int:
    """The bytes from `address` to the first address at or after it whose remainder mod
    PAGE is phase's (so O_DIRECT can move data there to or from file offset `phase`)."""
    return (phase - address) % PAGE


def in_phase(space: np.ndarray, nbytes: int, phase: int) -> np.ndarray:
    """(nbytes,) uint8 of `space` (uint8, at least nbytes + PAGE - 1) at an address in
    `phase`'s phase."""
    skip = to_phase(space.ctypes.data, phase)
    return space[skip:skip + nbytes]


def phase_aligned(nbytes: int, phase: int,
                  take: Callable[[int], np.ndarray] = lambda n: np.empty(n, np.uint8)
                  ) -> np.ndarray:
    """(nbytes,) uint8 whose address % PAGE == phase % PAGE, in memory of `take(bytes)`
    (uint8; newly allocated by default)."""
    return in_phase(take(nbytes + PAGE), nbytes, phase)


def _open_direct(path: str, flags: int = os.O_WRONLY) -> Optional[int]:
    """`path` opened with O_DIRECT (and `flags`), or None where its file system refuses it."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        done = os.pwrite(fd, data, offset)
        if done <= 0:
            raise OSError(errno.EIO, "a write wrote nothing")
        data, offset = data[done:], offset + done


def _pread_all(fd: int, out: memoryview, offset: int) -> int:
    """Read into all of `out` unless the file ends first; returns the bytes read."""
    got = 0
    while got < len(out):
        n = os.preadv(fd, [out[got:]], offset + got)
        if n <= 0:
            break
        got += n
    return got


def read_at(path: str, out: np.ndarray, offset: int) -> int:
    """Fill `out` (contiguous) with the bytes of `path` from `offset`, its whole pages with
    O_DIRECT when its address has the offset's phase (no page-cache page made for them),
    the rest through the cache; returns the bytes read (fewer where the file ends)."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    first = -(-offset // PAGE) * PAGE
    last = (offset + len(view)) // PAGE * PAGE
    middle = None  # bytes the direct read got
    if last > first and (out.ctypes.data - offset) % PAGE == 0:
        direct = _open_direct(path, os.O_RDONLY)
        if direct is not None:
            try:
                middle = _pread_all(direct, view[first - offset:last - offset], first)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
            finally:
                os.close(direct)
    with open(path, "rb", buffering=0) as f:
        if middle is None:
            return _pread_all(f.fileno(), view, offset)
        head = _pread_all(f.fileno(), view[:first - offset], offset)
        if middle < last - first:  # the file ends before the last whole page
            return head + middle
        return head + middle + _pread_all(f.fileno(), view[last - offset:], last)


def write_at(path: str, data: np.ndarray, offset: int) -> None:
    """Write the bytes of `data` (contiguous) into the existing file `path` at `offset`:
    its whole pages with O_DIRECT when its address has the offset's phase, the rest
    (or all of it) through the page cache."""
    data = np.ascontiguousarray(data)
    view = memoryview(data.reshape(-1).view(np.uint8))
    first = -(-offset // PAGE) * PAGE  # the first page boundary at or after offset
    last = (offset + len(view)) // PAGE * PAGE  # the last at or before its end
    direct = None
    if last > first and (data.ctypes.data - offset) % PAGE == 0:
        direct = _open_direct(path)
    if direct is not None:
        try:
            _pwrite_all(direct, view[first - offset:last - offset], first)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this file refuses it after all
                raise
            first = last = offset  # all of it through the cache
        finally:
            os.close(direct)
    else:
        first = last = offset
    fd = os.open(path, os.O_WRONLY)
    try:
        _pwrite_all(fd, view[:first - offset], offset)
        _pwrite_all(fd, view[last - offset:], last)
    finally:
        os.close(fd)


class DirectWriter:
    """A new file written front to back: the bytes gather in a page-aligned buffer of
    `buffer_bytes`, whose whole pages go to the file with O_DIRECT from this process's
    writer thread (`writer_thread`) while the next buffer fills; `close` writes the last partial
    page padded, then cuts the file to its length. Through the page cache where the file
    system refuses O_DIRECT.

    Bytes already written may be written again after a `seek` back (a zip member's header,
    completed once its data is written, as `zipfile` does on a seekable file): in the
    buffer if they are still there, else through the page cache."""

    def __init__(self, path: str, buffer_bytes: int = 8 << 20):
        self.path = path
        self.fd: Optional[int] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self.direct = _open_direct(path)
        size = max(PAGE, buffer_bytes // PAGE * PAGE)
        self.buf, self.spare = _buffer(size), _buffer(size)
        self.filled = 0  # bytes waiting in buf
        self.written = 0  # bytes handed to the file (a multiple of PAGE until close)
        self.pending: Optional[Future] = None  # the write of spare, under way
        self.pos = 0  # where the next write goes (the end, unless seek moved it)

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        end = self.written + self.filled
        self.pos = {os.SEEK_SET: pos, os.SEEK_CUR: self.pos + pos, os.SEEK_END: end + pos}[whence]
        if not 0 <= self.pos <= end:
            raise OSError(errno.EINVAL, f"{self.path}: seek to {self.pos} outside 0 .. {end}")
        return self.pos

    def flush(self) -> None:
        """Nothing: the bytes reach the file as the buffers fill, and at close."""

    def write(self, data) -> int:
        src = memoryview(data).cast("B")
        size = len(src)
        end = self.written + self.filled
        if self.pos < end:  # over bytes written before
            over = src[:end - self.pos]
            self._rewrite(over, self.pos)
            self.pos += len(over)
            src = src[len(over):]
        self.pos += len(src)
        while len(src):
            take = min(len(src), len(self.buf) - self.filled)
            self.buf[self.filled:self.filled + take] = np.frombuffer(src[:take], np.uint8)
            self.filled += take
            src = src[take:]
            if self.filled == len(self.buf):
                self._flush(self.filled)
        return size

    def _rewrite(self, data: memoryview, offset: int) -> None:
        """Write `data` over bytes at `offset`, all below the end."""
        in_file = max(0, min(len(data), self.written - offset))
        if in_file:
            self._wait()  # the page may be in the write under way
            _pwrite_all(self.fd, data[:in_file], offset)
        rest = data[in_file:]
        if len(rest):
            at = offset + in_file - self.written
            self.buf[at:at + len(rest)] = np.frombuffer(rest, np.uint8)

    def _write(self, data: memoryview, offset: int) -> None:
        if self.direct is not None:
            try:
                return _pwrite_all(self.direct, data, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                os.close(self.direct)
                self.direct = None
        _pwrite_all(self.fd, data, offset)

    def _wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def _flush(self, nbytes: int) -> None:
        """Start writing the first `nbytes` (a multiple of PAGE) of buf; the rest moves to
        the other buffer, which is filled next."""
        self._wait()  # the other buffer's write is done: it is free
        self.pending = writer_thread().submit(self._write, memoryview(self.buf)[:nbytes],
                                           self.written)
        self.written += nbytes
        rest = self.filled - nbytes
        self.spare[:rest] = self.buf[nbytes:self.filled]
        self.buf, self.spare = self.spare, self.buf
        self.filled = rest

    def close(self) -> int:
        """Write what is left; returns the file's length."""
        length = self.written + self.filled
        whole = self.filled // PAGE * PAGE
        if whole:
            self._flush(whole)
        if self.filled:  # the last partial page: padded to a whole one, then cut off
            self.buf[self.filled:PAGE] = 0
            self.filled = PAGE
            self._flush(PAGE)
        self._wait()
        if length != self.written:
            os.ftruncate(self.fd, length)
        self.abort()
        return length

    def abort(self) -> None:
        try:
            self._wait()
        finally:
            for fd in (self.direct, self.fd):
                if fd is not None:
                    os.close(fd)
            self.direct = self.fd = None
            if self.buf is not None:
                _FREE_BUFFERS.extend((self.buf, self.spare))
                self.buf = self.spare = None


# page-aligned buffers of writers that are closed, for the process's next writers (a fresh
# one is paged in again: a fault and a zeroed page every 4 KB)
_FREE_BUFFERS: List[np.ndarray] = []


def _buffer(size: int) -> np.ndarray:
    for i, buf in enumerate(_FREE_BUFFERS):
        if len(buf) == size:
            return _FREE_BUFFERS.pop(i)
    return phase_aligned(size, 0)


def release_buffers() -> None:
    """Free the buffers kept for later writers."""
    _FREE_BUFFERS.clear()


_THREADS: Dict[str, Tuple[int, ThreadPoolExecutor]] = {}


def thread(name: str, count: int = 1) -> ThreadPoolExecutor:
    """This process's thread `name` (a forked child makes its own): what is handed to it
    runs one at a time, in order; or with `count` > 1 (the same at every call), that many
    threads, each taking the next thing handed. A worker process joins them as it exits."""
    pid, pool = _THREADS.get(name, (0, None))
    if pool is None or pid != os.getpid():
        pool = ThreadPoolExecutor(count, thread_name_prefix=name)
        _THREADS[name] = (os.getpid(), pool)
    return pool


def finish_thread(name: str) -> None:
    """Wait for what this process handed to its thread `name`, and end the thread."""
    pid, pool = _THREADS.pop(name, (0, None))
    if pool is not None and pid == os.getpid():
        pool.shutdown(wait=True)


def background() -> ThreadPoolExecutor:
    """This process's I/O thread: the reads and writes handed to it run one at a time, in
    the order given (so a buffer handed to a read after a write of it is free again), while
    the caller computes; one per process."""
    return thread("direct-io")


READ_THREADS = 2


def parallel_reads() -> ThreadPoolExecutor:
    """This process's READ_THREADS threads for reads that need no order among them (the
    place's record parts, about 1 MB each): the disk serves two such reads at once faster
    than one after the other (on a 2-core VM, O_DIRECT reads of 1 MB moved 0.9 GB/s one at
    a time, 1.5 GB/s two at a time, 1.7 GB/s four at a time)."""
    return thread("direct-reads", READ_THREADS)


def writer_thread() -> ThreadPoolExecutor:
    """This process's thread for `DirectWriter`s' buffers, beside the I/O thread: a
    writer's buffer is its own, so it needs no order with the reads, and the disk serves a
    read and a write at once faster than one after the other (a parse task waited 10 % of
    its time on its writes queued behind its reads)."""
    return thread("direct-writer")
