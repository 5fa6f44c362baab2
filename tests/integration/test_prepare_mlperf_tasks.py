"""`prepare_mlperf` split over several tasks: each stage's tasks shared out by rank, as
separate per-stage runs, as a torchx job (launch/components.py:prepare_mlperf) on local_cwd
and on Slurm; each compared byte for byte with a one-process run of the same command."""

import glob
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dlrm_torchrec.cli import prepare_mlperf as cli
from dlrm_torchrec.data.converters.prepare_mlperf import STAGES
from tests.helpers.slurm import SKIP_REASON, cluster_ready, run_torchx_job
from tests.helpers.torchrec_preprocessing import raw_row

REPO = Path(__file__).resolve().parents[2]
ROWS_PER_DAY = 150
OPTIONS = ["--workers", "1", "--memory-gb", "0.0002", "--multi-hot", "--multi-hot-table-sizes",
           ",".join(str(n) for n in [300, 7, 900, 1, 40, 3, 90, 15, 63, 200, 30, 45, 10, 22,
                                     19, 15, 4, 97, 14, 45, 60, 120, 59, 12, 108, 36])]


@pytest.fixture(scope="module")
def one_task(tmp_path_factory):
    """The inputs, and what one process makes of them."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(3)
    inputs = []
    for d in range(24):
        p = root / "raw" / f"day_{d}"
        p.parent.mkdir(exist_ok=True)
        p.write_text("".join(raw_row(rng) + "\n" for _ in range(ROWS_PER_DAY + 2 * d)))
        inputs.append(str(p))
    out = root / "one"
    assert cli.main(inputs + ["-o", str(out)] + OPTIONS) == 0
    return {"inputs": inputs, "out": out}


def assert_same_files(out, want):
    names = sorted(n for n in os.listdir(want) if n.startswith("day_"))
    assert len(names) == 24 * 4
    assert sorted(n for n in os.listdir(out) if n.startswith("day_")) == names
    for name in names:
        assert (out / name).read_bytes() == (want / name).read_bytes(), name
    assert (out / "meta.json").exists() and not (out / ".prepare").exists()


def _command(inputs, out, *extra):
    return [sys.executable, "-m", "dlrm_torchrec.data.prepare_mlperf", *inputs, "-o", str(out),
            *OPTIONS, *extra]


def test_each_stage_shared_by_two_tasks_writes_the_same_bytes(one_task, tmp_path):
    out = tmp_path / "out"
    for stage in STAGES:
        # both tasks of a stage at once; the next stage starts when both have ended
        ranks = [0] if stage == "meta" else [0, 1]
        procs = [subprocess.Popen(_command(one_task["inputs"], out, "--stage", stage,
                                           "--rank", str(r), "--world-size", "2"),
                                  stderr=subprocess.PIPE, text=True) for r in ranks]
        for r, p in zip(ranks, procs):
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, f"stage {stage} rank {r}: {err[-2000:]}"
    assert_same_files(out, one_task["out"])


def test_a_stage_before_its_predecessor_stops_with_one_line(one_task, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(one_task["inputs"] + ["-o", str(out), "--stage", "parse", "--rank", "0",
                                          "--world-size", "3"] + OPTIONS) == 0
    capsys.readouterr()
    # rank 0 of 3 took tasks 0, 3, 6, ...: the multi-hot tables (the first), days 2, 5, ...
    parsed = sorted(int(n[4:]) for n in os.listdir(out / ".prepare" / "parse")
                    if not n.endswith(".tmp"))
    assert parsed == list(range(2, 24, 3))
    assert (out / ".prepare" / "multi_hot" / "tables" / "state_25.json").exists()
    assert cli.main(one_task["inputs"] + ["-o", str(out), "--stage", "vocab"] + OPTIONS) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --stage vocab: day 0 is not parsed; run --stage parse first (all "
                   "its tasks), or --stage all"]
    assert cli.main(one_task["inputs"] + ["-o", str(out), "--rank", "2", "--world-size", "2"]
                    + OPTIONS) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: rank 2 of 2 tasks: the rank must be in 0 .. 1"]


def _torchx_env():
    # the job runs `bash -c "torchrun ..."`: this interpreter's torchrun must come first
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def test_torchx_local_cwd_job_of_two_tasks_writes_the_same_bytes(one_task, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd",
           "-cfg", f"log_dir={tmp_path / 'logs'}", f"{REPO}/launch/components.py:prepare_mlperf",
           "-j", "1x2", "--", *one_task["inputs"], "-o", str(out), *OPTIONS]
    proc = subprocess.run(cmd, cwd=REPO, env=_torchx_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = "".join(Path(p).read_text() for p in glob.glob(f"{tmp_path}/logs/**/*.log",
                                                           recursive=True))
    # rank 1 ran its share of every stage and ended after the last barrier
    assert "stage all: task 1 of 2 done" in logs + proc.stderr
    assert_same_files(out, one_task["out"])


@pytest.mark.slow
@pytest.mark.skipif(not cluster_ready(), reason=SKIP_REASON)
def test_torchx_slurm_job_of_two_tasks_writes_the_same_bytes(one_task, tmp_path):
    job_dir, out = tmp_path / "job", tmp_path / "out"
    proc, _, logs = run_torchx_job(
        [f"{REPO}/launch/components.py:prepare_mlperf", "-j", "1x2",
         "--", *one_task["inputs"], "-o", str(out), *OPTIONS],
        job_dir, tmp_path, _torchx_env(), timeout=600)
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\n{logs}"
    assert "stage all: task 1 of 2 done" in logs, logs
    script = (job_dir / "torchx-sbatch.sh").read_text()
    assert "--nnodes 1 --nproc_per_node 2" in script
    assert_same_files(out, one_task["out"])
