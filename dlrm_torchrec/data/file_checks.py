"""Checks of the files the data tools read and the folders they write, shared by
preprocessing, the adoption commands, the Criteo loader and scoring, so that each kind of
damaged or mistaken file is named the same way everywhere.

- `input_problem`: why a path cannot be read as an input file (missing, a folder, ...).
- `output_folder_problem`: why a folder cannot be created or written, found before any work.
- `fingerprint` / `fingerprint_change`: an input file identified by its content, so a rerun
  that would resume an earlier output can tell whether the input is still the same.
- `read_npy_header` / `open_npy`: a .npy file memory-mapped after checking that it holds as
  many bytes as its header promises (a truncated copy otherwise fails deep inside numpy).
"""

import hashlib
import os
from typing import BinaryIO, Optional, Tuple

import numpy as np

# fingerprints: files up to FULL_HASH_BYTES are hashed whole; larger ones by their size and
# three SAMPLE_BYTES blocks (head, middle, tail), a few milliseconds whatever the size
SAMPLE_BYTES = 1 << 20
FULL_HASH_BYTES = 4 * SAMPLE_BYTES


def input_problem(path: str) -> Optional[str]:
    """Why `path` cannot be read as an input file ("not found", "a folder, not a file",
    ...), or None when it can."""
    if os.path.isdir(path):
        return "a folder, not a file"
    if not os.path.exists(path):
        return "a broken symbolic link" if os.path.islink(path) else "not found"
    if not os.path.isfile(path):
        return "not a regular file"
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return None


def output_folder_problem(path: str) -> Optional[str]:
    """Why the output folder `path` cannot be created or written into, or None.

    The first existing folder above a missing `path` must be a writable folder: a regular
    file there (`-o results.txt/out`) would otherwise fail at the first write."""
    full = os.path.abspath(path)
    if os.path.lexists(full):
        if not os.path.isdir(full):
            return f"{path} exists and is not a folder"
        if not os.access(full, os.W_OK | os.X_OK):
            return f"{path} is not writable"
        return None
    parent = os.path.dirname(full)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot create {path}: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {path}: {parent} is not writable"
    return None


def fingerprint(path: str) -> dict:
    """What identifies the content of input file `path`: its name, size, modification time
    and a BLAKE2b hash of its size and bytes (the whole file up to FULL_HASH_BYTES, else
    the head, middle and tail SAMPLE_BYTES). Deleting or adding lines changes the size, an
    edit in place the modification time, another file of the same name and size the
    sampled bytes."""
    size = os.path.getsize(path)
    h = hashlib.blake2b(digest_size=16)
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            h.update(f.read())
        else:
            for start in (0, (size - SAMPLE_BYTES) // 2, size - SAMPLE_BYTES):
                f.seek(start)
                h.update(f.read(SAMPLE_BYTES))
        mtime_ns = os.fstat(f.fileno()).st_mtime_ns
    return {"name": os.path.basename(path), "size": size, "mtime_ns": mtime_ns,
            "hash": h.hexdigest()}


def fingerprint_change(old: dict, new: dict) -> Optional[str]:
    """How the file of fingerprint `old` differs from that of `new`, or None if the same."""
    if old.get("size") != new["size"]:
        return f"its size changed ({old.get('size')} bytes then, {new['size']} now)"
    if old.get("hash") != new["hash"]:
        return "its content changed (same size, other bytes)"
    if old.get("mtime_ns") != new["mtime_ns"]:
        return ("it was modified since (same size and sampled bytes, another modification "
                "time; if it is the same file, give it back its time, e.g. copy it with "
                "cp -p)")
    return None


def read_npy_header(f: BinaryIO) -> Tuple[Tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy array at `f`'s position, which is left at
    the first data byte; ValueError when it is not one."""
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    return read(f)


def expected_size(offset: int, shape: Tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes a file needs for an array of `shape` and `dtype` whose data starts at `offset`."""
    return offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def open_npy(path: str) -> np.ndarray:
    """The .npy file `path`, memory-mapped read-only. ValueError naming the file when it is
    not a .npy array, holds Python objects, or is shorter than its header says (a copy or
    download cut short: numpy's own message is "mmap length is greater than file size")."""
    try:
        with open(path, "rb") as f:
            shape, fortran, dtype = read_npy_header(f)
            offset = f.tell()
    except ValueError as e:
        raise ValueError(f"{path}: not a NumPy .npy file ({e})") from None
    if dtype.hasobject:
        raise ValueError(f"{path}: holds Python objects, not numbers")
    size, want = os.path.getsize(path), expected_size(offset, shape, dtype)
    if size < want:
        raise ValueError(f"{path}: {size} bytes, but its header ({dtype} {tuple(shape)}) needs "
                         f"{want}: the file is truncated")
    return np.load(path, mmap_mode="r", allow_pickle=False)
