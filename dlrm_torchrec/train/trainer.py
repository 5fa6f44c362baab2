"""The training loop: sharded model, TorchRec's train pipeline (or the one-rank step of
one_rank_step.py), periodic evaluation, early stop, and the run folder (resolved config,
metrics).

`fit` reads as the run does: resume, then epoch by epoch train an interval, evaluate when
due, let the checkpointer save (`checkpoint.Checkpointer` decides when: periodic, best, at
the end, on a signal), and finish with a summary. The bookkeeping (interval lengths, the
clocks, the pending evaluation of a preempted run) lives in small helpers below it."""


import contextlib
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import (
    PrefetchTrainPipelineSparseDist,
    TrainPipelineSparseDist,
)
from torchrec.optim.keyed import CombinedOptimizer

from dlrm_torchrec.config import Config, feature_names, to_dict, to_yaml
from dlrm_torchrec.config.embedding_layout import is_compressed, memory_report
from dlrm_torchrec.data import build_data_source
from dlrm_torchrec.data.loader import prefetching, resolve_num_workers
from dlrm_torchrec.data.qr_split import wrap_source
from dlrm_torchrec.model.dlrm import (
    build_train_module,
    check_compile_supported,
    compile_dense_modules,
)
from dlrm_torchrec.parallel.distributed import DistInfo
from dlrm_torchrec.parallel.planning import collective_training_plan
from dlrm_torchrec.parallel.precision import (
    apply_matmul_precision,
    check_precision_supported,
)
from dlrm_torchrec.parallel.sharding import (
    plan_summary,
    prepare_sharding,
    shard_model,
    uses_uvm_caching,
)
from dlrm_torchrec.train import checkpoint
from dlrm_torchrec.train.metrics import EvalMetrics
from dlrm_torchrec.train.observability import RunLogger, write_line
from dlrm_torchrec.train.one_rank_step import OneRankStep, StepUnsupported, resolve_step_kind
from dlrm_torchrec.train.optim import LRSchedule, dense_optimizer
from dlrm_torchrec.train.preemption import Preempted, StopRequest


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
        # worker processes build (and pin) batches ahead of the step loop
        heavy = any(k > 1 for k in d.multi_hot_sizes) or d.source == "synthetic"
        self.num_workers = resolve_num_workers(d.num_workers, info.device.type,
                                               info.local_world_size, heavy_batches=heavy)
        self.source = prefetching(self.source, self.num_workers,
                                  d.pin_memory and info.device.type == "cuda")

        check_compile_supported(cfg.training.compile, info.device.type)
        self.step_kind = resolve_step_kind(cfg, info.world_size, info.device.type)
        module = build_train_module(cfg)
        if cfg.training.compile != "none":  # compiled lazily, at the first step
            compile_dense_modules(module, cfg.training.compile)
        # reduce-overhead replays CUDA graphs whose outputs the next replay overwrites: each
        # step is marked so graphs of consecutive steps never share live outputs
        self._mark_cudagraph_steps = (cfg.training.compile == "reduce-overhead"
                                      and info.device.type == "cuda")
        # the sharding section is checked (there) before the precision section
        planner_inputs = prepare_sharding(cfg, module, info.world_size, info.local_world_size,
                                          info.device)
        check_precision_supported(cfg, info.device.type)
        apply_matmul_precision(cfg.precision, info.device)
        # tables that cannot be placed stop every rank with what they need and what is there
        plan = collective_training_plan(planner_inputs, module, cfg.optimizer.sparse)
        self.model, self.plan = shard_model(module, planner_inputs, info.device,
                                            seed=cfg.training.seed, plan=plan)
        self.dense_optimizer = dense_optimizer(cfg.optimizer, self.model.named_parameters(),
                                               fused=info.device.type == "cuda")
        self.optimizer = CombinedOptimizer([self.model.fused_optimizer, self.dense_optimizer])
        self.schedule = LRSchedule(self.optimizer, cfg.lr_schedule)
        # training and evaluation steps: TorchRec's pipeline, or on one rank the direct /
        # CUDA-graph step (training.step; then there is no pipeline)
        self.pipeline = None
        if self.step_kind != "pipeline":
            try:
                self.train_step = OneRankStep(
                    self.model, self.optimizer, self.dense_optimizer,
                    feature_names(cfg.embeddings), info.device,
                    capture=self.step_kind == "cuda_graph")
            except StepUnsupported as e:  # the plan has no single fused kernel to call
                if cfg.training.step != "auto":
                    raise
                log(info, f"training.step=auto: pipeline, not {self.step_kind} ({e})")
                self.step_kind = "pipeline"
        if self.step_kind == "pipeline":
            # sharding.prefetch_pipeline, for tables in UVM behind an HBM cache: the pipeline
            # also fetches the next batch's rows into the cache while the current one trains
            prefetch = cfg.sharding.prefetch_pipeline and uses_uvm_caching(self.plan)
            pipeline_cls = PrefetchTrainPipelineSparseDist if prefetch else TrainPipelineSparseDist
            self.pipeline = pipeline_cls(self.model, self.optimizer, info.device,
                                         execute_all_batches=True)
            self.train_step = self.pipeline
        self.step = 0
        self.epoch = 0
        self.next_batch = 0  # data position: the next global batch of self.epoch
        self.samples_seen = torch.zeros((), dtype=torch.float64, device=info.device)
        # first step whose loss was not finite (-1: none); a device tensor, no sync per step
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=info.device)
        self.history: List[Dict[str, Any]] = []
        self.evals: List[Dict[str, Any]] = []
        self.best_auc, self.best_step = -math.inf, -1
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        # when to save (periodic, best, at the end, on a signal); `_save` writes
        self.checkpointer = checkpoint.Checkpointer(cfg.checkpoint, self._save)
        self.signature = checkpoint.model_signature(cfg, module.model.tables)
        self.last_checkpoint: Optional[Path] = None
        self._last_logged_step, self._last_log_time = 0, time.perf_counter()
        # the training losses since the last log line (this rank's sum; checkpointed, so a
        # run resumed between log lines logs the same mean as an uninterrupted one), and
        # the step from which the logged samples/s is timed (this process's steps only)
        self._loss_window = torch.zeros((), dtype=torch.float64, device=info.device)
        self._timed_from_step = 0
        # seconds the step loop waited for the loader (in its next()), and their count at the
        # last log line: the logged share of the time that went to waiting for data
        self.loader_wait = LoaderWait()
        self._waited_at_last_log = 0.0
        # SIGTERM (preemption, scancel, time limit, pod eviction): agree, save, exit
        self.stop_request = StopRequest(info.world_size, cfg.checkpoint.save_on_sigterm)
        # the epoch of the evaluation a SIGTERM interrupted at this step (None: none)
        self._eval_pending_epoch: Optional[int] = None

    # ------------------------------------------------------------------ steps
    def _run_steps(self, batches, epoch: int, loss_sum: torch.Tensor) -> int:
        """Train on `batches` with the training step (the pipeline or the one-rank step);
        returns the number of steps taken."""
        self.model.train()
        it = self.loader_wait.timed(iter(batches))
        taken = 0
        while True:
            self._step_begin()
            try:
                loss, _, _, weights = self.train_step.progress(it)
            except StopIteration:
                return taken
            self.schedule.step()
            self.step += 1
            taken += 1
            self.first_bad_step = torch.where(
                (self.first_bad_step < 0) & ~torch.isfinite(loss), self.step, self.first_bad_step)
            self._maybe_inject_crash()
            self.run_logger.step(self.step)  # observability: progress bar, profiler window
            loss_sum += loss.double()
            self.samples_seen += (weights > 0).sum()
            if self.step % self.cfg.logging.log_every_n_steps == 0:
                self._log_train(epoch, loss_sum)
            if self.stop_request.poll(self.step):  # the same step on every rank
                return taken

    def _step_begin(self) -> None:
        if self._mark_cudagraph_steps:
            torch.compiler.cudagraph_mark_step_begin()

    def _log_train(self, epoch: int, loss_sum: torch.Tensor) -> None:
        window = loss_sum.clone()
        if self.info.world_size > 1:
            dist.all_reduce(window)  # a sync point, once per logging interval
        n = self.step - self._last_logged_step
        mean_loss = window.item() / self.info.world_size / max(n, 1)
        loss_sum.zero_()
        now = time.perf_counter()
        timed = self.step - max(self._last_logged_step, self._timed_from_step)
        elapsed = max(now - self._last_log_time, 1e-9)
        rate = timed * self.cfg.data.batch_size / elapsed
        waited = self.loader_wait.seconds - self._waited_at_last_log
        self._last_logged_step, self._last_log_time = self.step, now
        self._waited_at_last_log = self.loader_wait.seconds
        rec = {"step": self.step, "epoch": epoch, "train_loss": mean_loss,
               "lr": self.schedule.last_lr, "samples_per_s": rate,
               "data_wait": min(waited / elapsed, 1.0)}
        self.history.append(rec)
        self.run_logger.train(rec)  # observability: log line or progress bar, TensorBoard

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str = "val", extended: bool = False,
                 interruptible: bool = False) -> Optional[Dict[str, float]]:
        """Metrics of `split` over every rank's share (a collective call). interruptible:
        give up (None, on every rank at the same batch) when the ranks agree to stop on
        SIGTERM: a long evaluation must not eat the grace period before the save."""
        self.model.eval()
        metrics = EvalMetrics(self.info.device, extended=extended)
        it = self.source.batches(split, 0)
        done = 0
        try:
            while True:
                self._step_begin()
                try:
                    _, logits, labels, weights = self.train_step.progress(it)
                except StopIteration:
                    break
                metrics.update(logits, labels, weights)
                done += 1
                if interruptible and self.stop_request.poll(done):
                    return None
        finally:
            self.model.train()
        return metrics.compute()

    def _evaluate_and_check(self, epoch: int) -> bool:
        """Evaluate this step (interruptibly); True when an early-stop target is reached."""
        with self._paused_clock():
            return self._evaluate_and_check_now(epoch)

    @contextlib.contextmanager
    def _paused_clock(self):
        """Time spent inside (evaluation, checkpointing) does not count in the next logged
        samples/s."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._last_log_time += time.perf_counter() - start

    def _evaluate_and_check_now(self, epoch: int) -> bool:
        t = self.cfg.training
        self.run_logger.eval_start(self.step)  # observability: mllog eval_start
        res = self.evaluate(t.eval_split, interruptible=True)
        if res is None:  # stopped on SIGTERM: the checkpoint saved next asks for it again
            self._eval_pending_epoch = epoch
            log(self.info, f"eval   step {self.step:>7d}  interrupted ({self.stop_request.signal_name}); "
                           f"a resumed run evaluates first")
            return False
        res.update(step=self.step, epoch=epoch, split=t.eval_split)
        self.evals.append(res)
        self.run_logger.eval(res)  # observability: TensorBoard, mllog eval_accuracy
        log(self.info, "eval   step {step:>7d}  auc {auc:.5f}  log_loss {log_loss:.5f}  "
                       "ne {ne:.5f}  accuracy {accuracy:.5f}  ({samples} samples)".format(
                           **{"auc": math.nan, "log_loss": math.nan, "ne": math.nan,
                              "accuracy": math.nan, **res}))
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
        """Train, evaluate and checkpoint as configured; returns the run's summary (also
        written to metrics.json). Raises Preempted after saving when SIGTERM stopped it."""
        self.stop_request.install()
        finished = False
        try:
            summary = self._fit()
            finished = True
            return summary
        finally:
            # after an error another rank may never join the exchange in flight
            self.stop_request.uninstall(wait=finished)

    def _fit(self) -> Dict[str, Any]:
        """The run, in order; every decision to stop is the same on every rank."""
        steps_per_epoch = self.source.num_batches("train")
        self._announce(steps_per_epoch)
        self._maybe_resume(steps_per_epoch)
        self._start_clocks(steps_per_epoch)
        start = time.perf_counter()
        stop_early = self._resume_pending_evaluation()
        epoch = self.epoch
        while not stop_early and not self.stop_request.stopped and epoch < self.cfg.training.epochs:
            stop_early = self._train_epoch(epoch, steps_per_epoch)
            if self.stop_request.stopped:  # agreed: same on every rank
                break
            self.run_logger.epoch_stop(epoch)  # observability
            if stop_early or self._reached_max_steps():
                break
            epoch, self.next_batch = epoch + 1, 0
        train_time = time.perf_counter() - start
        self._check_finite()
        stop_early = self._final_evaluation(epoch) or stop_early
        # the ranks' agreed stop (a signal after their last agreement is too late to matter)
        signalled = self.stop_request.signal_name if self.stop_request.stopped else None
        self.checkpointer.at_finish(self.step, signalled=signalled is not None)
        summary = self._summary(train_time, stop_early, signalled)
        self._write_metrics(summary)
        self.run_logger.finish(summary)  # observability: plot, CSV, close
        if signalled:
            raise Preempted(
                f"{signalled}: stopped after step {self.step} (epoch {self.epoch}, batch "
                f"{self.next_batch} of {steps_per_epoch}) and saved {self.last_checkpoint}; "
                f"continue with checkpoint.resume=auto", signalled)
        self._log_done(summary)
        return summary

    def _train_epoch(self, epoch: int, steps_per_epoch: int) -> bool:
        """Train the rest of `epoch` in intervals, each ending where an evaluation, a
        periodic checkpoint or max_steps falls; after each, evaluate when due and let the
        checkpointer save. True when an early-stop target is reached."""
        self.epoch = epoch
        self.run_logger.epoch_start(epoch)  # observability
        batches = self.source.batches("train", epoch, start_batch=self.next_batch)
        while self.next_batch < steps_per_epoch:
            n = self._interval_length(steps_per_epoch)
            if n <= 0:
                return False
            self.next_batch += self._run_steps(itertools.islice(batches, n), epoch,
                                              self._loss_window)
            self._check_finite()
            if self.stop_request.stopped:  # agreed: same on every rank
                return False
            stop_early, new_best = False, False
            if self._evaluation_due(steps_per_epoch):
                stop_early = self._evaluate_and_check(epoch)
                if self.stop_request.stopped:  # agreed during the evaluation
                    return False
                new_best = self._track_best()
            self.checkpointer.after_interval(self.step, new_best)
            if stop_early or self._reached_max_steps():
                return stop_early
        return False

    # ------------------------------------------------------------------ loop bookkeeping
    def _announce(self, steps_per_epoch: int) -> None:
        """The resolved config in the run folder; the plan and the data in the log."""
        cfg = self.cfg
        self._write_config()
        log(self.info, f"sharding plan ({self.info.world_size} ranks, {self.info.device.type}):\n"
                       f"{plan_summary(self.plan)}")
        if is_compressed(cfg.embeddings):
            log(self.info, memory_report(cfg.embeddings))
        log(self.info, f"{self.source.num_samples('train'):,} training samples, "
                       f"{steps_per_epoch} steps per epoch of global batch {cfg.data.batch_size}; "
                       f"{self.num_workers} loader worker(s) per rank; training step: "
                       f"{self.step_kind}"
                       + (" (training.step=auto)" if cfg.training.step == "auto" else ""))

    def _start_clocks(self, steps_per_epoch: int) -> None:
        """After resuming: the run's totals for observability, and the samples and time that
        this process's throughput is counted from."""
        t = self.cfg.training
        total_steps = steps_per_epoch * t.epochs
        self.run_logger.run_start(  # observability
            min(total_steps, t.max_steps) if t.max_steps else total_steps, steps_per_epoch,
            self.source.num_samples("train"), self.source.num_samples(t.eval_split))
        self._seen_at_start = int(self._all_reduce_sum(self.samples_seen))
        self._timed_from_step, self._last_log_time = self.step, time.perf_counter()

    def _interval_length(self, steps_per_epoch: int) -> int:
        """Steps to the next point where training pauses: an evaluation, a periodic
        checkpoint, max_steps or the end of the epoch."""
        t = self.cfg.training
        every = t.eval_every_n_steps or steps_per_epoch
        n = min(every - self.step % every, steps_per_epoch - self.next_batch)
        to_save = self.checkpointer.steps_to_next_periodic(self.step)
        if to_save is not None:
            n = min(n, to_save)
        if t.max_steps:
            n = min(n, t.max_steps - self.step)
        return n

    def _evaluation_due(self, steps_per_epoch: int) -> bool:
        every = self.cfg.training.eval_every_n_steps or steps_per_epoch
        return self.step % every == 0 or self.next_batch == steps_per_epoch

    def _reached_max_steps(self) -> bool:
        t = self.cfg.training
        return bool(t.max_steps) and self.step >= t.max_steps

    def _resume_pending_evaluation(self) -> bool:
        """Resumed from a SIGTERM checkpoint taken during an evaluation: run it first. The
        checkpoint of this step exists (it holds the request to evaluate again), so a new
        best is recorded but not saved. True when it reaches an early-stop target."""
        if self._eval_pending_epoch is None:
            return False
        pending, self._eval_pending_epoch = self._eval_pending_epoch, None
        stop_early = self._evaluate_and_check(pending)
        self._track_best()
        return stop_early

    def _final_evaluation(self, epoch: int) -> bool:
        """When training ends at a step not yet evaluated (max_steps mid-interval), evaluate
        it (unless the ranks are stopping on a signal). True when it reaches a target."""
        # an evaluation interrupted by the signal left no record, but then the ranks stop
        evaluated_at = self.evals[-1]["step"] if self.evals else -1
        if self.stop_request.stopped or evaluated_at == self.step:
            return False
        stop_early = self._evaluate_and_check(min(epoch, self.cfg.training.epochs - 1))
        if not self.stop_request.stopped:
            self.checkpointer.after_evaluation(self.step, self._track_best())
        return stop_early

    def _summary(self, train_time: float, stopped_early: bool,
                 signalled: Optional[str]) -> Dict[str, Any]:
        """The run's results, as metrics.json holds them."""
        seen = int(self._all_reduce_sum(self.samples_seen))
        return {
            "steps": self.step,
            "train_samples_seen": seen,
            "train_seconds": train_time,
            # this process's throughput: samples restored from a checkpoint do not count
            "train_samples_per_s": (seen - self._seen_at_start) / max(train_time, 1e-9),
            "stopped_early": stopped_early,
            "stopped_by_signal": signalled,
            "best_auc": self.best_auc if self.best_step >= 0 else None,
            "best_step": self.best_step,
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "peak_memory": peak_memory(self.info.device),
            "train_step": self._train_step_report(),
            "final": self.evals[-1] if self.evals else {},
            "evals": self.evals,
            "history": self.history,
        }

    def _log_done(self, summary: Dict[str, Any]) -> None:
        final, mem = summary["final"], summary["peak_memory"]
        log(self.info, f"done: {self.step} steps, {summary['train_samples_seen']:,} samples in "
                       f"{summary['train_seconds']:.1f}s ({summary['train_samples_per_s']:,.0f} "
                       f"samples/s); {self.cfg.training.eval_split} auc "
                       f"{final.get('auc', math.nan):.5f}; peak memory {mem['gb']:.2f} GB "
                       f"({mem['kind']}, rank 0); results in {self.run_dir}")

    def _train_step_report(self) -> Dict[str, Any]:
        """training.step, and for the one-rank kinds how this process's steps ran: direct, or
        as CUDA-graph replays (and whether the capture held; if not, why)."""
        report: Dict[str, Any] = {"kind": self.step_kind}
        if self.cfg.training.step != self.step_kind:
            report["configured"] = self.cfg.training.step  # auto
        if isinstance(self.train_step, OneRankStep):
            report.update(direct_steps=self.train_step.direct_steps,
                          graph_replays=self.train_step.replays,
                          capture_failed=self.train_step.capture_failed)
            if self.train_step.capture_failed:
                report["capture_error"] = self.train_step.capture_error
        return report

    def evaluate_only(self, split: str = "val") -> Dict[str, Any]:
        """Load the checkpoint named by checkpoint.resume and evaluate `split` with every
        metric (AUC, log loss, accuracy, precision, recall, F1, average precision)."""
        if not self.cfg.checkpoint.resume:
            raise checkpoint.CheckpointError(
                "--eval-only needs checkpoint.resume=auto or checkpoint.resume=<folder>")
        self._maybe_resume(self.source.num_batches("train"), with_optimizer=False)
        if self.last_checkpoint is None:
            raise checkpoint.CheckpointError(f"--eval-only: no checkpoint in {self.ckpt_dir}")
        res = self.evaluate(split, extended=True)
        res.update(split=split, step=self.step, checkpoint=str(self.last_checkpoint))
        log(self.info, f"{split} of {self.last_checkpoint}: " + "  ".join(
            f"{k} {v:.5f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()
            if k not in ("split", "checkpoint")))
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / f"eval_{split}.json").write_text(json.dumps(res, indent=1))
        return res

    # ------------------------------------------------------------------ checkpoints
    def _track_best(self) -> bool:
        """Whether the last evaluation has the best AUC so far (then it is recorded)."""
        auc = self.evals[-1].get("auc", math.nan) if self.evals else math.nan
        if auc > self.best_auc:  # NaN compares False
            self.best_auc, self.best_step = auc, self.step
            return True
        return False

    def _trainer_state(self) -> Dict[str, Any]:
        epoch, next_batch = self.epoch, self.next_batch
        if next_batch >= self.source.num_batches("train"):
            epoch, next_batch = epoch + 1, 0
        return {
            "step": self.step, "epoch": epoch, "next_batch": next_batch,
            "samples_seen": int(self._all_reduce_sum(self.samples_seen)),
            "best_auc": self.best_auc if self.best_step >= 0 else None,
            "best_step": self.best_step, "history": self.history, "evals": self.evals,
            "eval_pending_epoch": self._eval_pending_epoch,
            # the losses since the last log line (summed over steps, averaged over ranks as
            # `_log_train` does, so another world size resumes it) and that line's step
            "loss_window": {"sum": self._all_reduce_sum(self._loss_window) / self.info.world_size,
                            "since_step": self._last_logged_step},
            "world_size": self.info.world_size, "signature": self.signature,
            "config": to_dict(self.cfg),
        }

    def _save(self) -> None:
        """Collective: checkpoint the current step (when the checkpointer decides to)."""
        with self._paused_clock():
            self._save_now()

    def _save_now(self) -> None:
        state = self._trainer_state()
        keep = [self.best_step] if self.cfg.checkpoint.keep_best and self.best_step >= 0 else []
        self.last_checkpoint = checkpoint.save(
            self.ckpt_dir, self.step, self.model, self.optimizer, state,
            self.cfg.checkpoint.keep_last, keep)
        log(self.info, f"checkpoint: step {self.step} -> {self.last_checkpoint}")

    def _maybe_resume(self, steps_per_epoch: int, with_optimizer: bool = True) -> None:
        want = self.cfg.checkpoint.resume
        if not want:
            return
        if want == "auto":
            found, skipped = checkpoint.newest_usable(self.ckpt_dir)
            for why in skipped:
                log(self.info, f"resume=auto: skipped {why}")
            if found is None and skipped:
                raise checkpoint.CheckpointError(
                    f"resume=auto: none of the {len(skipped)} checkpoint(s) in {self.ckpt_dir} "
                    "can be used (each is named above); resume from another with "
                    "checkpoint.resume=<folder>, or move them away to start fresh")
            if found is None:
                log(self.info, f"resume=auto: no checkpoint in {self.ckpt_dir}; starting fresh")
                return
            path = found.path
        else:
            path = Path(want)  # that it is a folder, the checks before the model was built say
            checkpoint.verify(path)
        state = checkpoint.read_trainer_state(path)
        checkpoint.check_signature(path, state.get("signature", {}), self.signature)
        # an imported model (import_reference) has weights only: a fresh optimizer
        with_optimizer = with_optimizer and not state.get("weights_only")
        checkpoint.load(path, self.model, self.optimizer if with_optimizer else None)
        self.step, self.epoch, self.next_batch = state["step"], state["epoch"], state["next_batch"]
        self.schedule.resume_at(self.step)
        self.samples_seen.fill_(state["samples_seen"] if self.info.is_main else 0)
        self.history, self.evals = state["history"], state["evals"]
        self._eval_pending_epoch = state.get("eval_pending_epoch")
        window = state.get("loss_window", {"sum": 0.0, "since_step": self.step})
        self._loss_window.fill_(window["sum"] * self.info.world_size if self.info.is_main else 0.0)
        self._last_logged_step = window["since_step"]
        if state.get("best_auc") is not None:
            self.best_auc, self.best_step = state["best_auc"], state["best_step"]
        self.last_checkpoint = path
        self.checkpointer.resumed(self.step)
        log(self.info, f"resumed from {path}: step {self.step}, epoch {self.epoch}, batch "
                       f"{self.next_batch} of {steps_per_epoch} (written by "
                       f"{state['world_size']} ranks)")

    def _check_finite(self) -> None:
        """Collective: stop when any rank saw a non-finite loss (before anything is saved)."""
        bad = self.first_bad_step.clone()
        big = torch.iinfo(torch.int64).max
        bad = torch.where(bad < 0, torch.full_like(bad, big), bad)
        if self.info.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        if int(bad) != big:
            last = self.last_checkpoint or checkpoint.latest_checkpoint(self.ckpt_dir)
            raise TrainingDiverged(
                f"non-finite training loss at step {int(bad)}; stopped at step {self.step} "
                f"without saving; last good checkpoint: {last.path if hasattr(last, 'path') else last}")

    def _maybe_inject_crash(self) -> None:
        t = self.cfg.training
        if (t.crash_at_step and self.step == t.crash_at_step and self.info.rank == t.crash_rank
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
            print(f"training.crash_at_step: rank {self.info.rank} exits at step {self.step}",
                  file=sys.stderr, flush=True)
            os._exit(13)

    def _all_reduce_sum(self, t: torch.Tensor) -> float:
        t = t.clone()
        if self.info.world_size > 1:
            dist.all_reduce(t)
        return float(t.item())

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


class LoaderWait:
    """Seconds the step loop spent waiting for batches: inside the loader iterator's next(),
    where the process builds a batch itself (no loader workers) or waits for a worker's.
    A large share of a logging interval means the loader bounds training (more
    data.num_workers, or a cheaper data format); the share of a loader that keeps up is
    near 0."""

    def __init__(self):
        self.seconds = 0.0

    def timed(self, batches: Iterator) -> Iterator:
        """`batches`, adding the time each next() takes to `seconds`."""
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - start
            yield batch


def peak_memory(device: torch.device) -> Dict[str, Any]:
    """This process's peak memory so far: on CUDA the most the caching allocator held for
    tensors (`max_memory_allocated`; what a batch size or table placement must fit in), on
    CPU the peak resident set size of the process."""
    if device.type == "cuda":
        return {"gb": torch.cuda.max_memory_allocated(device) / 2**30, "kind": "cuda allocated",
                "reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"gb": kb / 2**20, "kind": "process rss"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def _json_default(x: Any) -> Optional[float]:
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)
