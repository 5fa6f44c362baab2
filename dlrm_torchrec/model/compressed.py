"""The model side of compressed embeddings (`config.embedding_layout` has the rules): the
pooled output of QR table pairs combined, and MD tables projected to the common width.

The MD projections live outside the EmbeddingBagCollection, so DistributedModelParallel
treats them as dense, data-parallel parameters trained by the dense optimizer."""

import math
from typing import Dict, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedTensor

from dlrm_torchrec.config.embedding_layout import FeatureSpec


class CompressedEmbeddingOutput(nn.Module):
    """The EmbeddingBagCollection's pooled KeyedTensor -> the interaction's B x (F * w):
    QR pairs combined by `operation`, MD features projected to the common width (bias-free
    Linear, data-parallel), the rest as they are."""

    def __init__(self, layout: Sequence[FeatureSpec], operation: str):
        super().__init__()
        self.layout = list(layout)
        self.operation = operation
        self.proj = nn.ModuleDict({
            f.feature: nn.Linear(f.tables[0].dim, f.out_dim, bias=False)
            for f in self.layout if f.project
        })

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Xavier-uniform projections, as the reference's PrEmbeddingBag."""
        with torch.no_grad():
            for f in self.layout:
                if f.project:
                    w = self.proj[f.feature].weight
                    bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
                    w.uniform_(-bound, bound, generator=generator)

    def forward(self, pooled: KeyedTensor) -> torch.Tensor:
        by_key: Dict[str, torch.Tensor] = pooled.to_dict()
        out = []
        for f in self.layout:
            if f.qr_collisions:
                q, r = by_key[f.tables[0].feature], by_key[f.tables[1].feature]
                if self.operation == "mult":
                    out.append(q * r)
                elif self.operation == "add":
                    out.append(q + r)
                else:
                    out.append(torch.cat([q, r], dim=1))
            elif f.project:
                out.append(self.proj[f.feature](by_key[f.feature]))
            else:
                out.append(by_key[f.feature])
        return torch.cat(out, dim=1)
