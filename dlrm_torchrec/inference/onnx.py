"""ONNX programs of an exported model (`python -m dlrm_torchrec.export ... --onnx [KINDS]`),
as the reference's `--save-onnx` (and `--quantize-mlp-with-bit 8`), for ONNX Runtime and
the servers built on it.

The program has the inputs and output of `export.InferenceModel`, flattened: `dense`
(B x D float32), `ids_0 .. ids_{F-1}` (1-D int64, a feature's ids of all B samples back to
back), `lengths_0 .. lengths_{F-1}` (B int64 each) -> click probabilities (B float32); B and
every ids length are dynamic.

Why not TorchRec's lookup as it is: an `EmbeddingBagCollection` is exported per table as
`aten.embedding_bag`, which ONNX has no operator for; the exporter writes it as an ONNX
`Loop` over the bags (a Python-speed loop in ONNX Runtime: 8.6 s for a batch of 8192 on the
2-core machine, 340x the eager model). `GatherSumCollection` computes the same sum pooling
from the same weights with operators ONNX has (a gather of the rows, then a scatter-add into
their bags), so the program runs the lookups at the speed of the eager model or better.

kinds (ONNX_KINDS):
- `onnx`: float32 everything (`model.onnx`);
- `onnx-mlp-int8`: the same with every MatMul/Gemm of the MLPs and the DCN cross layers
  dynamically quantized to int8 by ONNX Runtime's `quantize_dynamic` (int8 weights, per-batch
  activation scales), as the reference's `--quantize-mlp-with-bit 8`; the tables stay float32;
- `onnx-int8`: int8 MLPs as above and int8 tables (`model_int8.onnx`): each row stored as
  8-bit codes with a row-wise float32 scale and bias (min/max, as FBGEMM's int8 rows),
  dequantized after the gather, before pooling; a quarter of the float tables' memory plus
  8 bytes a row (the reference's `--quantize-emb-with-bit 8` with `--quantize-mlp-with-bit 8`).

Tables above ONNX's 2 GB protobuf limit go to an external data file beside the program
(`model.onnx.data`), which must stay in the same folder.
"""

import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Sequence, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

# kind -> file, and kind -> its name in export's --onnx option
ONNX_KINDS = {"onnx": "model.onnx", "onnx-mlp-int8": "model_mlp_int8.onnx",
              "onnx-int8": "model_int8.onnx"}
ONNX_OPTION_NAMES = {"onnx": "float", "onnx-mlp-int8": "mlp-int8", "onnx-int8": "int8"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# ONNX's protobuf limit is 2 GiB; larger programs keep their weights in an external file
EXTERNAL_DATA_BYTES = 1 << 30
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"  # node metadata the exporter adds
# the exporter's progress lines and optimizer notes; "" is the root logger, on which ONNX
# Runtime's quantizer warns
LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx",
           "torch.onnx._internal.exporter._registration", "")


class OnnxUnavailable(RuntimeError):
    """The ONNX packages are not installed."""


def bag_sum(rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sum pooling of gathered rows: rows (N x d, the rows of all bags back to back), lengths
    (B, rows per bag; 0 allowed) -> B x d float32, bag b the sum of its rows (zeros when empty).

    The bag of each row comes from counting bag starts: a 1 is added at every bag's first
    position (start = cumsum(lengths) - lengths; empty bags share their successor's start,
    trailing ones fall on the extra slot N), and the running count minus one at position j is
    the bag of row j. No slicing by the batch size, so the export stays valid for B = 1.
    Summed in float32 whatever the rows' dtype: ONNX Runtime's CPU scatter-add has no fp16
    kernel (and an fp16 running sum would lose what the eager kernel keeps).
    """
    n_rows = rows.shape[0]
    starts = torch.cumsum(lengths, 0) - lengths
    marks = torch.zeros(n_rows + 1, dtype=torch.int64).index_add(0, starts, torch.ones_like(starts))
    bag = torch.cumsum(marks[:n_rows], 0) - 1
    pooled = torch.zeros(lengths.shape[0], rows.shape[1], dtype=torch.float32)
    return pooled.index_add(0, bag, rows.float())


QUANTIZE_BLOCK_ROWS = 1 << 18  # rows per block: float32 temporaries of 256k x d, not n x d


def quantize_rows(weight: torch.Tensor, block_rows: int = QUANTIZE_BLOCK_ROWS
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight (n x d) -> codes (n x d uint8), scale (n x 1), bias (n x 1) float32 with
    codes * scale + bias within scale / 2 of each value: bias the row's minimum, scale its
    range / 255 (1 for a constant row, which its bias gives exactly). Worked through
    `block_rows` rows at a time: a 10M-row table would otherwise need several float32
    copies of itself at once."""
    n, d = weight.shape
    codes = torch.empty(n, d, dtype=torch.uint8)
    scale = torch.empty(n, 1, dtype=torch.float32)
    bias = torch.empty(n, 1, dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, n, block_rows):
            rows = slice(start, start + block_rows)
            w = weight[rows].to(torch.float32, copy=True)  # worked on in place
            low = w.amin(dim=1, keepdim=True)
            step = (w.amax(dim=1, keepdim=True) - low) / 255
            step = torch.where(step > 0, step, torch.ones_like(step))
            codes[rows] = w.sub_(low).div_(step).round_().clamp_(0, 255)
            scale[rows], bias[rows] = step, low
    return codes, scale, bias


class FloatRows(nn.Module):
    """A table's rows as they are: ids (N) -> N x d, in the table's dtype."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight  # shared with the model, not copied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]


class Int8Rows(nn.Module):
    """A table's rows as int8 codes with a row-wise scale and bias (quantize_rows):
    ids (N) -> N x d float32, dequantized."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        codes, scale, bias = quantize_rows(weight)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codes[ids].float() * self.scale[ids] + self.bias[ids]


class GatherSumCollection(nn.Module):
    """A stand-in for a plain (unsharded, unquantized) sum-pooled `EmbeddingBagCollection`:
    KJT -> KeyedTensor of the same keys, widths and dtype, from the same weights (shared;
    with `int8_rows`, their quantize_rows codes), written with operators ONNX has (see the
    module docstring)."""

    def __init__(self, ebc: EmbeddingBagCollection, int8_rows: bool = False):
        super().__init__()
        configs = ebc.embedding_bag_configs()
        self.keys: List[str] = [c.feature_names[0] for c in configs]
        self.dims: List[int] = [c.embedding_dim for c in configs]
        weights = [ebc.embedding_bags[c.name].weight for c in configs]
        self.dtype = torch.float32 if int8_rows else weights[0].dtype
        self.tables = nn.ModuleList([Int8Rows(w) if int8_rows else FloatRows(w)
                                     for w in weights])

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        by_key = features.to_dict()
        pooled = [bag_sum(table(by_key[k].values()), by_key[k].lengths())
                  for k, table in zip(self.keys, self.tables)]
        return KeyedTensor(keys=self.keys, length_per_key=self.dims,
                           values=torch.cat(pooled, dim=1).to(self.dtype))


def onnx_ready(model: nn.Module, int8_rows: bool = False) -> nn.Module:
    """A shallow copy of the DLRM `model` whose lookup is a GatherSumCollection over the
    same weights (or their int8 codes); everything else (MLPs, interaction, QR/MD outputs)
    is the model's own."""
    twin = nn.Module.__new__(type(model))
    twin.__dict__ = dict(model.__dict__)
    twin._modules = dict(model._modules)
    twin.sparse_arch = GatherSumCollection(model.sparse_arch, int8_rows)
    return twin


def require_packages(option: str) -> None:
    """OnnxUnavailable naming the `option` that needs ONNX_PACKAGES and what to install,
    before any work."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise OnnxUnavailable(f"{option} needs onnx, onnxscript and onnxruntime (pip install "
                              f"{' '.join(ONNX_PACKAGES)}); missing: {', '.join(missing)}")


@contextmanager
def _quiet() -> Iterator[None]:
    """LOGGERS at ERROR for the block, then as they were."""
    loggers = [logging.getLogger(name) for name in LOGGERS]
    old = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, old):
            log.setLevel(level)


def _move_into(tmp: Path, out: Path, name: str) -> None:
    """Every file of `tmp` into `out`, the program (`name`) last, so a reader never finds
    the program without its external data."""
    umask = os.umask(0)
    os.umask(umask)
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == name):
        os.chmod(f, 0o666 & ~umask)  # ONNX Runtime writes its data file private (0600)
        os.replace(f, out / f.name)


def _drop_stack_traces(program) -> None:
    """Remove the exporter's per-node stack traces from `program` (a torch.onnx ONNXProgram,
    whose `model` is an onnx_ir model). A stand-in program without a model (the tests' full
    disk) has none to remove."""
    model = getattr(program, "model", None)
    if model is None:
        return
    for node in model.graph.all_nodes():
        node.metadata_props.pop(STACK_TRACE_KEY, None)


def write_program(exported: torch.export.ExportedProgram, out: Path, name: str) -> None:
    """The ONNX program of the torch.export program `exported` (of an `onnx_ready` model) as
    out/name (+ out/name.data when its weights exceed EXTERNAL_DATA_BYTES)."""
    with _quiet():
        program = torch.onnx.export(exported, dynamo=True, verbose=False,
                                    optimize=True, report=False)
    # the exporter records each node's Python stack trace, with this machine's absolute
    # source paths: a program for other machines carries neither (a third of a small
    # model's graph file, and longer wherever the repository lies deeper)
    _drop_stack_traces(program)
    size = sum(p.numel() * p.element_size() for p in exported.state_dict.values())
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-onnx-") as tmp:
        program.save(str(Path(tmp) / name), external_data=size > EXTERNAL_DATA_BYTES)
        _move_into(Path(tmp), out, name)


def write_mlp_int8(src: Path, out: Path, name: str) -> None:
    """out/name: the ONNX program `src` with every MatMul and Gemm dynamically quantized to
    int8 by ONNX Runtime (int8 weights, activations scaled per batch); tables as they are."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = Path(f"{src}.data").exists()
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-onnx-") as tmp, _quiet():
        quantize_dynamic(src, Path(tmp) / name, op_types_to_quantize=["MatMul", "Gemm"],
                         weight_type=QuantType.QInt8, use_external_data_format=external)
        for leftover in Path(tmp).glob("*-inferred.onnx"):  # ORT's shape-inference scratch
            leftover.unlink()
        _move_into(Path(tmp), out, name)


def write_kind(kind: str, out: Path,
               exported_of: Callable[[bool], torch.export.ExportedProgram]) -> None:
    """Write the program of `kind` (ONNX_KINDS) to `out`. exported_of(int8_rows) gives the
    torch.export program of the onnx_ready model; onnx-mlp-int8 is made from out's
    model.onnx, which must be written first (export.parse_onnx orders the kinds so)."""
    name = ONNX_KINDS[kind]
    if kind == "onnx":
        write_program(exported_of(False), out, name)
    elif kind == "onnx-mlp-int8":
        write_mlp_int8(out / ONNX_KINDS["onnx"], out, name)
    else:  # onnx-int8: int8 tables in the graph, then int8 MLPs
        with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-onnx-") as tmp:
            write_program(exported_of(True), Path(tmp), "tables_int8.onnx")
            write_mlp_int8(Path(tmp) / "tables_int8.onnx", out, name)


class OnnxProgram:
    """An ONNX program run by ONNX Runtime with InferenceModel's call:
    (dense B x D, ids: F tensors, lengths: F tensors) -> probabilities B (torch float32)."""

    def __init__(self, path: Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's choice (all cores)
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, dense: torch.Tensor, ids: Sequence[torch.Tensor],
                 lengths: Sequence[torch.Tensor]) -> torch.Tensor:
        flat = [dense, *ids, *lengths]
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, flat)}
        return torch.from_numpy(self.session.run(None, feeds)[0])
