"""What a run leaves for its operator: plain log lines off a terminal and a progress bar on
one, TensorBoard scalars, the metrics plot and CSV, a profiler trace, and MLPerf log lines."""

import csv
import glob
import io
import json
import logging

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dlrm_torchrec.config import load_config
from dlrm_torchrec.train.observability import RunLogger
from tests.helpers.dist_utils import free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short real training run with every output switched on; stdout is not a tty."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config("configs/tiny_cpu.yaml", [
        "data.train_samples=4096", "data.eval_samples=1024", "training.eval_every_n_steps=8",
        "logging.log_every_n_steps=4", f"logging.run_dir={run_dir}", "logging.tensorboard=true",
        "logging.plot=true", "logging.profile=true", "logging.profile_start_step=3",
        "logging.profile_steps=2", "logging.mlperf_logging=true",
        "logging.mlperf_submission_org=acme",
    ])
    summary, stdout = train_in_process(cfg)
    return run_dir, summary, stdout


def train_in_process(cfg):
    """(summary, stdout) of `train(cfg)` in this process, stdout not a terminal."""
    from dlrm_torchrec.train.job import train

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", out)
        # the in-process rendezvous must not leak into later tests' subprocesses
        mp.setenv("MASTER_ADDR", "127.0.0.1")
        mp.setenv("MASTER_PORT", str(free_port()))
        summary = train(cfg)
    return summary, out.getvalue()


def test_without_a_terminal_training_prints_plain_log_lines(run):
    _, summary, stdout = run
    lines = stdout.splitlines()
    for rec in summary["history"]:
        assert any(line.startswith(f"step {rec['step']:>7d}  epoch 0  loss ") for line in lines)
    assert "\r" not in stdout and "%|" not in stdout  # no progress bar


@pytest.mark.alone  # compares shares of time of two runs: another test beside it skews them
def test_log_lines_tell_the_share_of_time_spent_waiting_for_the_loader(tmp_path):
    """A loader that takes 120 ms per training batch, against steps of a few ms: most of each
    logging interval goes to waiting for data, and the log line and history say so. The
    same run with the loader as it is waits a smaller share."""
    import time

    from dlrm_torchrec.train import trainer

    def slow_training_batches(source, *args):
        loader = trainer_prefetching(source, *args)
        batches = loader.batches

        def slow(split, *a, **k):
            for batch in batches(split, *a, **k):
                if split == "train":
                    time.sleep(0.12)
                yield batch

        loader.batches = slow
        return loader

    trainer_prefetching = trainer.prefetching
    overrides = ["data.train_samples=4096", "data.eval_samples=1024", "data.batch_size=256",
                 "logging.log_every_n_steps=4", "logging.tensorboard=false",
                 "logging.plot=false"]
    waits, waited = {}, {}
    for name in ("slow", "as_is"):
        cfg = load_config("configs/tiny_cpu.yaml", overrides + [f"logging.run_dir={tmp_path / name}"])
        with pytest.MonkeyPatch.context() as mp:
            if name == "slow":
                mp.setattr(trainer, "prefetching", slow_training_batches)
            summary, stdout = train_in_process(cfg)
        waits[name] = [rec["data_wait"] for rec in summary["history"]]
        assert len(waits[name]) == 4 and all(0 <= w <= 1 for w in waits[name])
        # the seconds each interval of 4 steps (1024 samples) waited: share x length
        waited[name] = [rec["data_wait"] * 1024 / rec["samples_per_s"]
                        for rec in summary["history"]]
    # the run waited through all 16 sleeps of 120 ms, whatever the steps took (5-15 ms on a
    # quiet machine, far more on a loaded one); the pipeline takes one batch ahead, so an
    # interval holds 3 to 5 of them; and each a larger share than with the loader as is
    assert sum(waited["slow"]) > 0.95 * 16 * 0.12, waited
    assert min(waited["slow"]) > 0.95 * 3 * 0.12, waited
    assert max(waits["as_is"]) < min(waits["slow"]), waits
    line = next(x for x in stdout.splitlines() if x.startswith("step       4  "))
    assert line.endswith(f"samples/s  data wait {waits['as_is'][0]:.0%}")


def test_tensorboard_event_file_holds_every_scalar(run):
    run_dir, summary, _ = run
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/data_wait", "val/auc",
            "val/log_loss", "val/ne", "val/calibration", "val/accuracy"} <= tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in summary["history"]]
    assert [e.value for e in loss] == pytest.approx([r["train_loss"] for r in summary["history"]])
    auc = acc.Scalars("val/auc")
    assert [e.step for e in auc] == [r["step"] for r in summary["evals"]] == [8, 16]
    assert auc[-1].value == pytest.approx(summary["final"]["auc"], rel=1e-6)


def test_plot_is_a_valid_png_image(run):
    from matplotlib.image import imread

    path = run[0] / "metrics.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_csv_has_one_row_per_training_record_and_evaluation(run):
    run_dir, summary, _ = run
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert [int(r["step"]) for r in train] == [r["step"] for r in summary["history"]]
    assert [float(r["train_loss"]) for r in train] == pytest.approx(
        [r["train_loss"] for r in summary["history"]])
    assert [float(r["auc"]) for r in val] == pytest.approx([r["auc"] for r in summary["evals"]])


def test_profiler_trace_is_chrome_json_of_the_configured_window(run):
    (path,) = glob.glob(str(run[0] / "profile" / "rank0.*.pt.trace.json"))
    with open(path) as f:
        trace = json.load(f)
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps) == 2  # logging.profile_steps


def test_mllog_lines_parse_and_tell_the_run(run):
    run_dir, summary, _ = run
    events = []
    for line in (run_dir / "mlperf.log").read_text().splitlines():
        assert line.startswith(":::MLLOG ")
        events.append(json.loads(line[len(":::MLLOG "):]))
    keys = [e["key"] for e in events]
    for key in ("submission_benchmark", "submission_org", "global_batch_size", "init_start",
                "init_stop", "run_start", "epoch_start", "epoch_stop", "eval_accuracy",
                "run_stop"):
        assert key in keys, key
    assert keys.index("run_start") < keys.index("epoch_start") < keys.index("eval_accuracy")
    assert keys[-1] == "run_stop"
    by_key = {e["key"]: e for e in events}
    assert by_key["submission_org"]["value"] == "acme"
    aucs = [e for e in events if e["key"] == "eval_accuracy"]
    assert [e["value"] for e in aucs] == pytest.approx([r["auc"] for r in summary["evals"]])
    assert [e["metadata"]["epoch_num"] for e in aucs] == [0.5, 1.0]
    assert by_key["run_stop"]["metadata"]["status"] == "aborted"  # no target was set


def test_mllog_of_an_mlperf_configured_run_passes_the_compliance_checker(tmp_path):
    """mlperf_logging's own checker (training rules 4.1.0, the last with DLRM-DCNv2) on a
    short run configured as the MLPerf reference (Adagrad family, no warmup or decay): every
    rule holds but the two only a full Criteo run can meet, the validation size (89,137,319
    samples) and the quality target (AUC >= 0.80275)."""
    from mlperf_logging.compliance_checker.mlp_compliance import make_checker

    cfg = load_config("configs/tiny_cpu.yaml", [
        "data.train_samples=4096", "data.eval_samples=1024", "training.eval_every_n_steps=8",
        "lr_schedule.warmup_steps=0", f"logging.run_dir={tmp_path}", "logging.tensorboard=false",
        "logging.plot=false", "logging.mlperf_logging=true",
        "logging.mlperf_submission_org=acme", "logging.mlperf_submission_platform=2xcpu",
    ])
    train_in_process(cfg)
    checker = make_checker("training", "4.1.0", quiet=True, werror=False)
    checker.check_file(str(tmp_path / "mlperf.log"), "training_4.1.0/common.yaml")
    failures = list(checker.overwritable.values()) + list(checker.not_overwritable)
    assert len(failures) == 2, failures
    assert any("eval_samples" in f and "89137319" in f for f in failures), failures
    assert any("eval_accuracy" in f and "0.80275" in f for f in failures), failures
    assert not checker.warnings, checker.warnings
    keys = [json.loads(line[len(":::MLLOG "):])["key"]
            for line in (tmp_path / "mlperf.log").read_text().splitlines()]
    assert keys.count("eval_start") == keys.count("eval_stop") == 2
    # each evaluation: start, stop, then its accuracy
    first = keys.index("eval_start")
    assert keys[first:first + 3] == ["eval_start", "eval_stop", "eval_accuracy"]


def test_on_a_terminal_a_progress_bar_replaces_the_log_lines(tmp_path, capsys):
    cfg = load_config("configs/tiny_cpu.yaml", [f"logging.run_dir={tmp_path}",
                                                "logging.tensorboard=false"])
    rl = RunLogger(cfg, rank=0, is_tty=True)
    rl.run_start(total_steps=10, steps_per_epoch=10, train_samples=2560, eval_samples=256)
    for step in range(1, 5):
        rl.step(step)
    rl.train({"step": 4, "epoch": 0, "train_loss": 0.51234, "lr": 0.05, "samples_per_s": 1234.0,
              "data_wait": 0.1})
    rl.close()
    out = capsys.readouterr().out
    assert "4/10" in out and "loss=0.51234" in out and "samples_s=1,234" in out
    assert "step       4  epoch 0" not in out


def _fbgemm_notice(fbgemm: str, torch_version: str) -> logging.LogRecord:
    msg = (f"\n  \033[33m\n  _fbgemm_torch_compat_table has no entry for {fbgemm} of FBGEMM;\n"
           f"  cannot determine compatibility with PyTorch {torch_version}\n  \033[0m\n")
    return logging.LogRecord("root", logging.WARNING, __file__, 1, msg, None, None)


def test_fbgemm_missing_table_entry_notice_is_dropped_only_for_a_matching_release_pair():
    from dlrm_torchrec import _not_a_matching_fbgemm_notice as keep

    assert not keep(_fbgemm_notice("1.6.0", "2.11.0+cu130"))  # the GPU machine's pair
    assert not keep(_fbgemm_notice("1.9.1", "2.14.0"))
    assert keep(_fbgemm_notice("1.6.0", "2.13.0"))  # a mismatch: the user must see it
    assert keep(_fbgemm_notice("2.0.0", "2.15.0"))
    assert keep(logging.LogRecord("root", logging.WARNING, __file__, 1, "other", None, None))
