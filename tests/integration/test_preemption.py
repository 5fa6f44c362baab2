"""SIGTERM (scancel, a time limit, preemption, pod eviction, torchrun's shutdown): every rank
stops after the same step, a checkpoint is saved there, and resuming from it trains exactly
like a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dlrm_torchrec.config import load_config
from dlrm_torchrec.train import checkpoint
from dlrm_torchrec.train.preemption import StopRequest
from tests.helpers.dist_utils import run_ranks

ROOT = Path(__file__).resolve().parents[2]


def _stop_step_worker(rank, world_size, out_dir, signal_rank, signal_step):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    stops = {}
    for case, sender in (("signalled", signal_rank), ("quiet", None)):
        request = StopRequest(world_size)
        request.install()
        stops[case] = None
        for step in range(1, 201):
            if rank == sender and step == signal_step:
                os.kill(os.getpid(), signal.SIGTERM)
            if request.poll(step):
                stops[case] = step
                break
        request.uninstall()
    stops["handler_restored"] = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(stops))
    dist.destroy_process_group()


def test_ranks_stop_after_the_same_step_when_only_one_is_signalled(tmp_path):
    run_ranks(2, _stop_step_worker, str(tmp_path), 1, 21)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0]["signalled"] == got[1]["signalled"]
    # the signal lands after step 20's poll; the flag goes out at step 24 and is read at 32
    assert got[0]["signalled"] == 32
    assert got[0]["quiet"] is None and got[1]["quiet"] is None
    assert got[0]["handler_restored"] and got[1]["handler_restored"]


def test_one_process_stops_at_the_next_step_and_disabled_leaves_sigterm_alone():
    request = StopRequest(1)
    request.install()
    try:
        assert not request.poll(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.poll(2) and request.signal_name == "SIGTERM"
    finally:
        request.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    off = StopRequest(1, enabled=False)
    off.install()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and not off.poll(8)


BASE = [
    "data.train_samples=76800", "data.eval_samples=2048", "data.batch_size=256",
    "training.eval_every_n_steps=0", "logging.log_every_n_steps=1",
    "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false",
    "sharding.sharding_type=table_wise",
]  # 300 steps of 256


def _train(rank, world_size, overrides):
    from dlrm_torchrec.train.job import train

    train(load_config("configs/tiny_cpu.yaml", overrides))


def _metrics(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def _descendants(pid):
    """Every live process below `pid` (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path("/proc", entry, "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_sigterm_to_every_process_of_a_torchrun_job_saves_and_resume_matches_uninterrupted(
        tmp_path):
    """As Slurm does at scancel or the time limit: SIGTERM to torchrun, its ranks and their
    loader workers at once. Log lines every 5 steps, so the stop (a multiple of 8) falls
    between two: the resumed run still logs the uninterrupted run's mean losses."""
    every5 = BASE + ["logging.log_every_n_steps=5"]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "-m", "dlrm_torchrec.train", "--config", "configs/tiny_cpu.yaml",
           *every5, f"logging.run_dir={run}", "data.num_workers=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stderr = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # rank 0's log lines
        if line.startswith("step      40 ") or time.monotonic() > deadline:
            break
    processes = [proc.pid] + _descendants(proc.pid)
    assert len(processes) >= 5, processes  # torchrun, 2 ranks, a loader worker each
    for pid in processes:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    out = proc.stdout.read()
    proc.wait(timeout=120)
    err = "".join(stderr)
    assert proc.returncode != 0
    assert "stopped: SIGTERM: stopped after step" in err, err[-3000:]
    assert "DataLoader worker" not in err  # the workers left the signal to their rank
    saved = checkpoint.latest_checkpoint(run / "checkpoints")
    assert saved is not None and 40 < saved.step < 300 and saved.step % 8 == 0, out[-2000:]
    stopped = _metrics(run)
    assert stopped["stopped_by_signal"] == "SIGTERM" and stopped["steps"] == saved.step
    assert stopped["evals"] == []  # no evaluation in the grace period


    run_ranks(2, _train, every5 + [f"logging.run_dir={run}", "checkpoint.resume=auto"])
    full = tmp_path / "full"
    run_ranks(2, _train, every5 + [f"logging.run_dir={full}"])
    got, want = _metrics(run), _metrics(full)
    assert got["steps"] == want["steps"] == 300
    assert got["train_samples_seen"] == want["train_samples_seen"] == 76800
    losses = {h["step"]: h["train_loss"] for h in got["history"]}
    assert sorted(losses) == list(range(5, 301, 5))
    for h in want["history"]:
        assert losses[h["step"]] == pytest.approx(h["train_loss"], abs=1e-6), h["step"]
    assert got["final"]["log_loss"] == pytest.approx(want["final"]["log_loss"], abs=1e-6)
    assert got["final"]["auc"] == pytest.approx(want["final"]["auc"], abs=1e-6)


def _train_signalling_one_rank(rank, world_size, overrides, signal_rank, signal_step):
    import faulthandler

    from dlrm_torchrec.train import trainer as trainer_module
    from dlrm_torchrec.train.preemption import Preempted

    faulthandler.dump_traceback_later(150, exit=True)  # ranks that disagree hang: fail instead
    inject_crash = trainer_module.Trainer._maybe_inject_crash

    def signal_at_step(self):
        if self.info.rank == signal_rank and self.step == signal_step:
            os.kill(os.getpid(), signal.SIGTERM)
        inject_crash(self)

    trainer_module.Trainer._maybe_inject_crash = signal_at_step
    try:
        _train(rank, world_size, overrides)
    except Preempted:
        pass


def test_a_signal_to_one_rank_just_before_an_evaluation_stops_every_rank_at_one_step(tmp_path):
    """Rank 1 alone is signalled at step 19, its last step before the evaluation at step 20
    (8 batches): both ranks finish that evaluation (its 8th batch sends the news), go on, and
    stop together at step 24, where they read it."""
    overrides = BASE + [f"logging.run_dir={tmp_path}", "data.train_samples=16384",
                        "training.eval_every_n_steps=20"]  # 64 steps
    run_ranks(2, _train_signalling_one_rank, overrides, 1, 19)
    m = _metrics(tmp_path)
    assert m["stopped_by_signal"] == "SIGTERM" and m["steps"] == 24
    assert [e["step"] for e in m["evals"]] == [20]
    assert checkpoint.latest_checkpoint(tmp_path / "checkpoints").step == 24


@pytest.mark.slow  # 37 s: CI runs it; make test stays under 15 min
def test_a_signal_during_an_evaluation_stops_it_and_the_resumed_run_evaluates_first(tmp_path):
    """Rank 1 is signalled in step 20, the last before the evaluation at 20 (32 batches): the
    ranks agree at its 16th batch, give it up and save step 20 asking for it again. The
    resumed run evaluates step 20 first and then trains and evaluates exactly like a run that
    was never interrupted."""
    eval_at_20 = BASE + ["data.train_samples=16384", "data.eval_samples=8192",
                         "training.eval_every_n_steps=20"]  # 64 steps, evaluations of 32 batches
    run = tmp_path / "run"
    run_ranks(2, _train_signalling_one_rank, eval_at_20 + [f"logging.run_dir={run}"], 1, 20)
    stopped = _metrics(run)
    assert stopped["stopped_by_signal"] == "SIGTERM" and stopped["steps"] == 20
    assert stopped["evals"] == []
    saved = checkpoint.latest_checkpoint(run / "checkpoints")
    assert saved.step == 20
    assert checkpoint.read_trainer_state(saved.path)["eval_pending_epoch"] == 0

    run_ranks(2, _train, eval_at_20 + [f"logging.run_dir={run}", "checkpoint.resume=auto"])
    full = tmp_path / "full"
    run_ranks(2, _train, eval_at_20 + [f"logging.run_dir={full}"])
    got, want = _metrics(run), _metrics(full)
    assert [e["step"] for e in got["evals"]] == [e["step"] for e in want["evals"]] == [20, 40, 60, 64]
    for g, w in zip(got["evals"], want["evals"]):
        assert g["epoch"] == w["epoch"] and g["samples"] == w["samples"] == 8192
        assert g["auc"] == pytest.approx(w["auc"], abs=1e-6)
        assert g["log_loss"] == pytest.approx(w["log_loss"], abs=1e-6)
    losses = {h["step"]: h["train_loss"] for h in got["history"]}
    for h in want["history"]:
        assert losses[h["step"]] == pytest.approx(h["train_loss"], abs=1e-6), h["step"]
    assert got["best_step"] == want["best_step"] and got["stopped_by_signal"] is None
