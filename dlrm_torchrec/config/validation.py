"""Cross-field checks of a built `Config`: what each key's type alone cannot say (ranges,
choices, widths that must agree, QR/MD settings that cannot work, per-table sharding keys
that name no table). Each failure is a `ConfigError` naming the key and its value."""

from typing import Any, Optional, Sequence

from dlrm_torchrec.config.embedding_layout import embedding_layout, table_specs
from dlrm_torchrec.config.schema import (
    COMM_PRECISIONS,
    COMPILE_MODES,
    COMPUTE_KERNELS,
    DATA_SOURCES,
    DENSE_AUTOCAST,
    DENSE_OPTIMIZERS,
    EMBEDDING_DTYPES,
    INTERACTIONS,
    LOSSES,
    QR_OPERATIONS,
    SHARDING_TYPES,
    SPARSE_OPTIMIZERS,
    STEP_KINDS,
    Config,
    ConfigError,
    sparse_output_dim,
)


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def _one_of(key: str, value: str, choices: Sequence[str]) -> None:
    _require(value in choices, key, value, f"unknown; choose one of {', '.join(choices)}")


def _check_compression(cfg: Config) -> None:
    """QR / MD settings that cannot work (see embedding_layout.py)."""
    e = cfg.embeddings
    if e.qr_threshold > 0 and e.md_alpha > 0:
        raise ConfigError(f"embeddings.md_alpha={e.md_alpha!r} with embeddings.qr_threshold="
                          f"{e.qr_threshold!r}: quotient-remainder and mixed dimensions cannot "
                          "be combined; set one of them to 0")
    if e.md_alpha <= 0:
        return
    _require(e.md_dim_multiple >= 1, "embeddings.md_dim_multiple", e.md_dim_multiple, "must be >= 1")
    _require(e.dim % e.md_dim_multiple == 0, "embeddings.md_dim_multiple", e.md_dim_multiple,
             f"must divide embeddings.dim ({e.dim})")
    if e.md_round_dims:
        _require(e.dim & (e.dim - 1) == 0, "embeddings.dim", e.dim,
                 "must be a power of two with embeddings.md_round_dims=true")
    # impossible MD dimensions: md_solver raises in embedding_layout, which
    # _check_fused_widths (called next) computes


def _check_fused_widths(cfg: Config) -> None:
    """FBGEMM's fused kernels take rows whose width is a multiple of 4 (TorchRec asserts it
    deep inside sharding); tables on the dense kernel (data-parallel ones among them) take
    any width."""
    e, s = cfg.embeddings, cfg.sharding
    for f in embedding_layout(e):  # md_solver raises for impossible dimensions
        for t in f.tables:
            tcfg = s.tables.get(t.name)
            dense_only = tcfg is not None and tcfg.sharding_types == ["data_parallel"]
            kernels = (list(tcfg.compute_kernels) if tcfg and tcfg.compute_kernels
                       else [s.compute_kernel])
            if s.sharding_type == "data_parallel" and not (tcfg and tcfg.sharding_types):
                dense_only = True
            if t.dim % 4 == 0 or dense_only or all(k == "dense" for k in kernels):
                continue
            if e.md_alpha > 0:
                raise ConfigError(
                    f"embeddings.md_dim_multiple={e.md_dim_multiple!r}: table {t.name} gets "
                    f"dimension {t.dim}, but FBGEMM's fused kernels need multiples of 4; use "
                    "embeddings.md_dim_multiple=4, or data-parallel tables (the dense kernel)")
            raise ConfigError(
                f"embeddings.dim={e.dim!r}: FBGEMM's fused kernels need a multiple of 4 "
                f"(table {t.name}); use a width such as {max(4, e.dim // 4 * 4)} or "
                f"{e.dim // 4 * 4 + 4}, or the dense kernel (sharding.compute_kernel=dense, "
                "or data-parallel tables)")


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Cross-field checks. `world_size` adds the batch-divisibility check."""
    m, e, d, o, s, t = cfg.model, cfg.embeddings, cfg.data, cfg.optimizer, cfg.sharding, cfg.training
    _require(e.dim > 0, "embeddings.dim", e.dim, "must be > 0")
    _require(len(e.num_embeddings_per_feature) > 0, "embeddings.num_embeddings_per_feature",
             e.num_embeddings_per_feature, "needs at least one table")
    for i, n in enumerate(e.num_embeddings_per_feature):
        _require(n > 0, f"embeddings.num_embeddings_per_feature[{i}]", n, "table sizes must be > 0")
    _require(e.max_ind_range >= 0, "embeddings.max_ind_range", e.max_ind_range, "must be >= 0")
    _require(e.qr_threshold >= 0, "embeddings.qr_threshold", e.qr_threshold, "must be >= 0")
    _require(e.qr_collisions >= 1, "embeddings.qr_collisions", e.qr_collisions, "must be >= 1")
    _one_of("embeddings.qr_operation", e.qr_operation, QR_OPERATIONS)
    _require(e.md_alpha >= 0, "embeddings.md_alpha", e.md_alpha, "must be >= 0")
    _check_compression(cfg)
    _check_fused_widths(cfg)

    _one_of("model.interaction", m.interaction, INTERACTIONS)
    _require(m.dense_in_features > 0, "model.dense_in_features", m.dense_in_features, "must be > 0")
    for name in ("bottom_mlp", "top_mlp"):
        layers = getattr(m, name)
        _require(len(layers) > 0, f"model.{name}", layers, "needs at least one layer")
        for i, w in enumerate(layers):
            _require(w > 0, f"model.{name}[{i}]", w, "layer widths must be > 0")
    _require(m.top_mlp[-1] == 1, "model.top_mlp", m.top_mlp, "the last layer must have width 1")
    if m.interaction in ("dot", "cat"):
        want = sparse_output_dim(cfg)
        _require(
            m.bottom_mlp[-1] == want, "model.bottom_mlp", m.bottom_mlp,
            f"the bottom MLP's output ({m.bottom_mlp[-1]}) must equal the embedding width "
            f"({want}, embeddings.dim{' x 2 for qr concat' if want != e.dim else ''}) for "
            f"{m.interaction} interaction",
        )
    if m.interaction == "dcn":
        _require(m.dcn_num_layers > 0, "model.dcn_num_layers", m.dcn_num_layers, "must be > 0")
        _require(m.dcn_low_rank_dim > 0, "model.dcn_low_rank_dim", m.dcn_low_rank_dim, "must be > 0")
    if m.interaction_itself:
        _require(m.interaction == "dot", "model.interaction_itself", True, "only applies to dot")

    _one_of("data.source", d.source, DATA_SOURCES)
    _require(d.batch_size > 0, "data.batch_size", d.batch_size, "must be > 0")
    _require(d.eval_batch_size >= 0, "data.eval_batch_size", d.eval_batch_size, "must be >= 0")
    _require(d.train_samples > 0, "data.train_samples", d.train_samples, "must be > 0")
    _require(d.eval_samples >= 0, "data.eval_samples", d.eval_samples, "must be >= 0")
    _require(d.num_indices_per_lookup > 0, "data.num_indices_per_lookup",
             d.num_indices_per_lookup, "must be > 0")
    if d.multi_hot_sizes:
        _require(len(d.multi_hot_sizes) == len(e.num_embeddings_per_feature),
                 "data.multi_hot_sizes", d.multi_hot_sizes,
                 f"needs one size per table ({len(e.num_embeddings_per_feature)})")
        for i, k in enumerate(d.multi_hot_sizes):
            _require(k > 0, f"data.multi_hot_sizes[{i}]", k, "must be > 0")
    _one_of("data.multi_hot_distribution", d.multi_hot_distribution, ("uniform", "pareto"))
    _one_of("data.id_distribution", d.id_distribution, ("uniform", "zipf"))
    if d.id_distribution == "zipf":
        _require(d.source == "random", "data.id_distribution", d.id_distribution,
                 f"applies to data.source=random, not {d.source}")
        _require(d.zipf_exponent > 0, "data.zipf_exponent", d.zipf_exponent, "must be > 0")
        for i, n in enumerate(e.table_sizes()):
            _require(n < 1 << 40, f"embeddings.num_embeddings_per_feature[{i}]", n,
                     "zipf ids need tables below 2^40 rows")
    _require(d.shuffle_window >= 0, "data.shuffle_window", d.shuffle_window, "must be >= 0")
    _require(d.num_workers >= -1, "data.num_workers", d.num_workers, "must be >= 0, or -1 (auto)")
    if d.source.startswith("criteo"):
        _require(bool(d.path), "data.path", d.path, f"required for data.source={d.source}")
        _require(m.dense_in_features == 13, "model.dense_in_features", m.dense_in_features,
                 "Criteo data has 13 dense features")

    _one_of("optimizer.dense", o.dense, DENSE_OPTIMIZERS)
    _one_of("optimizer.sparse", o.sparse, SPARSE_OPTIMIZERS)
    _require(o.lr > 0, "optimizer.lr", o.lr, "must be > 0")
    _require(o.sparse_lr >= 0, "optimizer.sparse_lr", o.sparse_lr, "must be >= 0")
    _require(o.eps > 0, "optimizer.eps", o.eps, "must be > 0")
    _require(0 <= o.beta1 < 1, "optimizer.beta1", o.beta1, "must be in [0, 1)")
    _require(0 <= o.beta2 < 1, "optimizer.beta2", o.beta2, "must be in [0, 1)")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0")

    ls = cfg.lr_schedule
    for name in ("warmup_steps", "decay_start_step", "num_decay_steps"):
        _require(getattr(ls, name) >= 0, f"lr_schedule.{name}", getattr(ls, name), "must be >= 0")
    _require(ls.decay_start_step >= ls.warmup_steps or ls.num_decay_steps == 0,
             "lr_schedule.decay_start_step", ls.decay_start_step,
             f"must be >= lr_schedule.warmup_steps ({ls.warmup_steps})")

    if s.sharding_type:
        _one_of("sharding.sharding_type", s.sharding_type, SHARDING_TYPES)
    _one_of("sharding.compute_kernel", s.compute_kernel, COMPUTE_KERNELS)
    _one_of("sharding.backend", s.backend, ("auto", "gloo", "nccl"))
    _one_of("sharding.device", s.device, ("auto", "cpu", "cuda"))
    _require(s.hbm_cap_gb >= 0, "sharding.hbm_cap_gb", s.hbm_cap_gb, "must be >= 0")
    _require(s.ddr_cap_gb >= 0, "sharding.ddr_cap_gb", s.ddr_cap_gb, "must be >= 0")
    _require(0 <= s.cache_load_factor <= 1, "sharding.cache_load_factor", s.cache_load_factor,
             "must be in [0, 1]")
    if s.prefetch_pipeline:
        allowed = [s.compute_kernel] + [ck for tc in s.tables.values() for ck in tc.compute_kernels]
        _require("fused_uvm_caching" in allowed, "sharding.prefetch_pipeline", True,
                 "prefetches the HBM cache of fused_uvm_caching tables, and neither "
                 "sharding.compute_kernel nor any sharding.tables.*.compute_kernels allows "
                 "that kernel")
    pr = cfg.precision
    _one_of("precision.dense_autocast", pr.dense_autocast, DENSE_AUTOCAST)
    _one_of("precision.embedding_dtype", pr.embedding_dtype, EMBEDDING_DTYPES)
    _one_of("precision.comms_forward", pr.comms_forward, COMM_PRECISIONS)
    _one_of("precision.comms_backward", pr.comms_backward, COMM_PRECISIONS)

    ordered = [t.name for t in table_specs(embedding_layout(cfg.embeddings))]
    table_names = set(ordered)
    listed = ", ".join(ordered) if len(ordered) <= 8 else f"{ordered[0]} .. {ordered[-1]}"
    for name, tcfg in s.tables.items():
        base = f"sharding.tables.{name}"
        _require(name in table_names or name.split("@")[0] in table_names, base, name,
                 f"no such table (tables are {listed})")
        for st in tcfg.sharding_types:
            _one_of(f"{base}.sharding_types", st, SHARDING_TYPES)
        for ck in tcfg.compute_kernels:
            _one_of(f"{base}.compute_kernels", ck, COMPUTE_KERNELS)

    _require(t.epochs > 0, "training.epochs", t.epochs, "must be > 0")
    _require(t.max_steps >= 0, "training.max_steps", t.max_steps, "must be >= 0")
    _require(t.eval_every_n_steps >= 0, "training.eval_every_n_steps", t.eval_every_n_steps,
             "must be >= 0")
    _one_of("training.loss", t.loss, LOSSES)
    _one_of("training.eval_split", t.eval_split, ("val", "test"))
    _one_of("training.compile", t.compile, COMPILE_MODES)
    _one_of("training.step", t.step, STEP_KINDS)
    _require(len(t.loss_weights) == 2, "training.loss_weights", t.loss_weights,
             "needs two weights: label 0, label 1")
    _require(all(w >= 0 for w in t.loss_weights) and any(w > 0 for w in t.loss_weights),
             "training.loss_weights", t.loss_weights,
             "weights must be >= 0, and one of them > 0")
    _require(0 <= t.target_auc <= 1, "training.target_auc", t.target_auc, "must be in [0, 1]")
    _require(0 <= t.target_accuracy <= 1, "training.target_accuracy", t.target_accuracy,
             "must be in [0, 1]")
    c = cfg.checkpoint
    _require(c.every_n_steps >= 0, "checkpoint.every_n_steps", c.every_n_steps, "must be >= 0")
    _require(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "must be >= 1")
    _require(cfg.logging.log_every_n_steps > 0, "logging.log_every_n_steps",
             cfg.logging.log_every_n_steps, "must be > 0")
    _require(cfg.logging.profile_start_step >= 1, "logging.profile_start_step",
             cfg.logging.profile_start_step, "must be >= 1")
    _require(cfg.logging.profile_steps >= 1, "logging.profile_steps", cfg.logging.profile_steps,
             "must be >= 1")

    if world_size is not None:
        _require(d.batch_size % world_size == 0, "data.batch_size", d.batch_size,
                 f"must be divisible by the world size ({world_size})")
        eb = d.eval_batch_size or d.batch_size
        _require(eb % world_size == 0, "data.eval_batch_size", eb,
                 f"must be divisible by the world size ({world_size})")
