"""Inference throughput of the exported programs, side by side in one run on the same
pre-generated batches: the eager plain `DLRM` (TorchRec's EmbeddingBagCollection) as the
baseline, the torch.export program (`model.pt2`), its int8-table twin (`model_int8.pt2`,
FBGEMM), and the ONNX programs in ONNX Runtime (`model.onnx`, `model_mlp_int8.onnx`,
`model_int8.onnx`).

    python bench/bench_inference.py [--arch kaggle terabyte] [--max-rows 200000]
                                    [--batches 1,256,8192] [--threads 0] [--seconds 3]

The models are randomly initialised (tables uniform in +-0.5, as the tests' checkpoints)
and written by the real `export.export` from a one-process checkpoint; ids are uniform over
each capped table, one per bag as Criteo. Each cell is samples/s over at least --seconds after one warm-up call;
with --threads 0 torch and ONNX Runtime use every core (their defaults), otherwise both are
held to that many threads. `--smoke` runs a tiny model for the tests.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dlrm_torchrec.config import load_config  # noqa: E402
from dlrm_torchrec.inference import export  # noqa: E402
from tests.helpers.checkpoints import fake_checkpoint  # noqa: E402

ARCHS = {"kaggle": "configs/criteo_kaggle.yaml", "terabyte": "configs/criteo_terabyte.yaml"}
PROGRAMS = ["eager", "float", "int8", "onnx", "onnx-mlp-int8", "onnx-int8"]


def make_batches(cfg, batch: int, count: int):
    g = torch.Generator().manual_seed(batch)
    rows = cfg.embeddings.table_sizes()
    out = []
    for _ in range(count):
        dense = torch.rand(batch, cfg.model.dense_in_features, generator=g) * 5
        ids = [torch.randint(0, r, (batch,), generator=g) for r in rows]
        lengths = [torch.ones(batch, dtype=torch.int64) for _ in rows]
        out.append((dense, ids, lengths))
    return out


@torch.no_grad()
def samples_per_s(program, batches, seconds: float) -> float:
    program(*batches[0])  # warm-up
    n, start = 0, time.perf_counter()
    while True:
        for b in batches:
            program(*b)
            n += b[0].shape[0]
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


@torch.no_grad()
def run_arch(arch: str, args) -> list:
    over = ["data.source=random", f"embeddings.max_ind_range={args.max_rows}",
            "data.eval_samples=0", "data.train_samples=1024", "data.batch_size=256"]
    if args.smoke:
        over += ["model.bottom_mlp=[16]", "model.top_mlp=[8,1]", "embeddings.dim=16"]
    cfg = load_config(ARCHS[arch], over)
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        ckpt, _ = fake_checkpoint(cfg, Path(tmp) / "ck")
        out = Path(tmp) / "export"
        t = time.perf_counter()
        export.export(cfg, ckpt, out, quantize="int8", onnx="float,mlp-int8,int8", eval_split="none",
                      log=lambda m: None)
        print(f"{arch}: export {time.perf_counter() - t:.1f}s", flush=True)
        model = export.load_weights(cfg, out / "weights.pt")
        programs = {"eager": export.InferenceModel(model, export.embedding_layout(cfg.embeddings))}
        programs.update({k: export.load_program(out, k) for k in PROGRAMS if k != "eager"})
        if args.threads:
            torch.set_num_threads(args.threads)
            for k in ("onnx", "onnx-mlp-int8", "onnx-int8"):
                programs[k] = export.OnnxProgram(out / export.program_file(k), args.threads)
        rows = []
        for b in args.batches:
            batches = make_batches(cfg, b, max(1, min(8, 65536 // b)))
            want = programs["eager"](*batches[0])
            row = {"arch": arch, "batch": b}
            for k, program in programs.items():
                row[k] = samples_per_s(program, batches, args.seconds)
                row[f"{k}_max_diff"] = float((program(*batches[0]) - want).abs().max())
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(row) -> str:
    base = row["eager"]
    cells = [f"{row['arch']:>8} {row['batch']:>6}"]
    for k in PROGRAMS:
        cells.append(f"{k} {row[k]:>11,.0f}" + ("" if k == "eager" else f" ({row[k] / base:.2f}x)"))
    return "  ".join(cells)


def markdown(rows) -> str:
    lines = ["| arch | batch | " + " | ".join(PROGRAMS) + " |",
             "|---|---|" + "---|" * len(PROGRAMS)]
    for r in rows:
        cells = [f"{r['eager']:,.0f}"] + [f"{r[k]:,.0f} ({r[k] / r['eager']:.2f}x)"
                                          for k in PROGRAMS[1:]]
        lines.append(f"| {r['arch']} | {r['batch']} | " + " | ".join(cells) + " |")
    diffs = {k: max(r[f"{k}_max_diff"] for r in rows) for k in PROGRAMS[1:]}
    lines.append("\nlargest probability difference from eager: "
                 + ", ".join(f"{k} {d:.2g}" for k, d in diffs.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    from dlrm_torchrec.cli import quiet_libraries

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["kaggle", "terabyte"], choices=list(ARCHS))
    p.add_argument("--max-rows", type=int, default=200_000)
    p.add_argument("--batches", default="1,256,8192")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    quiet_libraries()
    rows = [r for arch in args.arch for r in run_arch(arch, args)]
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
