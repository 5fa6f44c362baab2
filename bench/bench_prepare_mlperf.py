"""MLPerf DLRM-DCNv2 data preparation: TorchRec's three scripts (npy_preproc_criteo.py,
contiguous_preproc_criteo.py --frequency_threshold 0, shuffle_preproc_criteo.py
--random_seed 0) beside `python -m dlrm_torchrec.data.prepare_mlperf`, on the same 24
generated days; wall time and peak RSS of each, a byte-for-byte comparison of the outputs,
and an extrapolation to the real 4.37 billion rows.

    python bench/bench_prepare_mlperf.py [--rows-per-day 20000] [--workers N] [--dir DIR]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from bench_criteo import generate  # noqa: E402

DAYS = 24
CRITEO_ROWS = 4_373_472_329  # days 0-23 of Criteo 1TB
CRITEO_TRAIN_ROWS = 4_195_197_692  # days 0-22: the rows the shuffle permutes
TARGET_CORES = 32
SCRIPTS = "torchrec.datasets.scripts"


# Linux keeps a process's peak RSS across fork and exec, so a command started from this
# (large) process would report this process's peak: a small launcher starts it instead and
# reports the peak of its children (the largest process of the command's tree)
LAUNCHER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:], "
            "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN)"
            ".ru_maxrss); sys.exit(rc)")


def measured(cmd, env=None):
    """(wall seconds, peak RSS in MB of the largest process of the command's tree)."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True,
                          text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.time() - t0, int(proc.stdout.split()[-1]) / 1024


def shuffle_ns_per_row(n: int = 1 << 26) -> float:
    """The legacy MT19937 shuffle of uint32 indices (the one step that cannot run in
    parallel): ns per row."""
    perm = np.arange(n, dtype=np.uint32)
    t0 = time.time()
    np.random.RandomState(0).shuffle(perm)
    return (time.time() - t0) / n * 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows-per-day", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--memory-gb", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp/bench_prepare_mlperf")
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    raw, npy, contig, shuffled, ours = (os.path.join(a.dir, n) for n in
                                        ("raw", "npy", "contig", "shuffled", "ours"))
    for d in (raw, npy, contig, shuffled):
        os.makedirs(d)
    for d in range(DAYS):
        generate(os.path.join(raw, f"day_{d}"), a.rows_per_day, seed=d)
    rows = DAYS * a.rows_per_day
    text_mb = sum(os.path.getsize(os.path.join(raw, f"day_{d}")) for d in range(DAYS)) / 1e6
    print(f"{rows:,} rows ({text_mb:.0f} MB of text) in {DAYS} days; numpy {np.__version__}")

    py = sys.executable
    steps = [
        ("npy_preproc_criteo", [py, "-m", f"{SCRIPTS}.npy_preproc_criteo", "--input_dir", raw,
                                "--output_dir", npy]),
        ("contiguous_preproc_criteo", [py, "-m", f"{SCRIPTS}.contiguous_preproc_criteo",
                                       "--input_dir", npy, "--output_dir", contig,
                                       "--frequency_threshold", "0"]),
        ("shuffle_preproc_criteo", [py, "-m", f"{SCRIPTS}.shuffle_preproc_criteo",
                                    "--input_dir_labels_and_dense", npy, "--input_dir_sparse",
                                    contig, "--output_dir_shuffled", shuffled,
                                    "--random_seed", "0"]),
    ]
    results = []
    for name, cmd in steps:
        results.append((name, *measured(cmd)))
        if name == "contiguous_preproc_criteo":  # as MLPerf's instructions rename them
            for d in range(DAYS):
                os.replace(os.path.join(contig, f"day_{d}_sparse_contig_freq.npy"),
                           os.path.join(contig, f"day_{d}_sparse.npy"))
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, ".."))
    ours_wall, ours_rss = measured(
        [py, "-m", "dlrm_torchrec.data.prepare_mlperf",
         *[os.path.join(raw, f"day_{d}") for d in range(DAYS)], "-o", ours,
         "--workers", str(a.workers), "--memory-gb", str(a.memory_gb)], env)
    torchrec_wall = sum(r[1] for r in results)
    torchrec_rss = max(r[2] for r in results)
    for name, wall, rss in results:
        print(f"  torchrec {name:<28} {wall:8.1f} s  {rss:8.0f} MB")
    print(f"  torchrec, all three scripts           {torchrec_wall:8.1f} s  {torchrec_rss:8.0f} MB")
    print(f"  prepare_mlperf ({a.workers} workers)             {ours_wall:8.1f} s  {ours_rss:8.0f} MB")
    print(f"speed-up {torchrec_wall / ours_wall:.1f}x, peak memory 1/{torchrec_rss / ours_rss:.1f}")
    names = [f"day_{d}_{p}.npy" for d in range(DAYS) for p in ("dense", "sparse", "labels")]
    same = all(open(os.path.join(shuffled, n), "rb").read() == open(os.path.join(ours, n), "rb").read()
               for n in names)
    print(f"outputs byte-identical: {same}")

    # extrapolation: everything but the permutation scales with the cores (days, features
    # and buckets are tasks); the permutation is one sequential pass
    ns = shuffle_ns_per_row()
    cores = min(a.workers, os.cpu_count() or 1)
    per_core = rows / (ours_wall * cores)
    parallel_s = CRITEO_ROWS / (per_core * TARGET_CORES)
    permute_s = CRITEO_TRAIN_ROWS * ns * 1e-9
    print(f"measured: {per_core:,.0f} rows/s per core over the whole command, the shuffle "
          f"{ns:.1f} ns/row")
    print(f"extrapolated to {CRITEO_ROWS:,} rows on {TARGET_CORES} cores: "
          f"{parallel_s / 3600:.2f} h of parallel stages + {permute_s / 3600:.2f} h of "
          f"permutation (overlapping the vocabulary stage; counted in full) = "
          f"{(parallel_s + permute_s) / 3600:.2f} h")
    print(json.dumps({"rows": rows, "torchrec_s": torchrec_wall, "torchrec_mb": torchrec_rss,
                      "ours_s": ours_wall, "ours_mb": ours_rss, "same": same}))


if __name__ == "__main__":
    main()
