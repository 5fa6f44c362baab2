"""Generated-data throughput per process: `GeneratedSource` (the `synthetic` and `random`
sources) beside the plain per-feature computation of the same definition
(`tests/helpers/synthetic_reference.py`, bit-identical output), both assembled into the
batches the trainer gets. For synthetic multi-hot bags the baseline is the definition they had
before they were derived from the first id (every id hashed on its own, the click model
averaging all of them, per feature in numpy): the work the source did per sample before.

    python bench/bench_synthetic.py [--batches 1024 8192] [--repeats 3]

Shapes: the Terabyte one (26 one-hot features over the Kaggle cardinalities capped at 10M
rows) and the MLPerf DCNv2 one (the multi-hot bag sizes of configs/mlperf_dcnv2.yaml).
The batch is per rank: a global batch of 8192 on 8 GPUs is 1024 here.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlrm_torchrec.config import load_config  # noqa: E402
from dlrm_torchrec.data.batch import make_batch  # noqa: E402
from dlrm_torchrec.data.synthetic import GeneratedSource  # noqa: E402
from tests.helpers.synthetic_reference import reference_sample_arrays  # noqa: E402

MAX_ROWS = 10_000_000


def shapes():
    sizes = [min(n, MAX_ROWS) for n in load_config(
        str(ROOT / "configs/criteo_kaggle.yaml")).embeddings.num_embeddings_per_feature]
    multi_hot = list(load_config(str(ROOT / "configs/mlperf_dcnv2.yaml")).data.multi_hot_sizes)
    return {"terabyte one-hot": (sizes, [1] * len(sizes)),
            "dcnv2 multi-hot": (sizes, multi_hot)}


def rate(make_one, batch: int, repeats: int, batches: int) -> float:
    """Median samples/s over `repeats` runs of `batches` batches (after one warm-up)."""
    make_one(0)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for b in range(batches):
            make_one(b)
        runs.append(batches * batch / (time.perf_counter() - start))
    return statistics.median(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=65536, help="samples per timed run")
    a = p.parse_args()
    names = [f"cat_{i}" for i in range(26)]
    print("| data | shape | batch per rank | samples/s | baseline (plain, per feature; see above) | speed-up |")
    print("|---|---|---|---|---|---|")
    for kind in ("synthetic", "random"):
        for shape, (sizes, bags) in shapes().items():
            for batch in a.batches:
                src = GeneratedSource(kind, sizes, 13, batch, batch, 10**9, batch, bags, True,
                                      seed=0, rank=0, world_size=1)

                def fast(b, src=src, batch=batch):
                    idx = np.arange(b * batch, (b + 1) * batch, dtype=np.uint64)
                    return src.make("train", 0, idx, batch)

                def plain(b, batch=batch, sizes=sizes, bags=bags, kind=kind):
                    idx = np.arange(b * batch, (b + 1) * batch, dtype=np.uint64)
                    dense, ids, lengths, labels, _ = reference_sample_arrays(
                        kind, sizes, 13, bags, True, 0, "train", 0, idx, derive_bags=False)
                    return make_batch(dense, np.concatenate(ids), np.stack(lengths), labels,
                                      names, batch)

                n = max(1, a.samples // batch)
                new, old = rate(fast, batch, a.repeats, n), rate(plain, batch, a.repeats, n)
                print(f"| {kind} | {shape} | {batch} | {new:,.0f} | {old:,.0f} | "
                      f"{new / old:.2f}x |", flush=True)
    # power-law ids (data.id_distribution=zipf) beside uniform random ids, same run
    sizes, bags = shapes()["terabyte one-hot"]
    for batch in a.batches:
        rates = {}
        for dist in ("uniform", "zipf"):
            src = GeneratedSource("random", sizes, 13, batch, batch, 10**9, batch, bags, True,
                                  seed=0, rank=0, world_size=1, id_distribution=dist)

            def one(b, src=src, batch=batch):
                idx = np.arange(b * batch, (b + 1) * batch, dtype=np.uint64)
                return src.make("train", 0, idx, batch)

            rates[dist] = rate(one, batch, a.repeats, max(1, a.samples // batch))
        print(f"| random, zipf ids (s = 1.05) | terabyte one-hot | {batch} | "
              f"{rates['zipf']:,.0f} | uniform ids: {rates['uniform']:,.0f} | "
              f"{rates['zipf'] / rates['uniform']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
