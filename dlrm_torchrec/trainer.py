"""The training loop: sharded model, TorchRec's TrainPipelineSparseDist, periodic
evaluation, early stop, and the run folder (resolved config, metrics)."""

import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer

from dlrm_torchrec.compression import is_compressed, memory_report, wrap_source
from dlrm_torchrec.config import Config, to_yaml
from dlrm_torchrec.data import build_data_source
from dlrm_torchrec.distributed import DistInfo
from dlrm_torchrec.metrics import EvalMetrics
from dlrm_torchrec.model import build_train_module
from dlrm_torchrec.observability import RunLogger, write_line
from dlrm_torchrec.optim import LRSchedule, dense_optimizer, sparse_optimizer
from dlrm_torchrec.sharding import check_supported, plan_summary, shard_model


def log(info: DistInfo, msg: str) -> None:
    """Rank 0 prints; everyone else stays quiet."""
    if info.is_main:
        write_line(msg)  # above the progress bar when one is shown


class Trainer:
    """Builds the data source, the sharded model, the optimizers and the pipeline from the
    config sections, then `fit()` trains and evaluates."""

    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg = cfg
        self.info = info
        self.run_dir = Path(cfg.logging.run_dir)
        # observability: progress bar / log lines, TensorBoard, plot, CSV, profiler, mllog
        self.run_logger = RunLogger(cfg, info.rank)
        d = cfg.data
        self.per_rank_batch = d.batch_size // info.world_size
        self.source = build_data_source(d, cfg.embeddings, cfg.model.dense_in_features,
                                        info.rank, info.world_size)
        # QR: batches carry the split ids (cat_i_q, cat_i_r) for the sharded EBC's input
        self.source = wrap_source(self.source, cfg.embeddings)

        module = build_train_module(cfg)
        check_supported(cfg.sharding, info.device.type, cfg.optimizer.sparse)
        sparse_cls, sparse_kwargs, fused_params = sparse_optimizer(cfg.optimizer)
        self.model, self.plan = shard_model(
            module, module.model.sparse_arch, module.model.tables, cfg.sharding, sparse_cls,
            sparse_kwargs, fused_params, info.device, info.world_size, info.local_world_size,
            self.per_rank_batch, cfg.training.seed,
        )
        self.dense_optimizer = dense_optimizer(cfg.optimizer, self.model.named_parameters())
        self.optimizer = CombinedOptimizer([self.model.fused_optimizer, self.dense_optimizer])
        self.schedule = LRSchedule(self.optimizer, cfg.lr_schedule)
        self.pipeline = TrainPipelineSparseDist(self.model, self.optimizer, info.device,
                                                execute_all_batches=True)
        self.step = 0
        self.samples_seen = torch.zeros((), dtype=torch.float64, device=info.device)
        self.history: List[Dict[str, Any]] = []
        self.evals: List[Dict[str, Any]] = []

    # ------------------------------------------------------------------ steps
    def _run_steps(self, batches, epoch: int, loss_sum: torch.Tensor) -> int:
        """Train on `batches` through the pipeline; returns the number of steps taken."""
        self.model.train()
        it = iter(batches)
        taken = 0
        while True:
            try:
                loss, _, _, weights = self.pipeline.progress(it)
            except StopIteration:
                return taken
            self.schedule.step()
            self.step += 1
            taken += 1
            self.run_logger.step(self.step)  # observability: progress bar, profiler window
            loss_sum += loss.double()
            self.samples_seen += (weights > 0).sum()
            if self.step % self.cfg.logging.log_every_n_steps == 0:
                self._log_train(epoch, loss_sum)

    def _log_train(self, epoch: int, loss_sum: torch.Tensor) -> None:
        window = loss_sum.clone()
        if self.info.world_size > 1:
            dist.all_reduce(window)  # a sync point, once per logging interval
        n = self.step - self._last_logged_step
        mean_loss = window.item() / self.info.world_size / max(n, 1)
        loss_sum.zero_()
        now = time.perf_counter()
        rate = n * self.cfg.data.batch_size / max(now - self._last_log_time, 1e-9)
        self._last_logged_step, self._last_log_time = self.step, now
        rec = {"step": self.step, "epoch": epoch, "train_loss": mean_loss,
               "lr": self.schedule.last_lr, "samples_per_s": rate}
        self.history.append(rec)
        self.run_logger.train(rec)  # observability: log line or progress bar, TensorBoard

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str = "val", extended: bool = False) -> Dict[str, float]:
        """Metrics of `split` over every rank's share (a collective call)."""
        self.model.eval()
        metrics = EvalMetrics(self.info.device, extended=extended)
        it = self.source.batches(split, 0)
        while True:
            try:
                _, logits, labels, weights = self.pipeline.progress(it)
            except StopIteration:
                break
            metrics.update(logits, labels, weights)
        self.model.train()
        return metrics.compute()

    def _eval_and_check(self, epoch: int) -> bool:
        """Evaluate; True when an early-stop target is reached."""
        t = self.cfg.training
        res = self.evaluate("val")
        res.update(step=self.step, epoch=epoch, split="val")
        self.evals.append(res)
        self.run_logger.eval(res)  # observability: TensorBoard, mllog eval_accuracy
        log(self.info, "eval   step {step:>7d}  auc {auc:.5f}  log_loss {log_loss:.5f}  "
                       "accuracy {accuracy:.5f}  ({samples} samples)".format(
                           **{"auc": math.nan, "log_loss": math.nan, "accuracy": math.nan, **res}))
        auc, acc = res.get("auc", math.nan), res.get("accuracy", math.nan)
        hit = (t.target_auc > 0 and auc >= t.target_auc) or (
            t.target_accuracy > 0 and acc >= t.target_accuracy)
        if hit:
            log(self.info, f"early stop: target reached at step {self.step} "
                           f"(auc {auc:.5f} >= {t.target_auc} or accuracy {acc:.5f} >= "
                           f"{t.target_accuracy})")
        return hit

    # ------------------------------------------------------------------ loop
    def fit(self) -> Dict[str, Any]:
        cfg, t = self.cfg, self.cfg.training
        self._write_config()
        log(self.info, f"sharding plan ({self.info.world_size} ranks, {self.info.device.type}):\n"
                       f"{plan_summary(self.plan)}")
        if is_compressed(cfg.embeddings):
            log(self.info, memory_report(cfg.embeddings))
        steps_per_epoch = self.source.num_batches("train")
        log(self.info, f"{self.source.num_samples('train'):,} training samples, "
                       f"{steps_per_epoch} steps per epoch of global batch {cfg.data.batch_size}")
        total_steps = steps_per_epoch * t.epochs
        self.run_logger.run_start(  # observability
            min(total_steps, t.max_steps) if t.max_steps else total_steps, steps_per_epoch,
            self.source.num_samples("train"), self.source.num_samples("val"))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.info.device)
        self._last_logged_step, self._last_log_time = 0, time.perf_counter()
        start = time.perf_counter()
        stopped_early = False
        evaluated_at = -1
        every = t.eval_every_n_steps or steps_per_epoch
        for epoch in range(t.epochs):
            self.run_logger.epoch_start(epoch)  # observability
            batches = self.source.batches("train", epoch)
            done_in_epoch = 0
            while done_in_epoch < steps_per_epoch:
                n = min(every - self.step % every, steps_per_epoch - done_in_epoch)
                if t.max_steps:
                    n = min(n, t.max_steps - self.step)
                if n <= 0:
                    break
                taken = self._run_steps(itertools.islice(batches, n), epoch, loss_sum)
                done_in_epoch += taken
                if self.step % every == 0 or done_in_epoch == steps_per_epoch:
                    evaluated_at = self.step
                    if self._eval_and_check(epoch):
                        stopped_early = True
                        break
                if t.max_steps and self.step >= t.max_steps:
                    break
            self.run_logger.epoch_stop(epoch)  # observability
            if stopped_early or (t.max_steps and self.step >= t.max_steps):
                break
        train_time = time.perf_counter() - start
        if evaluated_at != self.step:
            stopped_early = self._eval_and_check(epoch) or stopped_early
        seen = self.samples_seen.clone()
        if self.info.world_size > 1:
            dist.all_reduce(seen)
        summary = {
            "steps": self.step,
            "train_samples_seen": int(seen.item()),
            "train_seconds": train_time,
            "train_samples_per_s": int(seen.item()) / max(train_time, 1e-9),
            "stopped_early": stopped_early,
            "final": self.evals[-1] if self.evals else {},
            "evals": self.evals,
            "history": self.history,
        }
        self._write_metrics(summary)
        self.run_logger.finish(summary)  # observability: plot, CSV, close
        final = summary["final"]
        log(self.info, f"done: {self.step} steps, {summary['train_samples_seen']:,} samples in "
                       f"{train_time:.1f}s ({summary['train_samples_per_s']:,.0f} samples/s); "
                       f"val auc {final.get('auc', math.nan):.5f}; results in {self.run_dir}")
        return summary

    # ------------------------------------------------------------------ run folder
    def _write_config(self) -> None:
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))

    def _write_metrics(self, summary: Dict[str, Any]) -> None:
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.run_dir / "metrics.json.tmp"
            tmp.write_text(json.dumps(summary, indent=1, default=_json_default))
            tmp.replace(self.run_dir / "metrics.json")


def _json_default(x: Any) -> Optional[float]:
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


def _is_tty() -> bool:
    return sys.stdout.isatty()
