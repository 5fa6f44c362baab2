"""A rank that trains configs/tiny_cpu.yaml with the given overrides, the way
`python -m dlrm_torchrec.train` does (dlrm_torchrec.train.job.train); spawned by
dist_utils.run_ranks."""

from dlrm_torchrec.config import load_config


def train_worker(rank, world_size, overrides):
    from dlrm_torchrec.train.job import train

    train(load_config("configs/tiny_cpu.yaml", overrides))
