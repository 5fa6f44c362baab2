"""Whether a Slurm cluster answers this machine (the localhost one that
`launch/slurm/slurm_local.sh start` brings up, or any other): the Slurm tests skip without."""

import shutil
import subprocess

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
