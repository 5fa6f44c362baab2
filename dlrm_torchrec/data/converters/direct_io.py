"""Writes that bypass the page cache (Linux O_DIRECT), for prepare_mlperf's large files.

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
from typing import Optional

import numpy as np

PAGE = 4096  # the alignment O_DIRECT needs here: the page size, a multiple of any block size


def phase_aligned(nbytes: int, phase: int) -> np.ndarray:
    """(nbytes,) uint8 whose address % PAGE == phase % PAGE."""
    raw = np.empty(nbytes + PAGE, np.uint8)
    skip = (phase - raw.ctypes.data) % PAGE
    return raw[skip:skip + nbytes]


def _open_direct(path: str) -> Optional[int]:
    """`path` opened for O_DIRECT writes, or None where its file system refuses them."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
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


def write_at(path: str, data: np.ndarray, offset: int) -> None:
    """Write the bytes of `data` (contiguous) into the existing file `path` at `offset`:
    its whole pages with O_DIRECT when its address has the offset's phase, the rest
    (or all of it) through the page cache."""
    view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
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
    `buffer_bytes`, whose whole pages go to the file with O_DIRECT; `close` writes the last
    partial page padded, then cuts the file to its length. Through the page cache where the
    file system refuses O_DIRECT."""

    def __init__(self, path: str, buffer_bytes: int = 8 << 20):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self.direct = _open_direct(path)
        self.buf = phase_aligned(max(PAGE, buffer_bytes // PAGE * PAGE), 0)
        self.filled = 0  # bytes waiting in buf
        self.written = 0  # bytes in the file (a multiple of PAGE until close)

    def write(self, data) -> None:
        src = memoryview(data).cast("B")
        while len(src):
            take = min(len(src), len(self.buf) - self.filled)
            self.buf[self.filled:self.filled + take] = np.frombuffer(src[:take], np.uint8)
            self.filled += take
            src = src[take:]
            if self.filled == len(self.buf):
                self._flush(self.filled)

    def _flush(self, nbytes: int) -> None:
        """Write the first `nbytes` (a multiple of PAGE) of buf, keep the rest."""
        out = memoryview(self.buf)[:nbytes]
        if self.direct is not None:
            try:
                _pwrite_all(self.direct, out, self.written)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                os.close(self.direct)
                self.direct = None
        if self.direct is None:
            _pwrite_all(self.fd, out, self.written)
        self.written += nbytes
        rest = self.filled - nbytes
        self.buf[:rest] = self.buf[nbytes:self.filled].copy()
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
            os.ftruncate(self.fd, length)
        self.abort()
        return length

    def abort(self) -> None:
        for fd in (self.direct, self.fd):
            if fd is not None:
                os.close(fd)
        self.direct = self.fd = None
