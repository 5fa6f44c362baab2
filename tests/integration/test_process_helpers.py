"""The test helpers that start processes from the preloaded server behave as a fresh
interpreter would: same exit status and output as `python -m`, the test's environment and
folder, a failing rank's error raised in the test."""

import os
import subprocess
import sys

import pytest

from tests.helpers.dist_utils import run_cli, run_ranks


def _write_env_and_cwd(rank, world_size, out):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    total = torch.tensor([rank + 1])
    dist.all_reduce(total)
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(f"{os.environ.get('DLRM_TEST_MARKER')} {os.getcwd()} {int(total)}")
    dist.destroy_process_group()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one gives up")


def test_ranks_see_the_tests_environment_and_folder_and_join_one_group(tmp_path, monkeypatch):
    monkeypatch.setenv("DLRM_TEST_MARKER", "marker-42")
    monkeypatch.chdir(tmp_path)
    run_ranks(2, _write_env_and_cwd, str(tmp_path))
    for rank in range(2):
        assert (tmp_path / f"rank{rank}").read_text() == f"marker-42 {tmp_path} 3"


def test_a_failing_rank_raises_its_error_in_the_test():
    with pytest.raises(Exception, match="rank one gives up"):
        run_ranks(2, _fail_on_rank_one)


@pytest.mark.parametrize("args", [
    ["-m", "json.tool", "no-such-file.json"],             # status 1 and a message
    ["-m", "json.tool", "--no-such-option"],              # argparse: status 2
    ["-m", "dlrm_torchrec.train", "--config", "configs/tiny_cpu.yaml", "data.batch_size=x"],
])
def test_a_command_gives_the_status_and_output_of_a_fresh_interpreter(args, tmp_path):
    want = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
    got = run_cli(args, timeout=120)
    assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout,
                                                        want.stderr)
    assert got.returncode != 0


def test_a_command_reads_its_input_from_the_given_folder_and_environment(tmp_path):
    (tmp_path / "doc.json").write_text('{"b": 1, "a": [2]}')
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    got = run_cli(["-m", "json.tool", "--sort-keys", "doc.json"], cwd=tmp_path, env=env)
    assert got.returncode == 0 and got.stdout == '{\n    "a": [\n        2\n    ],\n    "b": 1\n}\n'
