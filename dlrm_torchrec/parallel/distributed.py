"""Process group and device: the only module besides the entry point that reads the
environment (the variables torchrun / torchx set)."""

import atexit
import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dlrm_torchrec.config import ShardingConfig


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def init_distributed(cfg: ShardingConfig) -> DistInfo:
    """Start the default process group (also for world size 1, so every run takes the same
    sharded code path) and pick the device. Under torchrun the rank, world size and
    rendezvous come from the environment; a plain `python -m` run is rank 0 of 1."""
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("sharding.device='cuda' but no CUDA device is available")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        # a caller that keeps its model to the end (benchmarks, test workers) leaves the
        # groups to the exit: collect them there before the interpreter comes apart
        atexit.unregister(gc.collect)  # once, however many runs this process makes
        atexit.register(gc.collect)
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is None:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        else:
            # Under torchrun the agent's store outlives a failed attempt and still holds the
            # dead workers' gloo addresses; keep each attempt's keys apart.
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                is_master=rank == 0 and not agent_store, timeout=timedelta(minutes=10),
                wait_for_workers=False)
            dist.init_process_group(
                backend=backend, rank=rank, world_size=world_size,
                store=dist.PrefixStore(f"dlrm_torchrec/attempt_{restart}", store))
    return DistInfo(rank, world_size, local_rank, local_world_size, device, backend)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown(together: bool = False) -> None:
    """Leave the process groups.

    The sharded model's all-to-all modules hold the groups and sit in reference cycles, so
    they outlive the function that built them. Left to the interpreter's exit, gloo groups
    are destroyed half-way through finalisation, which now and then aborts the process
    (SIGABRT, seen in CI with 4 ranks after a run had finished): collect them first, while
    the interpreter is whole. together: every rank got here at the same point (a finished
    run, an agreed stop), so wait for all of them before any closes its connections while
    another may still be reading the last collective (gloo's teardown is the one at issue;
    an NCCL barrier would also need the device named). After an error, when another rank
    may never come, nobody waits.
    """
    gc.collect()
    if dist.is_initialized():
        if together and dist.get_world_size() > 1 and dist.get_backend() == "gloo":
            dist.barrier()
        dist.destroy_process_group()
