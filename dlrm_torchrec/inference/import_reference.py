"""A model the DLRM reference trained (`dlrm_s_pytorch.py --save-model FILE`) -> a checkpoint
of this project, to evaluate, export, score with or train on.

    python -m dlrm_torchrec.import_reference model.pt --config configs/criteo_kaggle.yaml \\
        [key=value ...] -o runs/from_reference
    python -m dlrm_torchrec.train --config configs/criteo_kaggle.yaml --eval-only \\
        checkpoint.resume=runs/from_reference/step_00000000
    python -m dlrm_torchrec.export --checkpoint runs/from_reference/step_00000000 --out export/
    python -m dlrm_torchrec.train --config configs/criteo_kaggle.yaml \\
        checkpoint.resume=runs/from_reference/step_00000000          # train on from its weights

The config describes the reference's model (`--arch-*`, `--qr-*`, `--md-*` flags become
model.*, embeddings.*); the checkpoint holds the reference's weights in this project's
layout and trains, evaluates and exports as any other (`step_00000000`, one DCP file,
resharded on load to any world size and plan). The reference's weights map one to one:
`emb_l.<k>.weight` (or, quotient-remainder, `weight_q` / `weight_r`; mixed-dimension,
`embs.weight` and the projection `proj.weight`) is feature k's table, `bot_l.<i>` and
`top_l.<i>` (nn.Sequential: Linear layers at even i) are the bottom and top MLPs. The
interaction has no weights and this project's matches the reference's layout, so the
imported model computes what the reference's did (tests/integration/test_import_reference.py).

Not carried over: the optimizer state (training from an imported checkpoint starts a fresh
optimizer at step 0; the reference's SGD has none) and the reference's data position.
Refused with the keys named: weights this architecture lacks or that do not fit (learned
weighted pooling `v_W_l`, FBGEMM-GPU or quantized tables, another architecture).

The file is read with `torch.load(weights_only=True)`: tensors, numbers and the numpy
scalars the reference stores beside them; anything else is refused, never unpickled.
"""

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from dlrm_torchrec.config import Config, to_dict
from dlrm_torchrec.config.embedding_layout import embedding_layout
from dlrm_torchrec.model.dlrm import build_train_module
from dlrm_torchrec.train import checkpoint

EMBEDDING_KEY = "model.sparse_arch.embedding_bags.{}.weight"
PROJECTION_KEY = "model.embedding_out.proj.{}.weight"
MLP_PREFIXES = {"bot_l.": "model.dense_arch.layers.", "top_l.": "model.over_arch.layers."}


class ReferenceModelError(Exception):
    """A user-facing problem: printed as `error: ...` with exit status 2, no traceback."""


def _numpy_globals() -> List[Any]:
    """What numpy scalars in a torch.save file refer to: the scalar constructor under its
    numpy 1 and numpy 2 names, and dtypes."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    found: List[Any] = [(scalar, "numpy.core.multiarray.scalar"),
                        (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    found += [type(np.dtype(t)) for t in ("f8", "f4", "i8", "i4", "u8", "bool")]
    return found


def read_reference_file(path: str) -> Dict[str, Any]:
    """The reference's save file (a dict with "state_dict"), or a bare state dict."""
    if not Path(path).is_file():
        raise ReferenceModelError(f"{path}: not found")
    try:
        with torch.serialization.safe_globals(_numpy_globals()), warnings.catch_warnings():
            # files of torch.save's legacy (non-zip) format carry pickle protocol 4
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle's and zipfile's errors, torch's refusals
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ReferenceModelError(f"{path}: not a weights-only torch.save file of the "
                                  f"reference ({first}); it is never unpickled") from None
    if not isinstance(saved, dict):
        raise ReferenceModelError(f"{path}: holds a {type(saved).__name__}, expected the "
                                  "reference's dict with a 'state_dict'")
    state = saved.get("state_dict", saved)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ReferenceModelError(f"{path}: its 'state_dict' is not a dict of tensors")
    info = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in saved.items()
            if isinstance(v, (int, float, str, np.generic))}
    return {"state_dict": state, "info": info}


def map_weights(state: Dict[str, torch.Tensor], cfg: Config) -> Dict[str, str]:
    """Reference key -> this project's state-dict key, for every reference weight the
    config's model has."""
    mapping: Dict[str, str] = {}
    for k, spec in enumerate(embedding_layout(cfg.embeddings)):
        if spec.qr_collisions:
            mapping[f"emb_l.{k}.weight_q"] = EMBEDDING_KEY.format(spec.tables[0].name)
            mapping[f"emb_l.{k}.weight_r"] = EMBEDDING_KEY.format(spec.tables[1].name)
            continue
        md = f"emb_l.{k}.embs.weight"  # the reference's mixed-dimension PrEmbeddingBag
        mapping[md if md in state else f"emb_l.{k}.weight"] = EMBEDDING_KEY.format(
            spec.tables[0].name)
        if spec.project:
            mapping[f"emb_l.{k}.proj.weight"] = PROJECTION_KEY.format(spec.feature)
    for key in state:
        for ref_prefix, ours in MLP_PREFIXES.items():
            if key.startswith(ref_prefix):
                mapping[key] = ours + key[len(ref_prefix):]
    return mapping


def imported_weights(state: Dict[str, torch.Tensor], cfg: Config,
                     target: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This project's state dict (keys and shapes of `target`) filled from the reference's
    `state`; ReferenceModelError naming every key that is missing, extra or of another shape."""
    mapping = map_weights(state, cfg)
    problems = []
    extra = sorted(k for k in state if k not in mapping)
    if extra:
        problems.append("weights this model has no place for: " + ", ".join(extra[:8])
                        + (" ..." if len(extra) > 8 else "")
                        + (" (learned weighted pooling is not supported)"
                           if any(k.startswith("v_W_l") for k in extra) else ""))
    wanted = {ours: ref for ref, ours in mapping.items()}
    out: Dict[str, torch.Tensor] = {}
    for ours, like in target.items():
        ref = wanted.get(ours)
        if ref is None or ref not in state:
            problems.append(f"{ref or ours}: missing from the reference's file (this config's "
                            f"model needs {ours} of shape {list(like.shape)})")
        elif state[ref].shape != like.shape:
            problems.append(f"{ref}: shape {list(state[ref].shape)}, but this config's {ours} "
                            f"is {list(like.shape)}")
        else:
            out[ours] = state[ref].detach().to(like.dtype).contiguous()
    if problems:
        raise ReferenceModelError(
            "the reference's model does not match this config (the --arch-*, --qr-*, --md-* "
            "flags map to model.* and embeddings.*):\n  " + "\n  ".join(problems))
    return out


def import_reference(path: str, cfg: Config, out: Path, log=print) -> Path:
    """Write checkpoint `out`/step_00000000 holding the reference model `path`'s weights."""
    started = time.time()
    saved = read_reference_file(path)
    # tables on the meta device: only their shapes are needed (a Terabyte model's would
    # take tens of GB); the reference's tensors are written as they are
    module = build_train_module(cfg, device=torch.device("meta"))
    weights = imported_weights(saved["state_dict"], cfg, module.state_dict())
    final = out / "step_00000000"
    if final.exists():
        raise ReferenceModelError(f"{final}: exists; choose another output folder")
    tmp = out / "step_00000000.tmp-import"
    shutil.rmtree(tmp, ignore_errors=True)  # an interrupted import's
    tmp.mkdir(parents=True)
    try:
        _write(tmp, weights, saved, path, cfg, module)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(final)
    n = sum(w.numel() for w in weights.values())
    info = saved["info"]
    log(f"{path}: {len(weights)} weights ({n:,} values) -> {final} in "
        f"{time.time() - started:.1f} s"
        + (f"; the reference saved it at epoch {info['epoch']}, iteration {info['iter']}"
           if "epoch" in info and "iter" in info else ""))
    return final


def _write(tmp: Path, weights, saved, path: str, cfg: Config, module) -> None:
    from dlrm_torchrec.train.checkpoint import model_signature

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": weights}, checkpoint_id=str(tmp), no_dist=True)
    state = {
        "format_version": checkpoint.FORMAT_VERSION, "step": 0, "epoch": 0, "next_batch": 0,
        "samples_seen": 0, "best_auc": None, "best_step": -1, "history": [], "evals": [],
        "eval_pending_epoch": None, "loss_window": {"sum": 0.0, "since_step": 0},
        "world_size": 1, "signature": model_signature(cfg, module.model.tables),
        "config": to_dict(cfg),
        # no optimizer state: a run resuming from here starts a fresh optimizer
        "weights_only": True,
        "imported_from": {"file": str(Path(path).resolve()), "reference_state": saved["info"]},
    }
    (tmp / checkpoint.STATE_FILE).write_text(json.dumps(state, indent=1, default=str))
    checkpoint.write_manifest(tmp)  # last: what verify checks on every load
