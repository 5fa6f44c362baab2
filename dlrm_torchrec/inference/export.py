"""Export a checkpoint to a single-host inference model:
`python -m dlrm_torchrec.export --config FILE --checkpoint DIR|auto --out OUT [--quantize int8,int4]
[--onnx float,mlp-int8,int8]`.

The checkpoint (DCP shards written by any world size and sharding plan) is read on one CPU
process without a process group: DCP reassembles every sharded table into the plain
`EmbeddingBagCollection` of `dlrm_torchrec.model.DLRM`. OUT receives

- `weights.pt`: the unsharded state dict of `DLRM` (plain tensors, `torch.load(...,
  weights_only=True)`), and `config.yaml`, the resolved config that builds that model;
- `model.pt2`: a `torch.export` program of `InferenceModel`: (dense B x D float32, ids: F
  1-D int64 tensors, lengths: F tensors of B int64) -> click probabilities B. Quotient-remainder
  id splits happen inside, so callers always pass the raw feature ids;
- with `--quantize int8` (or int4, int2, fp16; several comma-separated), `model_int8.pt2`
  (`model_<kind>.pt2`): the same program with every table quantized to int8 rows (row-wise
  scale and bias; fp16 rows have none) by TorchRec's `quantize_inference_model`, looked up by
  FBGEMM's IntNBit inference kernel; it needs `import fbgemm_gpu` (or torchrec) before
  `torch.export.load`;
- with `--onnx float` (and/or `mlp-int8`, `int8`), `model.onnx` (`model_mlp_int8.onnx`,
  `model_int8.onnx`): ONNX programs of the same call for ONNX Runtime, with int8 MLPs
  (and int8 tables) in the quantized ones (`dlrm_torchrec.export_onnx`);
- `export.json`: inputs, feature order, tables, files, the validation report (metrics of
  the exported programs on a split and their largest prediction differences) and, for
  models of Criteo data, `row_transform`: the data folder's preprocessing settings and
  stored table sizes, which `python -m dlrm_torchrec.score` applies to raw rows.

Loading never unpickles: the checkpoint is read with checkpoint.SafeFileSystemReader and
SafeLoadPlanner, and a checkpoint of another model is refused naming what differs.
"""


import copy
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_torchrec.config import CRITEO_SOURCES, Config, ConfigError, load_config, to_yaml
from dlrm_torchrec.config.embedding_layout import FeatureSpec, embedding_layout, is_compressed
from dlrm_torchrec.inference.onnx import (
    ONNX_KINDS,
    ONNX_OPTION_NAMES,
    ONNX_PACKAGES,
    OnnxProgram,
    onnx_ready,
    require_packages,
    write_kind,
)
from dlrm_torchrec.model.dlrm import DLRM, build_train_module
from dlrm_torchrec.train import checkpoint
from dlrm_torchrec.train.metrics import prediction_metrics

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.yaml"
PROGRAM_FILE = "model.pt2"
INFO_FILE = "export.json"
# table precisions of --quantize: TorchRec's quantize_inference_model dtypes (the integer
# ones with a row-wise scale and bias; FBGEMM's IntNBit CPU/GPU kernels), as the reference's
# --quantize-emb-with-bit 8 / 4 (and 2 bits, and fp16 rows)
QUANTIZED_TABLES = {"int8": torch.int8, "int4": torch.quint4x2, "int2": torch.quint2x4,
                    "fp16": torch.float16}


def program_file(kind: str) -> str:
    """The program file of `kind`: "float" (model.pt2), one of QUANTIZED_TABLES
    (model_<kind>.pt2) or of export_onnx.ONNX_KINDS (model.onnx, model_mlp_int8.onnx)."""
    if kind in ONNX_KINDS:
        return ONNX_KINDS[kind]
    return PROGRAM_FILE if kind == "float" else f"model_{kind}.pt2"


def export_flag(kind: str) -> str:
    """The export option that writes the program of `kind` ("" for the float one)."""
    if kind in ONNX_KINDS:
        return f"--onnx {ONNX_OPTION_NAMES[kind]}"
    return "" if kind == "float" else f"--quantize {kind}"


def load_program(folder: Path, kind: str):
    """The program of `kind` in an export folder, as a callable with InferenceModel's call
    (dense, ids, lengths) -> probabilities: a torch.export module, or an ONNX Runtime
    session for the ONNX kinds."""
    path = folder / program_file(kind)
    if kind in ONNX_KINDS:
        return OnnxProgram(path)
    if kind != "float":
        import fbgemm_gpu  # noqa: F401  (registers the quantized kernels the program calls)
    # loading a program notes each data-dependent size it does not need again
    logging.getLogger("torch._export.serde.serialize").setLevel(logging.ERROR)
    return torch.export.load(str(path)).module()


class ExportError(RuntimeError):
    """The export cannot be written (e.g. an unwritable output folder)."""


# --------------------------------------------------------------------------- the model


class InferenceModel(nn.Module):
    """Plain tensors in, click probabilities out, around a `DLRM` (float or quantized).

    forward(dense B x D float32, ids, lengths) -> B probabilities, where ids[f] holds feature
    f's ids of all B samples back to back (int64) and lengths[f] (B, int64) how many of them
    belong to each sample; features in `feature_names` order. Ids are folded into the
    feature's rows (id mod rows), as the Criteo loader folds preprocessed ids into tables
    capped by `embeddings.max_ind_range`: callers pass the preprocessed ids as they are, and an
    id out of range never reaches the lookup kernel (which does not check). Quotient-remainder
    features are then split into their two keys (id // c, id mod c), as
    `compression.split_qr_ids` does for training batches.
    """

    def __init__(self, dlrm: nn.Module, layout: Sequence[FeatureSpec]):
        super().__init__()
        self.dlrm = dlrm
        self.feature_names: List[str] = [f.feature for f in layout]
        self.rows: List[int] = [f.rows for f in layout]
        self.collisions: List[int] = [f.qr_collisions for f in layout]
        self.keys: List[str] = [t.feature for f in layout for t in f.tables]

    def forward(self, dense: torch.Tensor, ids: List[torch.Tensor],
                lengths: List[torch.Tensor]) -> torch.Tensor:
        values: List[torch.Tensor] = []
        lens: List[torch.Tensor] = []
        per_key: List[int] = []
        for f, c in enumerate(self.collisions):
            folded = torch.remainder(ids[f], self.rows[f])
            parts = [folded] if c == 0 else [torch.div(folded, c, rounding_mode="floor"),
                                             torch.remainder(folded, c)]
            for part in parts:
                values.append(part)
                lens.append(lengths[f])
                per_key.append(part.shape[0])
        kjt = KeyedJaggedTensor(keys=self.keys, values=torch.cat(values),
                                lengths=torch.cat(lens), length_per_key=per_key)
        return torch.sigmoid(self.dlrm(dense, kjt))


def load_weights(cfg: Config, weights: Path) -> DLRM:
    """A plain `DLRM` on CPU with the exported weights (`config.yaml` + `weights.pt`)."""
    model = DLRM(cfg, device=torch.device("cpu"))
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def quantize_tables(model: DLRM, kind: str) -> nn.Module:
    """A copy of `model` whose EmbeddingBagCollection is TorchRec's quantized one with
    `kind` rows (QUANTIZED_TABLES; FBGEMM lookups, float32 output)."""
    from torchrec.inference.modules import quantize_inference_model

    return quantize_inference_model(copy.deepcopy(model),
                                    quantization_dtype=QUANTIZED_TABLES[kind],
                                    output_dtype=torch.float32).eval()


def parse_quantize(spec: str) -> List[str]:
    """--quantize "int8,int4" -> ["int8", "int4"]; ConfigError for an unknown kind."""
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    for k in kinds:
        if k not in QUANTIZED_TABLES:
            raise ConfigError(f"--quantize {spec!r}: {k!r} unknown; choose from "
                              + ", ".join(QUANTIZED_TABLES) + " (comma-separated)")
    return list(dict.fromkeys(kinds))


def parse_onnx(spec: str) -> List[str]:
    """--onnx "float,mlp-int8" -> ["onnx", "onnx-mlp-int8"] (ONNX_KINDS, in that order);
    ConfigError for an unknown kind. mlp-int8 is made from the float program, so it brings
    model.onnx along."""
    names = [k.strip() for k in spec.split(",") if k.strip()]
    for k in names:
        if k not in ONNX_OPTION_NAMES.values():
            raise ConfigError(f"--onnx {spec!r}: {k!r} unknown; choose from "
                              + ", ".join(ONNX_OPTION_NAMES.values()) + " (comma-separated)")
    return [kind for kind, name in ONNX_OPTION_NAMES.items()
            if name in names or (kind == "onnx" and "mlp-int8" in names)]


def _example_inputs(cfg: Config, batch: int = 4, per_bag: int = 2):
    sizes = cfg.embeddings.table_sizes()
    dense = torch.rand(batch, cfg.model.dense_in_features, generator=torch.Generator().manual_seed(0))
    ids = [torch.arange(batch * per_bag, dtype=torch.int64) % n for n in sizes]
    lengths = [torch.full((batch,), per_bag, dtype=torch.int64) for _ in sizes]
    return dense, ids, lengths


def export_program(model: InferenceModel, cfg: Config):
    """torch.export of `model` with a dynamic batch size and dynamic ids per feature."""
    from torch.export import Dim

    if any(type(m).__module__.startswith("torchrec.quant") for m in model.modules()):
        # the IntNBit kernel holds fbgemm script objects (cache counters); TorchRec ships
        # fake versions of them for tracing
        from torch._library.fake_class_registry import has_fake_class
        from torchrec.pt2.utils import register_fake_classes

        if not has_fake_class("fbgemm::AtomicCounter"):
            register_fake_classes()
    batch = Dim("batch", min=1)
    n = len(model.feature_names)
    shapes = {"dense": {0: batch},
              "ids": [{0: Dim(f"ids_{name}", min=0)} for name in model.feature_names],
              "lengths": [{0: batch}] * n}
    example = _example_inputs(cfg)
    with torch.no_grad():
        # one eager call first: the quantized collection caches its feature order then
        # (a torch.tensor(data=...) call that non-strict tracing cannot follow)
        model(*example)
        root = logging.getLogger()
        root.addFilter(_quiet_kjt_warning)
        try:
            return torch.export.export(model, example, dynamic_shapes=shapes, strict=False)
        finally:
            root.removeFilter(_quiet_kjt_warning)


def onnx_export_program(model: DLRM, cfg: Config, int8_rows: bool = False):
    """The torch.export program (export_program) of `model` with its lookup made ONNX-ready
    (export_onnx.onnx_ready): what export_onnx.write_program turns into an ONNX program."""
    ready = onnx_ready(model, int8_rows)
    return export_program(InferenceModel(ready, embedding_layout(cfg.embeddings)).eval(), cfg)


def _quiet_kjt_warning(record: logging.LogRecord) -> bool:
    """TorchRec warns (on the root logger) on every export that splitting a KJT by key is
    slow to trace; it is, once."""
    return "non-strict torch.export KJT" not in record.getMessage()


# --------------------------------------------------------------------------- checkpoint


def resolve_checkpoint(spec: str, cfg: Optional[Config]) -> Path:
    if spec == "auto":
        if cfg is None:
            raise checkpoint.CheckpointError("--checkpoint auto needs --config (to find the run)")
        folder = Path(cfg.checkpoint.dir or Path(cfg.logging.run_dir) / "checkpoints")
        found, skipped = checkpoint.newest_usable(folder)
        for why in skipped:
            print(f"--checkpoint auto: skipped {why}", file=sys.stderr)
        if found is None:
            raise checkpoint.CheckpointError(f"--checkpoint auto: no usable checkpoint in {folder}")
        return found.path
    path = Path(spec)
    if not path.is_dir():
        raise checkpoint.CheckpointError(f"--checkpoint {spec}: no such folder")
    return path


def config_of_checkpoint(path: Path, overrides: Sequence[str] = ()) -> Config:
    """The resolved config a checkpoint was written with (its trainer_state.json)."""
    saved = checkpoint.read_trainer_state(path).get("config")
    if not isinstance(saved, dict):
        raise checkpoint.CheckpointError(f"{path}: holds no config; pass --config")
    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(saved, f)
        f.flush()
        return load_config(f.name, overrides)


def load_checkpoint(cfg: Config, path: Path) -> Tuple[DLRM, Dict[str, Any]]:
    """The plain DLRM (CPU, eval mode) with the weights of checkpoint `path`, and the
    checkpoint's trainer state. Raises CheckpointError for another model or a bad folder."""
    from dlrm_torchrec.train.checkpoint import model_signature

    checkpoint.verify(path)
    state = checkpoint.read_trainer_state(path)
    module = build_train_module(cfg, device=torch.device("cpu"))
    checkpoint.check_signature(path, state.get("signature", {}),
                               model_signature(cfg, module.model.tables))
    # keys as the DMP model's: model.sparse_arch.embedding_bags.t_cat_0.weight, ...
    weights = module.state_dict()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        checkpoint.load_state({"model": weights}, path, no_dist=True)
    module.load_state_dict(weights)
    return module.model.eval(), state


# --------------------------------------------------------------------------- evaluation


def batch_inputs(batch, feature_names: Sequence[str]):
    """A data-source Batch (raw, un-split features) -> InferenceModel's inputs."""
    by_key = batch.sparse_features.to_dict()
    return (batch.dense_features, [by_key[k].values() for k in feature_names],
            [by_key[k].lengths() for k in feature_names])


@torch.no_grad()
def predict_split(cfg: Config, models: Dict[str, Any], split: str, max_batches: int = 0):
    """Probabilities of every model on the real samples of `split` (one process, the whole
    global batch at a time), and the labels."""
    from dlrm_torchrec.config import feature_names
    from dlrm_torchrec.data import build_data_source

    source = build_data_source(cfg.data, cfg.embeddings, cfg.model.dense_in_features, 0, 1)
    names = feature_names(cfg.embeddings)
    probs: Dict[str, List[torch.Tensor]] = {k: [] for k in models}
    labels: List[torch.Tensor] = []
    for i, batch in enumerate(source.batches(split, 0)):
        if max_batches and i >= max_batches:
            break
        real = batch.weights > 0
        inputs = batch_inputs(batch, names)
        for k, m in models.items():
            probs[k].append(m(*inputs)[real])
        labels.append(batch.labels[real])
    cat = {k: torch.cat(v) if v else torch.zeros(0) for k, v in probs.items()}
    return cat, torch.cat(labels) if labels else torch.zeros(0)


# --------------------------------------------------------------------------- writing


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _publish(out: Path, name: str, write) -> None:
    """write(tmp_path), then rename into place: a failed export never leaves half a file.
    A file system error (a full disk above all) becomes an ExportError naming the file."""
    tmp = out / f".tmp-{os.getpid()}-{name}"  # same suffix: torch.export.save wants .pt2
    try:
        write(tmp)
        os.replace(tmp, out / name)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = checkpoint.os_error_behind(e)
        if cause is None:
            raise
        raise ExportError(f"{out / name}: cannot write ({cause.strerror or cause}); the "
                          "partial file was removed") from None


def _torch_save(obj: Any, path: Path) -> None:
    # through a Python file object: a failed write raises its OSError (ENOSPC: "No space
    # left on device"); given a path, torch's C++ writer only says "unexpected pos"
    with open(path, "wb") as f:
        torch.save(obj, f)


def describe_inputs(cfg: Config) -> Dict[str, Any]:
    e, layout = cfg.embeddings, embedding_layout(cfg.embeddings)
    return {
        "call": "probabilities = program.module()(dense, ids, lengths)",
        "dense": {"shape": ["B", cfg.model.dense_in_features], "dtype": "float32",
                  "note": "transformed as the training data (Criteo: log(x + 1))"},
        "ids": {"type": f"list of {len(layout)} 1-D int64 tensors, one per feature in "
                        "feature_order; feature f's ids of all B samples back to back",
                "range": "any id >= 0, as preprocessed; the program folds it into the "
                         "feature's rows (id mod rows), as the training loader does for "
                         "tables capped by max_ind_range"},
        "lengths": {"type": f"list of {len(layout)} int64 tensors of shape [B]: ids per "
                            "sample of each feature (0 allowed)"},
        "output": {"shape": ["B"], "dtype": "float32", "meaning": "click probability"},
        "feature_order": [f.feature for f in layout],
        "features": [{
            "name": f.feature, "rows": f.rows, "width": f.out_dim,
            "tables": [{"name": t.name, "key": t.feature, "rows": t.rows, "dim": t.dim}
                       for t in f.tables],
            **({"qr_collisions": f.qr_collisions, "qr_operation": e.qr_operation}
               if f.qr_collisions else {}),
        } for f in layout],
        "compression": ("quotient-remainder ids are split inside the program; weights.pt's "
                        "DLRM expects the split keys (compression.split_qr_ids)"
                        if is_compressed(e) else None),
    }


ONNX_DESCRIPTIONS = {
    "onnx": "float32",
    "onnx-mlp-int8": "MatMul/Gemm dynamically quantized to int8 by ONNX Runtime (tables "
                     "float32)",
    "onnx-int8": "int8 table rows (row-wise float32 scale and bias, dequantized after the "
                 "gather) and MatMul/Gemm dynamically quantized to int8 by ONNX Runtime",
}


def describe_onnx(loaded: Dict[str, Any]) -> Dict[str, Any]:
    """How to run the ONNX programs (export_onnx)."""
    onnx = [k for k in loaded if k in ONNX_KINDS]
    return {
        "call": "session.run(None, {name: array for name, array in zip(input_names, "
                "[dense, *ids, *lengths])})[0] -> probabilities B (float32)",
        "input_names": loaded[onnx[0]].input_names,
        "programs": {program_file(k): ONNX_DESCRIPTIONS[k] for k in onnx},
        "versions": {p: _version(p) for p in ONNX_PACKAGES},
    }


def row_transform(cfg: Config) -> Optional[Dict[str, Any]]:
    """How raw Criteo rows became the training rows: the data folder (absolute) and its
    meta.json without the per-day bookkeeping; None for generated data or a data folder
    that is not there."""
    from dlrm_torchrec.data.criteo import read_meta

    if cfg.data.source not in CRITEO_SOURCES:
        return None
    try:
        meta = read_meta(cfg.data.path)
    except ConfigError:
        return None
    keep = ("format_version", "settings", "table_sizes", "multi_hot_sizes")
    return {"data_path": os.path.abspath(cfg.data.path),
            "meta": {k: meta[k] for k in keep if k in meta}}


def export(cfg: Config, ckpt: Path, out: Path, quantize: str = "", eval_split: str = "val",
           eval_batches: int = 0, log=print, onnx: str = "") -> Dict[str, Any]:
    """Write the export of checkpoint `ckpt` (a model of `cfg`) to `out`; returns the
    contents of export.json. `quantize` and `onnx` as the --quantize and --onnx options."""
    kinds = parse_quantize(quantize)
    onnx_kinds = parse_onnx(onnx)
    if onnx_kinds:
        require_packages("--onnx")
    _check_writable(out)
    start = time.perf_counter()
    model, state = load_checkpoint(cfg, ckpt)
    layout = embedding_layout(cfg.embeddings)
    log(f"loaded {ckpt} (step {state.get('step')}, written by {state.get('world_size')} ranks)")

    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    _publish(out, WEIGHTS_FILE, lambda p: _torch_save(weights, p))
    _publish(out, CONFIG_FILE, lambda p: p.write_text(to_yaml(cfg)))

    programs = {"float": InferenceModel(model, layout).eval()}
    for kind in kinds:
        programs[kind] = InferenceModel(quantize_tables(model, kind), layout).eval()
    loaded = {}
    for kind, wrapper in programs.items():
        name = program_file(kind)
        ep = export_program(wrapper, cfg)
        _publish(out, name, lambda p, ep=ep: _save_program(ep, p))
        loaded[kind] = load_program(out, kind)  # what users will run
        log(f"wrote {out / name}")
    for kind in onnx_kinds:
        _write_onnx(kind, out, lambda int8_rows: onnx_export_program(model, cfg, int8_rows))
        loaded[kind] = load_program(out, kind)
        log(f"wrote {out / program_file(kind)}")

    info: Dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "checkpoint": str(ckpt), "step": state.get("step"),
        "written_by_world_size": state.get("world_size"),
        "files": {"weights": WEIGHTS_FILE, "config": CONFIG_FILE, "program": PROGRAM_FILE,
                  **{f"program_{k}": program_file(k) for k in loaded if k != "float"}},
        "weights": "state dict of dlrm_torchrec.model.DLRM(config, device=cpu); "
                   "export.load_weights(config, path)",
        "quantization": ({k: (f"{k} rows" + (", row-wise scale/bias" if k != "fp16" else "")
                              + ", TorchRec quantize_inference_model (FBGEMM kernels; import "
                              "fbgemm_gpu before torch.export.load)")
                          for k in loaded if k in QUANTIZED_TABLES} or None),
        "inputs": describe_inputs(cfg),
        **({"onnx": describe_onnx(loaded)} if onnx_kinds else {}),
        **({"row_transform": row} if (row := row_transform(cfg)) else {}),
        "versions": {"torch": torch.__version__, "torchrec": _version("torchrec")},
    }
    if eval_split != "none":
        info["validation"] = validate_export(cfg, model, layout, loaded, eval_split, eval_batches)
        v = info["validation"]
        log(f"{eval_split} ({v['samples']} samples): " + "  ".join(
            f"{k} auc {m.get('auc', math.nan):.6f} log_loss {m.get('log_loss', math.nan):.6f}"
            for k, m in v["metrics"].items()))
        for k, d in v["max_abs_prob_diff"].items():
            log(f"  max |p_{k} - p_eager| = {d:.3g}")
        for k in loaded:
            if f"auc_change_{k}" in v:
                log(f"  {k}: auc change {v[f'auc_change_{k}']:+.6f}, "
                    f"log_loss change {v[f'log_loss_change_{k}']:+.6f}")
    info["seconds"] = round(time.perf_counter() - start, 2)
    _publish(out, INFO_FILE, lambda p: p.write_text(json.dumps(info, indent=1, default=_nan_null)))
    log(f"export of {ckpt} -> {out} ({info['seconds']:.1f}s)")
    return info


def validate_export(cfg: Config, model: DLRM, layout, loaded: Dict[str, Any], split: str,
                    max_batches: int) -> Dict[str, Any]:
    """Metrics of the exported programs on `split` against the eager float model."""
    models = {"eager": InferenceModel(model, layout).eval(), **loaded}
    probs, labels = predict_split(cfg, models, split, max_batches)
    metrics = {k: prediction_metrics(p, labels) for k, p in probs.items() if k != "eager"}
    res: Dict[str, Any] = {
        "split": split, "samples": len(labels), "metrics": metrics,
        "max_abs_prob_diff": {k: float((p - probs["eager"]).abs().max()) if len(p) else 0.0
                              for k, p in probs.items() if k != "eager"},
    }
    for k in (k for k in metrics if k != "float"):
        res[f"max_abs_prob_diff_{k}_vs_float"] = (
            float((probs[k] - probs["float"]).abs().max()) if len(labels) else 0.0)
        for m in ("auc", "log_loss"):
            res[f"{m}_change_{k}"] = (metrics[k].get(m, math.nan)
                                      - metrics["float"].get(m, math.nan))
    return res


def _write_onnx(kind: str, out: Path, exported_of) -> None:
    """export_onnx.write_kind, with a failed write (a full disk, a vanished folder) as an
    ExportError naming the file, like _publish's. The program and its data are written in
    a temp folder that goes with the error, so nothing half-written is left in `out`."""
    try:
        write_kind(kind, out, exported_of)
    except OSError as e:
        raise ExportError(f"{out / program_file(kind)}: cannot write ({e.strerror or e})") from None


def _save_program(ep, path: Path) -> None:
    with warnings.catch_warnings():  # about tensors sharing storage, which all live on CPU
        warnings.filterwarnings("ignore", message="No complete tensor found")
        # serialized in memory first: torch.export.save's zip writer aborts the whole
        # process (an exception thrown in a destructor) when a write to the file fails,
        # as on a full disk; a plain write raises its OSError instead
        buf = io.BytesIO()
        torch.export.save(ep, buf)
    with open(path, "wb") as f:
        f.write(buf.getbuffer())


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def _nan_null(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else str(x)


# --------------------------------------------------------------------------- CLI
