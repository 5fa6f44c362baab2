"""`prepare_mlperf --multi-hot`: MLPerf's `day_{d}_sparse_multi_hot.npz` against a direct,
whole-array construction written here from the definition in MLPerf's
materialize_synthetic_multihot_dataset.py and its Multihot class (the global RNG seeded
with 0, one lookup table per feature drawn in one call, a day's ids taken mod the table size
and looked up with torch's embedding, np.savez), compared byte by byte; also after a killed
run is restarted, for bad flags, and by training on the folder."""

import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from dlrm_torchrec.cli import prepare_mlperf as cli
from dlrm_torchrec.config import load_config
from dlrm_torchrec.data.converters import mlperf_multi_hot as mh
from tests.helpers.dist_utils import run_ranks
from tests.helpers.torchrec_preprocessing import raw_row

DAYS = 24
ROWS_PER_DAY = 200
MEMORY = ["--memory-gb", "0.0002"]  # several chunks per table and per zip member
# small tables: the ids (up to a few thousand per feature) are folded mod them
TABLES = [500, 7, 3000, 1, 40, 3, 900, 15, 63, 2000, 300, 405, 10, 22, 119, 155, 4, 97, 14,
          450, 60, 1200, 59, 129, 108, 36]
PARETO_SIZES = [4, 2, 1, 2, 6, 1, 1, 1, 11, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 30, 27, 10, 3,
                1, 2]


def flags(sizes, tables, dist):
    return ["--multi-hot", "--multi-hot-sizes", ",".join(map(str, sizes)),
            "--multi-hot-table-sizes", ",".join(map(str, tables)),
            "--multi-hot-distribution", dist]


def script_tables(sizes, tables, dist):
    """The lookup tables as MLPerf's Multihot builds them: one RNG stream seeded once,
    each table [ids, draws] in one call, int32."""
    np.random.seed(0)
    out = []
    for n, k in zip(tables, sizes):
        ids = np.arange(n)[:, np.newaxis]
        if dist == "uniform":
            draws = np.random.randint(0, n, size=(n, k - 1))
        else:
            with np.errstate(invalid="ignore"):  # draws >= 2**31 do not fit int32
                draws = np.random.pareto(a=0.25, size=(n, k - 1)).astype(np.int32) % n
        out.append(torch.from_numpy(np.concatenate((ids, draws), axis=-1)).int())
    return out


def script_day(sparse_path, lookup, tables, dst):
    sparse = np.load(sparse_path, mmap_mode="r")
    members = {}
    for j, (table, n) in enumerate(zip(lookup, tables)):
        members[str(j)] = torch.nn.functional.embedding(
            torch.from_numpy(sparse[:, j] % n), table).numpy()
    np.savez(dst, **members)


def assert_as_the_script(out, sizes, tables, dist, tmp_path):
    lookup = script_tables(sizes, tables, dist)
    for d in range(DAYS):
        want = tmp_path / f"want_{d}.npz"
        script_day(out / f"day_{d}_sparse.npy", lookup, tables, want)
        got = out / f"day_{d}_sparse_multi_hot.npz"
        assert got.read_bytes() == want.read_bytes(), got.name
        want.unlink()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    rng = random.Random(11)
    paths = []
    for d in range(DAYS):
        p = root / f"day_{d}"
        p.write_text("".join(raw_row(rng) + "\n" for _ in range(ROWS_PER_DAY + d)))
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def uniform_run(inputs, tmp_path_factory):
    """One uninterrupted run with MLPerf's bag sizes (the default) on small tables."""
    out = tmp_path_factory.mktemp("uniform") / "out"
    argv = inputs + ["-o", str(out), "--workers", "2", "--multi-hot",
                     "--multi-hot-table-sizes", ",".join(map(str, TABLES))] + MEMORY
    assert cli.main(argv) == 0
    return out


def test_mlperf_defaults_are_the_mlperf_configs_sizes():
    cfg = yaml.safe_load(open("configs/mlperf_dcnv2.yaml"))
    assert list(mh.MLPERF_TABLE_SIZES) == cfg["embeddings"]["num_embeddings_per_feature"]
    assert list(mh.MLPERF_BAG_SIZES) == cfg["data"]["multi_hot_sizes"]
    assert cfg["data"]["multi_hot_distribution"] == "uniform"
    # the formula of docs/mlperf_data.md: 4 * sum n_f (k_f - 1) bytes
    assert mh.table_bytes(mh.MLPERF_BAG_SIZES, mh.MLPERF_TABLE_SIZES) == 23_098_260_712  # 23.1 GB


def test_uniform_bags_are_byte_identical_to_the_scripts(uniform_run, tmp_path):
    out = uniform_run
    assert_as_the_script(out, list(mh.MLPERF_BAG_SIZES), TABLES, "uniform", tmp_path)
    assert not (out / ".prepare").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["multi_hot_sizes"] == list(mh.MLPERF_BAG_SIZES)
    assert meta["day_files"][5]["sparse"] == "day_5_sparse_multi_hot.npz"
    # the table sizes, noted as the bags were written: their largest id + 1, read here
    largest = np.zeros(len(TABLES), np.int64)
    for d in range(DAYS):
        with np.load(out / f"day_{d}_sparse_multi_hot.npz") as bags:
            largest = np.maximum(largest, [bags[str(f)].max() for f in range(len(TABLES))])
    assert meta["table_sizes"] == (largest + 1).tolist()


def test_pareto_bags_are_byte_identical_to_the_scripts(inputs, tmp_path):
    # the x86-64 cast of draws >= 2**31 to int32 (-2**31) must occur in these tables
    np.random.seed(0)
    big = sum(int((np.random.pareto(0.25, size=(n, k - 1)) >= 2 ** 31).sum())
              for n, k in zip(TABLES, PARETO_SIZES))
    assert big > 20
    out = tmp_path / "out"
    assert cli.main(inputs + ["-o", str(out), "--workers", "2"]
                    + flags(PARETO_SIZES, TABLES, "pareto") + MEMORY) == 0
    assert_as_the_script(out, PARETO_SIZES, TABLES, "pareto", tmp_path)


@pytest.mark.parametrize("kill_at", ["parse:3", "multi_hot:5"])
def test_a_killed_run_restarted_writes_the_same_bytes(inputs, uniform_run, tmp_path, kill_at):
    out = tmp_path / "out"
    argv = [*inputs, "-o", str(out), "--workers", "2", "--multi-hot",
            "--multi-hot-table-sizes", ",".join(map(str, TABLES)), *MEMORY]
    env = dict(os.environ, DLRM_PREPARE_KILL_AFTER=kill_at)
    proc = subprocess.run([sys.executable, "-m", "dlrm_torchrec.data.prepare_mlperf", *argv],
                          env=env, capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "meta.json").exists()
    assert cli.main(argv) == 0
    names = sorted(n for n in os.listdir(uniform_run) if n.startswith("day_"))
    assert sorted(n for n in os.listdir(out) if n.startswith("day_")) == names
    assert len([n for n in names if n.endswith(".npz")]) == DAYS
    for name in names:
        assert (out / name).read_bytes() == (uniform_run / name).read_bytes(), name


def test_tables_drawn_again_from_a_saved_state_are_the_same(tmp_path):
    sizes, tables = PARETO_SIZES, TABLES
    mh.draw_tables(str(tmp_path), sizes, tables, "uniform", 4096)
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # as if killed while drawing table 9: tables 9 .. 25 and their states are gone
    for f in range(9, 26):
        for name in (f"table_{f}.npy", f"state_{f}.json"):
            if (tmp_path / name).exists():
                (tmp_path / name).unlink()
    mh.draw_tables(str(tmp_path), sizes, tables, "uniform", 1000)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first
    want = script_tables(sizes, tables, "uniform")
    for f in (0, 9, 20):
        assert np.array_equal(np.load(tmp_path / f"table_{f}.npy"), want[f][:, 1:].numpy())


def _error(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_multi_hot_flags_stop_before_any_work(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    base = inputs + ["-o", str(out), "--multi-hot"]
    assert "--multi-hot-sizes: 25 values, expected 26" in _error(
        capsys, base + ["--multi-hot-sizes", ",".join(["1"] * 25)])
    assert "--multi-hot-sizes: 0 is not allowed" in _error(
        capsys, base + ["--multi-hot-sizes", ",".join(["2"] * 25 + ["0"])])
    assert "--multi-hot-table-sizes: -3 is not allowed" in _error(
        capsys, base + ["--multi-hot-table-sizes", ",".join(["5"] * 25 + ["-3"])])
    assert "--multi-hot-table-sizes: 27 values" in _error(
        capsys, base + ["--multi-hot-table-sizes", ",".join(["5"] * 27)])
    assert "expected comma-separated integers" in _error(
        capsys, base + ["--multi-hot-sizes", "3,x"])
    assert "must be uniform or pareto" in _error(
        capsys, base + ["--multi-hot-distribution", "zipf"])
    assert "given without --multi-hot" in _error(
        capsys, inputs + ["-o", str(out), "--multi-hot-sizes", "1"])
    assert not out.exists()


def _train(rank, world_size, overrides):
    from dlrm_torchrec.train.job import train

    train(load_config("configs/mlperf_dcnv2.yaml", overrides))


def test_the_multi_hot_folder_trains_with_the_mlperf_config(uniform_run, tmp_path):
    run_dir = tmp_path / "run"
    run_ranks(1, _train, [
        f"data.path={uniform_run}", "data.source=criteo_terabyte",
        f"embeddings.num_embeddings_per_feature=[{','.join(map(str, TABLES))}]",
        "embeddings.max_ind_range=3000", "embeddings.dim=8",
        "model.dcn_low_rank_dim=4", "model.bottom_mlp=[16,8]", "model.top_mlp=[16,1]",
        "data.batch_size=1024", "data.eval_batch_size=512", "training.eval_every_n_steps=0",
        f"logging.run_dir={run_dir}", "logging.progress_bar=false", "checkpoint.at_end=false",
    ])
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["train_samples_seen"] == sum(ROWS_PER_DAY + d for d in range(23))
    assert m["final"]["split"] == "val" and m["final"]["samples"] == -(-(ROWS_PER_DAY + 23) // 2)
