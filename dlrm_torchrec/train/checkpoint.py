"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a folder `step_<N>` holding:
- the DCP shards of `{"model": DMP state dict, "optim": combined optimizer state}`: sharded
  embedding tables and their fused optimizer state (ShardedTensors, resharded on load to
  any world size or plan), dense parameters and the dense optimizer state;
- `trainer_state.json` (rank 0): step, data position (epoch, next batch), samples seen, the
  metrics history, the best validation AUC, the resolved config and the model signature.

Writing goes to `step_<N>.tmp-<id>` and is published by renaming it once every rank has
finished, `trainer_state.json` is in place and, written last, `manifest.json` holds the size
and SHA-256 of every other file: a crash mid-save leaves the previous checkpoints untouched
and the temporary folder is never picked. Loading checks every file against the manifest
first (`verify`), so damaged bytes or a missing file are refused before DCP reads anything,
and `resume=auto` takes the newest checkpoint that verifies (`newest_usable`).

When a run saves is the save policy of `Checkpointer`; what a checkpoint must match to be
loaded is `model_signature`.

Loading never unpickles arbitrary objects: DCP's metadata file is read with an unpickler
that admits only DCP's own metadata classes and a few builtins, and tensors are read with
`torch.load(weights_only=True)`.
"""


import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

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
MANIFEST_FILE = "manifest.json"
METADATA_FILE = ".metadata"  # DCP's index of the shards
FORMAT_VERSION = 1
_HASH_CHUNK = 1 << 20  # bytes read at a time while hashing


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
    """Published checkpoints in `folder` (those with a trainer state or a manifest), oldest
    first; temporary folders are ignored. Whether one is usable says `verify`."""
    if not folder.is_dir():
        return []
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise CheckpointError(f"{folder}: cannot be read ({e.strerror or e})") from None
    out = []
    for p in entries:
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and ((p / STATE_FILE).is_file() or (p / MANIFEST_FILE).is_file()):
            out.append(CheckpointInfo(p, int(m.group(1))))
    return sorted(out, key=lambda c: c.step)


def latest_checkpoint(folder: Path) -> Optional[CheckpointInfo]:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def newest_usable(folder: Path) -> Tuple[Optional[CheckpointInfo], List[str]]:
    """Collective: the newest checkpoint in `folder` that verifies (None: none does), and
    why each newer one was passed over. Rank 0 lists the folder, so every rank examines the
    same checkpoints, and every rank reaches the same verdict on each (see `verify`)."""
    found = _on_main(lambda: list_checkpoints(folder))
    skipped = []
    for c in reversed(found):
        try:
            verify(c.path)
            read_trainer_state(c.path)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        return c, skipped
    return None, skipped


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _rank_and_world() -> Tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_str(value: str) -> str:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _on_main(work: Callable[[], Any]) -> Any:
    """Collective: run `work` on rank 0 and give every rank its result, or raise its
    exception on every rank, so a failure there (a full disk, an unreadable folder) never
    leaves the other ranks waiting at the next collective."""
    result, error = None, None
    if _is_main():
        try:
            result = work()
        except Exception as e:  # handed to every rank below
            error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result


# --------------------------------------------------------------------------- manifest


def _sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB pieces (about 1 GB/s per core with the CPU's SHA
    instructions; zlib.crc32 is under twice as fast and detects less)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            piece = f.read(_HASH_CHUNK)
            if not piece:
                return h.hexdigest()
            h.update(piece)


def _describe_files(folder: Path, names: List[str]) -> Dict[str, Dict[str, Any]]:
    """Collective: {name: {"bytes", "sha256"}, or {"error": why}} for `names` (the same list
    on every rank). Each rank hashes every world_size-th file and all ranks gather the
    whole, so a large checkpoint is hashed in parallel and every rank holds the same
    answer."""
    rank, world = _rank_and_world()
    mine: Dict[str, Dict[str, Any]] = {}
    for i, name in enumerate(names):
        if i % world != rank:
            continue
        try:
            mine[name] = {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
        except OSError as e:
            mine[name] = {"error": "missing" if e.errno == errno.ENOENT else (e.strerror or str(e))}
    if world == 1:
        return mine
    parts: List[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    return {name: d for part in parts for name, d in part.items()}


def _files_of(folder: Path) -> List[str]:
    """Every file of a checkpoint folder but the manifest, relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST_FILE)


def _write_synced(path: Path, text: str) -> None:
    """Write and fsync: the publishing rename must not reach the disk before the bytes."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_manifest(folder: Path) -> None:
    """Collective: record the size and SHA-256 of every file of `folder` (a checkpoint
    about to be published, every rank's files and trainer_state.json written) in
    manifest.json. Call it last, before the rename that publishes the folder."""
    names = _on_main(lambda: _files_of(folder))
    files = _describe_files(folder, names)
    for name, d in files.items():
        if "error" in d:
            raise CheckpointError(f"{folder / name}: cannot be read back ({d['error']})")
    doc = {"format_version": FORMAT_VERSION, "hash": "sha256", "files": files}
    _on_main(lambda: _write_synced(folder / MANIFEST_FILE, json.dumps(doc, indent=1)))


def verify(path: Path) -> None:
    """Collective: refuse (CheckpointError naming the file) a checkpoint of which a file in
    its manifest is missing, has another size or other bytes. Every rank hashes a share
    and all see the same results, so all accept or refuse together. A checkpoint without
    a manifest (written before there were manifests) is accepted with a warning when DCP's
    .metadata and trainer_state.json are there; its bytes cannot be checked."""
    path = Path(path)
    manifest = _on_main(lambda: _read_manifest(path))
    if manifest is None:
        present = _on_main(lambda: [(path / n).is_file() for n in (METADATA_FILE, STATE_FILE)])
        for name, there in zip((METADATA_FILE, STATE_FILE), present):
            if not there:
                raise CheckpointError(f"{path / name}: missing (a checkpoint without "
                                      f"{MANIFEST_FILE}, written before checksums)")
        if _is_main():
            warnings.warn(f"{path}: no {MANIFEST_FILE} (written before checkpoints had "
                          "checksums): its files are not verified", stacklevel=2)
        return
    expected = manifest["files"]
    names = sorted(expected)
    found = _describe_files(path, names)
    for name in names:
        want, got = expected[name], found[name]
        if "error" in got:
            raise CheckpointError(f"{path / name}: {got['error']} (listed in {MANIFEST_FILE})")
        if got["bytes"] != want.get("bytes"):
            raise CheckpointError(f"{path / name}: {got['bytes']} bytes, {MANIFEST_FILE} "
                                  f"records {want.get('bytes')} (truncated or overwritten)")
        if got["sha256"] != want.get("sha256"):
            raise CheckpointError(f"{path / name}: damaged (its SHA-256 differs from the one "
                                  f"{MANIFEST_FILE} records)")


def _read_manifest(path: Path) -> Optional[Dict[str, Any]]:
    """manifest.json of checkpoint `path` (None when it has none); CheckpointError when it
    is not a manifest."""
    f = path / MANIFEST_FILE
    if not f.exists():
        return None
    try:
        doc = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not all(isinstance(d, dict) for d in files.values()):
        raise CheckpointError(f"{f}: not a checkpoint manifest (no mapping of files)")
    return doc


# --------------------------------------------------------------------------- save / load


def save(folder: Path, step: int, model: torch.nn.Module, optimizer: Any,
         trainer_state: Dict[str, Any], keep_last: int, keep: Optional[List[int]] = None) -> Path:
    """Collective: write checkpoint `step_<step>` atomically, then prune to the newest
    `keep_last` (never removing the steps in `keep`, e.g. the best one). Returns its path.
    A save that fails on a file system error removes its temporary folder and raises
    CheckpointError saying what failed (a full disk by name) and which checkpoint is kept."""
    folder = Path(folder)
    final = folder / f"step_{step:08d}"
    tmp = folder / _broadcast_str(f"step_{step:08d}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _on_main(lambda: tmp.mkdir(parents=True, exist_ok=True))
        state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
        dcp.save(state, checkpoint_id=str(tmp))
        doc = dict(trainer_state, format_version=FORMAT_VERSION)
        _on_main(lambda: _write_synced(tmp / STATE_FILE, json.dumps(doc, indent=1, default=str)))
        write_manifest(tmp)
        _on_main(lambda: _publish(tmp, final))
    except BaseException as e:  # also Ctrl-C and DCP's CheckpointException
        free = None
        if _is_main():  # measured before the partial folder gives its space back
            free = _free_bytes(folder)
            shutil.rmtree(tmp, ignore_errors=True)
        cause = os_error_behind(e)
        if cause is None:
            raise
        raise CheckpointError(_save_failure(final, tmp, cause, free)) from None
    _on_main(lambda: _prune(folder, keep_last, set(keep or []) | {step}))
    return final


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():  # a re-save of the same step (e.g. best and periodic)
        shutil.rmtree(final)
    tmp.rename(final)


def os_error_behind(e: BaseException) -> Optional[OSError]:
    """The file system error behind a failed write, if there is one: DCP wraps each rank's
    exception in a CheckpointException (its `failures`); others chain theirs, as torch's
    zip writer does with the OSError of its file object under its own RuntimeError."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None:
            return x
        if isinstance(x, CheckpointException):
            todo.extend(failed for failed, _ in x.failures.values())
        todo.extend([x.__cause__, x.__context__])
    return None


def _free_bytes(folder: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _save_failure(final: Path, tmp: Path, cause: OSError, free: Optional[int]) -> str:
    kept = latest_checkpoint(final.parent)
    kept_text = (f"the newest checkpoint kept is {kept.path}" if kept is not None
                 else "no earlier checkpoint exists")
    if cause.errno in (errno.ENOSPC, errno.EDQUOT):
        left = f", {free / 2**20:.1f} MiB free" if free is not None else ""
        return (f"cannot save checkpoint {final}: no space left on device ({final.parent}"
                f"{left}); {kept_text}; the partial {tmp.name} was removed. Free space, or "
                f"set checkpoint.dir to another disk, then continue with checkpoint.resume=auto")
    where = f" ({cause.filename})" if cause.filename else ""
    return (f"cannot save checkpoint {final}: {cause.strerror or cause}{where}; {kept_text}; "
            f"the partial {tmp.name} was removed")


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
        doc = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{f}: unreadable (not a JSON object)")
    return doc


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
