"""Raw Criteo text -> `python -m dlrm_torchrec.data.preprocess` -> 2-rank training on the
criteo_kaggle source: every training row of days 0-5 is consumed once and the validation
half of day 6 is evaluated."""

import json
import random

import numpy as np
import pytest

from dlrm_torchrec.config import load_config
from tests.helpers.criteo_rows import good_row
from tests.helpers.dist_utils import run_cli, run_ranks
from tests.helpers.torchrec_preprocessing import torchrec_folder


def _train(rank, world_size, overrides, config="configs/criteo_kaggle.yaml"):
    from dlrm_torchrec.train.job import train

    train(load_config(config, overrides))


def test_preprocessed_kaggle_file_trains_on_two_ranks(tmp_path):
    rng = random.Random(3)
    raw = tmp_path / "train.txt"
    raw.write_text("".join(good_row(rng) + "\n" for _ in range(7000)))
    out = tmp_path / "kaggle"
    proc = run_cli(
        ["-m", "dlrm_torchrec.data.preprocess", "--dataset", "kaggle",
         str(raw), "-o", str(out), "--max-ind-range", "1000", "--workers", "1", "--no-progress"],
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "run"
    run_ranks(2, _train, [
        f"data.path={out}", "embeddings.max_ind_range=1000", "data.batch_size=256",
        "data.eval_batch_size=512", "data.shuffle_window=1000", "training.eval_every_n_steps=0",
        "logging.log_every_n_steps=5", f"logging.run_dir={run_dir}", "logging.progress_bar=false",
        "model.bottom_mlp=[32,16]", "model.top_mlp=[32,1]", "checkpoint.at_end=false",
    ])
    m = json.loads((run_dir / "metrics.json").read_text())
    # 7 days of 1000 rows: 6000 training rows, day 6 halved into test and validation
    assert m["train_samples_seen"] == 6000
    assert m["steps"] == 24  # ceil(6000 / 256): the ragged last batch is kept
    assert m["final"]["samples"] == 500
    assert 0.0 <= m["final"]["auc"] <= 1.0


@pytest.mark.parametrize("bags", ["one-hot", "materialised multi-hot"])
def test_data_adopted_from_torchrecs_preprocessing_trains_on_two_ranks(tmp_path, bags):
    """TorchRec's own tsv_to_npys writes three days (plus, for MLPerf DCNv2, materialised
    bags of MLPerf's sizes beside them, trained with configs/mlperf_dcnv2.yaml scaled down:
    DCNv2, row-wise Adagrad, MLPerf logging); from_torchrec adopts them; 2 ranks with a
    loader worker each (the source is pickled into the worker) train on days 0-1 and
    evaluate TorchRec's validation half of day 2."""
    days = [("day_0", 900), ("day_1", 700), ("day_2", 301)]
    npy = torchrec_folder(tmp_path, days)
    # one-hot: evaluated on the second half of day 2 instead (TorchRec's test half)
    config, extra = "configs/criteo_kaggle.yaml", ["data.multi_hot_sizes=[]",
                                                   "training.eval_split=test"]
    if bags != "one-hot":
        config = "configs/mlperf_dcnv2.yaml"
        multi_hot = load_config(config).data.multi_hot_sizes
        extra = ["embeddings.dim=16", "model.dcn_low_rank_dim=8", "logging.mlperf_logging=true"]
        rng = np.random.default_rng(0)
        for stem, n in days:
            np.savez(npy / f"{stem}_sparse_multi_hot.npz",
                     **{str(f): rng.integers(0, 5000, (n, k)).astype(np.int32)
                        for f, k in enumerate(multi_hot)})
    out = tmp_path / "adopted"
    proc = run_cli(["-m", "dlrm_torchrec.data.from_torchrec", str(npy), "-o", str(out)],
                   timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "run"
    run_ranks(2, _train, [
        f"data.path={out}", "data.source=criteo_terabyte", "embeddings.max_ind_range=500",
        "data.batch_size=128", "data.eval_batch_size=256", "data.num_workers=1",
        "training.eval_every_n_steps=0", f"logging.run_dir={run_dir}",
        "logging.progress_bar=false", "model.bottom_mlp=[32,16]", "model.top_mlp=[32,1]",
        "checkpoint.at_end=false", *extra,
    ], config)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["train_samples_seen"] == 1600 and m["steps"] == 13  # ceil(1600 / 128)
    # TorchRec's validation: the first ceil(301 / 2) rows; its test: the other 150
    assert m["final"]["samples"] == (151 if bags != "one-hot" else 150)
    assert m["final"]["split"] == ("val" if bags != "one-hot" else "test")
    assert 0.0 <= m["final"]["auc"] <= 1.0
    if bags != "one-hot":
        assert '"key": "eval_accuracy"' in (run_dir / "mlperf.log").read_text()
