"""Rank-side code of the sharded-equals-unsharded test: train a few steps with the real
Trainer and save this rank's outputs and parameter shards."""

import itertools
from pathlib import Path
from typing import List

import torch


def run(rank: int, world_size: int, overrides: List[str], variants: List[List[str]],
        steps: int, out_dir: str) -> None:
    from dlrm_torchrec.config import ShardingConfig, load_config
    from dlrm_torchrec.parallel.distributed import init_distributed, shutdown
    from dlrm_torchrec.parallel.sharding import local_shards
    from dlrm_torchrec.train.trainer import Trainer

    info = init_distributed(ShardingConfig())
    for i, extra in enumerate(variants):
        cfg = load_config(None, overrides + extra + [f"logging.run_dir={out_dir}/run{i}"])
        tr = Trainer(cfg, info)
        first = next(tr.source.batches("train", 0))
        with torch.no_grad():
            tr.model.eval()
            _, logits0, _, _ = tr.pipeline.progress(iter([first]))
            tr.model.train()
        tr._last_logged_step, tr._last_log_time = 0, 0.0
        loss_sum = torch.zeros((), dtype=torch.float64)
        tr._run_steps(itertools.islice(tr.source.batches("train", 0), steps), 0, loss_sum)
        losses = [h["train_loss"] for h in tr.history]
        params = {}
        for key, value in tr.model.state_dict().items():
            params[key] = [(int(r), int(c), t.detach().clone()) for r, c, t in local_shards(value)]
        torch.save({"logits0": logits0, "losses": torch.tensor(losses), "params": params,
                    "plan": str(tr.plan)}, Path(out_dir) / f"variant{i}_rank{rank}.pt")
        del tr
    shutdown()
