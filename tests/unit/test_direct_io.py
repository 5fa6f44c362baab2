"""direct_io: writes and reads past the page cache give exactly the bytes of plain file
writes and reads (a bytearray model of the file), whatever the offsets, lengths and memory
phases, where O_DIRECT is taken and where it is refused."""

import multiprocessing as mp
import os

import numpy as np
import pytest

from dlrm_torchrec.data.converters import direct_io
from dlrm_torchrec.data.converters.direct_io import (
    PAGE,
    DirectWriter,
    phase_aligned,
    read_at,
    write_at,
)


@pytest.fixture(params=["direct", "refused"])
def mode(request, monkeypatch):
    """Each test twice: as the file system allows, and with O_DIRECT refused (tmpfs)."""
    if request.param == "refused":
        monkeypatch.setattr(direct_io, "_open_direct", lambda path, flags=os.O_WRONLY: None)
    return request.param


def _random_bytes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


# (offset, length): inside one page, across one boundary, many whole pages with partial
# ends, starting and ending on boundaries
SPANS = [(5, 100), (PAGE - 10, 30), (123, 5 * PAGE + 77), (2 * PAGE, 3 * PAGE), (0, 1)]


@pytest.mark.parametrize("offset, length", SPANS)
@pytest.mark.parametrize("in_phase", [True, False])
def test_write_at_leaves_exactly_the_bytes_a_plain_write_leaves(tmp_path, mode, offset,
                                                                 length, in_phase):
    path = str(tmp_path / "f")
    model = bytearray(_random_bytes(8 * PAGE + 11, 0).tobytes())
    with open(path, "wb") as f:
        f.write(model)
    data = phase_aligned(length, offset if in_phase else offset + 1)
    data[:] = _random_bytes(length, 1)
    write_at(path, data, offset)
    model[offset:offset + length] = data.tobytes()
    with open(path, "rb") as f:
        assert f.read() == bytes(model)


@pytest.mark.parametrize("offset, length", SPANS)
@pytest.mark.parametrize("in_phase", [True, False])
def test_read_at_returns_the_files_bytes(tmp_path, mode, offset, length, in_phase):
    path = str(tmp_path / "f")
    content = _random_bytes(8 * PAGE + 11, 2)
    content.tofile(path)
    out = phase_aligned(length, offset if in_phase else offset + 3)
    assert read_at(path, out, offset) == length
    assert out.tobytes() == content[offset:offset + length].tobytes()


def test_read_at_reports_the_bytes_there_are_where_the_file_ends(tmp_path, mode):
    path = str(tmp_path / "f")
    content = _random_bytes(3 * PAGE + 100, 3)
    content.tofile(path)
    for offset in (PAGE + 5, 2 * PAGE):
        out = phase_aligned(4 * PAGE, offset)
        got = read_at(path, out, offset)
        assert got == len(content) - offset
        assert out[:got].tobytes() == content[offset:].tobytes()


def _fill(path: str, offset: int, length: int, seed: int) -> None:
    data = phase_aligned(length, offset)
    data[:] = _random_bytes(length, seed)
    write_at(path, data, offset)


def test_two_processes_filling_the_two_sides_of_a_page_lose_neither(tmp_path):
    """The place stage's case: neighbouring buckets written by different workers at once,
    sharing the page where one ends and the next begins."""
    path = str(tmp_path / "f")
    size, cut = 40 * PAGE + 123, 17 * PAGE + 1000
    with open(path, "wb") as f:
        f.truncate(size)
    ctx = mp.get_context("fork")
    for _ in range(5):
        procs = [ctx.Process(target=_fill, args=(path, 0, cut, 4)),
                 ctx.Process(target=_fill, args=(path, cut, size - cut, 5))]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            assert p.exitcode == 0
        with open(path, "rb") as f:
            got = f.read()
        assert got[:cut] == _random_bytes(cut, 4).tobytes()
        assert got[cut:] == _random_bytes(size - cut, 5).tobytes()


@pytest.mark.parametrize("buffer_bytes", [PAGE, 3 * PAGE, 1 << 20])
def test_direct_writer_writes_the_stream_and_cuts_the_file_to_its_length(tmp_path, mode,
                                                                          buffer_bytes):
    path = str(tmp_path / "f")
    rng = np.random.default_rng(6)
    pieces = [_random_bytes(int(n), i) for i, n in
              enumerate(rng.integers(0, 3 * PAGE, 40).tolist() + [1, 0, PAGE])]
    w = DirectWriter(path, buffer_bytes)
    for p in pieces:
        w.write(p)
    expected = np.concatenate(pieces).tobytes()
    assert w.close() == len(expected)
    with open(path, "rb") as f:
        assert f.read() == expected


def test_direct_writer_of_nothing_leaves_an_empty_file(tmp_path, mode):
    path = str(tmp_path / "f")
    assert DirectWriter(path).close() == 0
    assert os.path.getsize(path) == 0
