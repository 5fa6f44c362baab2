"""The pipelined loader: worker processes hand back exactly the wrapped source's batches, in
order, from any start batch; worker errors surface as themselves; sources cross processes."""

import pickle

import numpy as np
import pytest
import torch

from dlrm_torchrec.config import ConfigError, EmbeddingsConfig, load_config
from dlrm_torchrec.data import build_data_source
from dlrm_torchrec.data.loader import PrefetchingSource, prefetching, resolve_num_workers
from dlrm_torchrec.data.qr_split import wrap_source
from tests.helpers.criteo_folder import make_folder
from tests.helpers.criteo_folder import source as criteo_source


def batch_arrays(batch):
    kjt = batch.sparse_features
    return [batch.dense_features.numpy(), batch.labels.numpy(), batch.weights.numpy(),
            kjt.values().numpy(), kjt.lengths().numpy(), np.array(kjt.keys())]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for b, (g, w) in enumerate(zip(got, want)):
        for i, (x, y) in enumerate(zip(batch_arrays(g), batch_arrays(w))):
            np.testing.assert_array_equal(x, y, err_msg=f"batch {b}, field {i}")


def generated(world=2, rank=1, **over):
    cfg = load_config(None, [
        "data.source=synthetic", "data.batch_size=16", "data.train_samples=150",
        "data.eval_samples=40", "data.num_indices_per_lookup=3",
        "data.num_indices_per_lookup_fixed=false", "embeddings.num_embeddings_per_feature=[50,7,300]",
    ] + [f"{k}={v}" for k, v in over.items()])
    return build_data_source(cfg.data, cfg.embeddings, 13, rank, world)


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("start", [0, 4, 9])
def test_workers_yield_the_sources_batches_in_order(workers, start):
    src = generated()  # 150 samples in batches of 16: 10 batches, the last one padded
    want = list(src.batches("train", 2, start_batch=start))
    got = list(PrefetchingSource(src, workers).batches("train", 2, start_batch=start))
    assert_same_batches(got, want)
    assert len(got) == 10 - start


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_workers_not_forked_get_the_source_pickled_and_yield_the_same_batches(tmp_path,
                                                                             start_method):
    """Where workers are not forked (macOS, Python 3.14's forkserver default) the source
    crosses to them pickled: generated, QR-wrapped and Criteo sources alike. A fork server's
    workers are its children, not the training process's, and must still start."""
    emb = EmbeddingsConfig(num_embeddings_per_feature=[50, 7, 300], qr_threshold=40)
    make_folder(tmp_path)
    for src in (wrap_source(generated(), emb), criteo_source(tmp_path, rank=1, world=2)):
        want = list(src.batches("val"))
        got = list(PrefetchingSource(src, 1, mp_context=start_method).batches("val"))
        assert_same_batches(got, want)


def test_start_past_the_end_yields_nothing():
    assert list(PrefetchingSource(generated(), 2).batches("train", 0, start_batch=10)) == []


def test_qr_split_batches_cross_worker_processes():
    emb = EmbeddingsConfig(num_embeddings_per_feature=[50, 7, 300], qr_threshold=40)
    src = wrap_source(generated(), emb)
    want = list(src.batches("val"))
    got = list(PrefetchingSource(src, 2).batches("val"))
    assert_same_batches(got, want)
    assert "cat_0_q" in got[0].sparse_features.keys()


@pytest.mark.parametrize("window", [0, 11])
def test_criteo_batches_through_workers(tmp_path, window):
    make_folder(tmp_path)
    src = criteo_source(tmp_path, rank=1, world=2, shuffle_window=window)
    want = list(src.batches("train", 1, start_batch=1))
    got = list(PrefetchingSource(src, 2).batches("train", 1, start_batch=1))
    assert_same_batches(got, want)


def test_criteo_source_pickles_without_its_data(tmp_path):
    make_folder(tmp_path)
    src = criteo_source(tmp_path)
    blob = pickle.dumps(src)
    assert len(blob) < 20_000  # the days' arrays are reopened, not copied
    back = pickle.loads(blob)
    assert isinstance(back.days[0][0], np.memmap)
    assert_same_batches(list(back.batches("val")), list(src.batches("val")))


class FailingSource:
    """Batches 0..4; building batch 3 raises a data error."""

    def num_batches(self, split):
        return 5

    def batches(self, split, epoch=0, start_batch=0):
        for b in range(start_batch, 5):
            if b == 3:
                raise ConfigError("data.path='x': day_3_dense.npy is truncated")
            yield torch.full((2,), float(b))


def test_a_worker_error_is_raised_as_itself_after_the_good_batches():
    got = []
    with pytest.raises(ConfigError, match="day_3_dense.npy is truncated") as err:
        for batch in PrefetchingSource(FailingSource(), 2).batches("train"):
            got.append(int(batch[0]))
    assert got == [0, 1, 2]
    assert "Traceback" not in str(err.value)


def test_num_workers_auto_is_zero_on_cpu_and_bounded_on_cuda(monkeypatch):
    assert resolve_num_workers(-1, "cpu", 2) == 0
    assert resolve_num_workers(3, "cpu", 2) == 3
    monkeypatch.setattr("dlrm_torchrec.data.loader.available_cores", lambda: 16)
    assert resolve_num_workers(-1, "cuda", 1) == 4
    assert resolve_num_workers(-1, "cuda", 1, heavy_batches=True) == 8  # multi-hot, synthetic
    assert resolve_num_workers(-1, "cuda", 2, heavy_batches=True) == 7  # a core per rank kept
    assert resolve_num_workers(-1, "cuda", 8) == 1
    assert resolve_num_workers(-1, "cuda", 8, heavy_batches=True) == 1
    monkeypatch.setattr("dlrm_torchrec.data.loader.available_cores", lambda: 8)
    assert resolve_num_workers(-1, "cuda", 8) == 0


def test_available_cores_follow_the_cpu_affinity():
    import os

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    from dlrm_torchrec.data.loader import available_cores

    full = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(full)})
        assert available_cores() == 1
    finally:
        os.sched_setaffinity(0, full)
    assert available_cores() == len(full)


def test_nothing_to_prefetch_keeps_the_source():
    src = generated()
    assert prefetching(src, 0, pin_memory=False) is src
    assert isinstance(prefetching(src, 2, pin_memory=False), PrefetchingSource)


def test_num_workers_below_minus_one_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.num_workers=-2: must be >= 0, or -1"):
        load_config(None, ["data.num_workers=-2"])
