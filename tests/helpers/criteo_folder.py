"""A preprocessed Criteo folder written by hand (`make_folder`: DAY_ROWS rows a day, the
first dense value of each row a unique sample number) and a CriteoSource over it
(`source`)."""

import json

import numpy as np

from dlrm_torchrec.config import DataConfig, EmbeddingsConfig
from dlrm_torchrec.data.criteo import CriteoSource

DAY_ROWS = [23, 17, 30, 25]  # three training days, then the evaluation day


def make_folder(path, stored_size=1000):
    """Day d row i: dense[:, 0] = a unique sample number, ids random below stored_size."""
    rng = np.random.default_rng(0)
    uid = 0
    for d, n in enumerate(DAY_ROWS):
        dense = rng.random((n, 13), dtype=np.float32)
        dense[:, 0] = np.arange(uid, uid + n)
        uid += n
        np.save(path / f"day_{d}_dense.npy", dense)
        np.save(path / f"day_{d}_sparse.npy",
                rng.integers(0, stored_size, (n, 26)).astype(np.int32))
        np.save(path / f"day_{d}_labels.npy", rng.integers(0, 2, (n, 1)).astype(np.int32))
    meta = {"format_version": 1, "settings": {"dataset": "kaggle"}, "complete": True,
            "num_days": len(DAY_ROWS), "eval_day": len(DAY_ROWS) - 1,
            "rows_per_day": DAY_ROWS, "table_sizes": [stored_size] * 26,
            "sparse_dtype": "int32"}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def source(path, rank=0, world=1, table=1000, **data_kw):
    data_kw.setdefault("batch_size", 8)
    data = DataConfig(source="criteo_kaggle", path=str(path), **data_kw)
    emb = EmbeddingsConfig(num_embeddings_per_feature=[table] * 26)
    return CriteoSource(data, emb, rank=rank, world_size=world)
