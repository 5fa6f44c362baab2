"""MLPerf DLRM-DCNv2 data preparation: TorchRec's three scripts (npy_preproc_criteo.py,
contiguous_preproc_criteo.py --frequency_threshold 0, shuffle_preproc_criteo.py
--random_seed 0) beside `python -m dlrm_torchrec.data.prepare_mlperf`, on the same 24
generated days; wall time and peak RSS of each, a byte-for-byte comparison of the outputs,
the time of each of prepare_mlperf's stages, a second prepare_mlperf run with
--multi-hot (MLPerf's bag sizes, its lookup tables scaled down: --table-scale), and an
extrapolation of each stage to the real 4.37 billion rows on a 32-core node, and the disk
floor: the run's reads and writes replayed stage by stage with nothing computed, the least
time any run that moves those bytes through this disk can take.

    python bench/bench_prepare_mlperf.py [--rows-per-day 20000] [--workers N] [--dir DIR]
        [--table-scale 0.1] [--disk-gbps 2]

MLPerf's tables (23.1 GB) do not fit a small machine, so the multi-hot figures are taken at
--table-scale of its table rows: drawing is timed per drawn value and the bags per row,
each then multiplied out to MLPerf's sizes (the bag sizes, and so the bytes per row, are
MLPerf's own; the lookups hit a table --table-scale the size, in the page cache).
"""

import argparse
import gzip
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from bench_criteo import generate  # noqa: E402

from dlrm_torchrec.data.converters import mlperf_multi_hot as mh  # noqa: E402
from dlrm_torchrec.data.converters import native  # noqa: E402

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


def measured(cmd, env=None, log=False):
    """(wall seconds, peak RSS in MB of the largest process of the command's tree), and its
    stderr with `log`. The disk is synced first, so that no command pays for writing back
    what the one before it left in the page cache (TorchRec's scripts leave gigabytes)."""
    os.sync()
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True,
                          text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    wall, rss = time.time() - t0, int(proc.stdout.split()[-1]) / 1024
    return (wall, rss, proc.stderr) if log else (wall, rss)


# prepare_mlperf logs the end of each stage with the seconds since its start
STAGE_LINES = (("parse", r"^parse: .*\(([\d.]+) s\)$"),
               ("vocab+permute", r"^vocab and permutation \(([\d.]+) s\)$"),
               ("scatter", r"^scatter: .*\(([\d.]+) s\)$"),
               ("place", r"^place \(([\d.]+) s\)$"),
               ("multi-hot", r"^multi-hot bags \(([\d.]+) s\)$"))


def stage_seconds(log: str, wall: float) -> dict:
    """Seconds of each stage from prepare_mlperf's log; "meta+start" is the rest of the
    wall time (interpreter start, checks, meta.json, removing the work files)."""
    out, before = {}, 0.0
    for name, pattern in STAGE_LINES:
        m = re.search(pattern, log, re.M)
        if m:
            out[name] = float(m.group(1)) - before
            before = float(m.group(1))
    out["meta+start"] = wall - before
    return out


def draw_ns_per_value(folder: str, tables, budget: int) -> float:
    """The sequential table drawing (`mlperf_multi_hot.draw_tables`, uniform): ns per drawn
    value, at the given table sizes."""
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.time()
    mh.draw_tables(folder, mh.MLPERF_BAG_SIZES, tables, "uniform", budget)
    ns = (time.time() - t0) / (mh.table_bytes(mh.MLPERF_BAG_SIZES, tables) / 4) * 1e9
    shutil.rmtree(folder, ignore_errors=True)
    return ns


def gunzip_ns_per_byte(path: str) -> float:
    """zlib decompression of a gzip-compressed copy of `path` (the real days are .gz; the
    generated ones plain text): ns per decompressed byte, on one core."""
    with open(path, "rb") as f:
        data = f.read()
    packed = gzip.compress(data, 6)
    t0 = time.time()
    gzip.decompress(packed)
    return (time.time() - t0) / len(data) * 1e9


def shuffle_ns_per_row(n: int = 1 << 26) -> float:
    """The legacy MT19937 shuffle of uint32 indices as prepare_mlperf makes it
    (`native.legacy_shuffle`; the one step that cannot run in parallel): ns per row."""
    perm = np.arange(n, dtype=np.uint32)
    t0 = time.time()
    native.legacy_shuffle(perm, 0)
    return (time.time() - t0) / n * 1e9


IO_BLOCK = 8 << 20


def _stream(paths, out_path=None, out_bytes=0):
    """Read `paths` one after another and write `out_bytes` random bytes to `out_path` at
    the same time (two threads; O_DIRECT, page-aligned blocks, so no page cache is involved
    where the file system takes it), as one stage of the run moves its data: seconds
    taken."""
    def read_all():
        buf = mmap.mmap(-1, IO_BLOCK)
        for path in paths:
            fd = _open_direct(path, os.O_RDONLY)
            try:
                offset = 0
                while (n := os.preadv(fd, [buf], offset)) > 0:
                    offset += n
            finally:
                os.close(fd)

    def write_all():
        buf = mmap.mmap(-1, IO_BLOCK)
        buf.write(os.urandom(IO_BLOCK))  # not zeros, which a virtual disk may store for free
        fd = _open_direct(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for offset in range(0, out_bytes, IO_BLOCK):
                os.pwritev(fd, [buf], offset)
        finally:
            os.close(fd)

    t0 = time.time()
    threads = [threading.Thread(target=read_all)]
    if out_path:
        threads.append(threading.Thread(target=write_all))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.time() - t0


def _open_direct(path, flags):
    try:
        return os.open(path, flags | os.O_DIRECT, 0o644)
    except OSError:  # a file system without O_DIRECT (tmpfs): through the page cache
        return os.open(path, flags, 0o644)


def disk_floor(folder: str, days, rows_bytes: int, records_bytes: int, out_bytes: int) -> dict:
    """prepare_mlperf's disk traffic replayed with nothing computed, stage by stage (the
    stages are separated, so their I/O cannot overlap): the parse reads the raw text and
    writes the rows (packed: `rows_bytes`, as the run reported them), the scatter reads
    the rows and writes the records (`records_bytes`: each column in the bytes its largest
    needs, as the run reported them), the place reads the records and writes the output.
    Seconds per stage and in all."""
    a, b, c = (os.path.join(folder, n) for n in ("floor_rows", "floor_records", "floor_out"))
    out = {"parse": _stream(days, a, rows_bytes),
           "scatter": _stream([a], b, records_bytes),
           "place": _stream([b], c, out_bytes)}
    for path in (a, b, c):
        os.remove(path)
    out["total"] = sum(out.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows-per-day", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--memory-gb", type=float, default=1.0)
    ap.add_argument("--low-memory-gb", type=float, default=0.4,
                    help="a second prepare_mlperf run with this --memory-gb (0: none)")
    ap.add_argument("--dir", default="/tmp/bench_prepare_mlperf")
    ap.add_argument("--table-scale", type=float, default=0.1,
                    help="the multi-hot run's table rows, as a fraction of MLPerf's")
    ap.add_argument("--disk-gbps", type=float, default=2.0,
                    help="disk bandwidth the extrapolation assumes (GB/s, reads and writes)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of prepare_mlperf (one-hot); the fastest is reported")
    ap.add_argument("--skip-torchrec", action="store_true",
                    help="time only prepare_mlperf (no speed-up, no byte comparison)")
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
    for name, cmd in [] if a.skip_torchrec else steps:
        results.append((name, *measured(cmd)))
        if name == "contiguous_preproc_criteo":  # as MLPerf's instructions rename them
            for d in range(DAYS):
                os.replace(os.path.join(contig, f"day_{d}_sparse_contig_freq.npy"),
                           os.path.join(contig, f"day_{d}_sparse.npy"))
    # TorchRec's intermediate folders are not compared: removed, so their pages do not
    # crowd prepare_mlperf's out of the page cache (each script ran with its own inputs'
    # pages there, too)
    for folder in (npy, contig):
        shutil.rmtree(folder)
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, ".."))
    days = [os.path.join(raw, f"day_{d}") for d in range(DAYS)]
    common = ["--workers", str(a.workers), "--memory-gb", str(a.memory_gb)]
    # on a shared machine other jobs slow some runs: the fastest of --repeat runs is
    # reported with its stages, every run's wall time beside it, and the largest peak RSS
    runs = []
    for _ in range(a.repeat):
        shutil.rmtree(ours, ignore_errors=True)
        runs.append(measured([py, "-m", "dlrm_torchrec.data.prepare_mlperf", *days, "-o", ours,
                              *common], env, True))
    ours_wall, _, log = min(runs)
    ours_rss = max(r[1] for r in runs)
    stages = stage_seconds(log, ours_wall)
    torchrec_wall = sum(r[1] for r in results)
    torchrec_rss = max((r[2] for r in results), default=0.0)
    for name, wall, rss in results:
        print(f"  torchrec {name:<28} {wall:8.1f} s  {rss:8.0f} MB")
    if results:
        print(f"  torchrec, all three scripts           {torchrec_wall:8.1f} s  {torchrec_rss:8.0f} MB")
    print(f"  prepare_mlperf ({a.workers} workers)             {ours_wall:8.1f} s  {ours_rss:8.0f} MB"
          + (f"  (fastest of {a.repeat}: " + ", ".join(f"{r[0]:.1f}" for r in runs) + " s)"
             if a.repeat > 1 else ""))
    print("    stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))
    same = None
    if results:
        print(f"speed-up {torchrec_wall / ours_wall:.1f}x (goal 50x), peak memory "
              f"1/{torchrec_rss / ours_rss:.1f} (goal 1/20)")
        names = [f"day_{d}_{p}.npy" for d in range(DAYS) for p in ("dense", "sparse", "labels")]
        same = all(open(os.path.join(shuffled, n), "rb").read()
                   == open(os.path.join(ours, n), "rb").read() for n in names)
        print(f"outputs byte-identical: {same}")

    # the output's bytes as written (day 23's ids are int64), for the disk floor below
    out_bytes = sum(os.path.getsize(os.path.join(ours, n)) for n in os.listdir(ours)
                    if n.endswith(".npy"))
    row_bytes = float(re.search(r"^parse: .*, ([\d.]+) bytes a row", log, re.M).group(1))
    record_bytes = int(re.search(r"^scatter: .*, (\d+) bytes a record", log, re.M).group(1))
    floor = disk_floor(a.dir, days, round(row_bytes * rows), record_bytes * rows, out_bytes)
    print("  disk alone, nothing computed: " + ", ".join(f"{k} {v:.2f} s" for k, v in floor.items())
          + (f"; 50x needs {torchrec_wall / 50:.2f} s" if results else ""))

    low = None
    if a.low_memory_gb:
        shutil.rmtree(ours, ignore_errors=True)
        low_wall, low_rss, _ = measured(
            [py, "-m", "dlrm_torchrec.data.prepare_mlperf", *days, "-o", ours, "--workers",
             str(a.workers), "--memory-gb", str(a.low_memory_gb)], env, True)
        low = {"memory_gb": a.low_memory_gb, "s": low_wall, "mb": low_rss}
        print(f"  prepare_mlperf --memory-gb {a.low_memory_gb:<17} {low_wall:8.1f} s  {low_rss:8.0f} MB")
        if results:
            low["same"] = all(open(os.path.join(shuffled, n), "rb").read()
                              == open(os.path.join(ours, n), "rb").read() for n in names)
            print(f"    speed-up {torchrec_wall / low_wall:.1f}x, peak memory "
                  f"1/{torchrec_rss / low_rss:.1f}; outputs byte-identical: {low['same']}")
        shutil.rmtree(ours)

    # --multi-hot at MLPerf's bag sizes, its tables scaled down
    tables = [max(1, round(n * a.table_scale)) for n in mh.MLPERF_TABLE_SIZES]
    values_full = mh.table_bytes(mh.MLPERF_BAG_SIZES, mh.MLPERF_TABLE_SIZES) // 4
    mh_wall, mh_rss, mh_log = measured(
        [py, "-m", "dlrm_torchrec.data.prepare_mlperf", *days, "-o", ours + "_multi_hot",
         *common, "--multi-hot", "--multi-hot-table-sizes", ",".join(map(str, tables))],
        env, True)
    mh_stages = stage_seconds(mh_log, mh_wall)
    shutil.rmtree(ours + "_multi_hot")
    print(f"  prepare_mlperf --multi-hot, tables x{a.table_scale} "
          f"({mh.table_bytes(mh.MLPERF_BAG_SIZES, tables) / 1e9:.2f} GB) "
          f"{mh_wall:8.1f} s  {mh_rss:8.0f} MB")
    print("    stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in mh_stages.items()))
    draw_ns = draw_ns_per_value(os.path.join(a.dir, "tables"), tables, int(a.memory_gb * (1 << 30)) // a.workers)
    gunzip_ns = gunzip_ns_per_byte(days[0])

    # extrapolation, stage by stage: a stage's tasks (days, features, buckets) spread over
    # the cores, so its core-seconds per row are measured here and divided by the target's
    # cores; sequential steps (the permutation, the table drawing) are timed on their own
    # and overlap the stage they run beside; each stage takes at least its disk traffic
    # at --disk-gbps (the intermediates, TBs at full scale, do not fit a 64 GB page cache)
    ns = shuffle_ns_per_row()
    cores = min(a.workers, os.cpu_count() or 1)
    text_per_row = text_mb * 1e6 / rows
    # a parsed row and a record at their widest (every value in 4 bytes): their widths at
    # full scale depend on the real days' ranges, which are not measured here
    row, rec, out = 4 * native.ROW_WORDS, native.RECORD_BYTES, 4 * (13 + 26 + 1)
    disk = {"parse": text_per_row + row, "vocab+permute": 0, "scatter": row + rec,
            "place": rec + out, "multi-hot": 104 + 2 * 4 * 26 + 4 * sum(mh.MLPERF_BAG_SIZES)}
    cpu_s = {k: (mh_stages if k == "multi-hot" else stages)[k] * cores / rows * CRITEO_ROWS
             / TARGET_CORES for k in disk}
    cpu_s["parse"] += CRITEO_ROWS * text_per_row * gunzip_ns * 1e-9 / TARGET_CORES
    seq = {"parse": values_full * draw_ns * 1e-9, "vocab+permute": CRITEO_TRAIN_ROWS * ns * 1e-9}
    print(f"measured: the shuffle {ns:.1f} ns/row, table drawing {draw_ns:.2f} ns/value "
          f"({values_full:,} values at MLPerf's sizes), gunzip {gunzip_ns:.2f} ns/byte, "
          f"{text_per_row:.0f} bytes of text per row")
    print(f"extrapolated to {CRITEO_ROWS:,} rows on {TARGET_CORES} cores, disk {a.disk_gbps} GB/s:")
    total = {"one-hot": 0.0, "multi-hot": 0.0}
    for k in disk:
        io = CRITEO_ROWS * disk[k] / (a.disk_gbps * 1e9)
        t = max(cpu_s[k], seq.get(k, 0.0), io)
        print(f"  {k:<14} cpu {cpu_s[k] / 3600:5.2f} h  sequential {seq.get(k, 0.0) / 3600:5.2f} h  "
              f"disk {io / 3600:5.2f} h  -> {t / 3600:5.2f} h")
        total["multi-hot"] += t
        if k != "multi-hot":
            total["one-hot"] += t
    print(f"  total: {total['one-hot'] / 3600:.2f} h without the multi-hot bags, "
          f"{total['multi-hot'] / 3600:.2f} h with them (goal 2 h)")
    print(json.dumps({"rows": rows, "torchrec_s": torchrec_wall, "torchrec_mb": torchrec_rss,
                      "torchrec": {n: [w, r] for n, w, r in results},
                      "ours_s": ours_wall, "ours_runs_s": [r[0] for r in runs], "ours_mb": ours_rss,
                      "stages": stages,
                      "multi_hot_s": mh_wall, "multi_hot_mb": mh_rss, "multi_hot_stages": mh_stages,
                      "draw_ns_per_value": draw_ns, "gunzip_ns_per_byte": gunzip_ns,
                      "shuffle_ns_per_row": ns, "extrapolated_h": {k: v / 3600 for k, v in total.items()},
                      "same": same, "low_memory": low, "disk_floor_s": floor}))


if __name__ == "__main__":
    main()
