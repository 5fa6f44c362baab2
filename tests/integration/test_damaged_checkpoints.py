"""Checkpoints whose files were damaged, lost or never finished: a checkpoint is used only
when every file its manifest lists is there with the recorded size and SHA-256. A damaged
one named by checkpoint.resume stops the run naming the file; resume=auto passes over it,
says why, and resumes from the newest one that verifies, which the losses after the resume
prove (they equal the uninterrupted run's from that step). A save that runs out of disk
space says so, keeps the previous checkpoint and removes its partial folder."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers.dist_utils import run_cli, run_ranks

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/tiny_cpu.yaml")
# 8 steps of 256 samples on one process; checkpoints at steps 4 and 8
RUN = ["data.train_samples=2048", "data.eval_samples=512", "data.batch_size=256",
       "training.eval_every_n_steps=0", "logging.log_every_n_steps=1",
       "logging.progress_bar=false", "checkpoint.every_n_steps=4", "checkpoint.keep_best=false",
       "logging.tensorboard=false", "logging.plot=false"]


def _train_cli(*args):
    return run_cli(["-m", "dlrm_torchrec.train", "--config", CONFIG, *RUN, *args], timeout=300)


def _losses(run_dir):
    m = json.loads((Path(run_dir) / "metrics.json").read_text())
    return {h["step"]: h["train_loss"] for h in m["history"]}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    proc = _train_cli(f"logging.run_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000008"], names
    return run


def _copy(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run / "checkpoints", run / "checkpoints")
    return run


def _flip_bytes_in_the_middle(path: Path, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _largest_shard(ckpt: Path) -> Path:
    return max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)


def _assert_resumed_from_step_4(proc, run, finished_run, why):
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "resume=auto: skipped" in out and why in out, out[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000004'}: step 4" in out, out[-3000:]
    # steps 5-8 trained again from step 4's state: the uninterrupted run's losses
    want, got = _losses(finished_run), _losses(run)
    for step in range(5, 9):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


def test_flipped_bytes_in_a_shard_are_refused_naming_the_file(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    newest = run / "checkpoints" / "step_00000008"
    shard = _largest_shard(newest)
    _flip_bytes_in_the_middle(shard)
    proc = _train_cli(f"logging.run_dir={run}", f"checkpoint.resume={newest}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"error: {shard}: damaged (its SHA-256 differs" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_resume_auto_passes_over_a_damaged_checkpoint_to_the_newest_that_verifies(finished_run,
                                                                                 tmp_path):
    run = _copy(finished_run, tmp_path)
    shard = _largest_shard(run / "checkpoints" / "step_00000008")
    _flip_bytes_in_the_middle(shard)
    proc = _train_cli(f"logging.run_dir={run}", "checkpoint.resume=auto")
    _assert_resumed_from_step_4(proc, run, finished_run, f"{shard}: damaged")


@pytest.mark.parametrize("lost", [".metadata", "trainer_state.json", "shard"])
def test_resume_auto_passes_over_a_checkpoint_missing_a_file(finished_run, tmp_path, lost):
    run = _copy(finished_run, tmp_path)
    newest = run / "checkpoints" / "step_00000008"
    gone = _largest_shard(newest) if lost == "shard" else newest / lost
    gone.unlink()
    proc = _train_cli(f"logging.run_dir={run}", "checkpoint.resume=auto")
    _assert_resumed_from_step_4(proc, run, finished_run, str(gone))


def _train_until_the_disk_fills(rank, world_size, run_dir):
    """Train in this rank with every write of checkpoint step 8 failing as a full disk
    does (ENOSPC from the storage writer); returns after checking the error."""
    from torch.distributed.checkpoint import filesystem

    from dlrm_torchrec.config import load_config
    from dlrm_torchrec.train.checkpoint import CheckpointError
    from dlrm_torchrec.train.job import train

    write_data = filesystem._FileSystemWriter.write_data

    def full_disk_at_step_8(self, plan, planner):
        if "step_00000008" in str(self.path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return write_data(self, plan, planner)

    filesystem._FileSystemWriter.write_data = full_disk_at_step_8
    try:
        train(load_config(CONFIG, RUN + [f"logging.run_dir={run_dir}"]))
    except CheckpointError as e:
        msg = str(e)
    else:
        raise AssertionError("the save on a full disk did not fail")
    finally:
        filesystem._FileSystemWriter.write_data = write_data
    ckpts = Path(run_dir) / "checkpoints"
    assert "cannot save checkpoint" in msg and "step_00000008" in msg, msg
    assert "no space left on device" in msg, msg
    assert f"the newest checkpoint kept is {ckpts / 'step_00000004'}" in msg, msg
    assert "was removed" in msg and "checkpoint.resume=auto" in msg, msg
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004"]


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_resume_finishes(
        finished_run, tmp_path):
    run = tmp_path / "run"
    run_ranks(1, _train_until_the_disk_fills, str(run))
    proc = _train_cli(f"logging.run_dir={run}", "checkpoint.resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000004'}: step 4" in proc.stdout
    want, got = _losses(finished_run), _losses(run)
    for step in range(5, 9):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
