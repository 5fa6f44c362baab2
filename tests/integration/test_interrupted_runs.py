"""Ctrl-C: a terminal sends SIGINT to every process of the foreground job, the tool and its
worker processes alike. The tool ends with exit status 130 and one line saying what is safe,
no process prints a traceback or stays behind, and the same command (or resume=auto)
continues to the result an uninterrupted run gives."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.criteo_rows import make_lines

REPO = Path(__file__).resolve().parents[2]


def _interrupt_when(cmd, cwd, pattern, timeout=120):
    """Run `cmd` in a session of its own; as soon as a path matching `pattern` exists,
    SIGINT its whole process group, as Ctrl-C in a terminal does. Returns (status, stdout,
    stderr) and checks that no process of the group is left."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # a shell without job control starts background commands with SIGINT ignored, and
    # Python then keeps ignoring it (a suite run under `nohup ... &`): the job gets the
    # default disposition a terminal's foreground job has
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + timeout
    while not glob.glob(os.path.join(cwd, pattern)):
        assert proc.poll() is None, f"ended before {pattern} appeared: {proc.stderr.read()}"
        assert time.time() < deadline, f"{pattern} never appeared"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    time.sleep(0.5)
    try:
        os.killpg(proc.pid, 0)
        left = True
    except ProcessLookupError:
        left = False
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, "processes of the interrupted job are still running"
    return proc.returncode, out, err


def test_ctrl_c_stops_training_with_loader_workers_and_resume_continues(tmp_path):
    train = [sys.executable, "-m", "dlrm_torchrec.train", "--config",
             str(REPO / "configs/tiny_cpu.yaml"), "logging.run_dir=run", "data.num_workers=2",
             "logging.progress_bar=false", "checkpoint.every_n_steps=20", "logging.plot=false",
             "logging.log_every_n_steps=10"]
    code, out, err = _interrupt_when(train, tmp_path, "run/checkpoints/step_????????")
    assert code == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == ("interrupted; continue from the newest checkpoint "
                                            "with checkpoint.resume=auto"), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    newest = sorted((tmp_path / "run/checkpoints").glob("step_????????"))[-1]
    assert not list((tmp_path / "run/checkpoints").glob("*.tmp-*"))  # no partial save left
    step = int(newest.name.split("_")[1])
    proc = subprocess.run([*train, "checkpoint.resume=auto", f"training.max_steps={step + 20}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from run/checkpoints/{newest.name}: step {step}" in proc.stdout
    history = json.loads((tmp_path / "run/metrics.json").read_text())["history"]
    assert history[-1]["step"] == step + 20


def test_ctrl_c_stops_preprocessing_with_workers_and_the_rerun_writes_the_same_bytes(tmp_path):
    block = ("\n".join(make_lines(2000, with_bad=False)) + "\n").encode()
    with open(tmp_path / "train.txt", "wb") as f:
        for _ in range(80 << 20 // len(block) + 1):  # about 80 MB: seconds of parsing
            f.write(block)
    cmd = [sys.executable, "-m", "dlrm_torchrec.data.preprocess", "train.txt", "--dataset",
           "kaggle", "--max-ind-range", "1000", "--workers", "2", "--chunk-mb", "0.25",
           "--no-progress"]
    code, out, err = _interrupt_when([*cmd, "-o", "out"], tmp_path, "out/*")
    assert code == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert "Traceback" not in err, err[-3000:]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for out_dir in ("out", "uninterrupted"):
        proc = subprocess.run([*cmd, "-o", out_dir], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "uninterrupted").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out").iterdir())
    for name in names:
        if name.endswith(".npy"):
            assert (tmp_path / "out" / name).read_bytes() == \
                (tmp_path / "uninterrupted" / name).read_bytes(), name
