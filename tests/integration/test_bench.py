"""The GPU benchmark's code path on CPU (--smoke), so the one device call a GPU session gets
does not die of a plain Python error: every requested row runs and reports, and --report
turns the JSON into the README's table. The inference benchmark's too, on a tiny model."""

import json
import subprocess
import sys

import pytest

# the one-rank step's rows: test_bench_gpu_graph_rows_replay_at_every_batch_size
ROWS = ["torchrec", "pytorch", "trainer fp32", "trainer fp16-tables", "trainer cudagraphs"]


def test_bench_gpu_smoke_runs_every_row_and_reports_them(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "bench/bench_gpu.py", "--smoke", "--archs", "terabyte", "--rows",
         ",".join(ROWS), "--profile-steps", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["row"], r["batch"]) for r in rows} == {(n, b) for n in ROWS for b in (128, 256)}
    failed = [r for r in rows if "samples_per_s" not in r]
    assert not failed, failed
    assert all(r["samples_per_s"] > 0 and r["steps"] >= 2 for r in rows)
    # --profile-steps: per-step counts on every row (no CUDA here: no launches), and the
    # rows' operator tables
    assert all(r["per_step"]["aten_ops"] > 0 and r["per_step"]["launches"] == 0 for r in rows)
    ops = (tmp_path / "bench.json.ops.txt").read_text()
    assert ops.count("== terabyte batch ") == len(rows) and "aten::" in ops
    report = subprocess.run([sys.executable, "bench/bench_gpu.py", "--report", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    for name in ROWS:
        assert f"| {name} | " in report.stdout
    assert "| torchrec | " in report.stdout and "(1.00x)" in report.stdout


def test_bench_gpu_graph_rows_replay_at_every_batch_size(tmp_path):
    """The cuda_graph rows on the CPU stand-in for the graph (tests/helpers/graph_on_cpu.py).
    The benchmark times both batch sizes on one trainer, so at the second size the graph must
    be captured again, not left to run every step direct. First size: 3 direct warm-up steps,
    then replays; second: 1 direct step (the new shapes, not yet seen twice), then replays."""
    out = tmp_path / "bench.json"
    rows = ["trainer cuda_graph", "trainer all+cuda_graph"]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.graph_on_cpu", "bench/bench_gpu.py", "--smoke",
         "--archs", "terabyte", "--rows", ",".join(rows), "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["rows"]
    assert [(r["row"], r["batch"]) for r in results] == [(n, b) for n in rows for b in (128, 256)]
    for r in results:
        assert "samples_per_s" in r, r
        # the row's steps: 1 warm-up, 3 probe, then 2-4 timed (--smoke)
        counts = r["train_step"]
        assert 6 <= counts["graph_replays"] + counts["direct_steps"] <= 8, r
        assert counts["direct_steps"] == (3 if r["batch"] == 128 else 1), r
        assert "capture_error" not in counts, r


def test_bench_gpu_says_why_a_graph_row_ran_direct(tmp_path):
    """A failed capture (the stand-in's, as CUDA's when the step waits for the GPU): the row
    still times, every step direct, and its line and JSON say why."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.graph_on_cpu", "--capture-fails", "bench/bench_gpu.py",
         "--smoke", "--archs", "terabyte", "--rows", "trainer cuda_graph", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [128, 256]
    error = "CUDA error: operation not permitted when stream is capturing"
    for row in rows:
        counts = row["train_step"]
        assert counts["graph_replays"] == 0 and counts["direct_steps"] >= 6, row
        assert counts["capture_error"] == error
        assert (f"0 replayed, {counts['direct_steps']} direct (capture failed: {error})"
                in proc.stdout)


def test_profile_row_counts_the_operators_of_each_step():
    """A step of exactly two aten calls (add_, mul; tensor operands, so no scalar-to-tensor
    conversions nest inside them) on CPU: 2 operators per step, whatever the number of
    steps; no kernel launches or host syncs."""
    import torch

    sys.path.insert(0, "bench")
    from bench_gpu import is_host_sync, profile_row

    x, y = torch.ones(8), torch.ones(8)

    def run(batches):
        for _ in batches:
            torch.mul(x.add_(y), y)

    for steps in (1, 3):
        per_step, table = profile_row(run, [None], steps, torch.device("cpu"))
        assert per_step == {"aten_ops": 2, "launches": 0, "host_syncs": 0, "gpu_ms": 0}
        assert "aten::mul" in table and "aten::add_" in table
    assert is_host_sync("cudaStreamSynchronize") and is_host_sync("cudaMemcpy")
    assert not is_host_sync("cudaMemcpyAsync") and not is_host_sync("cudaLaunchKernel")


@pytest.mark.slow  # 50 s: five programs of the Kaggle architecture exported and timed
def test_bench_inference_smoke_times_every_program_and_checks_their_answers(tmp_path):
    out = tmp_path / "inference.json"
    proc = subprocess.run(
        [sys.executable, "bench/bench_inference.py", "--smoke", "--arch", "kaggle",
         "--max-rows", "1000", "--batches", "1,32", "--seconds", "0.05", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [1, 32]
    for r in rows:
        assert all(r[k] > 0 for k in ("eager", "float", "int8", "onnx", "onnx-mlp-int8",
                                      "onnx-int8"))
        assert r["float_max_diff"] < 1e-6 and r["onnx_max_diff"] < 1e-5
        assert 0 < r["int8_max_diff"] < 0.05 and 0 < r["onnx-mlp-int8_max_diff"] < 0.15
        assert 0 < r["onnx-int8_max_diff"] < 0.15
    assert "| kaggle | 32 |" in proc.stdout
