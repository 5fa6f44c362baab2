"""Whether a Slurm cluster answers this machine (the localhost one that
`launch/slurm/slurm_local.sh start` brings up, or any other): the Slurm tests skip without."""

import glob
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

SKIP_REASON = "no Slurm cluster answers (launch/slurm/slurm_local.sh start)"


def _answers(*cmd: str) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def cluster_ready() -> bool:
    # torchx submits with sbatch and reads job state with sacct (accounting must be on)
    return (shutil.which("sbatch") is not None and _answers("scontrol", "ping")
            and _answers("sacct", "--noheader", "--starttime=now"))


def run_torchx_job(component_and_args: List[str], job_dir: Path, cwd: Path, env: Dict[str, str],
                   timeout: float) -> Tuple[subprocess.CompletedProcess, str, str]:
    """`torchx run --wait -s slurm` of the repository (snapshotted into `job_dir`), run from
    `cwd` (torchx records job dirs in ./.torchxslurmjobdirs). Returns (the torchx process,
    the Slurm job id, the tail of each of the job's log files); a job still running at the
    timeout is cancelled."""
    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torchx.cli.main", "run", "--wait",
           "--workspace", f"file://{repo}", "-s", "slurm",
           "-cfg", f"job_dir={job_dir},time=00:10:00", *component_and_args]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        handle = re.search(r"slurm://\S+/(\d+)", str(e.stdout or ""))
        if handle:
            subprocess.run(["scancel", handle.group(1)], check=False)
        raise
    handle = re.search(r"slurm://\S+/(\d+)", proc.stdout)
    assert handle, f"no app handle in torchx output:\n{proc.stdout}\n{proc.stderr}"
    job_id = handle.group(1)
    logs = "".join(Path(p).read_text()[-3000:]
                   for p in sorted(glob.glob(f"{job_dir}/slurm-{job_id}*")))
    return proc, job_id, logs
