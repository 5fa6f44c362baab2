"""Quotient-remainder and mixed-dimension embeddings in sharded training: on 2 gloo ranks
they give the forward output and the parameters after several optimizer steps of an
independent single-process plain-PyTorch reference that pools the tables by the rules
written out here. (The lookups and the MD rule by hand: tests/unit/test_compression.py.)"""

import math

import torch

from dlrm_torchrec.config import load_config
from dlrm_torchrec.config.embedding_layout import md_solver
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
    written from docs/reference.md's rules on the raw ids. tables: every EBC table in order."""

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
