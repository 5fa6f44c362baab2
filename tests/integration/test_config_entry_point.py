"""The training command with a mistake in its config: one `error:` line naming the key and
the value, exit status 2, no traceback. (The messages themselves: tests/unit/test_config.py.)"""

import subprocess
import sys


def test_entry_point_prints_config_errors_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "dlrm_torchrec.train", "--config", "configs/tiny_cpu.yaml",
         "data.batch_size=-1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: data.batch_size=-1: must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr
