"""TorchX components that launch the DLRM trainer (``python -m dlrm_torchrec.train``).

The job a laptop runs is the job a cluster runs: only the scheduler (``-s``) and the size
(``-j``, resources) change. Both components wrap ``torchx.components.dist.ddp``, so every
rank is started by ``torchrun`` with ``--config FILE key=value ...`` as its arguments.

Run them by file path from the repository root (the dotted overrides go after ``--``)::

    torchx run -s local_cwd launch/components.py:train_cpu -- training.max_steps=20
    torchx run -s slurm launch/components.py:train_cpu -j 1x2 -- logging.run_dir=runs/s
    torchx run -s slurm launch/components.py:train_gpu --config configs/FILE.yaml -j 2x8

torchx executes this file in its own namespace, so it imports nothing from this repository.
Annotations stay ``typing.Optional``/``Dict``/``List``: torchx's component linter reads
them from the source and rejects ``X | None`` and ``dict[...]``.
"""

from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist

MODULE = "dlrm_torchrec.train"
"""The trainer's entry point, run by torchrun as ``python -m``."""

DEFAULT_IMAGE = "dlrm_torchrec:latest"
"""Container image for container schedulers; local_cwd and slurm run the current directory."""

DEFAULT_NAME = "dlrm_torchrec/dlrm"
"""``{experiment}/{run}``: the run name becomes the job name on every scheduler."""


def _common_env(resource: specs.Resource, nproc_per_node: int) -> Dict[str, str]:
    # torchrun pins OMP_NUM_THREADS to 1 when it starts several ranks per node; give each
    # rank its share of the requested cores instead, so the dense MLPs use the host.
    threads = max(1, resource.cpu // max(1, nproc_per_node))
    return {
        "OMP_NUM_THREADS": str(threads),
        # rank output reaches the scheduler's log as it happens, not when a buffer fills
        "PYTHONUNBUFFERED": "1",
    }


def _gloo_env(nnodes: int) -> Dict[str, str]:
    if nnodes > 1:
        # Multi-node gloo picks its interface from the hostname; set GLOO_SOCKET_IFNAME
        # through --env when that resolves to the wrong network.
        return {}
    # One node: every rank is on this host, so loopback always reaches the peers, even in
    # containers whose hostname resolves to an address that refuses connections.
    return {"GLOO_SOCKET_IFNAME": "lo"}


def _nccl_env() -> Dict[str, str]:
    return {
        # NCCL's own warnings (bad topology, fallbacks to sockets) without INFO's flood
        "NCCL_DEBUG": "WARN",
        # embedding tables and their optimizer state fragment the caching allocator;
        # expandable segments return the gaps to later allocations
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    }


def _trainer_app(
    overrides: List[str],
    config: str,
    j: str,
    h: Optional[str],
    cpu: int,
    gpu: int,
    memMB: int,
    env: Optional[Dict[str, str]],
    backend_env: Dict[str, str],
    max_retries: int,
    mounts: Optional[List[str]],
    image: str,
    rdzv_port: int,
    name: str,
    debug: bool,
) -> specs.AppDef:
    """The AppDef both components share: ``dist.ddp`` running the trainer module.

    Environment precedence (low to high): common defaults, backend defaults, ``env``.
    """
    _, _, nproc_per_node, _ = dist.parse_nnodes(j)
    resource = specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h)
    merged_env = {**_common_env(resource, nproc_per_node), **backend_env, **(env or {})}
    return dist.ddp(
        "--config",
        config,
        *overrides,
        m=MODULE,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=merged_env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
        debug=debug,
    )


def train_cpu(
    *overrides: str,
    config: str = "configs/tiny_cpu.yaml",
    j: str = "1x2",
    h: Optional[str] = None,
    cpu: int = 2,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    image: str = DEFAULT_IMAGE,
    rdzv_port: int = 29500,
    name: str = DEFAULT_NAME,
    debug: bool = False,
) -> specs.AppDef:
    """DLRM training on CPU ranks (gloo): laptops, CI, and CPU-only cluster nodes.

    Example: torchx run -s local_cwd launch/components.py:train_cpu -j 1x2 -- training.max_steps=20

    Args:
        overrides: dotted config overrides passed to the trainer after the config file, e.g.
            training.max_steps=20 logging.run_dir=runs/tiny (put them after ``--``)
        config: YAML config file, relative to the job's working directory
        j: {nnodes}x{nproc_per_node}, or {min_nnodes}:{nnodes}x{nproc_per_node} for elastic
        h: a registered named resource (e.g. cpu.xlarge); overrides cpu and memMB
        cpu: CPU cores per node (each rank gets cpu / nproc_per_node OpenMP threads)
        memMB: host memory per node in MB
        env: extra environment variables, K1=V1,K2=V2; they override the defaults
            (OMP_NUM_THREADS, PYTHONUNBUFFERED, and GLOO_SOCKET_IFNAME=lo on one node)
        max_retries: how many times the scheduler may restart the whole job after a failure
        mounts: storage mounts for container schedulers, e.g.
            type=bind,src=/data,dst=/data,readonly or type=volume,src=CLAIM,dst=/data
        image: container image holding this repository and its dependencies
            (kubernetes, docker); local_cwd and slurm run in the current directory
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node only)
        name: {experiment}/{run}; the run name names the job
        debug: run with torch's distributed debug flags (TORCH_DISTRIBUTED_DEBUG=DETAIL, ...)
    """
    nnodes = dist.parse_nnodes(j)[1]
    return _trainer_app(
        list(overrides),
        config=config,
        j=j,
        h=h,
        cpu=cpu,
        gpu=0,
        memMB=memMB,
        env=env,
        backend_env=_gloo_env(nnodes),
        max_retries=max_retries,
        mounts=mounts,
        image=image,
        rdzv_port=rdzv_port,
        name=name,
        debug=debug,
    )


def train_gpu(
    *overrides: str,
    config: str,
    j: str = "1x8",
    h: Optional[str] = None,
    cpu: int = 64,
    gpu: int = 8,
    memMB: int = 262144,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    image: str = DEFAULT_IMAGE,
    rdzv_port: int = 29500,
    name: str = DEFAULT_NAME,
    debug: bool = False,
) -> specs.AppDef:
    """DLRM training on GPU nodes (NCCL), one rank per GPU.

    Example: torchx run -s slurm launch/components.py:train_gpu --config configs/FILE.yaml -j 2x8

    Args:
        overrides: dotted config overrides passed to the trainer after the config file, e.g.
            data.batch_size=8192 logging.run_dir=/shared/runs/x (put them after ``--``)
        config: YAML config file, relative to the job's working directory
        j: {nnodes}x{nproc_per_node}, or {min_nnodes}:{nnodes}x{nproc_per_node} for elastic;
            nproc_per_node must not exceed the GPUs per node
        h: a registered named resource (e.g. aws_p5.48xlarge, gpu.xlarge); overrides
            cpu, gpu and memMB
        cpu: CPU cores per node (each rank gets cpu / nproc_per_node OpenMP threads)
        gpu: GPUs per node
        memMB: host memory per node in MB (also holds UVM-offloaded embedding rows)
        env: extra environment variables, K1=V1,K2=V2; they override the defaults
            (OMP_NUM_THREADS, PYTHONUNBUFFERED, NCCL_DEBUG=WARN, PYTORCH_CUDA_ALLOC_CONF);
            set NCCL_SOCKET_IFNAME / NCCL_IB_HCA here for your fabric
        max_retries: how many times the scheduler may restart the whole job after a failure
        mounts: storage mounts for container schedulers, e.g.
            type=bind,src=/data,dst=/data,readonly or type=volume,src=CLAIM,dst=/data
        image: container image holding this repository and its dependencies
            (kubernetes, docker); local_cwd and slurm run in the current directory
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node only)
        name: {experiment}/{run}; the run name names the job
        debug: run with torch's distributed debug flags (CUDA_LAUNCH_BLOCKING=1, ...)
    """
    nproc_per_node = dist.parse_nnodes(j)[2]
    gpus_per_node = specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h).gpu
    if nproc_per_node > gpus_per_node:
        raise ValueError(
            f"-j {j} starts {nproc_per_node} ranks per node but a node has"
            f" {gpus_per_node} GPUs; one rank per GPU needs nproc_per_node <= {gpus_per_node}"
        )
    return _trainer_app(
        list(overrides),
        config=config,
        j=j,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        env=env,
        backend_env=_nccl_env(),
        max_retries=max_retries,
        mounts=mounts,
        image=image,
        rdzv_port=rdzv_port,
        name=name,
        debug=debug,
    )


PREPARE_MODULE = "dlrm_torchrec.data.prepare_mlperf"
"""MLPerf data preparation from the raw Criteo 1TB days, run by torchrun as ``python -m``."""


def prepare_mlperf(
    *args: str,
    j: str = "1x2",
    h: Optional[str] = None,
    cpu: int = 2,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    image: str = DEFAULT_IMAGE,
    rdzv_port: int = 29500,
    name: str = "dlrm_torchrec/prepare_mlperf",
) -> specs.AppDef:
    """MLPerf DLRM-DCNv2's data from the raw Criteo 1TB days, split over several tasks.

    Every task runs ``python -m dlrm_torchrec.data.prepare_mlperf ARGS`` under torchrun
    (``dist.ddp``): each takes its share of every stage's tasks (days, features, buckets) by
    its RANK and WORLD_SIZE, and a gloo barrier separates the stages. The output folder must
    be on storage every node shares.

    Example: torchx run -s slurm launch/components.py:prepare_mlperf -j 4x1 --cpu 32 -- /data/day_{0..23}.gz -o /shared/mlperf --workers 30 --memory-gb 100

    Args:
        args: the command's arguments (put them after ``--``): the 24 days, -o OUTPUT,
            --workers per task, --memory-gb per task, --multi-hot ...
        j: {nnodes}x{nproc_per_node}: nnodes x nproc_per_node tasks in all
        h: a registered named resource (e.g. cpu.xlarge); overrides cpu and memMB
        cpu: CPU cores per node
        memMB: host memory per node in MB
        env: extra environment variables, K1=V1,K2=V2; they override the defaults
            (PYTHONUNBUFFERED, and GLOO_SOCKET_IFNAME=lo on one node)
        max_retries: how many times the scheduler may restart the whole job after a failure
            (a restarted job resumes: finished tasks are skipped)
        mounts: storage mounts for container schedulers, e.g.
            type=bind,src=/data,dst=/data
        image: container image holding this repository and its dependencies
            (kubernetes, docker); local_cwd and slurm run in the current directory
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node only)
        name: {experiment}/{run}; the run name names the job
    """
    _, nnodes, nproc_per_node, _ = dist.parse_nnodes(j)
    resource = specs.resource(cpu=cpu, gpu=0, memMB=memMB, h=h)
    merged_env = {**_common_env(resource, nproc_per_node), **_gloo_env(nnodes), **(env or {})}
    return dist.ddp(
        *args,
        m=PREPARE_MODULE,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=0,
        memMB=memMB,
        j=j,
        env=merged_env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )
