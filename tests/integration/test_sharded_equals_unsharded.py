"""With 2 gloo ranks, every sharding type that runs on CPU gives the same forward output
and the same parameters after several optimizer steps as an independent single-process
plain-PyTorch model started from the same weights (see tests/helpers/reference_dlrm.py)."""

import torch

from dlrm_torchrec.config import load_config
from dlrm_torchrec.data import build_data_source
from dlrm_torchrec.model.dlrm import build_train_module, embedding_init_rows
from tests.helpers.dist_utils import run_ranks
from tests.helpers.parity_settings import ADAGRAD, BASE, SGD, STEPS, TOL
from tests.helpers.parity_worker import run as parity_worker
from tests.helpers.reference_dlrm import (
    ReferenceDLRM,
    dense_param_names,
    linear_layers,
    parity_failures,
    train_reference,
)

VARIANTS = [
    SGD + ["sharding.sharding_type=table_wise"],
    SGD + ["sharding.sharding_type=column_wise"],
    SGD + ["sharding.sharding_type=table_column_wise"],
    SGD + ["sharding.sharding_type=data_parallel", "sharding.compute_kernel=dense"],
    ADAGRAD + ["sharding.sharding_type=column_wise"],
    ADAGRAD + ["sharding.sharding_type=table_wise", "model.interaction=cat", "model.bottom_mlp=[16,8]"],
    SGD + ["sharding.sharding_type=table_wise", "model.interaction_itself=true"],
    # equal tables alternate between the ranks; the sharded collection's output groups
    # features by rank (0, 2, 4, 6, 1, ...), out of the configured order
    SGD + ["sharding.sharding_type=table_wise",
           "embeddings.num_embeddings_per_feature=[40,40,40,40,40,40,40,40]"],
    # 80 samples: the third global batch has 16 real samples, all on rank 0
    SGD + ["sharding.sharding_type=table_wise", "data.train_samples=80"],
]


def reference_run(overrides):
    cfg = load_config(None, BASE + overrides)
    sizes = cfg.embeddings.table_sizes()
    d = cfg.embeddings.dim
    tables = [embedding_init_rows(cfg.training.seed, i, n, d, 0, n) for i, n in enumerate(sizes)]
    module = build_train_module(cfg, device=torch.device("cpu"))
    ref = ReferenceDLRM(tables, linear_layers(module.model.dense_arch),
                        linear_layers(module.model.over_arch), cfg.model.interaction,
                        cfg.model.interaction_itself)
    source = build_data_source(cfg.data, cfg.embeddings, cfg.model.dense_in_features, 0, 1)
    logits0, losses = train_reference(ref, cfg, source, STEPS)
    names = dense_param_names(module)
    return cfg, ref, logits0, losses, names


def test_sharded_training_matches_single_process_reference(tmp_path):
    run_ranks(2, parity_worker, BASE, VARIANTS, STEPS, str(tmp_path))
    failures = []
    for i, overrides in enumerate(VARIANTS):
        cfg, ref, logits0, losses, dense_names = reference_run(overrides)
        outs = [torch.load(tmp_path / f"variant{i}_rank{r}.pt", weights_only=True) for r in range(2)]
        name = " ".join(o.split("=")[1] for o in overrides if "sharding_type" in o or "interaction" in o)
        table_names = [f"t_cat_{f}" for f in range(len(ref.tables))]
        failures += parity_failures(name, outs, ref, table_names, logits0, losses, dense_names,
                                    STEPS, TOL)
    assert not failures, "\n".join(failures)
