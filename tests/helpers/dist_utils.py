"""Spawning real gloo ranks for tests (torch.multiprocessing, spawn start method)."""

import faulthandler
import os
import socket
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: Any) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    # a rank that dies on a signal (SIGABRT, SIGSEGV) prints every thread's Python stack
    faulthandler.enable()
    import torch

    torch.set_num_threads(1)
    fn(rank, world_size, *args)


def run_ranks(world_size: int, fn: Callable, *args: Any) -> None:
    """Run fn(rank, world_size, *args) in `world_size` fresh processes; raises if any fails."""
    mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size,
                       join=True, start_method="spawn")
