"""The tables an embeddings section stands for: quotient-remainder (QR, Shi et al. 2019)
and mixed dimensions (MD, Ginart et al. 2019) as plain arithmetic on the config, with no
torch. Validation, the model, the id split of the data, the planner and export all read
the layout from here (docs/reference.md states the rules).

Both change only which tables the `EmbeddingBagCollection` holds and what happens to its
pooled output before the interaction, so the planner shards every table like any other.

Quotient-remainder (`embeddings.qr_threshold` > 0): a feature whose table has n > threshold
rows becomes two KJT keys, cat_i_q (ids id // c) and cat_i_r (ids id mod c), looked up in
tables t_cat_i_q (ceil(n / c) rows) and t_cat_i_r (c rows). The id split is a batch
transform (`data.qr_split`), the combination of the two pooled vectors a module of the
model (`model.compressed`). With concat every feature is 2d wide: compressed features by
concatenation, the others by tables of dimension 2d, so the interaction sees one width.

Mixed dimensions (`embeddings.md_alpha` > 0): table k gets dimension d_k from `md_solver`
(base dimension d0 = embeddings.dim), rounded up to a multiple of `embeddings.md_dim_multiple`
because FBGEMM's fused kernels need multiples of 4 (only data-parallel tables, which use
the dense kernel, can keep other widths). A table with d_k < d0 is followed by a
bias-free Linear d_k -> d0 (`model.compressed`).

QR and MD together are rejected (ConfigError): the reference's mix, where QR wins per table
and MD sizes the rest, is not offered.

Initial weights: table j of `embedding_layout`'s order (its position in `DLRM.tables`) is
seeded as `embedding_init_rows(seed, j, rows, dim, ...)`, so the uncompressed layout keeps
its indices 0..F-1 and every compressed table has its own stream.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from dlrm_torchrec.config.schema import ConfigError, EmbeddingsConfig, feature_names

BYTES_PER_FLOAT = 4


# --------------------------------------------------------------------------- mixed dimensions


def md_solver(sizes: Sequence[int], alpha: float, d0: int, round_dims: bool = False,
              counts: Optional[Sequence[float]] = None) -> List[int]:
    """Per-table dimensions by the power-law rule of the reference's `md_solver`.

    Tables are ordered by row count n ascending (ties keep their order); with
    n'_k = n_k / counts_k (counts: per-table feature frequencies, default 1),
    lambda = d0 * n'_min^alpha and d_k = round(lambda * n'_k^-alpha), at least 1; the
    smallest table gets exactly d0. With `round_dims` each d_k becomes the nearest power of
    two (2^round(log2 d_k)). `round` is half-to-even, as torch.round. Returns the dimensions
    in the input order. Raises ConfigError when a dimension exceeds d0.
    """
    n = len(sizes)
    eff = [float(s) / float(counts[i]) if counts is not None else float(s)
           for i, s in enumerate(sizes)]
    order = sorted(range(n), key=lambda i: sizes[i])
    lam = d0 * eff[order[0]] ** alpha
    dims = [0] * n
    for pos, i in enumerate(order):
        d = d0 if pos == 0 else max(1, round(lam * eff[i] ** -alpha))
        if round_dims:
            d = 2 ** round(math.log2(d))
        if d > d0:
            raise ConfigError(
                f"embeddings.md_alpha={alpha!r}: table {i} ({sizes[i]} rows) would get "
                f"dimension {d} > embeddings.dim={d0}; mixed dimensions only shrink tables")
        dims[i] = d
    return dims


def _round_up(d: int, multiple: int) -> int:
    return -(-d // multiple) * multiple


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class TableSpec:
    """One EmbeddingBagCollection table: name t_<key>, its KJT key, rows, dimension."""

    name: str
    feature: str
    rows: int
    dim: int


@dataclass(frozen=True)
class FeatureSpec:
    """How one data feature (KJT key cat_i) is embedded.

    tables: one table, or (quotient, remainder) for QR. qr_collisions: c, or 0 when not
    QR-compressed. out_dim: the width the interaction sees. project: an MD feature whose
    table is narrower than out_dim (a Linear table dim -> out_dim follows).
    """

    feature: str
    rows: int
    tables: Tuple[TableSpec, ...]
    qr_collisions: int
    out_dim: int
    project: bool


def qr_enabled(e: EmbeddingsConfig) -> bool:
    return e.qr_threshold > 0


def md_enabled(e: EmbeddingsConfig) -> bool:
    return e.md_alpha > 0


def is_compressed(e: EmbeddingsConfig) -> bool:
    """True when the tables or the pooled output differ from one d-wide table per feature."""
    return qr_enabled(e) or md_enabled(e)


def embedding_layout(e: EmbeddingsConfig) -> List[FeatureSpec]:
    """The tables of every feature, in feature order. Without QR or MD: one table t_cat_i of
    n_i x d per feature."""
    sizes = e.table_sizes()
    names = feature_names(e)
    out = []
    if md_enabled(e):
        dims = [_round_up(d, e.md_dim_multiple)
                for d in md_solver(sizes, e.md_alpha, e.dim, e.md_round_dims)]
        for name, n, d in zip(names, sizes, dims):
            out.append(FeatureSpec(name, n, (TableSpec(f"t_{name}", name, n, d),), 0, e.dim,
                                   project=d < e.dim))
        return out
    width = 2 * e.dim if qr_enabled(e) and e.qr_operation == "concat" else e.dim
    for name, n in zip(names, sizes):
        if qr_enabled(e) and n > e.qr_threshold:
            c = e.qr_collisions
            tables = (TableSpec(f"t_{name}_q", f"{name}_q", -(-n // c), e.dim),
                      TableSpec(f"t_{name}_r", f"{name}_r", c, e.dim))
            out.append(FeatureSpec(name, n, tables, c, width, project=False))
        else:
            out.append(FeatureSpec(name, n, (TableSpec(f"t_{name}", name, n, width),), 0, width,
                                   project=False))
    return out


def table_specs(layout: Sequence[FeatureSpec]) -> List[TableSpec]:
    """Every table in EmbeddingBagCollection order (which is also the init index order)."""
    return [t for f in layout for t in f.tables]


# --------------------------------------------------------------------------- memory


def memory_bytes(e: EmbeddingsConfig) -> Tuple[int, int, int]:
    """fp32 bytes of (the configured tables, the MD projections, the uncompressed n x d
    tables); optimizer state not included."""
    layout = embedding_layout(e)
    used = sum(t.rows * t.dim for t in table_specs(layout))
    proj = sum(f.tables[0].dim * f.out_dim for f in layout if f.project)
    plain = sum(n * e.dim for n in e.table_sizes())
    return used * BYTES_PER_FLOAT, proj * BYTES_PER_FLOAT, plain * BYTES_PER_FLOAT


def memory_report(e: EmbeddingsConfig) -> str:
    """One line: memory of the configured tables (plus MD projections) against the
    uncompressed n x d tables."""
    layout = embedding_layout(e)
    used, proj, plain = memory_bytes(e)
    if md_enabled(e):
        how = (f"MD alpha={e.md_alpha:g} dims {[f.tables[0].dim for f in layout]}, "
               f"projections {proj / 2**20:.3f} MiB replicated")
    else:
        how = (f"QR c={e.qr_collisions} {e.qr_operation} on "
               f"{sum(1 for f in layout if f.qr_collisions)} of {len(layout)} features")
    total = used + proj
    return (f"embedding memory: {total / 2**20:.3f} MiB in {len(table_specs(layout))} tables "
            f"({how}) vs "
            f"{plain / 2**20:.3f} MiB uncompressed ({plain / max(total, 1):.2f}x smaller)")
