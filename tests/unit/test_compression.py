"""Quotient-remainder and mixed-dimension embeddings (dlrm_torchrec/config/embedding_layout.py,
model/compressed.py, data/qr_split.py): the
lookups against hand-computed rows, the MD rule against hand-computed dimensions, config
errors and the memory line. (Sharded training of these tables on 2 gloo ranks against an
independent plain-PyTorch reference: tests/integration/test_compression_parity.py.)"""

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_torchrec.config import ConfigError, load_config
from dlrm_torchrec.config.embedding_layout import (
    embedding_layout,
    md_solver,
    memory_report,
    table_specs,
)
from dlrm_torchrec.data.qr_split import split_qr_ids
from dlrm_torchrec.model.dlrm import DLRM

SMALL = ["model.dense_in_features=3", "model.bottom_mlp=[4]", "model.top_mlp=[1]",
         "embeddings.dim=4", "embeddings.num_embeddings_per_feature=[10,3]"]


def _kjt(bags0, bags1):
    """KJT cat_0, cat_1 from per-sample id lists."""
    values = [i for b in bags0 + bags1 for i in b]
    lengths = [len(b) for b in bags0 + bags1]
    return KeyedJaggedTensor(keys=["cat_0", "cat_1"], values=torch.tensor(values),
                             lengths=torch.tensor(lengths), stride=len(bags0))


def _fill_tables(model: DLRM) -> dict:
    """Give every table distinct known values; returns name -> weight."""
    weights = {}
    with torch.no_grad():
        for k, (name, w) in enumerate(model.sparse_arch.embedding_bags.items()):
            vals = torch.arange(w.weight.numel(), dtype=torch.float32).view_as(w.weight.data)
            w.weight.copy_(0.1 * vals + k)
            weights[name] = w.weight.detach().clone()
    return weights


def _sparse_out(model: DLRM, kjt: KeyedJaggedTensor) -> torch.Tensor:
    pooled = model.sparse_arch(kjt)
    return pooled.values() if model.embedding_out is None else model.embedding_out(pooled)


# --------------------------------------------------------------------------- QR


def test_qr_split_maps_ids_to_quotient_and_remainder_keys():
    cfg = load_config(None, SMALL + ["embeddings.qr_threshold=5", "embeddings.qr_collisions=3"])
    out = split_qr_ids(_kjt([[7, 2], [], [9]], [[1], [0, 2], [2]]), embedding_layout(cfg.embeddings))
    assert out.keys() == ["cat_0_q", "cat_0_r", "cat_1"]
    assert out["cat_0_q"].values().tolist() == [2, 0, 3]
    assert out["cat_0_r"].values().tolist() == [1, 2, 0]
    assert out["cat_0_q"].lengths().tolist() == out["cat_0_r"].lengths().tolist() == [2, 0, 1]
    assert out["cat_1"].values().tolist() == [1, 0, 2, 2]


@pytest.mark.parametrize("op", ["mult", "add", "concat"])
def test_qr_lookup_combines_the_bag_sums_of_both_tables(op):
    bottom = "[8]" if op == "concat" else "[4]"
    cfg = load_config(None, SMALL + ["embeddings.qr_threshold=5", "embeddings.qr_collisions=3",
                                     f"embeddings.qr_operation={op}", f"model.bottom_mlp={bottom}"])
    model = DLRM(cfg, device=torch.device("cpu"))
    assert [(t.name, t.num_embeddings) for t in model.tables] == [
        ("t_cat_0_q", 4), ("t_cat_0_r", 3), ("t_cat_1", 3)]
    w = _fill_tables(model)
    bags0, bags1 = [[7, 2], [], [9], [4, 4, 5]], [[1], [0, 2], [], [2]]
    got = _sparse_out(model, split_qr_ids(_kjt(bags0, bags1), embedding_layout(cfg.embeddings)))
    width = 8 if op == "concat" else 4
    assert got.shape == (4, 2 * width)
    for i, bag in enumerate(bags0):
        # each table pooled over the whole bag first, then combined (the reference's order)
        q = sum((w["t_cat_0_q"][v // 3] for v in bag), torch.zeros(4))
        r = sum((w["t_cat_0_r"][v % 3] for v in bag), torch.zeros(4))
        want = {"mult": q * r, "add": q + r, "concat": torch.cat([q, r])}[op]
        torch.testing.assert_close(got[i, :width], want)
        plain = sum((w["t_cat_1"][v] for v in bags1[i]), torch.zeros(width))
        torch.testing.assert_close(got[i, width:], plain)


def test_qr_leaves_tables_at_or_below_the_threshold_alone():
    cfg = load_config(None, ["embeddings.num_embeddings_per_feature=[100,101,5]",
                             "embeddings.qr_threshold=100", "embeddings.qr_collisions=7"])
    specs = [(t.name, t.rows) for t in table_specs(embedding_layout(cfg.embeddings))]
    assert specs == [("t_cat_0", 100), ("t_cat_1_q", 15), ("t_cat_1_r", 7), ("t_cat_2", 5)]


def test_default_layout_is_one_plain_table_per_feature():
    cfg = load_config(None, ["embeddings.num_embeddings_per_feature=[10,20]"])
    specs = [(t.name, t.feature, t.rows, t.dim) for t in table_specs(embedding_layout(cfg.embeddings))]
    assert specs == [("t_cat_0", "cat_0", 10, 16), ("t_cat_1", "cat_1", 20, 16)]
    assert DLRM(cfg).embedding_out is None


# --------------------------------------------------------------------------- MD


def test_md_dims_follow_the_power_law_rule():
    # sorted sizes 10, 100, 1000, 10000; lambda = 16 * 10^0.5 = 50.60
    # d = 16 (smallest), 50.60 / 10 = 5.06 -> 5, 50.60 / 31.62 = 1.60 -> 2, 0.506 -> 1 (at least 1)
    sizes = [1000, 10, 100, 10000]
    assert md_solver(sizes, 0.5, 16) == [2, 16, 5, 1]
    # powers of two: 2 -> 2, 5 -> 4 (log2 5 = 2.32), 1 -> 1
    assert md_solver(sizes, 0.5, 16, round_dims=True) == [2, 16, 4, 1]
    # alpha 1: lambda = 80; 80 / 40 = 2, 80 / 30 = 2.67 -> 3, 80 / 25 = 3.2 -> 3; ties keep order
    assert md_solver([40, 10, 30, 10, 25], 1.0, 8) == [2, 8, 3, 8, 3]
    # feature counts divide the sizes: 100 / 10 = 10 rows per count, as the smallest
    assert md_solver([10, 100], 1.0, 8, counts=[1, 10]) == [8, 8]


def test_md_dims_above_the_base_dimension_are_an_error():
    with pytest.raises(ConfigError, match=r"embeddings.md_alpha=1.0: table 1 .* dimension 80 > "):
        md_solver([10, 100], 1.0, 8, counts=[1, 100])


def test_md_layout_rounds_up_to_the_dim_multiple_and_projects_narrow_tables():
    base = ["embeddings.dim=16", "embeddings.num_embeddings_per_feature=[1000,10,100,10000]",
            "embeddings.md_alpha=0.5"]
    e = load_config(None, base + ["sharding.compute_kernel=dense",
                                  "embeddings.md_dim_multiple=1"]).embeddings
    assert [f.tables[0].dim for f in embedding_layout(e)] == [2, 16, 5, 1]
    e = load_config(None, base).embeddings  # the default multiple, 4
    layout = embedding_layout(e)
    assert [f.tables[0].dim for f in layout] == [4, 16, 8, 4]
    assert [f.project for f in layout] == [True, False, True, True]


def test_md_model_projects_each_narrow_table_to_the_base_dimension():
    # dims 4 (smallest) and 4 * 10 / 160 = 0.25 -> at least 1
    cfg = load_config(None, SMALL + ["embeddings.num_embeddings_per_feature=[10,160]",
                                     "embeddings.md_alpha=1.0", "embeddings.md_dim_multiple=1",
                                     "sharding.compute_kernel=dense"])
    model = DLRM(cfg, device=torch.device("cpu"))
    assert [(t.name, t.embedding_dim) for t in model.tables] == [("t_cat_0", 4), ("t_cat_1", 1)]
    model.reset_dense_parameters(3)
    w = _fill_tables(model)
    proj = model.embedding_out.proj["cat_1"].weight.detach()
    assert proj.shape == (4, 1)
    bags0, bags1 = [[1, 2], [9]], [[5, 150], []]
    got = _sparse_out(model, _kjt(bags0, bags1))
    for i in range(2):
        e0 = sum((w["t_cat_0"][v] for v in bags0[i]), torch.zeros(4))
        e1 = sum((w["t_cat_1"][v] for v in bags1[i]), torch.zeros(1)) @ proj.T
        torch.testing.assert_close(got[i], torch.cat([e0, e1]))


@pytest.mark.parametrize("overrides, message", [
    (["embeddings.qr_threshold=10", "embeddings.md_alpha=0.5"],
     "embeddings.md_alpha=0.5 with embeddings.qr_threshold=10: quotient-remainder and mixed"),
    (["embeddings.dim=12", "model.bottom_mlp=[12]", "embeddings.md_alpha=0.5",
      "embeddings.md_round_dims=true"], "embeddings.dim=12: must be a power of two"),
    (["embeddings.md_alpha=0.5", "embeddings.md_dim_multiple=3"],
     "embeddings.md_dim_multiple=3: must divide embeddings.dim"),
    (["embeddings.md_alpha=0.5", "embeddings.md_dim_multiple=1"],
     "embeddings.md_dim_multiple=1: table t_cat_1 gets dimension 7, but FBGEMM"),
    (["embeddings.qr_threshold=20", "sharding.tables.t_cat_1.sharding_types=[table_wise]"],
     "sharding.tables.t_cat_1='t_cat_1': no such table (tables are t_cat_0, t_cat_1_q, t_cat_1_r)"),
])
def test_impossible_compression_settings_name_the_key(overrides, message):
    base = ["embeddings.dim=16", "model.bottom_mlp=[16]", "embeddings.num_embeddings_per_feature=[10,60]"]
    with pytest.raises(ConfigError) as err:
        load_config(None, base + overrides)
    assert message in str(err.value)


def test_md_dims_need_no_multiple_of_4_on_dense_or_data_parallel_tables():
    base = ["embeddings.dim=16", "model.bottom_mlp=[16]", "embeddings.num_embeddings_per_feature=[10,60]",
            "embeddings.md_alpha=0.5", "embeddings.md_dim_multiple=1"]
    load_config(None, base + ["sharding.compute_kernel=dense"])
    load_config(None, base + ["sharding.tables.t_cat_1.sharding_types=[data_parallel]"])


def test_memory_report_compares_with_the_uncompressed_tables():
    e = load_config(None, ["embeddings.dim=4", "model.bottom_mlp=[4]",
                           "embeddings.num_embeddings_per_feature=[1000,10]",
                           "embeddings.qr_threshold=100", "embeddings.qr_collisions=10"]).embeddings
    # (100 + 10 + 10) x 4 floats against (1000 + 10) x 4
    line = memory_report(e)
    assert f"{120 * 16 / 2**20:.3f} MiB in 3 tables" in line
    assert f"vs {1010 * 16 / 2**20:.3f} MiB uncompressed ({1010 / 120:.2f}x smaller)" in line
