"""Materialised multi-hot bags: MLPerf DLRM-DCNv2's `day_{d}_sparse_multi_hot.npz`.

The MLPerf reference (`materialize_synthetic_multihot_dataset.py` of TorchRec's DLRM example)
expands the one-hot Criteo ids into fixed-size bags once and stores them per day as an
uncompressed .npz: members `0.npy` .. `25.npy`, member f an int32 (rows, bag size of f)
array. The MLPerf quality target is defined on that data, so it is read as it is: every
member is memory-mapped in place inside the zip file (numpy's own `np.load` would read a
whole member into memory), and rows are taken from all 26 together.
"""

import os
import struct
import zipfile
from typing import List, Sequence

import numpy as np

from dlrm_torchrec.data.file_checks import expected_size, read_npy_header

LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra length


class NpzError(Exception):
    """A file that cannot be memory-mapped as materialised bags (message names it)."""


def member_memmap(path: str, member: str) -> np.ndarray:
    """The .npy `member` of the uncompressed zip `path`, memory-mapped read-only."""
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(member)
    except KeyError:
        raise NpzError(f"{path}: no member {member}") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise NpzError(f"{path}: not a readable .npz file ({e})") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise NpzError(f"{path}: member {member} is compressed (np.savez_compressed); only "
                       "uncompressed .npz (np.savez) can be memory-mapped")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        sig, name_len, extra_len = LOCAL_HEADER.unpack(f.read(LOCAL_HEADER.size))
        if sig != b"PK\x03\x04":
            raise NpzError(f"{path}: member {member}: no zip local header where the index says")
        # the local header's own extra field (zip64 sizes) may differ from the index's
        f.seek(info.header_offset + LOCAL_HEADER.size + name_len + extra_len)
        try:
            shape, fortran, dtype = read_npy_header(f)
        except ValueError as e:
            raise NpzError(f"{path}: member {member} is not a .npy array ({e})") from None
        offset = f.tell()
    if dtype.hasobject:
        raise NpzError(f"{path}: member {member} holds Python objects")
    size, want = os.path.getsize(path), expected_size(offset, shape, dtype)
    if size < want:
        raise NpzError(f"{path}: {size} bytes, but member {member} ({dtype} {tuple(shape)}) "
                       f"needs {want}: the file is truncated")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset,
                     order="F" if fortran else "C")


class MaterialisedBags:
    """The F per-feature (rows, bag size) id arrays of a day, indexed together by row: a
    slice or an index array gives the same rows of every feature."""

    def __init__(self, columns: Sequence[np.ndarray]):
        self.columns = list(columns)

    @classmethod
    def open(cls, path: str, num_features: int) -> "MaterialisedBags":
        return cls([member_memmap(path, f"{f}.npy") for f in range(num_features)])

    @classmethod
    def concat(cls, parts: Sequence["MaterialisedBags"]) -> "MaterialisedBags":
        return cls([np.concatenate(cols) for cols in zip(*(p.columns for p in parts))])

    @property
    def bag_sizes(self) -> List[int]:
        return [c.shape[1] for c in self.columns]

    def __len__(self) -> int:
        return len(self.columns[0])

    def __getitem__(self, rows) -> "MaterialisedBags":
        return MaterialisedBags([c[rows] for c in self.columns])

    def values(self, table_sizes: np.ndarray, fold: Sequence[int]) -> np.ndarray:
        """All ids as make_batch takes them (feature-major, then sample, then position in
        the bag), int64; features in `fold` taken mod their table size."""
        out = np.empty(sum(c.size for c in self.columns), dtype=np.int64)
        pos = 0
        fold = set(fold)
        for f, c in enumerate(self.columns):
            part = out[pos:pos + c.size].reshape(c.shape)
            part[...] = c
            if f in fold:
                part %= table_sizes[f]
            pos += c.size
        return out
