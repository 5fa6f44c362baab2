"""`python -m dlrm_torchrec.data.prepare_mlperf` against TorchRec's own installed scripts:
npy_preproc_criteo.py, contiguous_preproc_criteo.py --frequency_threshold 0 (its files
renamed to day_{d}_sparse.npy, as MLPerf's instructions do) and shuffle_preproc_criteo.py
--random_seed 0 run on the same 24 generated days are the oracle, compared file by file,
byte by byte; also after a run killed mid-way and restarted, and for bad inputs."""

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dlrm_torchrec.cli import prepare_mlperf as cli
from dlrm_torchrec.config import load_config
from dlrm_torchrec.data import criteo_text as ct
from dlrm_torchrec.data.converters import direct_io, native
from dlrm_torchrec.data.converters import prepare_mlperf as pm
from tests.helpers.dist_utils import run_ranks
from tests.helpers.torchrec_preprocessing import raw_row

ROWS_PER_DAY = 300
# small enough that each day's destinations fall into several buckets
MEMORY = ["--memory-gb", "0.0002"]


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    """24 days in Criteo's shape (hex ids up to 2**32, missing values, negative dense
    values), and what TorchRec's three scripts make of them."""
    from torchrec.datasets.scripts import (
        contiguous_preproc_criteo,
        npy_preproc_criteo,
        shuffle_preproc_criteo,
    )

    root = tmp_path_factory.mktemp("mlperf")
    rng = random.Random(5)
    raw = root / "raw"
    raw.mkdir()
    for d in range(pm.DAYS):
        (raw / f"day_{d}").write_text(
            "".join(raw_row(rng) + "\n" for _ in range(ROWS_PER_DAY + d)))
    npy, contig, shuffled = root / "npy", root / "contig", root / "shuffled"
    for folder in (npy, contig, shuffled):
        folder.mkdir()
    npy_preproc_criteo.main(["--input_dir", str(raw), "--output_dir", str(npy)])
    contiguous_preproc_criteo.main(["--input_dir", str(npy), "--output_dir", str(contig),
                                    "--frequency_threshold", "0"])
    for d in range(pm.DAYS):
        os.replace(contig / f"day_{d}_sparse_contig_freq.npy", contig / f"day_{d}_sparse.npy")
    shuffle_preproc_criteo.main(["--input_dir_labels_and_dense", str(npy), "--input_dir_sparse",
                                 str(contig), "--output_dir_shuffled", str(shuffled),
                                 "--random_seed", "0"])
    # our inputs: the same text, two days gzipped as downloaded
    ours = root / "inputs"
    ours.mkdir()
    inputs = []
    for d in range(pm.DAYS):
        src = raw / f"day_{d}"
        if d in (3, 23):
            dst = ours / f"day_{d}.gz"
            dst.write_bytes(gzip.compress(src.read_bytes()))
        else:
            dst = ours / f"day_{d}"
            shutil.copy(src, dst)
        inputs.append(str(dst))
    return {"inputs": inputs, "oracle": shuffled}


def expected_files():
    return sorted(f"day_{d}_{p}.npy" for d in range(pm.DAYS) for p in ("dense", "sparse", "labels"))


def assert_same_as_oracle(out, oracle):
    names = sorted(n for n in os.listdir(out) if n.endswith(".npy"))
    assert names == expected_files()
    for name in names:
        assert (out / name).read_bytes() == (oracle / name).read_bytes(), name


def test_files_are_byte_identical_to_torchrecs_three_scripts(days, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(days["inputs"] + ["-o", str(out), "--workers", "2"] + MEMORY) == 0
    assert_same_as_oracle(out, days["oracle"])
    assert not (out / ".prepare").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["rows_per_day"] == [ROWS_PER_DAY + d for d in range(24)]
    # the oracle's ids, read independently: the table sizes are their largest + 1
    top = np.max([np.load(days["oracle"] / f"day_{d}_sparse.npy").max(axis=0)
                  for d in range(24)], axis=0)
    assert meta["table_sizes"] == (top + 1).tolist()
    assert "rows written" in capsys.readouterr().err


def test_lines_cut_across_the_blocks_the_text_is_read_in_keep_their_rows(days, tmp_path,
                                                                         monkeypatch):
    """The raw text read in blocks of two pages (not 8 MB): most lines start in one block
    and end in the next, and the last block is short. Each block's rows are packed on
    their own, and the scatter reads chunks of 100 rows and unpacks them 37 at a time,
    both starting and ending inside the packs."""
    monkeypatch.setattr(pm, "CHUNK_BYTES", 2 * direct_io.PAGE)
    monkeypatch.setattr(pm, "MAX_CHUNK_BYTES", 2 * direct_io.PAGE)
    monkeypatch.setattr(pm, "MIN_CHUNK_ROWS", 100)
    monkeypatch.setattr(pm, "SCATTER_BLOCK_ROWS", 37)
    out = tmp_path / "out"
    assert cli.main(days["inputs"] + ["-o", str(out), "--workers", "1"] + MEMORY) == 0
    assert_same_as_oracle(out, days["oracle"])


@pytest.mark.parametrize("kill_at", ["scatter:7", "place:15"])
def test_a_killed_run_restarted_writes_the_same_bytes(days, tmp_path, kill_at):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dlrm_torchrec.data.prepare_mlperf", *days["inputs"], "-o",
           str(out), "--workers", "2", *MEMORY]
    env = dict(os.environ, DLRM_PREPARE_KILL_AFTER=kill_at)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "meta.json").exists() and (out / ".prepare").is_dir()
    assert cli.main(days["inputs"] + ["-o", str(out), "--workers", "2"] + MEMORY) == 0
    assert_same_as_oracle(out, days["oracle"])


def test_the_place_stage_removes_what_only_the_scatter_read_and_a_rerun_needs_none_of_it(
        days, tmp_path):
    out = tmp_path / "out"
    work = out / ".prepare"
    for stage in ("parse", "vocab", "scatter", "place"):
        assert cli.main(days["inputs"] + ["-o", str(out), "--workers", "2", "--stage", stage]
                        + MEMORY) == 0
    assert not list((work / "vocab").glob("map_*.npy")) and not (work / "destinations").exists()
    assert not list((work / "parse").glob("day_*/first.npy"))
    assert len(list((work / "vocab").glob("count_*.json"))) == 26  # the place reads these
    # the whole command again: the vocabulary stage is not redone (its inputs are gone too)
    assert cli.main(days["inputs"] + ["-o", str(out), "--workers", "2"] + MEMORY) == 0
    assert_same_as_oracle(out, days["oracle"])


def test_malformed_rows_are_dropped_and_reported_on_request(days, tmp_path, capsys):
    inputs = list(days["inputs"])
    (tmp_path / "bad").mkdir()
    text = open(inputs[7]).read().splitlines(keepends=True)
    text.insert(10, "1\t2\tx\n")  # line 11: too few columns
    text.insert(20, text[19].replace("\t", "\tzz", 1))  # line 21: a non-integer dense value
    bad = tmp_path / "bad" / "day_7"
    bad.write_text("".join(text))
    inputs[7] = str(bad)
    out = tmp_path / "out"
    assert cli.main(inputs + ["-o", str(out)] + MEMORY) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad}:11: wrong column count: 3 columns, expected 40 "
                   "(--drop-malformed drops such rows)"]
    assert not (out / "meta.json").exists()
    shutil.rmtree(out)
    # day 9, line 101: a dense value far below the day's others, then an id that is not
    # hex: the compiled parser stops at it (the only line of its day the exact parser
    # takes), and the dropped row's values must not count towards the day's smallest
    text = open(inputs[9]).read().splitlines(keepends=True)
    fields = text[100].rstrip("\n").split("\t")
    fields[1], fields[20] = "-99999", "zz"
    text.insert(100, "\t".join(fields) + "\n")
    low = tmp_path / "bad" / "day_9"
    low.write_text("".join(text))
    inputs[9] = str(low)
    assert cli.main(inputs + ["-o", str(out), "--drop-malformed", "--workers", "2"] + MEMORY) == 0
    err = capsys.readouterr().err
    assert f"{bad}: 2 malformed row(s) dropped" in err
    assert "1 x non-integer dense value: line 21 (column I1" in err
    assert f"{low}: 1 malformed row(s) dropped" in err and "line 101" in err
    # without the three bad lines the data are TorchRec's
    assert_same_as_oracle(out, days["oracle"])


def _error(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_input_mistakes_stop_before_any_work(days, tmp_path, capsys, monkeypatch):
    inputs, out = days["inputs"], tmp_path / "out"
    o = ["-o", str(out)]
    assert "missing day(s) day_12" in _error(capsys, inputs[:12] + inputs[13:] + o)
    swapped = inputs[:4] + [inputs[5], inputs[4]] + inputs[6:]
    assert "given as day 4; give the days in order" in _error(capsys, swapped + o)
    assert "not found" in _error(capsys, inputs[:-1] + [str(tmp_path / "day_23")] + o)
    (tmp_path / "a_file").write_text("")
    under_file = str(tmp_path / "a_file" / "out")
    assert f"-o {under_file}: cannot create {under_file}: {tmp_path / 'a_file'} is a file" in \
        _error(capsys, inputs + ["-o", under_file])
    monkeypatch.setattr(pm.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 10 ** 6))
    msg = _error(capsys, inputs + o)
    assert "0.0 GB free, but the preparation needs about" in msg and "GB more" in msg
    assert not out.exists()


def test_a_work_folder_of_other_settings_or_another_version_is_not_resumed(days, tmp_path,
                                                                              capsys):
    out = tmp_path / "out"
    argv = days["inputs"] + ["-o", str(out)] + MEMORY
    assert cli.main(argv + ["--stage", "parse"]) == 0
    capsys.readouterr()
    assert "other settings (exact_ids)" in _error(capsys, argv + ["--exact-ids"])
    settings = out / ".prepare" / "settings.json"
    older = json.loads(settings.read_text())
    del older["work_format"]  # as a version before the rows were packed wrote it
    settings.write_text(json.dumps(older))
    msg = _error(capsys, argv)
    assert "of another version of this tool; remove" in msg and str(out / ".prepare") in msg


def test_dense_values_outside_int32_stop_with_file_and_line(days, tmp_path, capsys):
    inputs = list(days["inputs"])
    text = open(inputs[0]).read().splitlines(keepends=True)
    text[4] = text[4].replace("\t", f"\t{2 ** 31}", 1)
    bad = tmp_path / "day_0"
    bad.write_text("".join(text))
    msg = _error(capsys, [str(bad)] + inputs[1:] + ["-o", str(tmp_path / "out")])
    assert msg.startswith(f"error: {bad}:5: dense value outside int32")


# every value in 4 bytes: records of native.RECORD_DTYPE
WIDEST = np.full(native.RECORD_COLUMNS, 4, np.uint8)


def _records(records: np.ndarray) -> np.ndarray:
    """Scattered records (n, RECORD_BYTES) uint8, every value 4 bytes wide, as their fields."""
    return records.view(native.RECORD_DTYPE)[:, 0]


def _rows(labels: np.ndarray, local: list, dense=None) -> np.ndarray:
    """Parsed rows (native.ROW_WORDS uint32 words) with these labels, raw dense values ((n,
    13) int, or 0) and per-feature local numbers, built field by field."""
    rows = np.zeros((len(labels), native.ROW_WORDS), np.uint32)
    rows[:, 0] = labels
    if dense is not None:
        rows[:, 1:14] = np.asarray(dense, np.int64).astype(np.int32).view(np.uint32)
    for f, column in enumerate(local):
        rows[:, 14 + f] = column
    return rows


def test_ids_pass_through_float32_as_torchrecs_shuffle_casts_them():
    # float32 has 24 bits of mantissa: above 2**24 ids are rounded to even multiples
    ids = np.array([2 ** 24 - 1, 2 ** 24, 2 ** 24 + 1, 2 ** 24 + 3, 2 ** 25 + 2, 2 ** 25 + 3],
                   dtype=np.uint32)
    n = len(ids)
    records = np.empty((n, native.RECORD_BYTES), np.uint8)
    native.scatter_records(_rows(np.zeros(n, np.int32), [np.arange(n, dtype=np.uint32)] * 26),
                           0, [ids] * 26, False, np.arange(n, dtype=np.uint32),
                           np.zeros(1, np.int64), WIDEST, records)
    assert _records(records)["sparse"][:, 0].tolist() == [
        2 ** 24 - 1, 2 ** 24, 2 ** 24, 2 ** 24 + 4, 2 ** 25, 2 ** 25 + 4]


def _parser_arrays(labels, dense, sparse):
    """The parser's arrays for rows given row-major: labels (n,), dense (n, 13), ids (n, 26)."""
    return (np.asarray(labels, np.int32), np.asarray(dense, np.int32),
            np.ascontiguousarray(np.asarray(sparse, np.uint32).T))


def test_packed_rows_store_each_column_in_the_bytes_its_range_needs():
    # the label and dense columns less their smallest; the ids (day-local numbers) as they
    # are, in the bytes the largest number the day's table could have given needs
    dense = np.zeros((2, 13), np.int64)
    dense[:, 0] = [-2, 300]  # range 302: two bytes, 0 and 302 stored
    dense[:, 1] = [-2 ** 31, 2 ** 31 - 1]  # the whole int32 range: four bytes
    sparse = np.zeros((2, 26), np.int64)  # all 0, below an id_top of 0: no bytes at all
    sparse[:, 5] = [300, 2]
    id_top = np.zeros(26, np.uint32)
    id_top[5] = 300  # two bytes
    pack, packed = native.pack_rows(*_parser_arrays([1, 0], dense, sparse), id_top,
                                    np.zeros(2 * 160 + native.PACK_ROOM, np.uint8))
    assert pack.widths.tolist() == [1, 2, 4] + [0] * 11 + [0] * 5 + [2] + [0] * 20
    assert pack.row_bytes == 9 and pack.bases[:3].view(np.int32).tolist() == [0, -2, -2 ** 31]
    assert not pack.bases[14:].any()
    # row 0: label 1, 0 (2 bytes), 0 (4 bytes), 300; row 1: label 0, 302, 2**32 - 1, 2
    assert packed.tobytes() == bytes([1, 0, 0, 0, 0, 0, 0, 44, 1,
                                      0, 46, 1, 255, 255, 255, 255, 2, 0])
    id_top[5] = 299
    with pytest.raises(ValueError, match="above its feature's id_top"):
        native.pack_rows(*_parser_arrays([1, 0], dense, sparse), id_top,
                         np.zeros(2 * 160 + native.PACK_ROOM, np.uint8))


@pytest.mark.parametrize("n", [1, 7, 3000])
def test_packed_rows_unpack_to_the_rows_even_over_their_own_bytes(n):
    rng = np.random.default_rng(n)
    labels = rng.integers(0, 2, n)
    dense = rng.integers(-5, 5000, (n, 13))
    dense[:, 4] = rng.integers(-2 ** 31, 2 ** 31, n)
    tops = np.array([0, 2 ** 8 - 1, 2 ** 16 - 1, 2 ** 24 - 1, 2 ** 32 - 1] * 5 + [1000])
    sparse = rng.integers(0, tops + 1, (n, 26))
    pack, packed = native.pack_rows(*_parser_arrays(labels, dense, sparse),
                                    tops.astype(np.uint32),
                                    np.zeros(n * 160 + native.PACK_ROOM, np.uint8))
    assert len(packed) == n * pack.row_bytes < n * 160
    want = np.concatenate([labels[:, None], dense, sparse], axis=1).astype(np.int64) % 2 ** 32
    # the rows written over the packed bytes, which end where the rows do
    space = np.zeros(n * 160 + native.PACK_ROOM, np.uint8)
    space[n * 160 - len(packed):n * 160] = packed
    rows = space[:n * 160].view(np.uint32).reshape(n, native.ROW_WORDS)
    native.unpack_rows(pack, space[n * 160 - len(packed):n * 160], rows)
    assert (rows == want).all()


def test_id_tables_number_values_in_order_of_first_sight_across_calls():
    table = native.IdTable(2, keep_order=True)
    got = [table.assign(np.array(block, dtype=np.uint32)).tolist()
           for block in ([7, 3, 7, 9], [3, 1, 9], [], [5, 1, 7, 0, 2 ** 32 - 1])]
    assert got == [[2, 3, 2, 4], [3, 5, 4], [], [6, 5, 2, 7, 8]]
    assert table.order().tolist() == [7, 3, 9, 1, 5, 0, 2 ** 32 - 1] and len(table) == 7


def test_id_tables_match_a_dictionary_through_many_resizes_and_strided_columns():
    rng = np.random.default_rng(0)
    # clustered and spread values, so probes collide and the table doubles many times
    values = np.concatenate([rng.integers(0, 3000, 40_000), rng.integers(0, 2 ** 32, 60_000),
                             np.arange(0, 2 ** 32, 2 ** 20)]).astype(np.uint32)
    rng.shuffle(values)
    columns = values.reshape(-1, 4)  # numbered one strided column at a time, in place
    want, order = {}, []
    for v in columns.T.ravel().tolist():
        if v not in want:
            want[v] = len(want)
            order.append(v)
    table = native.IdTable(0, keep_order=True)
    expect = np.vectorize(want.get, otypes=[np.uint32])(columns.T.copy())
    for c in range(4):
        table.assign(columns[:, c], out=columns[:, c])
    assert (columns.T == expect).all()
    assert table.order().tolist() == order


def _train(rank, world_size, overrides):
    from dlrm_torchrec.train.job import train

    train(load_config("configs/mlperf_dcnv2.yaml", overrides))


@pytest.mark.slow
def test_prepared_folder_trains_with_the_mlperf_config(days, tmp_path):
    out = tmp_path / "out"
    assert cli.main(days["inputs"] + ["-o", str(out), "--workers", "2"]) == 0
    run_dir = tmp_path / "run"
    run_ranks(1, _train, [
        f"data.path={out}", "embeddings.max_ind_range=500", "embeddings.dim=16",
        "model.dcn_low_rank_dim=8", "model.bottom_mlp=[32,16]", "model.top_mlp=[32,1]",
        "data.batch_size=1024", "data.eval_batch_size=512", "training.eval_every_n_steps=0",
        f"logging.run_dir={run_dir}", "logging.progress_bar=false", "checkpoint.at_end=false",
    ])
    m = json.loads((run_dir / "metrics.json").read_text())
    train_rows = sum(ROWS_PER_DAY + d for d in range(23))
    assert m["train_samples_seen"] == train_rows
    assert m["final"]["split"] == "val" and m["final"]["samples"] == -(-(ROWS_PER_DAY + 23) // 2)


def test_compiled_parser_gives_the_exact_parsers_values_and_stops_where_it_must():
    from tests.helpers.criteo_rows import bad_rows, good_row

    rng = random.Random(3)
    rows = [good_row(rng) for _ in range(3000)]
    fits = [r for r in rows if all(-2 ** 31 <= int(x or 0) < 2 ** 31 for x in r.split("\t")[1:14])]
    text = np.frombuffer("".join(r + "\n" for r in fits).encode(), np.uint8)
    buffers = native.ParseBuffers(len(fits))
    n, used, stop, low = buffers.parse(text.ctypes.data, len(text))
    want = ct.parse_chunk(text.tobytes(), 1, raw_dense=True)
    assert (n, used, stop) == (len(fits), len(text), 0) and len(want.labels) == n
    assert low == want.dense_raw.min()
    assert (buffers.labels[:n] == want.labels).all()
    assert (buffers.dense[:n] == want.dense_raw).all()
    assert (buffers.sparse[:, :n].T == want.sparse).all()
    # full arrays: it stops after the rows they hold
    small = native.ParseBuffers(7)
    assert small.parse(text.ctypes.data, len(text))[:3] == (7, len("".join(r + "\n" for r in fits[:7])), 2)
    # a line the text ends inside: it stops before it
    assert small.parse(text.ctypes.data, len(fits[0]) + 1 + 30)[:3] == (1, len(fits[0]) + 1, 0)
    # anything but plainly valid rows goes to the exact parser, which names the problem
    # or repairs the line: every malformed kind, a CRLF line, a dense value outside int32
    head = "".join(r + "\n" for r in fits[:5]).encode()
    others = [t for t, _ in bad_rows(rng)] + [fits[0] + "\r", fits[1].replace("\t", f"\t{2 ** 31}", 1)]
    for other in others:
        chunk = np.frombuffer(head + "".join(r + "\n" for r in [other] + fits[5:9]).encode(), np.uint8)
        got = native.ParseBuffers(20).parse(chunk.ctypes.data, len(chunk))
        assert got[:3] == (5, len(head), 1), repr(other)


def test_compiled_parser_reads_dense_values_of_every_length_as_the_exact_parser():
    """Dense values of 0 to 17 digits, with and without a sign, leading zeros, in every
    column and at the very end of the text (fewer than 8 bytes left to read): each line
    whose values fit int32 is taken with the exact parser's values, the others (a lone
    sign, a value outside int32) left to it."""
    rng = random.Random(5)
    lines, fits = [], []
    for digits in range(18):
        for sign in ("", "-"):
            for _ in range(3):
                number = "".join(rng.choice("0123456789") for _ in range(digits))
                dense = [str(rng.randrange(-3, 30)) for _ in range(13)]
                dense[rng.randrange(13)] = sign + number
                ids = [f"{rng.randrange(2 ** 32):08x}" for _ in range(26)]
                lines.append("\t".join([rng.choice("01")] + dense + ids))
                fits.append(digits > 0 and -2 ** 31 <= int(sign + number) < 2 ** 31
                            or digits == 0 and not sign)
    lines.append("\t".join(["1", "12345678", "-9999999"] + ["7"] * 11 + ["a"] * 25 + ["1"]))
    fits.append(True)
    data = "".join(line + "\n" for line in lines).encode()
    text = np.frombuffer(data, np.uint8)
    want = [ct.parse_chunk((line + "\n").encode(), 1, raw_dense=True) for line in lines]
    buffers = native.ParseBuffers(len(lines))
    pos, line = 0, 0
    while pos < len(data):  # a line the compiled parser leaves is stepped over
        n, used, stop, _ = buffers.parse(text.ctypes.data + pos, len(data) - pos)
        assert all(fits[line:line + n])
        for i in range(n):
            assert (buffers.dense[i] == want[line + i].dense_raw[0]).all(), lines[line + i]
            assert buffers.labels[i] == want[line + i].labels[0]
        pos, line = pos + used, line + n
        if stop == 1:
            assert not fits[line], lines[line]
            pos, line = data.index(b"\n", pos) + 1, line + 1
    assert line == len(lines)


def test_compiled_shuffle_makes_numpys_legacy_shuffle():
    for n in (1, 2, 3, 64, 65, 1000, 65_537, 300_007):
        for seed in (0, 1, 12345, 2 ** 32 - 1):
            want = np.arange(n, dtype=np.uint32)
            np.random.RandomState(seed).shuffle(want)
            got = native.legacy_shuffle(np.arange(n, dtype=np.uint32), seed)
            assert (got == want).all(), (n, seed)
    values = np.random.default_rng(2).integers(0, 2 ** 32, 5000, dtype=np.uint32)
    want = values.copy()
    np.random.RandomState(7).shuffle(want)
    assert (native.legacy_shuffle(values, 7) == want).all()
    with pytest.raises(ValueError, match="seed"):
        native.legacy_shuffle(np.arange(3, dtype=np.uint32), -1)


def test_destinations_of_a_row_range_are_argsorts_slice_of_the_permutation():
    rng = np.random.default_rng(1)
    for n in (1, 2, 9, 1000, 100_003):
        perm = rng.permutation(n).astype(np.uint32)
        want = np.argsort(perm).astype(np.uint32)  # want[s]: where source row s lands
        for lo, hi in [(0, n), (0, n // 2), (n // 3, n), (n // 4, n // 4 + 1), (n, n)]:
            got = native.destinations(perm, lo, hi, np.empty(hi - lo, np.uint32))
            assert (got == want[lo:hi]).all(), (n, lo, hi)
    with pytest.raises(ValueError):
        native.destinations(perm, 0, 10, np.empty(9, np.uint32))


def test_a_cleared_id_table_numbers_anew_from_its_base():
    table = native.IdTable(2, keep_order=True)
    table.assign(np.arange(10_000, dtype=np.uint32) * 7919)  # grows it several times
    table.clear()
    assert len(table) == 0
    assert table.assign(np.array([5, 9, 5, 0], dtype=np.uint32)).tolist() == [2, 3, 2, 4]
    assert table.order().tolist() == [5, 9, 0]


def test_an_id_table_grows_into_lent_memory_then_past_it_as_a_dictionary_numbers():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 2 ** 32, 50_000).astype(np.uint32)
    values = np.concatenate([values, values[::3]])  # seen again, in another order
    want = {}
    for v in values.tolist():
        want.setdefault(v, 2 + len(want))
    table = native.IdTable(2)
    # room for the slot arrays of its next two sizes (2**13, 2**14 slots), not the third
    lent = np.zeros((2 ** 13 + 2 ** 14) * 8, np.uint8)
    table.lend(lent)
    got = [table.assign(values[:5000].copy()), table.assign(values[5000:].copy())]
    assert np.concatenate(got).tolist() == [want[v] for v in values.tolist()]
    assert lent[-8:].any()  # the largest array that fitted was made there
    assert len(table) == len(want) > 2 ** 14  # and the table grew past it
    with pytest.raises(TypeError):
        native.IdTable(2).lend(np.zeros(16, np.uint32))
    with pytest.raises(RuntimeError):  # its slots lie in the first
        table.lend(np.zeros(64, np.uint8))


def test_stage_memory_is_taken_as_a_stack_and_starts_over_at_each_stage():
    mem = pm.StageMemory()
    mem.begin("one", 1000)
    base = mem.buf.ctypes.data
    assert base % mem.ALIGN == 0 and len(mem.buf) == 1000
    a, b = mem.take(100), mem.take(10)
    assert (a.ctypes.data - base, b.ctypes.data - base) == (0, 128)  # 64-byte boundaries
    mem.give_back(a)  # not the latest: stays taken
    assert mem.take(1).ctypes.data - base == 192
    c = mem.take(300, grow=mem.take(200))  # the latest, replaced where it started
    assert c.ctypes.data - base == 256
    mem.give_back(c)
    assert mem.array((2, 3), np.int64).ctypes.data - base == 256
    rest = mem.rest()
    assert rest.ctypes.data - base == 320 and len(rest) == 1000 - 320
    beyond = mem.take(64)  # past the share: memory of its own
    assert not base <= beyond.ctypes.data < base + 1000 and len(beyond) == 64
    mem.begin("one", 1000)  # the same stage: nothing let go
    assert len(mem.take(64)) == 64 and mem.take(1).ctypes.data != base
    mem.begin("two", 500)  # a new one: from the start, in the same memory
    assert mem.take(8).ctypes.data == base and len(mem.buf) == 1000
    mem.end()
    assert len(mem.buf) == 0


def test_record_parts_are_read_in_batches_of_whole_records(monkeypatch):
    monkeypatch.setattr(pm, "PLACE_BATCH_BYTES", 14)  # three 4-byte records
    monkeypatch.setattr(pm, "PLACE_BATCH_PARTS", 2)
    batches, need = pm._read_batches([("a", 0, 40), ("b", 100, 4), ("c", 500, 12)], 4)
    assert batches == [[("a", 0, 12)], [("a", 12, 12)], [("a", 24, 12)],
                       [("a", 36, 4), ("b", 100, 4)], [("c", 500, 12)]]
    assert need == 12 + 2 * (direct_io.PAGE + pm.Arena.ALIGN)
    # at most two reads a batch, however small
    batches, _ = pm._read_batches([(str(i), 0, 4) for i in range(5)], 4)
    assert [len(b) for b in batches] == [2, 2, 1]


def test_buckets_split_the_largest_days_further_until_each_process_has_as_many():
    # 10, 7 and 3 rows in buckets of at most 4: 3 + 2 + 1 buckets; for 4 processes two
    # more, each to the day whose buckets are then largest (7 / 2, then 10 / 3 rows)
    starts, buckets = pm.bucket_plan([10, 7, 3], 4, processes=4)
    assert buckets == [(0, 0, 2), (0, 2, 3), (0, 5, 2), (0, 7, 3),
                       (1, 0, 2), (1, 2, 2), (1, 4, 3), (2, 0, 3)]
    assert starts.tolist() == [0, 2, 5, 7, 10, 12, 14, 17]
    # one process, or a count already a multiple: the buckets the rows need
    assert pm.bucket_plan([10, 7, 3], 4)[1] == pm.bucket_plan([10, 7, 3], 4, processes=3)[1]
    assert len(pm.bucket_plan([10, 7, 3], 4)[1]) == 6


def test_a_placed_bucket_frees_the_pages_no_unplaced_bucket_or_the_header_shares():
    # records of 1000 bytes after the 128-byte header; chunk 0 holds rows 0-15 (buckets
    # 0, 1, 2: 5, 3 and 8 rows), chunk 1 rows 16-19 (bucket 1: 4 rows; bucket 0 none)
    index = np.array([[0, 5, 3, 8], [16, 0, 4, 0]])
    parts = pm._record_parts(index, 1000)
    # bytes: bucket 0 128-5128, 1 5128-8128, 2 8128-16128, 1 16128-20128; pages of 4096
    assert [a.tolist() for a in parts] == [[128, 5128, 8128, 16128],
                                           [5128, 8128, 16128, 20128], [0, 1, 2, 1]]
    # bucket 2 alone: not page 1 (buckets 0 and 1 in it), nor page 3 (bucket 1)
    assert pm._freed_pages(parts, 2, {2}) == [(8192, 12288)]
    # then bucket 1: page 3 (with bucket 2) and page 4; page 1 waits for bucket 0
    assert pm._freed_pages(parts, 1, {1, 2}) == [(12288, 20480)]
    # the last placed frees the pages it shares with the others, never the header's
    assert pm._freed_pages(parts, 0, {0, 1, 2}) == [(4096, 8192)]
    assert pm._freed_pages(parts, 2, {0, 1, 2}) == [(4096, 16384)]


def _claim_until(n: int) -> list:
    got = []
    while (k := pm.claim()) < n:
        got.append(k)
        time.sleep(0.01)
    return got


@pytest.mark.parametrize("workers", [1, 2])
def test_tasks_of_a_stage_claim_each_number_once_across_workers_from_0_each_stage(workers):
    pool, other = pm._Pool(workers, 1 << 20), pm._Pool(1, 1 << 20)
    try:
        for stage in ("one", "two"):
            other.run(stage, [("x", _claim_until, (3,))])  # a pool's count is its own
            got = pool.run(stage, [(str(i), _claim_until, (100,)) for i in range(2)])
            assert sorted(got["0"] + got["1"]) == list(range(100))
            if workers == 2:  # side by side, each took its share as it got to them
                assert got["0"] and got["1"]
            else:  # one after the other: the first took them all
                assert got["1"] == []
    finally:
        pool.close()
        other.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_buckets_placed_from_small_batches_in_kept_memory_write_the_same_bytes(
        days, tmp_path, monkeypatch, workers):
    """A memory share the stages' buffers fit in (the other tests' is too small, so they
    take memory of their own), while buckets stay small (the plan counts 400 KB a row):
    several to a day, each read in batches of at most two parts and 320 bytes (a few
    records), so most parts are read in pieces."""
    monkeypatch.setattr(pm, "PLACE_BYTES_PER_ROW", 400_000)
    monkeypatch.setattr(pm, "PLACE_BATCH_BYTES", 2 * native.RECORD_BYTES)
    monkeypatch.setattr(pm, "PLACE_BATCH_PARTS", 2)
    inside = {"yes": 0, "no": 0}

    class Watched(pm.StageMemory):
        def take(self, nbytes, grow=None):
            out = super().take(nbytes, grow)
            at = out.ctypes.data - self.buf.ctypes.data
            if nbytes:
                inside["yes" if 0 <= at < len(self.buf) else "no"] += 1
            return out

    monkeypatch.setattr(pm, "MEMORY", Watched())
    out = tmp_path / "out"
    assert cli.main(days["inputs"] + ["-o", str(out), "--workers", str(workers),
                                      "--memory-gb", "0.1"]) == 0
    assert_same_as_oracle(out, days["oracle"])
    if workers == 1:  # the tasks ran in this process, their memory taken from the share
        assert inside["yes"] > 0 and inside["no"] == 0, inside


def test_no_c_compiler_or_no_writable_cache_stops_with_one_line(days, tmp_path, capsys,
                                                                monkeypatch):
    argv = days["inputs"] + ["-o", str(tmp_path / "out")]
    monkeypatch.setattr(native, "_lib", None)  # as in a fresh process
    monkeypatch.setenv("DLRM_TORCHREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert "no C compiler" in _error(capsys, argv)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("DLRM_TORCHREC_CACHE", str(tmp_path / "file" / "cache"))
    assert "set DLRM_TORCHREC_CACHE to a writable folder" in _error(capsys, argv)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_compiled_parser_agrees_with_the_exact_one_on_mutated_lines():
    """Random byte edits of valid lines: a line the compiled parser takes, the exact one
    takes with the same values; the line it stops at, the exact one rejects or repairs."""
    from tests.helpers.criteo_rows import good_row

    rng = random.Random(11)
    alphabet = "\t\r-+ 0189afAFgz."
    for _ in range(400):
        lines = [good_row(rng) for _ in range(6)]
        k = rng.randrange(len(lines))
        line = list(lines[k])
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(line) + 1)
            op = rng.random()
            if op < 0.4 and at < len(line):
                line[at] = rng.choice(alphabet)
            elif op < 0.7:
                line.insert(at, rng.choice(alphabet))
            elif at < len(line):
                del line[at]
        lines[k] = "".join(line)
        data = "".join(x + "\n" for x in lines).encode()
        text = np.frombuffer(data, np.uint8)
        buffers = native.ParseBuffers(len(lines))
        n, used, stop, _ = buffers.parse(text.ctypes.data, len(text))
        if used:
            taken = ct.parse_chunk(data[:used], 1, raw_dense=True)
            assert not taken.bad.counts and len(taken.labels) == n
            assert (taken.dense_raw == buffers.dense[:n]).all()
            assert (taken.sparse == buffers.sparse[:, :n].T).all()
            assert (taken.labels == buffers.labels[:n]).all()
        else:
            assert n == 0
        if stop == 1:
            rest = data[used:]
            first = rest[:rest.index(b"\n") + 1]
            p = ct.parse_chunk(first, n + 1, raw_dense=True)
            outside = len(p.labels) and not (-2 ** 31 <= p.dense_raw.min()
                                             and p.dense_raw.max() < 2 ** 31)
            assert p.bad.counts or outside, first
        else:
            assert stop == 0 and used == len(data)


def test_repaired_lines_crlf_a_byte_order_mark_and_no_final_newline_keep_torchrecs_bytes(
        days, tmp_path, capsys):
    """Plain days read through the reused buffer, with the lines the exact parser repairs:
    every line ending in CRLF, a byte-order mark, a last line without its newline."""
    inputs = list(days["inputs"])
    folder = tmp_path / "in"
    folder.mkdir()
    edits = {5: lambda b: b.replace(b"\n", b"\r\n"), 6: lambda b: b[:-1],
             8: lambda b: ct.UTF8_BOM + b}
    for d, edit in edits.items():
        path = folder / f"day_{d}"
        path.write_bytes(edit(open(inputs[d], "rb").read()))
        inputs[d] = str(path)
    out = tmp_path / "out"
    assert cli.main(inputs + ["-o", str(out), "--workers", "2"] + MEMORY) == 0
    assert_same_as_oracle(out, days["oracle"])
    err = capsys.readouterr().err  # the repairs are reported, each with its file
    assert f"{inputs[8]}: " in err and "byte-order mark" in err
    assert f"{inputs[5]}: " in err and "CRLF" in err


def test_scattered_ids_pass_through_float32_as_numpy_casts_them_unless_exact():
    rng = np.random.default_rng(4)
    n = 5000
    big = np.array([2 ** 24 - 1, 2 ** 24 + 1, 2 ** 24 + 3, 2 ** 25 + 3, 2 ** 31 - 1, 123],
                   dtype=np.uint32)
    maps = [np.concatenate([big, rng.integers(2, 2 ** 31, 100).astype(np.uint32)])
            for _ in range(26)]
    local = [rng.integers(0, len(m), n).astype(np.uint32) for m in maps]
    ids = np.stack([m[c] for m, c in zip(maps, local)], axis=1).astype(np.int64)
    # raw dense values over the whole int32 range, shifted by a day whose smallest is
    # INT32_MIN + 1: m - 2 and x - (m - 2) wrap around in int32
    dense = rng.integers(-2 ** 31 + 1, 2 ** 31, (n, 13))
    shift = 2 ** 31 - 1  # (-2**31 + 1) - 2, wrapped
    shifted = (dense - shift + 2 ** 31) % 2 ** 32 - 2 ** 31
    labels = rng.integers(0, 2, n).astype(np.int32)
    dest = rng.permutation(n).astype(np.uint32)
    starts = np.array([0, 1000, 3500], dtype=np.int64)
    # numpy's casts, as TorchRec's shuffle makes them (float32, then int32)
    rounded = ids.astype(np.float32).astype(np.int32)
    assert pm.dense_shift(-2 ** 31 + 1) == shift
    for exact, want in ((False, rounded), (True, ids.astype(np.int32))):
        records = np.empty((n, native.RECORD_BYTES), np.uint8)
        counts = native.scatter_records(_rows(labels, local, dense), shift, maps, exact, dest,
                                        starts, WIDEST, records)
        bucket = np.searchsorted(starts, dest, side="right") - 1
        assert counts.tolist() == np.bincount(bucket, minlength=3).tolist()
        order = np.argsort(bucket, kind="stable")  # grouped by bucket, in row order within
        rec = _records(records)
        assert (rec["dest_label"] % 2 ** 31 == dest[order] - starts[bucket[order]]).all()
        assert (rec["dest_label"] // 2 ** 31 == labels[order]).all()
        assert (rec["sparse"] == want[order]).all() and (rec["dense"] == shifted[order]).all()


def test_records_with_values_of_one_to_four_bytes_place_the_values_scattered():
    """Each column (shifted dense values, ids) in the bytes its largest needs: scattered to
    two buckets, then placed, the output columns hold every row's values at its
    destination, as numpy puts them there."""
    rng = np.random.default_rng(8)
    n, starts = 3000, np.array([0, 1800], dtype=np.int64)
    largest = [0, 255, 256, 2 ** 16 - 1, 2 ** 16, 2 ** 24 - 1, 2 ** 24, 2 ** 31 - 1] * 3 + [7, 70000]
    maps = [np.array([x, 0, x // 2], np.uint32) for x in largest]
    local = [rng.integers(0, 3, n).astype(np.uint32) for _ in range(26)]
    ids = np.stack([m[c] for m, c in zip(maps, local)], axis=1).astype(np.int64)
    # a day whose smallest dense value is -5: shifted values from 2 (x = m) upward, each
    # column's largest one of the edges of a width
    low, shift = -5, -7
    dense_top = [2, 255, 256, 2 ** 16 - 1, 2 ** 16, 2 ** 24 - 1, 2 ** 24, 2 ** 31 - 1, 2 ** 32 - 1,
                 3, 1000, 2 ** 20, 2 ** 30]
    shifted = np.stack([rng.integers(2, top + 1, n) for top in dense_top], axis=1)
    shifted[0] = dense_top  # each column's largest, and its smallest (x = m) in the next row
    shifted[1] = 2
    dense = shifted + shift  # the raw values: x = shifted + m - 2, some beyond int32
    labels = rng.integers(0, 2, n).astype(np.int32)
    dest = rng.permutation(n).astype(np.uint32)
    widths = np.array([native.id_width(x) for x in dense_top + largest], np.uint8)
    assert widths[:9].tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 4]
    assert widths[13:21].tolist() == [1, 1, 2, 2, 3, 3, 4, 4]
    size = native.record_bytes(widths)
    assert size == 4 + sum(widths) < native.RECORD_BYTES
    records = np.empty(n * size + 5, np.uint8)  # room to spare: only n * size is written
    records[n * size:] = 77
    rows = _rows(labels, local, (dense + 2 ** 31) % 2 ** 32 - 2 ** 31)
    assert pm.dense_shift(low) == shift
    counts = native.scatter_records(rows, shift, maps, True, dest, starts, widths, records)
    assert counts.tolist() == [1800, 1200] and (records[n * size:] == 77).all()
    for b, (lo, bucket_rows) in enumerate([(0, 1800), (1800, 1200)]):
        at = int(counts[:b].sum()) * size
        out = (np.zeros((bucket_rows, 13), np.int32), np.zeros((bucket_rows, 26), np.int32),
               np.zeros((bucket_rows, 1), np.int32))
        filled = np.zeros(bucket_rows, np.uint8)
        top = native.place_records(records[at:at + bucket_rows * size], widths, *out, filled)
        mine = np.flatnonzero((dest >= lo) & (dest < lo + bucket_rows))
        want_sparse = np.zeros((bucket_rows, 26), np.int64)
        want_sparse[dest[mine] - lo] = ids[mine]
        assert filled.all() and (out[1] == want_sparse).all()
        # the shifted values as int32 bits (2**32 - 1 is -1)
        assert (out[0][dest[mine] - lo] == shifted[mine].astype(np.uint32).view(np.int32)).all()
        assert (out[2][dest[mine] - lo, 0] == labels[mine]).all()
        assert top.tolist() == want_sparse.max(axis=0).tolist()
    for column in (2, 13 + 2):  # a dense value, then an id, a byte short of their width
        narrow = widths.copy()
        narrow[column] = 1
        with pytest.raises(RuntimeError, match="wider than its column's width"):
            native.scatter_records(rows, shift, maps, True, dest, starts, narrow,
                                   np.empty(n * native.record_bytes(narrow), np.uint8))


def test_record_widths_fit_each_dense_columns_largest_shifted_value_over_the_training_days(
        tmp_path):
    # shifted values reach the largest less the day's smallest, plus 2; day 23 (not
    # scattered) is not counted
    work = tmp_path
    lows = {0: -3, 1: 0, 22: 5, 23: -1000}
    for d in range(pm.DAYS):
        top = [0] * 13
        if d == 0:
            top[:4] = [250, 251, 2 ** 16 - 5, 2 ** 24]  # + 3 + 2: 255, 256, 2**16, 2**24 + 5
        if d == 22:
            top[4] = 2 ** 16 + 100  # - 5 + 2: 2**16 + 97
        if d == 23:
            top[5] = 2 ** 20
        os.makedirs(work / "parse" / f"day_{d}")
        (work / "parse" / f"day_{d}" / "stats.json").write_text(json.dumps(
            {"dense_min": lows.get(d, 0), "dense_max": top}))
    os.makedirs(work / "vocab")
    for f in range(26):  # ids up to FIRST_ID + count - 1
        (work / "vocab" / f"count_{f}.json").write_text(json.dumps({"distinct": 254 + f}))
    widths = pm.record_widths(str(work))
    # column 5's 2**20 is day 23's; the others' largest are 0 - (-3) + 2 = 5 (day 0's)
    assert widths[:13].tolist() == [1, 2, 3, 4, 3] + [1] * 8
    assert widths[13:].tolist() == [1] + [2] * 25  # 2 + 254 - 1 = 255, then 256 on


def test_evaluation_day_ids_are_the_maps_entries_at_the_local_numbers():
    rng = np.random.default_rng(9)
    n = 2000
    maps = [rng.integers(0, 2 ** 32, rng.integers(1, 500), dtype=np.uint32) for _ in range(26)]
    local = [rng.integers(0, len(m), n).astype(np.uint32) for m in maps]
    top = np.full(26, -1, np.int64)
    got = native.lookup_ids(_rows(np.zeros(n, np.int32), local), maps,
                            np.empty((n, 26), np.int64), top)
    want = np.stack([m.astype(np.int64)[c] for m, c in zip(maps, local)], axis=1)
    assert (got == want).all() and top.tolist() == want.max(axis=0).tolist()
    local[3][17] = len(maps[3])  # one past its map's end
    with pytest.raises(RuntimeError, match="outside its day's map"):
        native.lookup_ids(_rows(np.zeros(n, np.int32), local), maps,
                          np.empty((n, 26), np.int64), top)


def test_work_written_before_the_machine_restarted_is_redone_not_trusted(days, tmp_path,
                                                                          capsys, monkeypatch):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dlrm_torchrec.data.prepare_mlperf", *days["inputs"], "-o",
           str(out), "--workers", "2", *MEMORY]
    env = dict(os.environ, DLRM_PREPARE_KILL_AFTER="place:3")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    records = list((out / ".prepare" / "hosts").iterdir())
    assert [json.loads(r.read_text())["boot_id"] for r in records] == [pm.boot_id()]
    # as if the machine went down after the kill: unsynced work files lost their tails
    placed = next(out.glob("day_*_sparse.npy.part"))
    with open(placed, "r+b") as f:
        f.truncate(os.path.getsize(placed) // 2)
    monkeypatch.setattr(pm, "boot_id", lambda: "another boot")
    several = ["--world-size", "2", "--rank", "0", "--stage", "parse"]
    msg = _error(capsys, days["inputs"] + ["-o", str(out)] + MEMORY + several)
    assert "written on" in msg and "before the machine restarted" in msg and "remove" in msg
    assert cli.main(days["inputs"] + ["-o", str(out), "--workers", "2"] + MEMORY) == 0
    assert "starting over" in capsys.readouterr().err
    assert_same_as_oracle(out, days["oracle"])


def test_a_day_whose_scatter_was_killed_half_way_is_scattered_again_from_its_rows(days,
                                                                                  tmp_path):
    # a killed scatter leaves the day's rows and part of its records: the resumed run
    # writes the records again, from the start, instead of trusting the partial file
    out = tmp_path / "out"
    for stage in ("parse", "vocab"):
        assert cli.main(days["inputs"] + ["-o", str(out), "--stage", stage] + MEMORY) == 0
    day = out / ".prepare" / "parse" / "day_5"
    (day / "records.partial.npy").write_bytes(b"\xff" * 5000)
    assert cli.main(days["inputs"] + ["-o", str(out), "--workers", "2"] + MEMORY) == 0
    assert_same_as_oracle(out, days["oracle"])
