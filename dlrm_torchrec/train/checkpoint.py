"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a folder `step_<N>` holding:
- the DCP shards of `{"model": DMP state dict, "optim": combined optimizer state}`: sharded
  embedding tables and their fused optimizer state (ShardedTensors, resharded on load to
  any world size or plan), dense parameters and the dense optimizer state;
- `trainer_state.json` (rank 0): step, data position (epoch, next batch), samples seen, the
  metrics history, the best validation AUC, the resolved config and the model signature.

Writing goes to `step_<N>.tmp-<id>` and is published by renaming it once every rank has
finished and `trainer_state.json` is in place: a crash mid-save leaves the previous
checkpoints untouched and the temporary folder is never picked.

When a run saves is the save policy of `Checkpointer`; what a checkpoint must match to be
loaded is `model_signature`.

Loading never unpickles arbitrary objects: DCP's metadata file is read with an unpickler
that admits only DCP's own metadata classes and a few builtins, and tensors are read with
`torch.load(weights_only=True)`.
"""


import io
import json
import pickle
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from dlrm_torchrec.config import CheckpointConfig, Config

STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or from a different model."""


# --------------------------------------------------------------------------- safe reading


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP metadata classes, torch dtypes/layouts/memory formats/Size and plain
    containers; anything else (e.g. os.system) is refused before it can run."""

    _BUILTINS = {"object", "set", "frozenset", "slice", "list", "dict", "tuple", "int",
                 "float", "str", "bytes", "bool", "complex", "bytearray"}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint.") or module.startswith(
                "torch.distributed._shard.sharded_tensor.metadata"):
            return super().find_class(module, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)) or obj is torch.Size:
                return obj
        if module == "builtins" and name in self._BUILTINS:
            return super().find_class(module, name)
        if (module, name) in {("collections", "OrderedDict"), ("copyreg", "_reconstructor"),
                              ("copyreg", "__newobj__"), ("_codecs", "encode"),
                              ("enum", "Enum"), ("torch.serialization", "_get_layout"),
                              ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                              ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read with `_MetadataUnpickler`. The reason a read
    failed is kept in `metadata_error`: some torch releases (2.11) swallow it and only
    report "metadata is None"."""

    metadata_error: Optional[BaseException] = None

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                data = f.read()
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except Exception as e:
            if self.metadata_error is None:  # the global file's error, not a fallback's
                self.metadata_error = e
            raise
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP stores non-tensor values (optimizer hyper-parameters) with torch.save and its
    default planner reads them back with weights_only=False; read them with weights_only."""

    def load_bytes(self, read_item, value) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# --------------------------------------------------------------------------- layout


@dataclass
class CheckpointInfo:
    path: Path
    step: int


def list_checkpoints(folder: Path) -> List[CheckpointInfo]:
    """Complete checkpoints in `folder`, oldest first (temporary folders are ignored)."""
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append(CheckpointInfo(p, int(m.group(1))))
    return sorted(out, key=lambda c: c.step)


def latest_checkpoint(folder: Path) -> Optional[CheckpointInfo]:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_str(value: str) -> str:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- save / load


def save(folder: Path, step: int, model: torch.nn.Module, optimizer: Any,
         trainer_state: Dict[str, Any], keep_last: int, keep: Optional[List[int]] = None) -> Path:
    """Collective: write checkpoint `step_<step>` atomically, then prune to the newest
    `keep_last` (never removing the steps in `keep`, e.g. the best one). Returns its path."""
    folder = Path(folder)
    final = folder / f"step_{step:08d}"
    tmp = folder / _broadcast_str(f"step_{step:08d}.tmp-{uuid.uuid4().hex[:8]}")
    if _is_main():
        tmp.mkdir(parents=True, exist_ok=True)
    _barrier()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if _is_main():
        doc = dict(trainer_state, format_version=FORMAT_VERSION)
        (tmp / STATE_FILE).write_text(json.dumps(doc, indent=1, default=str))
        if final.exists():  # a re-save of the same step (e.g. best and periodic)
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(folder, keep_last, set(keep or []) | {step})
    _barrier()
    return final


def _prune(folder: Path, keep_last: int, keep: set) -> None:
    found = list_checkpoints(folder)
    old = found[:-keep_last] if keep_last > 0 else []
    for c in old:
        if c.step not in keep:
            shutil.rmtree(c.path, ignore_errors=True)
    for p in folder.iterdir():  # temporary folders left by a crashed save
        if ".tmp-" in p.name and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def read_trainer_state(path: Path) -> Dict[str, Any]:
    f = Path(path) / STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable ({e})") from None


def check_signature(path: Path, saved: Dict[str, Any], current: Dict[str, Any]) -> None:
    """Stop with the differences when the checkpoint was written by another model."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if key == "tables" and isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                diffs.append(f"tables: checkpoint has {len(a)}, config {len(b)}")
            for ta, tb in zip(a, b):
                if ta != tb:
                    diffs.append(f"table {tb[0]}: checkpoint rows x dim {ta[1]} x {ta[2]}, "
                                 f"config {tb[1]} x {tb[2]}")
        else:
            diffs.append(f"{key}: checkpoint {a!r}, config {b!r}")
    if diffs:
        raise CheckpointError(f"{path} was written by a different model:\n  " + "\n  ".join(diffs))


def load(path: Path, model: torch.nn.Module, optimizer: Any = None) -> None:
    """Collective: load a checkpoint into the (sharded) model and optimizer in place,
    resharding to this run's world size and plan."""
    path = Path(path)
    state: Dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    load_state(state, path)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])


def load_state(state: Dict[str, Any], path: Path, no_dist: bool = False) -> None:
    """dcp.load of `state` (filled in place) from checkpoint `path`, safely (no unpickling
    of code, tensors with weights_only); any failure is a CheckpointError naming `path` and
    the cause. no_dist: read in one process without a process group (export)."""
    reader = SafeFileSystemReader(str(path))
    try:
        dcp.load(state, checkpoint_id=str(path), storage_reader=reader,
                 planner=SafeLoadPlanner(), no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
        # the metadata reader's own error, when that is what failed (see the reader)
        failed_on_metadata = reader.metadata_error is not None and "metadata" in str(e)
        cause = _root_cause(reader.metadata_error if failed_on_metadata else e)
        raise CheckpointError(f"{path}: cannot be loaded ({cause})") from None


def _root_cause(e: BaseException) -> str:
    """The informative line of a (possibly multi-rank, multi-line) DCP error."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    for ln in lines:
        if "refusing" in ln:
            return ln[ln.index("refusing"):].split(";")[0][:300]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:300]
    return (lines[-1] if lines else type(e).__name__)[:300]


def model_signature(cfg: Config, tables) -> Dict[str, Any]:
    """What a checkpoint must match to be loaded: tables and the dense architecture."""
    m = cfg.model
    return {
        "tables": [[t.name, t.num_embeddings, t.embedding_dim] for t in tables],
        "dense_in_features": m.dense_in_features, "bottom_mlp": list(m.bottom_mlp),
        "top_mlp": list(m.top_mlp), "interaction": m.interaction,
        "interaction_itself": m.interaction_itself,
        "dcn": [m.dcn_num_layers, m.dcn_low_rank_dim] if m.interaction == "dcn" else None,
    }


# --------------------------------------------------------------------------- save policy


class Checkpointer:
    """When a run saves, given the checkpoint section; `save` writes the checkpoint of the
    current step (a collective call, so every rank takes the same decisions here).

    - periodic: every `every_n_steps` optimizer steps;
    - best: after an evaluation with a new best AUC (`keep_best`), when the run checkpoints
      at all (periodic or at the end);
    - on a signal: when the ranks agreed to stop on SIGTERM (then not at the end);
    - at the end: when training ends (`at_end`).

    A step is never saved twice: a resumed checkpoint counts as saved at its step."""

    def __init__(self, cfg: CheckpointConfig, save: Callable[[], None]):
        self.cfg = cfg
        self._save = save
        self.saved_at = -1

    @property
    def enabled(self) -> bool:
        return self.cfg.every_n_steps > 0 or self.cfg.at_end

    def resumed(self, step: int) -> None:
        self.saved_at = step

    def steps_to_next_periodic(self, step: int) -> Optional[int]:
        """Optimizer steps from `step` to the next periodic save (None: no periodic saves),
        where a training interval must end."""
        every = self.cfg.every_n_steps
        return every - step % every if every else None

    def after_interval(self, step: int, new_best: bool) -> None:
        """At the end of a training interval (after its evaluation, if it had one)."""
        if new_best:
            self.after_evaluation(step, new_best)
        if self.cfg.every_n_steps and step % self.cfg.every_n_steps == 0:
            self._save_once(step)

    def after_evaluation(self, step: int, new_best: bool) -> None:
        if new_best and self.cfg.keep_best and self.enabled:
            self._save_once(step)

    def at_finish(self, step: int, signalled: bool) -> None:
        """When training ends: on an agreed signal the checkpoint holds the data position to
        continue from; otherwise the final one, if at_end."""
        if signalled or self.cfg.at_end:
            self._save_once(step)

    def _save_once(self, step: int) -> None:
        if self.saved_at != step:
            self._save()
            self.saved_at = step
