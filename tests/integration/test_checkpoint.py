"""Checkpoints: exact resume, resharding to other world sizes and plans, atomic
publication, refusal of foreign/corrupt/malicious checkpoints, eval-only, non-finite loss,
and restart after a killed rank under torchrun with every sample consumed once."""

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from dlrm_torchrec.config import load_config
from dlrm_torchrec.train import checkpoint
from tests.helpers.dist_utils import run_cli, run_ranks

BASE = [
    "data.train_samples=6144", "data.eval_samples=2048", "data.batch_size=256",
    "training.eval_every_n_steps=0", "logging.log_every_n_steps=1",
    "logging.progress_bar=false", "sharding.sharding_type=table_wise",
]


def _train(rank, world_size, overrides, eval_only=False):
    from dlrm_torchrec.train.job import train

    train(load_config("configs/tiny_cpu.yaml", overrides), eval_only=eval_only)


def _metrics(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def _losses(m):
    return {h["step"]: h["train_loss"] for h in m["history"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 2-rank run of 24 steps that checkpoints at the end."""
    d = tmp_path_factory.mktemp("full")
    run_ranks(2, _train, BASE + [f"logging.run_dir={d}"])
    return d


def test_resumed_run_reproduces_the_uninterrupted_loss_trajectory(uninterrupted, tmp_path):
    first = BASE + [f"logging.run_dir={tmp_path}", "training.max_steps=10"]
    run_ranks(2, _train, first)
    assert checkpoint.latest_checkpoint(tmp_path / "checkpoints").step == 10
    run_ranks(2, _train, BASE + [f"logging.run_dir={tmp_path}", "checkpoint.resume=auto"])
    want, got = _losses(_metrics(uninterrupted)), _losses(_metrics(tmp_path))
    assert sorted(got) == sorted(want) == list(range(1, 25))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    m = _metrics(tmp_path)
    assert m["train_samples_seen"] == 6144
    assert m["final"]["log_loss"] == pytest.approx(_metrics(uninterrupted)["final"]["log_loss"], abs=1e-6)


@pytest.mark.parametrize("world_size, extra", [
    (1, []), (4, []), (2, ["sharding.sharding_type=column_wise"]),
    (2, ["sharding.sharding_type=data_parallel", "sharding.compute_kernel=dense"]),
])
def test_checkpoint_loads_with_other_world_sizes_and_plans(uninterrupted, tmp_path, world_size, extra):
    ckpt = checkpoint.latest_checkpoint(uninterrupted / "checkpoints").path
    over = BASE + extra + [f"logging.run_dir={tmp_path}", f"checkpoint.resume={ckpt}"]
    run_ranks(world_size, _train, over, True)
    got = json.loads((tmp_path / "eval_val.json").read_text())
    want = _metrics(uninterrupted)["final"]
    assert got["samples"] == want["samples"] == 2048
    assert got["log_loss"] == pytest.approx(want["log_loss"], abs=1e-6)
    assert got["auc"] == pytest.approx(want["auc"], abs=1e-6)
    for key in ("precision", "recall", "f1", "average_precision"):
        assert 0 <= got[key] <= 1


def test_half_written_checkpoints_are_never_picked(uninterrupted, tmp_path):
    good = checkpoint.latest_checkpoint(uninterrupted / "checkpoints")
    folder = tmp_path / "ck"
    folder.mkdir()
    os.symlink(good.path, folder / good.path.name)
    (folder / "step_00000099.tmp-1234abcd").mkdir()  # a crash during a save
    (folder / "step_00000098").mkdir()                # shards, but no trainer_state.json
    assert checkpoint.latest_checkpoint(folder).step == good.step


def _entry(args, timeout=300):
    return run_cli(["-m", "dlrm_torchrec.train", "--config", "configs/tiny_cpu.yaml", *args],
                   timeout=timeout)


def test_checkpoint_of_a_different_model_is_refused_naming_the_difference(uninterrupted, tmp_path):
    ckpt = checkpoint.latest_checkpoint(uninterrupted / "checkpoints").path
    proc = _entry(BASE + ["embeddings.dim=8", "model.bottom_mlp=[64,32,8]",
                          f"checkpoint.resume={ckpt}", f"logging.run_dir={tmp_path}"])
    assert proc.returncode == 1
    assert "was written by a different model" in proc.stderr
    assert "table t_cat_0: checkpoint rows x dim 1000 x 16, config 1000 x 8" in proc.stderr
    assert "bottom_mlp: checkpoint [64, 32, 16], config [64, 32, 8]" in proc.stderr
    assert "Traceback" not in proc.stderr


def _copy_checkpoint(uninterrupted, tmp_path):
    import shutil

    src = checkpoint.latest_checkpoint(uninterrupted / "checkpoints").path
    dst = tmp_path / "checkpoints" / src.name
    shutil.copytree(src, dst)
    return dst


def test_truncated_checkpoint_stops_with_a_clear_error(uninterrupted, tmp_path):
    ckpt = _copy_checkpoint(uninterrupted, tmp_path)
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    proc = _entry(BASE + ["checkpoint.resume=auto", f"logging.run_dir={tmp_path}"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    # the manifest finds the short shard: resume=auto names it, and with no other to fall
    # back to, stops
    assert "error: resume=auto: none of the 1 checkpoint(s)" in proc.stderr, proc.stderr
    assert str(ckpt) in proc.stdout, proc.stdout[-2000:]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_loading_never_runs_pickled_code_from_the_checkpoint(uninterrupted, tmp_path):
    ckpt = _copy_checkpoint(uninterrupted, tmp_path)
    evil = pickle.dumps(_Evil())
    (ckpt / ".metadata").write_bytes(evil)
    # an attacker rewrites the manifest too, so the checksums pass and the reader is tried
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][".metadata"] = {"bytes": len(evil),
                                      "sha256": hashlib.sha256(evil).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    proc = _entry(BASE + ["checkpoint.resume=auto", f"logging.run_dir={tmp_path}"])
    assert proc.returncode == 1
    assert "refusing to load" in proc.stderr and "system" in proc.stderr
    assert not Path("PWNED").exists()


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = _entry(BASE + ["optimizer.dense=sgd", "optimizer.sparse=sgd", "optimizer.lr=1e18",
                          "checkpoint.every_n_steps=1", "checkpoint.keep_last=100",
                          f"logging.run_dir={tmp_path}"])
    assert proc.returncode == 1
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("error: non-finite"))
    bad_step = int(line.split("at step ")[1].split(";")[0])
    saved = [c.step for c in checkpoint.list_checkpoints(tmp_path / "checkpoints")]
    assert saved == list(range(1, bad_step))
    assert f"last good checkpoint: {tmp_path}/checkpoints/step_{bad_step - 1:08d}" in line


def test_killed_rank_restarts_from_the_checkpoint_and_consumes_every_sample_once(uninterrupted, tmp_path):
    args = BASE + [f"logging.run_dir={tmp_path}", "checkpoint.every_n_steps=5",
                   "checkpoint.resume=auto", "training.crash_at_step=13", "training.crash_rank=1"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "--max-restarts=1", "-m", "dlrm_torchrec.train", "--config", "configs/tiny_cpu.yaml", *args],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 exits at step 13" in proc.stderr
    assert "resumed from" in proc.stdout and "step_00000010" in proc.stdout
    m = _metrics(tmp_path)
    assert m["train_samples_seen"] == 6144 and m["steps"] == 24
    # the interrupted run ends exactly where the uninterrupted one does
    want = _losses(_metrics(uninterrupted))
    got = _losses(m)
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    assert m["final"]["log_loss"] == pytest.approx(_metrics(uninterrupted)["final"]["log_loss"], abs=1e-6)
