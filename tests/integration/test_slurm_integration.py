"""A real Slurm job: the tiny config submitted with `torchx run -s slurm`, on the localhost
cluster that `launch/slurm/slurm_local.sh start` brings up (or any cluster this machine
can submit to). Skipped where no Slurm answers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.slurm import SKIP_REASON, cluster_ready, run_torchx_job

REPO = Path(__file__).resolve().parents[2]
SUBMIT_TIMEOUT_S = 600


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not cluster_ready(), reason=SKIP_REASON),
]


def test_torchx_slurm_run_of_tiny_config_on_two_cpu_ranks(tmp_path):
    job_dir = tmp_path / "job"  # torchx snapshots the repository here and runs from it
    run_dir = tmp_path / "run"
    # The job inherits this environment: this interpreter's torchrun must be on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc, job_id, logs = run_torchx_job(
        [f"{REPO}/launch/components.py:train_cpu", "-j", "1x2", "--",
         f"logging.run_dir={run_dir}"],
        job_dir, tmp_path, env, timeout=SUBMIT_TIMEOUT_S)
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\n{logs}"

    # accounting agrees with torchx, and the job ran the requested shape
    sacct = subprocess.run(
        ["sacct", "--noheader", "--parsable2", "-X", "-j", job_id,
         "--format=JobName,State,AllocCPUS"],
        capture_output=True, text=True, check=True).stdout.split()
    assert sacct == ["train-0|COMPLETED|2"]
    script = (job_dir / "torchx-sbatch.sh").read_text()  # what sbatch ran
    assert "--nnodes 1 --nproc_per_node 2" in script

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] > 0, metrics
