"""What an operator sees of a run: progress bar or log lines, TensorBoard scalars, the final
plot and CSV, a torch.profiler trace, and MLPerf compliance events.

`RunLogger` is built on every rank; everything but the profiler (which may trace all ranks)
is done by rank 0 only. The trainer calls it at a handful of points:

    run_start -> (epoch_start -> step* / train* / eval* -> epoch_stop)* -> finish -> close

Files in `logging.run_dir`:
    tensorboard/                      event files (`tensorboard --logdir RUN_DIR`)
    metrics.png, metrics.csv          training loss and validation metrics against steps
    profile/rank<R>.*.pt.trace.json   Chrome trace: ui.perfetto.dev, chrome://tracing, TensorBoard
    mlperf.log                        `:::MLLOG {...}` lines
"""

import csv
import logging
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from dlrm_torchrec.config import Config

TRAIN_SCALARS = {"train_loss": "train/loss", "lr": "train/lr", "samples_per_s": "train/samples_per_s",
                 "data_wait": "train/data_wait"}
EVAL_SCALARS = {"auc": "val/auc", "log_loss": "val/log_loss", "ne": "val/ne",
                "calibration": "val/calibration", "accuracy": "val/accuracy"}
CSV_COLUMNS = ["split", "step", "epoch", "train_loss", "lr", "samples_per_s", "data_wait", "auc",
               "log_loss", "ne", "calibration", "accuracy", "ctr", "samples"]


def write_line(msg: str) -> None:
    """Print a line; above any tqdm bar (tqdm redraws it), plainly when there is none."""
    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


def format_train_line(rec: Dict[str, Any]) -> str:
    return (f"step {rec['step']:>7d}  epoch {rec['epoch']}  loss {rec['train_loss']:.5f}  "
            f"lr {rec['lr']:.3g}  {rec['samples_per_s']:,.0f} samples/s  "
            f"data wait {rec['data_wait']:.0%}")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class RunLogger:
    """Progress, TensorBoard, plot/CSV, profiler and mllog for one run (see the module doc)."""

    def __init__(self, cfg: Config, rank: int, is_tty: Optional[bool] = None):
        self.cfg = cfg.logging
        self.rank = rank
        self.is_main = rank == 0
        self.run_dir = Path(self.cfg.run_dir)
        self.is_tty = sys.stdout.isatty() if is_tty is None else is_tty
        self.train_records: List[Dict[str, Any]] = []
        self.eval_records: List[Dict[str, Any]] = []
        self.steps_per_epoch = 1
        self.bar: Optional[tqdm] = None
        self.writer = None
        self.profiler: Optional[torch.profiler.profile] = None
        self.mllogger = None
        self._mllog_handler: Optional[logging.Handler] = None
        self._closed = False
        if self.is_main and self.cfg.mlperf_logging:
            self._start_mllog(cfg)

    # ------------------------------------------------------------------ trainer hooks
    def run_start(self, total_steps: int, steps_per_epoch: int, train_samples: int,
                  eval_samples: int) -> None:
        """Training is about to start: `total_steps` optimizer steps at most."""
        self.steps_per_epoch = max(steps_per_epoch, 1)
        if self.is_main:
            if self.cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            if self.cfg.progress_bar and self.is_tty:
                self.bar = tqdm(total=total_steps, unit="step", file=sys.stdout,
                                dynamic_ncols=True, desc="train")
            self._mllog("end", "init_stop")
            self._mllog("start", "run_start")
            self._mllog("event", "train_samples", train_samples)
            self._mllog("event", "eval_samples", eval_samples)
        if self.cfg.profile and (self.is_main or self.cfg.profile_all_ranks):
            self._start_profiler()

    def epoch_start(self, epoch: int) -> None:
        self._mllog("start", "epoch_start", metadata={"epoch_num": epoch + 1})

    def epoch_stop(self, epoch: int) -> None:
        self._mllog("end", "epoch_stop", metadata={"epoch_num": epoch + 1})

    def step(self, step: int) -> None:
        """After every training step (1-based `step`); cheap: no device sync."""
        if self.bar is not None:
            self.bar.update(1)
        if self.profiler is not None:
            self.profiler.step()
            if step >= self.cfg.profile_start_step + self.cfg.profile_steps - 1:
                self._stop_profiler()  # the trace is written; stop paying for the hooks

    def train(self, rec: Dict[str, Any]) -> None:
        """A training record {step, epoch, train_loss, lr, samples_per_s, data_wait}."""
        if not self.is_main:
            return
        self.train_records.append(dict(rec))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['train_loss']:.5f}",
                                 samples_s=f"{rec['samples_per_s']:,.0f}", lr=f"{rec['lr']:.3g}",
                                 data_wait=f"{rec['data_wait']:.0%}")
        else:
            write_line(format_train_line(rec))
        self._scalars(TRAIN_SCALARS, rec)

    def eval(self, rec: Dict[str, Any]) -> None:
        """A validation record {auc, log_loss, ne, calibration, accuracy, ctr, samples, step,
        epoch}."""
        if not self.is_main:
            return
        self.eval_records.append(dict(rec))
        self._scalars(EVAL_SCALARS, rec)
        if self.writer is not None:
            self.writer.flush()  # evaluations are rare; make them visible at once
        epoch_num = {"epoch_num": rec["step"] / self.steps_per_epoch}
        self._mllog("end", "eval_stop", metadata=epoch_num)
        if _finite(rec.get("auc")):
            self._mllog("event", "eval_accuracy", rec["auc"], epoch_num)

    def eval_start(self, step: int) -> None:
        """A validation pass begins after `step` training steps."""
        self._mllog("start", "eval_start",
                    metadata={"epoch_num": step / self.steps_per_epoch})

    def finish(self, summary: Dict[str, Any]) -> None:
        """Training is over: write the plot and CSV, close everything."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_csv(self.run_dir / "metrics.csv", self.train_records, self.eval_records)
            if self.cfg.plot:
                plot_metrics(self.run_dir / "metrics.png", self.train_records, self.eval_records,
                             title=self.run_dir.name)
        status = "success" if summary.get("stopped_early") else "aborted"
        self.close(status)

    def close(self, status: str = "aborted") -> None:
        """Idempotent; also the error path's cleanup (mllog's run_stop says `status`)."""
        if self._closed:
            return
        self._closed = True
        self._stop_profiler()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.mllogger is not None:
            self._mllog("end", "run_stop", metadata={"status": status})
            self.mllogger.logger.removeHandler(self._mllog_handler)
            self._mllog_handler.close()
            self.mllogger = None

    # ------------------------------------------------------------------ TensorBoard
    def _scalars(self, names: Dict[str, str], rec: Dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, tag in names.items():
            if _finite(rec.get(key)):
                self.writer.add_scalar(tag, rec[key], global_step=rec["step"])

    # ------------------------------------------------------------------ profiler
    def _start_profiler(self) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        start = self.cfg.profile_start_step
        # profiler.step() runs after each training step, so step s runs in profiler step s-1;
        # one warmup step before the window when there is room for it
        warmup = 1 if start >= 2 else 0
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self.profiler = profile(
            activities=activities,
            schedule=schedule(wait=start - 1 - warmup, warmup=warmup,
                              active=self.cfg.profile_steps, repeat=1),
            on_trace_ready=tensorboard_trace_handler(str(self.run_dir / "profile"),
                                                     worker_name=f"rank{self.rank}"),
            record_shapes=True,
        )
        self.profiler.start()

    def _stop_profiler(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    # ------------------------------------------------------------------ MLPerf
    def _start_mllog(self, cfg: Config) -> None:
        from mlperf_logging.mllog.mllog import MLLogger

        self.run_dir.mkdir(parents=True, exist_ok=True)
        # a private logger, not mllog's shared one, so runs in one process do not share files
        logger = logging.Logger(f"dlrm_torchrec.mllog.{id(self)}", level=logging.INFO)
        self._mllog_handler = logging.FileHandler(self.run_dir / "mlperf.log", mode="w")
        logger.addHandler(self._mllog_handler)
        self.mllogger = MLLogger(logger=logger, default_stack_offset=2)
        self._mllog("event", "cache_clear", True)
        self._mllog("start", "init_start")
        for key, value in mllog_hyperparameters(cfg):
            self._mllog("event", key, value)

    def _mllog(self, kind: str, key: str, value: Any = None,
               metadata: Optional[Dict[str, Any]] = None) -> None:
        if self.mllogger is not None:
            getattr(self.mllogger, kind)(key=key, value=value, metadata=metadata)


def mllog_hyperparameters(cfg: Config) -> List[Tuple[str, Any]]:
    """The submission and hyperparameter events the MLPerf DLRM-DCNv2 rules require (checked
    by mlperf_logging's compliance checker, tests/integration/test_observability.py). The reference
    trains embeddings with row-wise Adagrad and the MLPs with Adagrad; MLPerf calls both
    "adagrad", and its Adagrad keys are logged only for that optimizer."""
    o, ls, lg = cfg.optimizer, cfg.lr_schedule, cfg.logging
    adagrad = o.sparse in ("adagrad", "rowwise_adagrad")
    events: List[Tuple[str, Any]] = [
        ("submission_benchmark", "dlrm_dcnv2"),
        ("submission_division", "closed"),
        ("submission_status", "onprem"),
        ("submission_org", lg.mlperf_submission_org),
        ("submission_platform", lg.mlperf_submission_platform),
        ("global_batch_size", cfg.data.batch_size),
        ("gradient_accumulation_steps", 1),
        ("seed", cfg.training.seed),
        ("opt_name", "adagrad" if adagrad else o.sparse),
        ("opt_base_learning_rate", o.lr),
        ("opt_weight_decay", o.weight_decay),
        ("opt_learning_rate_warmup_steps", ls.warmup_steps),
        ("opt_learning_rate_decay_start_step", ls.decay_start_step),
        ("opt_learning_rate_decay_steps", ls.num_decay_steps),
    ]
    if adagrad:
        events += [
            ("opt_adagrad_learning_rate_decay", 0.0),  # torch's lr_decay; FBGEMM has none
            ("opt_adagrad_initial_accumulator_value", 0.0),  # torch's and FBGEMM's default
            ("opt_adagrad_epsilon", o.eps),
        ]
    return events


# ---------------------------------------------------------------------- files


def write_csv(path: Path, train: List[Dict[str, Any]], evals: List[Dict[str, Any]]) -> None:
    """One row per training record (split=train) and per evaluation (split=val), by step."""
    rows = [{"split": "train", **r} for r in train] + [{"split": "val", **r} for r in evals]
    rows.sort(key=lambda r: (r["step"], r["split"] != "train"))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                        for k, v in r.items()})
    tmp.replace(path)


def plot_metrics(path: Path, train: List[Dict[str, Any]], evals: List[Dict[str, Any]],
                 title: str = "") -> None:
    """Training loss (left) and validation AUC and accuracy (right) against steps, as PNG."""
    # the object API with the Agg canvas: no pyplot, no global backend switch, no display
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax, val_ax = fig.subplots(1, 2)
    loss_ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], color="tab:blue")
    loss_ax.set(xlabel="step", ylabel="training loss", title="training loss")
    for key, color in (("auc", "tab:orange"), ("accuracy", "tab:green")):
        pts = [(r["step"], r[key]) for r in evals if _finite(r.get(key))]
        if pts:
            val_ax.plot(*zip(*pts), marker="o", color=color, label=f"validation {key}")
    val_ax.set(xlabel="step", ylabel="metric", title="validation")
    if evals:
        val_ax.legend(loc="best")
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
