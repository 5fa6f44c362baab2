"""Precision options on CPU, and the planner inputs fixed with them:

- fp16 and bf16 all-to-alls (TorchRec qcomms) on 2 gloo ranks stay within a stated
  tolerance of fp32 all-to-alls, and differ from them (the codecs really ran; bf16 more
  than fp16, so bf16 was not swapped for fp16);
- bf16 autocast of the dense part survives TorchRec's train pipeline (its fx trace): the
  Linear layers really output bf16; fp16 tables are really stored in fp16;
- pooling factors and the UVM cache size reach the planner's constraints; on CUDA the
  topology takes the device's real memory when sharding.hbm_cap_gb is 0.
"""

import types

import pytest
import torch
from torchrec.distributed.types import CommOp
from torchrec.modules.embedding_configs import DataType

from dlrm_torchrec.config import ConfigError, ShardingConfig, load_config
from dlrm_torchrec.model.dlrm import build_train_module
from dlrm_torchrec.parallel.precision import embedding_data_type, qcomm_codecs_registry
from dlrm_torchrec.parallel.sharding import GB, build_topology, constraints_for, pooling_factors
from tests.helpers.dist_utils import run_ranks
from tests.helpers.precision_worker import run as precision_worker

# Tolerances on the logits (|logit| <= ~0.5 here) against the same run with fp32 comms:
# fp16 keeps 11 significant bits (measured ~6e-5), bf16 8 bits (measured ~6e-4).
FP16_COMMS_TOL = 5e-4
BF16_COMMS_TOL = 5e-3
AUTOCAST_TOL = 2e-2  # bf16 matmuls in the MLPs and the interaction (measured ~3e-3)
FP16_TABLES_TOL = 1e-3  # fp16 table weights (measured ~8e-5)
STEPS = 3
BASE = [
    "model.dense_in_features=5", "model.bottom_mlp=[16,8]", "model.top_mlp=[16,1]",
    "embeddings.dim=8", "embeddings.num_embeddings_per_feature=[40,60,30,50]",
    "data.source=random", "data.batch_size=32", "data.train_samples=96", "data.eval_samples=32",
    "data.num_indices_per_lookup=3", "logging.log_every_n_steps=1", "training.seed=7",
    "optimizer.lr=0.5", "sharding.sharding_type=table_wise",
    "logging.tensorboard=false", "logging.plot=false",
]
COMMS = {"fp16": ["precision.comms_forward=fp16", "precision.comms_backward=fp16"],
         "bf16": ["precision.comms_forward=bf16", "precision.comms_backward=bf16"]}
CW = ["sharding.sharding_type=column_wise"]
VARIANTS = {
    "fp32": [],
    "fp16": COMMS["fp16"],
    "bf16": COMMS["bf16"],
    "cw_fp32": CW,
    "cw_bf16_fwd_fp16_bwd": CW + ["precision.comms_forward=bf16", "precision.comms_backward=fp16"],
    "autocast": ["precision.dense_autocast=bf16"],
    "fp16_tables": ["precision.embedding_dtype=fp16"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every variant trained for STEPS steps on 2 gloo ranks (one spawn for all)."""
    out = tmp_path_factory.mktemp("precision")
    names = list(VARIANTS)
    run_ranks(2, precision_worker, BASE, [VARIANTS[n] for n in names], STEPS, str(out))
    res = {}
    for i, name in enumerate(names):
        ranks = [torch.load(out / f"variant{i}_rank{r}.pt", weights_only=True) for r in range(2)]
        res[name] = {
            "logits0": torch.cat([o["logits0"] for o in ranks]),
            "logits_after": torch.cat([o["logits_after"] for o in ranks]),
            "losses": ranks[0]["losses"],
            "linear_dtypes": ranks[0]["linear_dtypes"],
            "table_dtypes": sorted(set(ranks[0]["table_dtypes"] + ranks[1]["table_dtypes"])),
        }
    return res


def _diffs(runs, name, ref):
    """Largest |logit| difference before training (forward comms only) and after STEPS steps
    (the backward comms changed the updates too)."""
    return tuple(float((runs[name][k] - runs[ref][k]).abs().max()) for k in ("logits0", "logits_after"))


@pytest.mark.parametrize("name,ref,tol", [
    ("fp16", "fp32", FP16_COMMS_TOL),
    ("bf16", "fp32", BF16_COMMS_TOL),
    ("cw_bf16_fwd_fp16_bwd", "cw_fp32", BF16_COMMS_TOL),
])
def test_compressed_all_to_alls_stay_close_to_fp32(runs, name, ref, tol):
    before, after = _diffs(runs, name, ref)
    assert 0 < before <= tol, (name, before)
    assert 0 < after <= tol, (name, after)
    assert torch.allclose(runs[name]["losses"], runs[ref]["losses"], atol=tol)


def test_bf16_all_to_all_is_really_bf16_on_gloo(runs):
    # TorchRec's registry would turn bf16 into fp16 on CPU; precision.py keeps bf16
    assert max(_diffs(runs, "bf16", "fp32")) > 2 * max(_diffs(runs, "fp16", "fp32"))


def test_bf16_autocast_survives_the_pipeline_trace(runs):
    assert runs["autocast"]["linear_dtypes"] == ["torch.bfloat16"]
    assert runs["fp32"]["linear_dtypes"] == ["torch.float32"]
    before, after = _diffs(runs, "autocast", "fp32")
    assert 0 < before <= AUTOCAST_TOL and 0 < after <= AUTOCAST_TOL, (before, after)
    assert runs["autocast"]["logits0"].dtype == torch.float32


def test_fp16_tables_are_stored_in_fp16_and_train(runs):
    assert runs["fp16_tables"]["table_dtypes"] == ["torch.float16"]
    assert runs["fp32"]["table_dtypes"] == ["torch.float32"]
    before, after = _diffs(runs, "fp16_tables", "fp32")
    assert before <= FP16_TABLES_TOL and 0 < after <= FP16_TABLES_TOL, (before, after)


# --------------------------------------------------------------------------- config


def test_precision_keys_parse_and_validate():
    cfg = load_config(None, ["precision.tf32=true", "precision.dense_autocast=bf16",
                             "precision.embedding_dtype=fp16", "precision.comms_forward=bf16"])
    p = cfg.precision
    assert (p.tf32, p.dense_autocast, p.embedding_dtype, p.comms_forward, p.comms_backward) == (
        True, "bf16", "fp16", "bf16", "fp32")
    assert embedding_data_type(p) == DataType.FP16
    assert all(t.data_type == DataType.FP16 for t in build_train_module(cfg).model.tables)
    for bad in ["precision.dense_autocast=fp16", "precision.embedding_dtype=bf16",
                "precision.comms_backward=int8", "sharding.cache_load_factor=2"]:
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


def test_qcomm_registry():
    cfg = load_config(None, [])
    assert qcomm_codecs_registry(cfg.precision, torch.device("cpu")) is None
    cfg = load_config(None, ["precision.comms_forward=fp16", "precision.comms_backward=bf16"])
    for device in ("cpu", "cuda"):  # building the codecs needs no GPU
        reg = qcomm_codecs_registry(cfg.precision, torch.device(device))
        codecs = reg[CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL.name]
        assert codecs.forward.quantized_dtype == torch.float16
        assert codecs.backward.quantized_dtype == torch.bfloat16, device


# --------------------------------------------------------------------------- planner inputs


def _tables(overrides):
    cfg = load_config(None, overrides)
    return cfg, build_train_module(cfg).model.tables


def test_pooling_factors_reach_the_constraints():
    cfg, tables = _tables(["embeddings.num_embeddings_per_feature=[10,20,30]",
                           "data.multi_hot_sizes=[3,1,7]"])
    pf = pooling_factors(cfg.data, cfg.embeddings)
    assert pf == {"t_cat_0": 3.0, "t_cat_1": 1.0, "t_cat_2": 7.0}
    cons = constraints_for(cfg.sharding, tables, pf)
    assert [cons[t.name].pooling_factors for t in tables] == [[3.0], [1.0], [7.0]]
    # without factors the constraints are as before (TorchRec's default, 1)
    assert constraints_for(cfg.sharding, tables)["t_cat_2"].pooling_factors == [1.0]
    # random bags of 1..k ids: mean (k + 1) / 2; fixed: k; one-hot Criteo: 1
    cfg, _ = _tables(["embeddings.num_embeddings_per_feature=[10,20]",
                      "data.num_indices_per_lookup=4", "data.num_indices_per_lookup_fixed=false"])
    assert pooling_factors(cfg.data, cfg.embeddings) == {"t_cat_0": 2.5, "t_cat_1": 2.5}
    cfg, _ = _tables(["embeddings.num_embeddings_per_feature=[10,20]", "data.num_indices_per_lookup=4"])
    assert pooling_factors(cfg.data, cfg.embeddings) == {"t_cat_0": 4.0, "t_cat_1": 4.0}
    cfg, _ = _tables(["data.source=criteo_kaggle", "data.path=x", "data.num_indices_per_lookup=4"])
    assert set(pooling_factors(cfg.data, cfg.embeddings).values()) == {1.0}
    # quotient-remainder: both tables of a feature get its factor
    cfg, _ = _tables(["embeddings.num_embeddings_per_feature=[1000,20]", "embeddings.qr_threshold=100",
                      "data.multi_hot_sizes=[5,2]"])
    assert pooling_factors(cfg.data, cfg.embeddings) == {"t_cat_0_q": 5.0, "t_cat_0_r": 5.0,
                                                         "t_cat_1": 2.0}


def test_cache_load_factor_sets_cache_params_of_uvm_caching_tables():
    cfg, tables = _tables(["sharding.compute_kernel=fused_uvm_caching",
                           "sharding.cache_load_factor=0.05",
                           "sharding.tables.t_cat_1.compute_kernels=[fused]"])
    cons = constraints_for(cfg.sharding, tables)
    assert cons["t_cat_0"].cache_params.load_factor == 0.05
    assert cons["t_cat_0"].cache_params.prefetch_pipeline is None
    assert cons["t_cat_1"].cache_params is None


def test_prefetch_pipeline_asks_fbgemm_to_keep_the_rows_of_batches_in_flight_cached():
    cfg, tables = _tables(["sharding.tables.t_cat_1.compute_kernels=[fused,fused_uvm_caching]",
                           "sharding.prefetch_pipeline=true"])
    cons = constraints_for(cfg.sharding, tables)
    assert cons["t_cat_0"].cache_params is None
    assert cons["t_cat_1"].cache_params.load_factor is None  # TorchRec's default size
    assert cons["t_cat_1"].cache_params.prefetch_pipeline is True


def test_prefetch_pipeline_without_a_uvm_caching_kernel_is_a_config_error():
    with pytest.raises(ConfigError, match=r"sharding.prefetch_pipeline=True: .*allows"):
        _tables(["sharding.prefetch_pipeline=true"])


def test_topology_takes_the_cuda_device_memory_when_uncapped(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(total_memory=141 * GB))
    hbm = lambda cfg, dev: build_topology(cfg, 1, 1, dev).devices[0].storage.hbm  # noqa: E731
    assert hbm(ShardingConfig(), "cuda") == 141 * GB  # not TorchRec's 32 GB default
    assert hbm(ShardingConfig(hbm_cap_gb=2.5), "cuda") == int(2.5 * GB)
    topo = build_topology(ShardingConfig(ddr_cap_gb=3), 8, 8, "cuda")
    assert topo.devices[5].storage.ddr == 3 * GB  # per rank, as the docstring says
