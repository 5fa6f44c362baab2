"""DLRM on TorchRec: EmbeddingBagCollection + bottom MLP + interaction + top MLP.

Shapes: B batch, D dense features, F sparse features, d embedding dimension.
"""

import math
from typing import List, Optional

import torch
import torch.nn.functional as nnf
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm_torchrec.config import Config, ConfigError, feature_names, sparse_output_dim
from dlrm_torchrec.config.embedding_layout import embedding_layout, is_compressed, table_specs
from dlrm_torchrec.data.batch import Batch
from dlrm_torchrec.model.compressed import CompressedEmbeddingOutput
from dlrm_torchrec.model.interaction import Interaction
from dlrm_torchrec.parallel.precision import autocast_dtype, embedding_data_type

# --------------------------------------------------------------------------- init


def _block_generator(seed: int, *keys: int) -> torch.Generator:
    g = torch.Generator()
    h = seed & 0x7FFFFFFF
    for k in keys:  # a small integer hash; only needs to separate streams
        h = (h * 1000003 + k + 0x9E3779B9) % (2**61 - 1)
    g.manual_seed(h)
    return g


INIT_BLOCK_ROWS = 4096


def embedding_init_rows(seed: int, table_index: int, num_rows: int, dim: int,
                        row_start: int, row_end: int) -> torch.Tensor:
    """Rows [row_start, row_end) of table `table_index`'s initial weights, uniform in
    +-sqrt(1 / num_rows) as the reference. Generated in fixed blocks of rows, each from its
    own seeded stream, so any shard computes its rows without materialising the table and
    the values do not depend on how the table is sharded. Returns (row_end - row_start) x dim.
    """
    bound = math.sqrt(1.0 / num_rows)
    out = torch.empty(row_end - row_start, dim)
    first, last = row_start // INIT_BLOCK_ROWS, (row_end - 1) // INIT_BLOCK_ROWS
    for block in range(first, last + 1):
        b0 = block * INIT_BLOCK_ROWS
        b1 = min(b0 + INIT_BLOCK_ROWS, num_rows)
        g = _block_generator(seed, 17, table_index, block)
        vals = torch.rand(b1 - b0, dim, generator=g) * (2 * bound) - bound
        lo, hi = max(b0, row_start), min(b1, row_end)
        out[lo - row_start: hi - row_start] = vals[lo - b0: hi - b0]
    return out


# --------------------------------------------------------------------------- modules


class MLP(nn.Module):
    """Linear layers with ReLU between them; the last layer has no activation when
    `last_activation` is False (the top MLP's sigmoid is applied with the loss).

    Input B x in_features, output B x layers[-1].
    """

    def __init__(self, in_features: int, layers: List[int], last_activation: bool = True):
        super().__init__()
        mods: List[nn.Module] = []
        for i, width in enumerate(layers):
            mods.append(nn.Linear(in_features, width))
            if last_activation or i < len(layers) - 1:
                mods.append(nn.ReLU())
            in_features = width
        self.layers = nn.Sequential(*mods)
        # precision.dense_autocast: set by DLRM. The autocast is entered here, in a module
        # the train pipeline's fx trace keeps as a leaf, so the trace cannot drop it.
        self.autocast_dtype: Optional[torch.dtype] = None

    def reset_parameters(self, generator: torch.Generator) -> None:
        """The reference's init: W ~ N(0, sqrt(2 / (fan_in + fan_out))), b ~ N(0, sqrt(1 / fan_out))."""
        with torch.no_grad():
            for m in self.layers:
                if isinstance(m, nn.Linear):
                    fan_out, fan_in = m.weight.shape
                    m.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)
                    m.bias.normal_(0.0, math.sqrt(1.0 / fan_out), generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self.layers(x)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            return self.layers(x)


class PooledInOrder(nn.Module):
    """KeyedTensor -> B x (F * d) in the configured feature order. A sharded collection
    returns its features grouped by sharding (e.g. by rank for table-wise), so its
    `values()` order depends on the plan; the interaction's layout must not."""

    def __init__(self, feature_names: List[str]):
        super().__init__()
        self.feature_names = list(feature_names)

    def forward(self, pooled: KeyedTensor) -> torch.Tensor:
        if pooled.keys() == self.feature_names:
            return pooled.values()
        by_key = pooled.to_dict()
        return torch.cat([by_key[k] for k in self.feature_names], dim=1)


class DLRM(nn.Module):
    """The model. forward(dense B x D, KJT of F features) -> logits B. With QR the KJT
    carries the split keys (see data/qr_split.py)."""

    def __init__(self, cfg: Config, device: torch.device = torch.device("meta")):
        super().__init__()
        e, m = cfg.embeddings, cfg.model
        names = feature_names(e)
        layout = embedding_layout(e)  # one n x d table t_cat_i per feature unless QR / MD
        self.tables = [
            EmbeddingBagConfig(
                name=t.name, embedding_dim=t.dim, num_embeddings=t.rows,
                feature_names=[t.feature], pooling=PoolingType.SUM,
                data_type=embedding_data_type(cfg.precision),  # precision.embedding_dtype
            )
            for t in table_specs(layout)
        ]
        self.sparse_arch = EmbeddingBagCollection(tables=self.tables, device=device)
        # QR pairs combine and MD tables project to the common width after the EBC
        self.embedding_out: Optional[CompressedEmbeddingOutput] = (
            CompressedEmbeddingOutput(layout, e.qr_operation) if is_compressed(e) else None)
        self.in_order = PooledInOrder(names)
        self.dense_arch = MLP(m.dense_in_features, m.bottom_mlp, last_activation=True)
        width = sparse_output_dim(cfg)
        self.interaction = Interaction(
            m.interaction, len(names), width, m.interaction_itself, m.dcn_num_layers,
            m.dcn_low_rank_dim,
        )
        self.over_arch = MLP(self.interaction.output_dim, m.top_mlp, last_activation=False)
        for mod in (self.dense_arch, self.interaction, self.over_arch):
            mod.autocast_dtype = autocast_dtype(cfg.precision)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        x = self.dense_arch(dense_features)
        pooled: KeyedTensor = self.sparse_arch(sparse_features)
        sparse = self.in_order(pooled) if self.embedding_out is None else self.embedding_out(pooled)
        return self.top(x, sparse)

    def top(self, x: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """Interaction and top MLP: bottom-MLP output x (B x d) and the pooled embeddings in
        feature order (B x F*d) -> logits B. Also the one-rank direct step's (one_rank_step.py),
        which pools with the FBGEMM kernel itself."""
        r = self.interaction(x, sparse)
        return self.over_arch(r).squeeze(-1).float()  # fp32 logits under dense_autocast too

    def reset_dense_parameters(self, seed: int) -> None:
        """Seeded init of every non-embedding parameter (same on every rank)."""
        g = _block_generator(seed, 1)
        self.dense_arch.reset_parameters(g)
        self.over_arch.reset_parameters(g)
        if self.interaction.crossnet is not None:
            with torch.no_grad():
                for name, p in self.interaction.crossnet.named_parameters():
                    if "bias" in name:
                        p.zero_()
                    else:
                        bound = math.sqrt(6.0 / (p.shape[-1] + p.shape[-2]))
                        p.uniform_(-bound, bound, generator=g)
        if self.embedding_out is not None:  # its own stream: the layers above keep theirs
            self.embedding_out.reset_parameters(_block_generator(seed, 2))


class Loss(nn.Module):
    """Per-sample losses on logits, weighted and summed, divided by the per-rank batch.

    Batch weights are 1 (or B / n_real in an epoch's padded last batch) for real samples and 0
    for padding, so the result is this rank's share of the global-batch mean.
    """

    def __init__(self, kind: str, class_weights: List[float], round_targets: bool):
        super().__init__()
        self.kind = kind
        self.round_targets = round_targets
        self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32),
                             persistent=False)

    def per_sample(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.round_targets:
            labels = torch.round(labels)
        if self.kind == "mse":
            return (torch.sigmoid(logits) - labels) ** 2
        bce = nnf.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        if self.kind == "wbce":
            return bce * self.class_weights[labels.long()]
        return bce

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return (self.per_sample(logits, labels) * weights).sum() / weights.numel()


class DLRMTrain(nn.Module):
    """The module given to DistributedModelParallel and the train pipeline.

    forward(batch) -> (loss, (loss, logits, labels, weights)), all detached but the first.
    """

    def __init__(self, model: DLRM, loss: Loss):
        super().__init__()
        self.model = model
        self.loss_fn = loss

    def forward(self, batch: Batch):
        logits = self.model(batch.dense_features, batch.sparse_features)
        loss = self.loss_fn(logits, batch.labels, batch.weights)
        return loss, (loss.detach(), logits.detach(), batch.labels, batch.weights)


def compile_dense_modules(module: DLRMTrain, mode: str) -> List[nn.Module]:
    """torch.compile, in place, the modules that run data parallel: the bottom MLP, the
    interaction, the top MLP, the QR/MD output layer and the loss. Returns them.

    In place (`nn.Module.compile`), so parameter names, checkpoints and DDP are unchanged.
    Each is compiled on its own rather than the whole model because TorchRec's train
    pipeline fx-traces `DLRM.forward` to find the sharded collection's input and keeps these
    modules as leaves of that trace (they hold nothing sharded): they run compiled while the
    sharded embedding lookup around them stays eager. Shapes are static (every batch is
    padded to the full per-rank size), so each compiles once for training and once for an
    evaluation batch of another size; with mode reduce-overhead each becomes CUDA graphs.
    """
    m = module.model
    targets = [m.dense_arch, m.interaction, m.over_arch, module.loss_fn]
    if m.embedding_out is not None:
        targets.append(m.embedding_out)
    for t in targets:
        t.compile(mode=None if mode == "default" else mode, dynamic=False)
    return targets


def check_compile_supported(mode: str, device_type: str) -> None:
    """training.compile needs inductor's code generator for the device: a C++ compiler on
    CPU (g++, or $CXX), Triton on CUDA. Without it the first step would fail deep inside
    torch.compile; this says so before anything is built (ConfigError)."""
    if mode == "none":
        return
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError(f"training.compile={mode!r}: torch.compile on CUDA needs Triton, "
                              "which this environment lacks; install it or set "
                              "training.compile=none")
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # the lookup moved in this torch version: let inductor report it
        return
    try:
        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - inductor raises its own InvalidCxxCompiler
        raise ConfigError(f"training.compile={mode!r}: torch.compile on CPU needs a C++ "
                          f"compiler (g++, or the one $CXX names) and found none "
                          f"({type(e).__name__}); install one or set training.compile=none") from e


def build_train_module(cfg: Config, device: torch.device = torch.device("meta")) -> DLRMTrain:
    """The model with embedding tables on `device` (meta: sharding materialises them) and
    seeded dense layers."""
    torch.manual_seed(cfg.training.seed)
    model = DLRM(cfg, device=device)
    model.reset_dense_parameters(cfg.training.seed)
    t = cfg.training
    return DLRMTrain(model, Loss(t.loss, t.loss_weights, t.round_targets))
