"""The GPU benchmark's code path on CPU (--smoke), so the one device call a GPU session gets
does not die of a plain Python error: every requested row runs and reports, and --report
turns the JSON into the README's table."""

import json
import subprocess
import sys

ROWS = ["torchrec", "pytorch", "trainer fp32", "trainer fp16-tables", "trainer cudagraphs"]


def test_bench_gpu_smoke_runs_every_row_and_reports_them(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "bench/bench_gpu.py", "--smoke", "--archs", "terabyte", "--rows",
         ",".join(ROWS), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["row"], r["batch"]) for r in rows} == {(n, b) for n in ROWS for b in (128, 256)}
    failed = [r for r in rows if "samples_per_s" not in r]
    assert not failed, failed
    assert all(r["samples_per_s"] > 0 and r["steps"] >= 2 for r in rows)
    report = subprocess.run([sys.executable, "bench/bench_gpu.py", "--report", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    for name in ROWS:
        assert f"| {name} | " in report.stdout
    assert "| torchrec | " in report.stdout and "(1.00x)" in report.stdout
