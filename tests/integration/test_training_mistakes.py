"""Mistakes a user makes in a training run's settings that only the run's environment
reveals (folders, checkpoints, what the planner can place) end before any work as one
`error:` line with exit status 2, on every rank, with no traceback."""

import contextlib
import io
from pathlib import Path

from dlrm_torchrec.cli import train as train_cli
from tests.helpers.dist_utils import run_cli, run_ranks

REPO = Path(__file__).resolve().parents[2]
TINY = ["--config", str(REPO / "configs/tiny_cpu.yaml"), "training.max_steps=2", "logging.progress_bar=false"]
HUGE_TABLE = "embeddings.num_embeddings_per_feature=[1099511627776,10,10,10,10,10,10,10]"


def train(tmp_path, *args):
    return run_cli(["-m", "dlrm_torchrec.train", *TINY, *args], cwd=tmp_path, timeout=300)


def assert_one_error_line(proc, *parts):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for part in parts:
        assert part in errors[0], errors[0]


def test_folders_the_run_writes_that_cannot_be_made_are_named(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    cases = [
        ("logging.run_dir=a_file", "logging.run_dir='a_file': a_file exists and is not a folder"),
        ("logging.run_dir=a_file/run", "logging.run_dir='a_file/run': cannot create a_file/run: "),
        ("checkpoint.dir=a_file/ckpt", "checkpoint.dir='a_file/ckpt': cannot create a_file/ckpt: "),
    ]
    for setting, message in cases:
        proc = train(tmp_path, setting)
        assert_one_error_line(proc, message)
        # before any work: nothing trained, nothing printed about a plan
        assert "sharding plan" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_missing_checkpoint_to_resume_is_refused_before_the_model_is_built(tmp_path):
    (tmp_path / "a_file").write_text("")
    for resume, message in [("nowhere/step_00000002", "no such folder"),
                            ("a_file", "not a folder")]:
        proc = train(tmp_path, f"checkpoint.resume={resume}", "logging.run_dir=run")
        assert_one_error_line(proc, f"checkpoint.resume='{resume}': {message}")
        assert "sharding plan" not in proc.stdout + proc.stderr
    proc = run_cli(["-m", "dlrm_torchrec.train", "--eval-only", *TINY, "logging.run_dir=run"],
                   cwd=tmp_path, timeout=300)
    assert_one_error_line(proc, "checkpoint.resume='': --eval-only evaluates a checkpoint")


def test_tables_too_large_for_the_planner_name_the_table_and_the_memory(tmp_path):
    proc = train(tmp_path, HUGE_TABLE, "logging.run_dir=run")
    # 2^40 rows x 16 floats = 65,536 GB (2^30 bytes each), as the error says
    assert_one_error_line(proc, "the embedding tables do not fit on 1x1 cpu devices",
                          "t_cat_0 1,099,511,627,776 x 16 (65,536.00 GB)",
                          "GB per device for them")


def _train_huge_table(rank, world_size, run_dir):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train_cli.main([*TINY, HUGE_TABLE, f"logging.run_dir={run_dir}"])
    assert code == 2, err.getvalue()
    assert "do not fit on 1x2 cpu devices" in err.getvalue(), err.getvalue()
    assert "Traceback" not in err.getvalue()


def test_tables_too_large_stop_every_rank_of_a_job(tmp_path):
    """TorchRec plans on rank 0 and broadcasts: a planner error there must reach the other
    ranks as the same error, not leave them waiting for a plan."""
    run_ranks(2, _train_huge_table, str(tmp_path / "run"))


def test_export_to_a_folder_under_a_file_is_refused_before_reading_the_checkpoint(tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = run_cli(["-m", "dlrm_torchrec.export", "--checkpoint", "nowhere", "--out",
                    "a_file/export"], cwd=tmp_path, timeout=300)
    assert_one_error_line(proc, "--out a_file/export: cannot create a_file/export: ")
