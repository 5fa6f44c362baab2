"""One training (or evaluation-only) job in this process: join the process groups, build
the trainer, run it, and leave the groups the way the other ranks do."""

from typing import Optional

from dlrm_torchrec.config import Config, validate
from dlrm_torchrec.parallel.distributed import init_distributed, shutdown
from dlrm_torchrec.train.preemption import Preempted
from dlrm_torchrec.train.run_paths import check_run_paths
from dlrm_torchrec.train.trainer import Trainer


def train(cfg: Config, eval_only: bool = False, split: Optional[str] = None) -> dict:
    """Train with `cfg` in this process (rank and world size from the environment), or
    with `eval_only` evaluate the checkpoint named by checkpoint.resume on `split`
    (default: training.eval_split)."""
    info = init_distributed(cfg.sharding)
    trainer = None
    together = False  # every rank leaves at the same point (finished, or agreed to stop)
    try:
        validate(cfg, world_size=info.world_size)
        check_run_paths(cfg, eval_only)
        trainer = Trainer(cfg, info)
        if eval_only:
            result = trainer.evaluate_only(split or cfg.training.eval_split)
        else:
            result = trainer.fit()
        together = True
        return result
    except Preempted:
        together = True
        raise
    finally:
        if trainer is not None:  # after an error: stop the profiler, flush TensorBoard
            trainer.run_logger.close()
        # the sharded model holds the process groups: let it go before they are destroyed
        del trainer
        shutdown(together)
