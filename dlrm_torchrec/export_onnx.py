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
  activation scales), as the reference's `--quantize-mlp-with-bit 8`; the tables stay float32.

Tables above ONNX's 2 GB protobuf limit go to an external data file beside the program
(`model.onnx.data`), which must stay in the same folder.
"""

import logging
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

# kind -> file, and kind -> its name in export's --onnx option
ONNX_KINDS = {"onnx": "model.onnx", "onnx-mlp-int8": "model_mlp_int8.onnx"}
ONNX_OPTION_NAMES = {"onnx": "float", "onnx-mlp-int8": "mlp-int8"}
ONNX_PACKAGES = "onnx, onnxscript and onnxruntime (pip install onnx onnxscript onnxruntime)"
# ONNX's protobuf limit is 2 GiB; larger programs keep their weights in an external file
EXTERNAL_DATA_BYTES = 1 << 30
LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.onnx._internal.exporter._registration")


class OnnxUnavailable(RuntimeError):
    """The ONNX packages are not installed."""


def bag_sum(weight: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sum pooling: weight (n x d), ids (N, rows of all bags back to back), lengths (B, ids
    per bag; 0 allowed) -> B x d, bag b the sum of its rows (zeros when empty).

    The bag of each id comes from counting bag starts: a 1 is added at every bag's first
    position (start = cumsum(lengths) - lengths; empty bags share their successor's start,
    trailing ones fall on the extra slot N), and the running count minus one at position j is
    the bag of id j. No slicing by the batch size, so the export stays valid for B = 1.
    """
    n_ids = ids.shape[0]
    starts = torch.cumsum(lengths, 0) - lengths
    marks = torch.zeros(n_ids + 1, dtype=torch.int64).index_add(0, starts, torch.ones_like(starts))
    bag = torch.cumsum(marks[:n_ids], 0) - 1
    # summed in float32 whatever the table's dtype: ONNX Runtime's CPU scatter-add has no
    # fp16 kernel (and an fp16 running sum would lose what the eager kernel keeps)
    pooled = torch.zeros(lengths.shape[0], weight.shape[1], dtype=torch.float32)
    return pooled.index_add(0, bag, weight[ids].float()).to(weight.dtype)


class GatherSumCollection(nn.Module):
    """A stand-in for a plain (unsharded, unquantized) sum-pooled `EmbeddingBagCollection`:
    KJT -> KeyedTensor of the same keys, widths and values, from the same weight tensors
    (shared, not copied), written with operators ONNX has (see the module docstring)."""

    def __init__(self, ebc: EmbeddingBagCollection):
        super().__init__()
        configs = ebc.embedding_bag_configs()
        self.keys: List[str] = [c.feature_names[0] for c in configs]
        self.dims: List[int] = [c.embedding_dim for c in configs]
        self.weights = nn.ParameterList([ebc.embedding_bags[c.name].weight for c in configs])

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        by_key = features.to_dict()
        pooled = [bag_sum(w, by_key[k].values(), by_key[k].lengths())
                  for k, w in zip(self.keys, self.weights)]
        return KeyedTensor(keys=self.keys, length_per_key=self.dims,
                           values=torch.cat(pooled, dim=1))


def onnx_ready(model: nn.Module) -> nn.Module:
    """A shallow copy of the DLRM `model` whose lookup is a GatherSumCollection over the
    same weights; everything else (MLPs, interaction, QR/MD outputs) is the model's own."""
    twin = nn.Module.__new__(type(model))
    twin.__dict__ = dict(model.__dict__)
    twin._modules = dict(model._modules)
    twin.sparse_arch = GatherSumCollection(model.sparse_arch)
    return twin


def require_packages() -> None:
    """OnnxUnavailable naming what to install, before any work."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise OnnxUnavailable(f"--onnx needs {ONNX_PACKAGES}; missing: {', '.join(missing)}")


def _quiet() -> Dict[str, int]:
    """Silence the exporter's progress lines and optimizer notes; returns the old levels."""
    old = {}
    for name in LOGGERS:
        log = logging.getLogger(name)
        old[name] = log.level
        log.setLevel(logging.ERROR)
    return old


def _move_into(tmp: Path, out: Path, name: str) -> None:
    """Every file of `tmp` into `out`, the program (`name`) last, so a reader never finds
    the program without its external data."""
    umask = os.umask(0)
    os.umask(umask)
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == name):
        os.chmod(f, 0o666 & ~umask)  # ONNX Runtime writes its data file private (0600)
        os.replace(f, out / f.name)


def write_program(exported: torch.export.ExportedProgram, out: Path, name: str) -> None:
    """The ONNX program of the torch.export program `exported` (of an `onnx_ready` model) as
    out/name (+ out/name.data when its weights exceed EXTERNAL_DATA_BYTES)."""
    old = _quiet()
    try:
        program = torch.onnx.export(exported, dynamo=True, verbose=False,
                                    optimize=True, report=False)
    finally:
        for log_name, level in old.items():
            logging.getLogger(log_name).setLevel(level)
    size = sum(p.numel() * p.element_size() for p in exported.state_dict.values())
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-onnx-") as tmp:
        program.save(str(Path(tmp) / name), external_data=size > EXTERNAL_DATA_BYTES)
        _move_into(Path(tmp), out, name)


def write_mlp_int8(out: Path, float_name: str, name: str) -> None:
    """out/name: out/float_name with every MatMul and Gemm dynamically quantized to int8 by
    ONNX Runtime (int8 weights, activations scaled per batch); the tables stay float."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = out / float_name
    external = (out / f"{float_name}.data").exists()
    old = _quiet()
    logging.getLogger("root").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-onnx-") as tmp:
        try:
            quantize_dynamic(src, Path(tmp) / name, op_types_to_quantize=["MatMul", "Gemm"],
                             weight_type=QuantType.QInt8, use_external_data_format=external)
        finally:
            for log_name, level in old.items():
                logging.getLogger(log_name).setLevel(level)
        for leftover in Path(tmp).glob("*-inferred.onnx"):  # ORT's shape-inference scratch
            leftover.unlink()
        _move_into(Path(tmp), out, name)


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
