"""Criteo preprocessing: outputs checked value by value against a plain line-by-line
computation (written here and in tests/helpers/criteo_rows.py), independently of the
vectorised parser."""

import gzip
import json
import os
import random

import numpy as np
import pytest

from dlrm_torchrec.cli import preprocess as preprocess_cli
from dlrm_torchrec.data.converters import preprocess as pp
from tests.helpers.criteo_rows import bad_rows, make_lines, ref_parse, write
from tests.helpers.hash_reference import ref_uniform

# --------------------------------------------------------------------------- reference


def ref_days(lines, days):
    per, extra = divmod(len(lines), days)
    out, pos = [], 0
    for d in range(days):
        size = per + (d < extra)
        out.append([(pos + i + 1, lines[pos + i]) for i in range(size)])  # (line number, text)
        pos += size
    return out


def ref_day_arrays(numbered, day, map_id, rate=0.0, seed=0, train=False):
    labels, dense, sparse = [], [], []
    for no, line in numbered:
        r = ref_parse(line)
        if r is None:
            continue
        if train and rate > 0 and r[0] == 0 and ref_uniform(seed, day, no) < rate:
            continue
        labels.append(r[0])
        dense.append(r[1])
        sparse.append([map_id(f, v) for f, v in enumerate(r[2])])
    return (np.array(labels, np.int32).reshape(-1, 1), np.array(dense, np.float32).reshape(-1, 13),
            np.array(sparse, np.int64).reshape(-1, 26))


def load_day(out, d):
    return tuple(np.load(os.path.join(out, f"day_{d}_{p}.npy"))
                 for p in ("labels", "dense", "sparse"))


def assert_day_equal(out, d, want):
    got = load_day(out, d)
    for g, w, name in zip(got, want, ("labels", "dense", "sparse")):
        assert g.shape == w.shape, (d, name)
        np.testing.assert_array_equal(g, w.astype(g.dtype), err_msg=f"day {d} {name}")


def settings(inputs, out, **kw):
    kw.setdefault("dataset", "kaggle")
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    return pp.Settings(inputs=[str(p) for p in inputs], output=str(out), **kw)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("workers", [0, 2])
def test_kaggle_hash_mode_matches_line_by_line_reference(tmp_path, workers):
    lines = make_lines(1500)
    src = write(tmp_path / "train.txt", lines)
    s = settings([src], tmp_path / "out", max_ind_range=1000, workers=workers,
                 chunk_bytes=64 << 10)
    report = pp.run(s)
    for d, numbered in enumerate(ref_days(lines, 7)):
        assert_day_equal(s.output, d, ref_day_arrays(numbered, d, lambda f, v: v % 1000))
    meta = json.load(open(tmp_path / "out" / "meta.json"))
    assert meta["complete"] and meta["table_sizes"] == [1000] * 26
    bad = report.bad[str(src)]
    want = {}
    for _, reason in bad_rows(random.Random(0)):
        want[reason] = want.get(reason, 0) + 1
    want["CRLF line ending (repaired, row kept)"] = 3
    assert bad.counts == want
    # reported line numbers point at the malformed lines
    for reason, ex in bad.examples.items():
        for no, _ in ex:
            assert (ref_parse(lines[no - 1]) is None) != ("CRLF" in reason)


def test_raw_ids_kept_as_int64_when_no_range(tmp_path):
    lines = make_lines(200, with_bad=False)
    s = settings([write(tmp_path / "t.txt", lines)], tmp_path / "out")
    pp.run(s)
    for d, numbered in enumerate(ref_days(lines, 7)):
        assert_day_equal(s.output, d, ref_day_arrays(numbered, d, lambda f, v: v))
    assert np.load(tmp_path / "out" / "day_0_sparse.npy").dtype == np.int64


def test_terabyte_gzip_days_and_sub_sampling_of_training_days_only(tmp_path):
    days = [make_lines(300, seed=d) for d in range(3)]
    inputs = [write(tmp_path / f"day_{d}.gz", days[d], gz=True) for d in range(3)]
    s = settings(inputs[::-1], tmp_path / "out", dataset="terabyte", max_ind_range=77,
                 sub_sample_rate=0.5, seed=5, workers=2, chunk_bytes=64 << 10)
    report = pp.run(s)
    for d in range(3):
        numbered = [(i + 1, t) for i, t in enumerate(days[d])]
        want = ref_day_arrays(numbered, d, lambda f, v: v % 77, rate=0.5, seed=5, train=d < 2)
        assert_day_equal(s.output, d, want)
    assert report.sub_sampled > 100
    assert json.load(open(tmp_path / "out" / "day_2.json"))["sub_sampled"] == 0


def test_vocab_mode_numbers_frequent_values_and_shares_a_rare_id(tmp_path):
    lines = make_lines(700, seed=3)
    s = settings([write(tmp_path / "t.txt", lines)], tmp_path / "out", frequency_threshold=3)
    pp.run(s)
    counts = [{} for _ in range(26)]
    for line in lines:
        r = ref_parse(line)
        if r:
            for f, v in enumerate(r[2]):
                counts[f][v] = counts[f].get(v, 0) + 1
    vocab = [sorted(v for v, c in cf.items() if c >= 3) for cf in counts]
    index = [{v: i for i, v in enumerate(vf)} for vf in vocab]
    for d, numbered in enumerate(ref_days(lines, 7)):
        want = ref_day_arrays(numbered, d, lambda f, v: index[f].get(v, len(vocab[f])))
        assert_day_equal(s.output, d, want)
    meta = json.load(open(tmp_path / "out" / "meta.json"))
    assert meta["table_sizes"] == [len(v) + 1 for v in vocab]
    assert list(np.load(tmp_path / "out" / "vocab" / "cat_5.npy")) == vocab[5]


def test_resume_skips_done_days_and_rejects_other_settings(tmp_path):
    lines = make_lines(300, with_bad=False)
    src = write(tmp_path / "t.txt", lines)
    s = settings([src], tmp_path / "out", max_ind_range=50)
    pp.run(s)
    out = tmp_path / "out"
    before = {d: os.stat(out / f"day_{d}_dense.npy").st_mtime_ns for d in range(7)}
    os.remove(out / "day_3.json")  # as if interrupted while writing day 3
    os.remove(out / "day_3_dense.npy")
    pp.run(settings([src], out, max_ind_range=50))
    for d in range(7):
        if d != 3:
            assert os.stat(out / f"day_{d}_dense.npy").st_mtime_ns == before[d]
    assert_day_equal(out, 3, ref_day_arrays(ref_days(lines, 7)[3], 3, lambda f, v: v % 50))
    assert not list(out.glob("*.tmp"))
    with pytest.raises(pp.PreprocessError, match="other settings"):
        pp.run(settings([src], out, max_ind_range=51))


def test_missing_input_stops_before_any_work(tmp_path, capsys):
    src = write(tmp_path / "day_0", make_lines(10, with_bad=False))
    rc = preprocess_cli.main([str(src), str(tmp_path / "day_1.gz"), "-o", str(tmp_path / "out"),
                  "--dataset", "terabyte", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: input file(s) not found") and "day_1.gz" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_strict_mode_stops_at_first_malformed_row_with_file_and_line(tmp_path, capsys):
    lines = make_lines(50, with_bad=False)
    lines.insert(20, "\t".join(lines[0].split("\t")[:30]))
    src = write(tmp_path / "t.txt", lines)
    rc = preprocess_cli.main([str(src), "-o", str(tmp_path / "out"), "--dataset", "kaggle",
                  "--strict", "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"error: {src}:21: wrong column count: 30 columns, expected 40" in err
    assert not (tmp_path / "out" / "meta.json").exists() or not json.load(
        open(tmp_path / "out" / "meta.json"))["complete"]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_a_complete_last_row_without_newline_is_kept_a_cut_one_is_truncated(tmp_path):
    lines = make_lines(200, with_bad=False)
    # as an editor saves it: all 40 columns, no newline after the last row
    plain = write(tmp_path / "day_0", lines, final_newline=False)
    cut = write(tmp_path / "day_1", lines[:199] + ["\t".join(lines[199].split("\t")[:20])],
                final_newline=False)
    blob = gzip.compress(("\n".join(lines) + "\n").encode())
    (tmp_path / "day_2.gz").write_bytes(blob[: len(blob) // 2])
    s = settings([plain, cut, tmp_path / "day_2.gz"], tmp_path / "out", dataset="terabyte",
                 max_ind_range=10)
    report = pp.run(s)
    truncated = "truncated last line (no newline at end of file, too few columns)"
    assert not report.bad[str(plain)].counts
    numbered = [(i + 1, t) for i, t in enumerate(lines)]
    assert_day_equal(s.output, 0, ref_day_arrays(numbered, 0, lambda f, v: v % 10))
    b1 = report.bad[str(cut)]
    assert b1.counts == {truncated: 1} and b1.examples[truncated][0][0] == 200
    assert_day_equal(s.output, 1, ref_day_arrays(numbered[:199], 1, lambda f, v: v % 10))
    b2 = report.bad[str(tmp_path / "day_2.gz")]
    assert b2.counts.get("truncated gzip stream") == 1
    kept = len(np.load(tmp_path / "out" / "day_2_labels.npy"))
    assert 0 < kept < 200
    assert_day_equal(s.output, 2, ref_day_arrays(numbered[:kept], 2, lambda f, v: v % 10))
    assert json.load(open(tmp_path / "out" / "day_0.json"))["lines"] == 200
    with pytest.raises(pp.PreprocessError, match=r"day_2.gz:\d+: truncated"):
        good = write(tmp_path / "day_3", lines)
        pp.run(settings([tmp_path / "day_2.gz", good], tmp_path / "out2",
                        dataset="terabyte", strict=True))


def test_non_criteo_file_stops_clearly(tmp_path, capsys):
    src = tmp_path / "notes.csv"
    src.write_text("a,b,c\n1,2,3\n" * 50)
    rc = preprocess_cli.main([str(src), "-o", str(tmp_path / "out"), "--dataset", "kaggle",
                  "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not look like Criteo data" in err and "Traceback" not in err
    binary = tmp_path / "x.bin"
    binary.write_bytes(bytes(range(1, 256)).replace(b"\n", b"") * 8000)
    rc = preprocess_cli.main([str(binary), "-o", str(tmp_path / "out2"), "--dataset", "kaggle",
                  "--workers", "0", "--no-progress"])
    assert rc == 2 and "not Criteo text" in capsys.readouterr().err


def test_npy_files_are_standard_and_torchrec_shaped(tmp_path):
    s = settings([write(tmp_path / "t.txt", make_lines(70, with_bad=False))], tmp_path / "out",
                 max_ind_range=100)
    pp.run(s)
    dense = np.load(tmp_path / "out" / "day_0_dense.npy", mmap_mode="r")
    sparse = np.load(tmp_path / "out" / "day_0_sparse.npy", mmap_mode="r")
    labels = np.load(tmp_path / "out" / "day_0_labels.npy", mmap_mode="r")
    assert dense.dtype == np.float32 and dense.shape == (10, 13)
    assert sparse.dtype == np.int32 and sparse.shape == (10, 26)
    assert labels.dtype == np.int32 and labels.shape == (10, 1)
    assert dense.offset == pp.HEADER_BYTES
