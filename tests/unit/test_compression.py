"""Quotient-remainder and mixed-dimension embeddings (dlrm_torchrec/compression.py): the
lookups against hand-computed rows, the MD rule against hand-computed dimensions, config
errors, the memory line, and sharded training on 2 gloo ranks against an independent
plain-PyTorch reference."""

import math

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
from dlrm_torchrec.data import build_data_source
from dlrm_torchrec.data.qr_split import split_qr_ids
from dlrm_torchrec.model.dlrm import DLRM, build_train_module, embedding_init_rows
from tests.dist_utils import run_ranks
from tests.parity_worker import run as parity_worker
from tests.reference_dlrm import (
    ReferenceDLRM,
    dense_param_names,
    linear_layers,
    parity_failures,
    train_reference,
)
from tests.test_sharded_equals_unsharded import ADAGRAD, BASE, SGD, STEPS, TOL

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


# --------------------------------------------------------------------------- sharded parity


QR = ["embeddings.qr_threshold=35", "embeddings.qr_collisions=4"]
VARIANTS = [
    SGD + QR + ["embeddings.qr_operation=mult", "sharding.sharding_type=table_wise"],
    ADAGRAD + QR + ["embeddings.qr_operation=add", "sharding.sharding_type=column_wise"],
    SGD + QR + ["embeddings.qr_operation=concat", "model.bottom_mlp=[16,16]",
                "model.interaction=cat", "sharding.sharding_type=data_parallel",
                "sharding.compute_kernel=dense"],
    # the rule's own dimensions 7, 6, 8, 6 (data-parallel tables: no multiple of 4 needed)
    SGD + ["embeddings.md_alpha=0.5", "embeddings.md_dim_multiple=1",
           "sharding.sharding_type=data_parallel", "sharding.compute_kernel=dense"],
    # fused kernel, powers of two: 8 (8 * 30 / 40 = 6 -> 8), 4, 8, 4 (8 * 30 / 50 = 4.8 -> 5 -> 4)
    ADAGRAD + ["embeddings.md_alpha=1.0", "embeddings.md_round_dims=true",
               "sharding.sharding_type=column_wise"],
]


class CompressedReference(ReferenceDLRM):
    """ReferenceDLRM whose features are pooled from QR table pairs or MD tables + projections,
    written from REFERENCE.md's rules on the raw ids. tables: every EBC table in order."""

    def __init__(self, tables, bottom, top, interaction, sizes, qr, md_proj):
        super().__init__(tables, bottom, top, interaction)
        self.sizes = sizes
        self.qr = qr  # (threshold, collisions, operation) or None
        self.md_proj = {f: p.clone().double().requires_grad_() for f, p in md_proj.items()}

    def dense_params(self):
        return super().dense_params() + [self.md_proj[f] for f in sorted(self.md_proj)]

    def pooled(self, ids, batch_size):
        out, k = [], 0
        for f, bags in enumerate(ids):
            if self.qr is not None and self.sizes[f] > self.qr[0]:
                c, op = self.qr[1], self.qr[2]
                wq, wr = self.tables[k], self.tables[k + 1]
                k += 2
                q = torch.stack([self.bag_sum(wq, [v // c for v in b]) for b in bags])
                r = torch.stack([self.bag_sum(wr, [v % c for v in b]) for b in bags])
                out.append(q * r if op == "mult" else q + r if op == "add" else torch.cat([q, r], 1))
                continue
            e = torch.stack([self.bag_sum(self.tables[k], b) for b in bags])
            k += 1
            out.append(e @ self.md_proj[f].T if f in self.md_proj else e)
        return out


def reference_run(overrides):
    cfg = load_config(None, BASE + overrides)
    e = cfg.embeddings
    seed = cfg.training.seed
    sizes = e.table_sizes()
    names, tables = [], []
    # the sharded model's init convention: EBC table j is embedding_init_rows(seed, j, ...)
    qr = (e.qr_threshold, e.qr_collisions, e.qr_operation) if e.qr_threshold else None
    dims = []
    if e.md_alpha:
        dims = md_solver(sizes, e.md_alpha, e.dim, e.md_round_dims)
        dims = [math.ceil(d / e.md_dim_multiple) * e.md_dim_multiple for d in dims]
    for f, n in enumerate(sizes):
        if qr and n > qr[0]:
            shapes = [(f"t_cat_{f}_q", -(-n // qr[1]), e.dim), (f"t_cat_{f}_r", qr[1], e.dim)]
        else:
            width = dims[f] if dims else 2 * e.dim if qr and qr[2] == "concat" else e.dim
            shapes = [(f"t_cat_{f}", n, width)]
        for name, rows, d in shapes:
            tables.append(embedding_init_rows(seed, len(names), rows, d, 0, rows))
            names.append(name)
    module = build_train_module(cfg, device=torch.device("cpu"))
    proj = {}
    if e.md_alpha:
        proj = {int(k.split("_")[1]): p.weight.detach()
                for k, p in module.model.embedding_out.proj.items()}
    ref = CompressedReference(tables, linear_layers(module.model.dense_arch),
                              linear_layers(module.model.over_arch), cfg.model.interaction,
                              sizes, qr, proj)
    source = build_data_source(cfg.data, e, cfg.model.dense_in_features, 0, 1)
    logits0, losses = train_reference(ref, cfg, source, STEPS)
    dense_names = dense_param_names(module)
    dense_names += [f"model.embedding_out.proj.cat_{f}.weight" for f in sorted(proj)]
    return ref, names, logits0, losses, dense_names


def test_sharded_qr_and_md_training_matches_single_process_reference(tmp_path):
    run_ranks(2, parity_worker, BASE, VARIANTS, STEPS, str(tmp_path))
    failures = []
    for i, overrides in enumerate(VARIANTS):
        ref, names, logits0, losses, dense_names = reference_run(overrides)
        outs = [torch.load(tmp_path / f"variant{i}_rank{r}.pt", weights_only=True) for r in range(2)]
        label = " ".join(o.split("=")[1] for o in overrides
                         if any(k in o for k in ("sharding_type", "qr_operation", "md_alpha")))
        failures += parity_failures(label, outs, ref, names, logits0, losses, dense_names,
                                    STEPS, TOL)
    assert not failures, "\n".join(failures)
