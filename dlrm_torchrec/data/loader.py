"""A pipelined loader: batches are built by worker processes ahead of the training loop and
pinned for an asynchronous host-to-device copy.

Building a batch (hashing synthetic ids, gathering and expanding Criteo rows, assembling the
KJT) costs milliseconds of CPU per step. Done in the training process it sits on the
critical path of every step, because TorchRec's TrainPipelineSparseDist asks for the next
batch synchronously. `PrefetchingSource` moves it to `num_workers` processes (torch's
DataLoader): worker w builds global batches start + w, start + w + N, ... and the DataLoader
hands them back round-robin, so the order is exactly the wrapped source's.

With num_workers=0 the batches are built in the calling process, as without the wrapper.

Workers end with the training process: torch's own check of the parent (every 5 s while a
worker waits for work) misses a parent killed while the worker builds a batch, so each worker
also arms `worker_exit.exit_with_parent`.
"""

import functools
import os
import pickle
import signal
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dlrm_torchrec.data import SourceWrapper
from dlrm_torchrec.data.worker_exit import exit_with_parent


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity (what Slurm, taskset or a container's
    cpuset grant), not the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_num_workers(requested: int, device_type: str, local_world_size: int,
                        heavy_batches: bool = False) -> int:
    """data.num_workers: -1 (auto) is 0 on CPU, where the ranks already use the cores, and on
    CUDA up to 4 per rank (8 with heavy batches), leaving each rank one core of its own.
    The cores are this process's (`available_cores`) shared by the node's ranks.

    Heavy batches: multi-hot bags or the synthetic click model. One worker builds one-hot
    Criteo batches at 2-10M samples/s, ahead of any single GPU, but expands MLPerf DCNv2 bags
    (214 ids per sample) at only about 0.5M (bench/bench_criteo.py) and generates synthetic
    data at 0.2-0.35M (bench/bench_synthetic.py); a GPU trains at millions of samples per
    second."""
    if requested >= 0:
        return requested
    if device_type != "cuda":
        return 0
    cores_per_rank = available_cores() // max(local_world_size, 1)
    return max(0, min(8 if heavy_batches else 4, cores_per_rank - 1))


def _start_worker(parent_pid: int, worker_id: int) -> None:
    """A loader worker ends when the training process `parent_pid` dies, and leaves SIGTERM
    to it. Slurm signals every process of a job step: a worker dying of it would fail the
    training process's next batch, while that process is stopping cleanly
    (`dlrm_torchrec.preemption`); it ends its workers itself."""
    exit_with_parent(parent_pid)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _WorkerFailure:
    """An exception raised in a worker, carried back as a batch so the training process
    re-raises it with its own type and message (the DataLoader would wrap it into a
    traceback dump)."""

    def __init__(self, exc: BaseException):
        try:
            pickle.dumps(exc)
            self.exc = exc
        except Exception:  # an exception that cannot cross processes: keep its text
            self.exc = RuntimeError(f"{type(exc).__name__}: {exc}")


class _StridedBatches(IterableDataset):
    """Global batches start..end-1 of one split and epoch; each DataLoader worker yields
    every num_workers-th of them, beginning at its own id."""

    def __init__(self, source, split: str, epoch: int, start: int, end: int):
        super().__init__()
        self.source, self.split, self.epoch = source, split, epoch
        self.start, self.end = start, end

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for b in range(self.start + worker, self.end, workers):
            try:
                yield next(iter(self.source.batches(self.split, self.epoch, start_batch=b)))
            except Exception as e:  # noqa: BLE001 - re-raised in the training process
                yield _WorkerFailure(e)
                return


class PrefetchingSource(SourceWrapper):
    """Wraps a data source (see `dlrm_torchrec.data`); `batches()` is produced by worker
    processes and, with `pin_memory`, handed over in page-locked memory. Everything else is
    the wrapped source's.

    Args:
        source: the data source (must be picklable when workers are not forked).
        num_workers: worker processes; 0 builds batches in this process.
        pin_memory: pin each batch (CUDA training: lets the pipeline's copy overlap compute).
        prefetch_factor: batches each worker keeps ready.
        mp_context: how workers start (None: the platform's default, fork on Linux up to
            Python 3.13, spawn on macOS; with spawn and forkserver the source is pickled).
    """

    def __init__(self, source, num_workers: int, pin_memory: bool = False,
                 prefetch_factor: int = 2, mp_context: Optional[str] = None):
        super().__init__(source)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.mp_context = mp_context

    def batches(self, split: str, epoch: int = 0, start_batch: int = 0) -> Iterator:
        end = self.source.num_batches(split)
        if self.num_workers == 0:
            for batch in self.source.batches(split, epoch, start_batch=start_batch):
                yield batch.pin_memory() if self.pin_memory else batch
            return
        if start_batch >= end:
            return
        loader = DataLoader(
            _StridedBatches(self.source, split, epoch, start_batch, end),
            batch_size=None,  # the source already batches
            num_workers=min(self.num_workers, end - start_batch),
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            multiprocessing_context=self.mp_context,
            worker_init_fn=functools.partial(_start_worker, os.getpid()),
        )
        for item in loader:
            if isinstance(item, _WorkerFailure):
                raise item.exc
            yield item


def prefetching(source, num_workers: int, pin_memory: bool = False):
    """`source` itself when there is nothing to do, else a PrefetchingSource. Pinning needs
    CUDA; without it `pin_memory` is ignored."""
    pin = pin_memory and torch.cuda.is_available()
    if num_workers == 0 and not pin:
        return source
    return PrefetchingSource(source, num_workers, pin)
