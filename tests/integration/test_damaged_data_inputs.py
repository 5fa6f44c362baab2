"""Damaged and mistaken data inputs: preprocessing, the adoption commands and the Criteo
loader either repair what can be repaired (and say so) or stop with one `error:` line
naming the file, before any work where that is possible, and never mix or half-write
output. The expected rows come from the plain line-by-line parser of
tests/helpers/criteo_rows.py."""

import errno
import gzip
import json
import os

import numpy as np
import pytest

from dlrm_torchrec.cli import from_reference as from_reference_cli
from dlrm_torchrec.cli import from_torchrec as from_torchrec_cli
from dlrm_torchrec.cli import preprocess as preprocess_cli
from dlrm_torchrec.config import ConfigError
from dlrm_torchrec.data.converters import preprocess as pp
from dlrm_torchrec.data.file_checks import FULL_HASH_BYTES
from tests.helpers.criteo_folder import make_folder, source
from tests.helpers.criteo_rows import make_lines, ref_parse, write

MOD = 50  # --max-ind-range of the runs here


def settings(inputs, out, **kw):
    kw.setdefault("dataset", "kaggle")
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("max_ind_range", MOD)
    return pp.Settings(inputs=[str(p) for p in inputs], output=str(out), **kw)


def expected(lines):
    """(labels, dense, ids mod MOD) of the well-formed `lines`, in order."""
    rows = [r for r in map(ref_parse, lines) if r is not None]
    return (np.array([r[0] for r in rows], np.int32).reshape(-1, 1),
            np.array([r[1] for r in rows], np.float32).reshape(-1, 13),
            np.array([[v % MOD for v in r[2]] for r in rows], np.int64).reshape(-1, 26))


def day_rows(out, days):
    """(labels, dense, sparse) of days `days` of a preprocessed folder, concatenated."""
    return tuple(np.concatenate([np.load(os.path.join(out, f"day_{d}_{p}.npy")) for d in days])
                 for p in ("labels", "dense", "sparse"))


def assert_rows(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_array_equal(g, w.astype(g.dtype))


def run_cli(main, args, capsys):
    """(exit status, stderr) of a command-line entry point."""
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def assert_one_error(err, *parts):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for part in parts:
        assert part in lines[0], (part, err)


# --------------------------------------------------------------------------- resuming


def interrupted_run(tmp_path, lines, **kw):
    """Preprocess `lines` as terabyte days day_0..day_2 (day_d: lines[d::3]) and undo the
    last day, as a run stopped while writing it; returns (inputs, output folder)."""
    inputs = [write(tmp_path / f"day_{d}", lines[d::3]) for d in range(3)]
    out = tmp_path / "out"
    pp.run(settings(inputs, out, dataset="terabyte", **kw))
    os.remove(out / "day_2.json")
    return inputs, out


def test_resume_onto_an_input_with_lines_deleted_is_refused(tmp_path, capsys):
    lines = make_lines(600, with_bad=False)
    inputs, out = interrupted_run(tmp_path, lines)
    day0 = lines[0::3]
    write(inputs[0], day0[:100] + day0[101:])  # a line deleted from a finished day
    rc, err = run_cli(preprocess_cli.main, [*inputs, "-o", out, "--dataset", "terabyte",
                                            "--max-ind-range", MOD, "--no-progress"], capsys)
    assert rc == 2
    assert_one_error(err, f"{inputs[0]} is not the file {out} was started from",
                     "its size changed", f"delete {out}")
    assert not (out / "day_2.json").exists()  # nothing resumed


def test_resume_onto_another_file_of_the_same_name_and_size_is_refused(tmp_path):
    lines = make_lines(600, with_bad=False)
    inputs, out = interrupted_run(tmp_path, lines)
    write(inputs[1], lines[1::3][::-1])  # same size, other bytes: like another file
    with pytest.raises(pp.PreprocessError, match="its content changed"):
        pp.run(settings(inputs, out, dataset="terabyte"))


def test_resume_onto_a_large_file_edited_in_place_is_refused(tmp_path):
    # a byte changed between the sampled blocks: only the modification time tells
    line = make_lines(1, with_bad=False)[0]
    big = [line] * (2 * FULL_HASH_BYTES // len(line))
    inputs = [write(tmp_path / "day_0", big), write(tmp_path / "day_1", big[:50])]
    out = tmp_path / "out"
    pp.run(settings(inputs, out, dataset="terabyte"))
    data = bytearray(inputs[0].read_bytes())
    k = len(data) // 4
    data[k:k + 1] = b"7" if data[k:k + 1] != b"7" else b"8"
    st = os.stat(inputs[0])
    inputs[0].write_bytes(bytes(data))
    os.utime(inputs[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    with pytest.raises(pp.PreprocessError, match="another modification time"):
        pp.run(settings(inputs, out, dataset="terabyte"))


def test_resume_onto_the_same_inputs_completes_with_their_rows(tmp_path):
    lines = make_lines(600, with_bad=False)
    inputs, out = interrupted_run(tmp_path, lines)
    pp.run(settings(inputs, out, dataset="terabyte"))
    assert json.loads((out / "meta.json").read_text())["complete"]
    assert_rows(day_rows(out, [2]), expected(lines[2::3]))


def test_an_input_that_changes_while_it_is_read_leaves_the_output_incomplete(tmp_path,
                                                                              monkeypatch):
    lines = make_lines(300, with_bad=False)
    src = write(tmp_path / "train.txt", lines)
    real_pass = pp._run_pass

    def pass_then_append(s, *args, **kw):
        real_pass(s, *args, **kw)
        with open(src, "a") as f:  # another process still writing the file
            f.write(lines[0] + "\n")
    monkeypatch.setattr(pp, "_run_pass", pass_then_append)
    with pytest.raises(pp.PreprocessError, match="changed while it was being read"):
        pp.run(settings([src], tmp_path / "out"))
    assert not json.loads((tmp_path / "out" / "meta.json").read_text())["complete"]


# --------------------------------------------------------------------------- repaired text


def test_a_byte_order_mark_is_removed_and_the_first_row_kept(tmp_path):
    lines = make_lines(140, with_bad=False)
    plain = tmp_path / "train.txt"
    plain.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())
    report = pp.run(settings([plain], tmp_path / "out"))
    assert report.bad[str(plain)].counts == {
        "UTF-8 byte-order mark at the start of the file (removed, row kept)": 1}
    assert_rows(day_rows(tmp_path / "out", range(7)), expected(lines))
    with pytest.raises(pp.PreprocessError, match=r"train.txt:1: UTF-8 byte-order mark"):
        pp.run(settings([plain], tmp_path / "strict", strict=True))


def test_a_byte_order_mark_inside_gzip_and_a_last_row_without_newline(tmp_path):
    lines = make_lines(90, with_bad=False)
    days = [tmp_path / "day_0.gz", tmp_path / "day_1.gz"]
    for p, part in zip(days, (lines[:45], lines[45:])):
        p.write_bytes(gzip.compress(b"\xef\xbb\xbf" + "\n".join(part).encode()))
    pp.run(settings(days, tmp_path / "out", dataset="terabyte"))
    assert_rows(day_rows(tmp_path / "out", [0, 1]), expected(lines))


def test_a_gzip_stream_whose_checksum_fails_is_reported_and_stops_strict_mode(tmp_path):
    lines = make_lines(200, with_bad=False)
    blob = bytearray(gzip.compress(("\n".join(lines) + "\n").encode()))
    blob[-8] ^= 0xFF  # the CRC-32 of the gzip trailer
    bad = tmp_path / "day_1.gz"
    bad.write_bytes(bytes(blob))
    good = write(tmp_path / "day_0", lines)
    report = pp.run(settings([good, bad], tmp_path / "out", dataset="terabyte"))
    assert report.bad[str(bad)].counts == {"corrupt gzip stream": 1}
    assert "incorrect data check" in report.bad[str(bad)].examples["corrupt gzip stream"][0][1]
    with pytest.raises(pp.PreprocessError, match=r"day_1.gz:201: corrupt gzip stream"):
        pp.run(settings([good, bad], tmp_path / "strict", dataset="terabyte", strict=True))


def test_a_block_of_nul_bytes_drops_only_the_rows_it_overwrote(tmp_path):
    # what a crash can leave in a file: a zero-filled 4 KB block in the middle
    lines = make_lines(400, with_bad=False)
    data = bytearray(("\n".join(lines) + "\n").encode())
    at = len(data) // 2
    data[at:at + 4096] = bytes(4096)
    src = tmp_path / "train.txt"
    src.write_bytes(bytes(data))
    report = pp.run(settings([src], tmp_path / "out"))
    damaged = [line for line in bytes(data).decode().split("\n")[:-1]]
    assert_rows(day_rows(tmp_path / "out", range(7)), expected(damaged))
    assert 0 < report.bad[str(src)].rejected() <= 4096 // min(map(len, lines)) + 2


# --------------------------------------------------------------------------- inputs


def test_a_folder_given_as_an_input_is_called_a_folder(tmp_path, capsys):
    (tmp_path / "day_1").mkdir()
    day0 = write(tmp_path / "day_0", make_lines(10, with_bad=False))
    rc, err = run_cli(preprocess_cli.main, [day0, tmp_path / "day_1", "-o", tmp_path / "out",
                                            "--dataset", "terabyte", "--no-progress"], capsys)
    assert rc == 2
    assert_one_error(err, f"input {tmp_path / 'day_1'}: a folder, not a file")
    assert not (tmp_path / "out").exists()
    src = tmp_path / "npy"
    src.mkdir()
    write_torchrec_days(src, [12, 9])
    os.remove(src / "day_1_dense.npy")
    (src / "day_1_dense.npy").mkdir()
    rc, err = run_cli(from_torchrec_cli.main, [src, "-o", tmp_path / "adopted"], capsys)
    assert rc == 2
    assert_one_error(err, f"{src / 'day_1_dense.npy'}: a folder, not a file")
    rc, err = run_cli(from_reference_cli.main, [tmp_path / "npy", "-o", tmp_path / "ref",
                                                "--counts", tmp_path / "day_1"], capsys)
    assert rc == 2
    assert_one_error(err, f"{tmp_path / 'day_1'}: a folder, not a file")


def test_a_gap_in_the_terabyte_days_is_refused_unless_allowed(tmp_path, capsys):
    lines = make_lines(60, with_bad=False)
    inputs = [write(tmp_path / f"day_{d}", lines[i::3]) for i, d in enumerate((0, 2, 3))]
    args = [*inputs, "-o", tmp_path / "out", "--dataset", "terabyte", "--no-progress"]
    rc, err = run_cli(preprocess_cli.main, args, capsys)
    assert rc == 2
    assert_one_error(err, "day_1 missing between day_0 and day_3", "--allow-missing-days")
    assert not (tmp_path / "out").exists()
    rc, err = run_cli(preprocess_cli.main, args + ["--allow-missing-days", "--max-ind-range",
                                                   MOD], capsys)
    assert rc == 0
    assert err.startswith("warning: day_1 missing between day_0 and day_3")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["num_days"] == 3 and meta["complete"]
    assert_rows(day_rows(tmp_path / "out", [1]), expected(lines[1::3]))  # day_2 is day 1
    twice = write(tmp_path / "day_0.gz", lines[:5])
    with pytest.raises(pp.PreprocessError, match="are the same day"):
        pp.run(settings([inputs[0], twice, inputs[1]], tmp_path / "out2", dataset="terabyte"))


# --------------------------------------------------------------------------- outputs


def test_an_output_folder_under_a_regular_file_is_one_error_before_any_work(tmp_path, capsys):
    src = write(tmp_path / "train.txt", make_lines(30, with_bad=False))
    blocker = tmp_path / "results"
    blocker.write_text("not a folder\n")
    out = blocker / "criteo"
    rc, err = run_cli(preprocess_cli.main, [src, "-o", out, "--dataset", "kaggle",
                                            "--no-progress"], capsys)
    assert rc == 2
    assert_one_error(err, f"cannot create {out}: {blocker} is a file, not a folder")
    npy = tmp_path / "npy"
    npy.mkdir()
    write_torchrec_days(npy, [12, 9])
    rc, err = run_cli(from_torchrec_cli.main, [npy, "-o", out], capsys)
    assert rc == 2
    assert_one_error(err, f"{blocker} is a file, not a folder")
    rc, err = run_cli(from_reference_cli.main, [npy, "-o", out], capsys)
    assert rc == 2 and "is a file, not a folder" in err
    assert blocker.read_text() == "not a folder\n"


def test_a_full_disk_keeps_the_finished_days_and_resumes(tmp_path, capsys, monkeypatch):
    lines = make_lines(700, with_bad=False)
    src = write(tmp_path / "train.txt", lines)
    out = tmp_path / "out"
    real_write = pp.NpyWriter.write

    def write_until_full(self, arr):
        if os.path.basename(self.path).startswith("day_3_sparse"):  # day 3's second part
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path + ".tmp")
        real_write(self, arr)
    monkeypatch.setattr(pp.NpyWriter, "write", write_until_full)
    args = [src, "-o", out, "--dataset", "kaggle", "--max-ind-range", MOD, "--workers", "0",
            "--chunk-mb", "0.0625", "--no-progress"]
    rc, err = run_cli(preprocess_cli.main, args, capsys)
    assert rc == 2
    assert_one_error(err, f"{out}: no space left on device",
                     "kept the 3 finished day(s) (0, 1, 2)", "rerun the same command")
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    assert sorted(p for p in os.listdir(out) if p.endswith(".json")) == [
        "day_0.json", "day_1.json", "day_2.json", "meta.json"]
    monkeypatch.setattr(pp.NpyWriter, "write", real_write)
    rc, err = run_cli(preprocess_cli.main, args, capsys)
    assert rc == 0, err
    assert_rows(day_rows(out, range(7)), expected(lines))


# --------------------------------------------------------------------------- loader


def write_torchrec_days(folder, rows):
    """TorchRec's npy_preproc_criteo.py layout: day_{d}_{dense,sparse,labels}.npy."""
    rng = np.random.default_rng(1)
    for d, n in enumerate(rows):
        np.save(folder / f"day_{d}_dense.npy", rng.random((n, 13), dtype=np.float32))
        np.save(folder / f"day_{d}_sparse.npy", rng.integers(0, 90, (n, 26), dtype=np.int64))
        np.save(folder / f"day_{d}_labels.npy", rng.integers(0, 2, (n, 1), dtype=np.int32))


def truncate(path, keep_bytes):
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])
    return len(data)


def test_a_truncated_day_file_is_named_with_its_size_and_the_size_it_needs(tmp_path):
    make_folder(tmp_path)
    full = truncate(tmp_path / "day_1_sparse.npy", 1000)
    with pytest.raises(ConfigError) as e:
        source(tmp_path)
    assert f"day_1_sparse.npy: 1000 bytes, but its header (int32 (17, 26)) needs {full}" in \
        str(e.value) and "truncated" in str(e.value)


def test_a_day_file_replaced_by_one_of_other_rows_is_a_config_error(tmp_path):
    make_folder(tmp_path)
    np.save(tmp_path / "day_2_labels.npy", np.zeros((29, 1), np.int32))  # meta.json says 30
    with pytest.raises(ConfigError, match="day_2_labels.npy has 29 rows, meta.json says day 2 "
                                          "has 30"):
        source(tmp_path)


def test_adopting_a_truncated_npy_file_names_it(tmp_path, capsys):
    write_torchrec_days(tmp_path, [12, 9])
    full = truncate(tmp_path / "day_0_sparse.npy", 700)
    rc, err = run_cli(from_torchrec_cli.main, [tmp_path, "-o", tmp_path, "--workers", "1"],
                      capsys)
    assert rc == 2
    assert_one_error(err, f"day_0_sparse.npy: 700 bytes, but its header (int64 (12, 26)) "
                          f"needs {full}")
    assert not (tmp_path / "meta.json").exists()


@pytest.mark.parametrize("damage, expect", [
    (lambda m: "{\"format_version\": 1, \"complete\": tr", "is not readable JSON"),
    (lambda m: "[1, 2]", "holds list, not an object"),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "table_sizes"}),
     "table_sizes None: expected 26 positive table sizes"),
    (lambda m: json.dumps(dict(m, rows_per_day=[23, 17])), "rows_per_day [23, 17]: expected 4"),
    (lambda m: json.dumps(dict(m, eval_day=4)), "eval_day 4: expected a day below num_days"),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "settings"}),
     "no settings.dataset"),
])
def test_a_damaged_meta_json_is_a_config_error_naming_it(tmp_path, damage, expect):
    make_folder(tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(damage(meta))
    with pytest.raises(ConfigError) as e:
        source(tmp_path)
    assert "meta.json" in str(e.value) and expect in str(e.value), str(e.value)
