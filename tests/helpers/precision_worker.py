"""Rank-side code of tests/integration/test_precision.py: for each variant, build the real
Trainer, run the first batch forward through the train pipeline, train a few steps, run the
first batch again, and save what the test compares (logits, losses, the dtypes the dense
layers and the tables really had)."""

import itertools
from functools import partial
from pathlib import Path
from typing import List, Set

import torch
from torch import nn


def _record_dtype(seen: Set[str], module, inputs, output) -> None:
    seen.add(str(output.dtype))


def _forward(tr, batch) -> torch.Tensor:
    """Logits of `batch` through the train pipeline, in eval mode."""
    with torch.no_grad():
        tr.model.eval()
        _, logits, _, _ = tr.pipeline.progress(iter([batch]))
        tr.model.train()
    return logits


def run(rank: int, world_size: int, base: List[str], variants: List[List[str]], steps: int,
        out_dir: str) -> None:
    from dlrm_torchrec.config import ShardingConfig, load_config
    from dlrm_torchrec.config.embedding_layout import embedding_layout, table_specs
    from dlrm_torchrec.parallel.distributed import init_distributed, shutdown
    from dlrm_torchrec.parallel.sharding import embedding_state_keys, local_shards
    from dlrm_torchrec.train.trainer import Trainer

    info = init_distributed(ShardingConfig())
    for i, extra in enumerate(variants):
        cfg = load_config(None, base + extra + [f"logging.run_dir={out_dir}/run{i}"])
        tr = Trainer(cfg, info)
        linear_dtypes: Set[str] = set()
        hooks = [m.register_forward_hook(partial(_record_dtype, linear_dtypes))
                 for m in tr.model.modules() if isinstance(m, nn.Linear)]
        first = next(tr.source.batches("train", 0))
        logits0 = _forward(tr, first)
        tr._last_logged_step, tr._last_log_time = 0, 0.0
        loss_sum = torch.zeros((), dtype=torch.float64)
        tr._run_steps(itertools.islice(tr.source.batches("train", 0), steps), 0, loss_sum)
        logits_after = _forward(tr, first)
        for h in hooks:
            h.remove()
        sd = tr.model.state_dict()
        tables = table_specs(embedding_layout(cfg.embeddings))  # each has the table's .name
        table_dtypes = sorted({str(t.dtype) for key in embedding_state_keys(sd, tables)
                               for _, _, t in local_shards(sd[key])})
        torch.save({"logits0": logits0, "logits_after": logits_after,
                    "losses": torch.tensor([h["train_loss"] for h in tr.history]),
                    "linear_dtypes": sorted(linear_dtypes), "table_dtypes": table_dtypes},
                   Path(out_dir) / f"variant{i}_rank{rank}.pt")
        del tr
    shutdown()
