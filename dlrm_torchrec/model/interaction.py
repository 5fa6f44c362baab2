"""Feature interactions of DLRM: dot (pairwise dot products of the bottom MLP's output and
the pooled embeddings, lower triangle, with or without each vector with itself), cat
(concatenation) and DCNv2's low-rank cross net."""

from typing import List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet


def dot_interaction_pairs(num_vectors: int, self_interaction: bool) -> Tuple[List[int], List[int]]:
    """(i, j) pairs of the reference's layout: j < i (j <= i with self-interaction), ordered
    by i then j: (1,0), (2,0), (2,1), (3,0), ..."""
    offset = 0 if self_interaction else 1
    rows = [i for i in range(num_vectors) for j in range(i + 1 - offset)]
    cols = [j for i in range(num_vectors) for j in range(i + 1 - offset)]
    return rows, cols


class Interaction(nn.Module):
    """Combines the bottom-MLP output x (B x d) with the pooled embeddings (KeyedTensor of
    F features, each B x d) into the top MLP's input.

    - dot: [x, Z(i, j) for the lower-triangle pairs of Z = T T'], T = [x, e_1..e_F] (B x (F+1) x d).
    - cat: [x, e_1, ..., e_F] (B x d(F+1)).
    - dcn: a DCNv2 low-rank cross net over [x, e_1, ..., e_F] (B x d(F+1)).

    With W ranks each rank's loss is its share's mean; DDP averages the dense gradients and
    TorchRec's all-to-alls divide the embedding gradients by W (comm_ops gradient division),
    so both are gradients of the global-batch mean loss.
    """

    def __init__(self, kind: str, num_features: int, dim: int, self_interaction: bool = False,
                 dcn_num_layers: int = 3, dcn_low_rank_dim: int = 512):
        super().__init__()
        self.kind = kind
        self.num_features = num_features
        self.dim = dim
        if kind == "dot":
            rows, cols = dot_interaction_pairs(num_features + 1, self_interaction)
            # positions of the pairs in the flattened (F+1) x (F+1) matrix: index_select on
            # them (backward: index_add) is about twice as fast as z[:, rows, cols]
            flat = [i * (num_features + 1) + j for i, j in zip(rows, cols)]
            self.register_buffer("pairs", torch.tensor(flat, dtype=torch.long), persistent=False)
        self.crossnet: Optional[LowRankCrossNet] = None
        if kind == "dcn":
            self.crossnet = LowRankCrossNet(
                in_features=dim * (num_features + 1), num_layers=dcn_num_layers,
                low_rank=dcn_low_rank_dim,
            )
        self.autocast_dtype: Optional[torch.dtype] = None  # as MLP's (precision.dense_autocast)

    @property
    def output_dim(self) -> int:
        if self.kind == "dot":
            return self.dim + len(self.pairs)
        return self.dim * (self.num_features + 1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """dense: B x d; sparse: B x (F * d) (the KeyedTensor's values) -> B x output_dim."""
        if self.autocast_dtype is not None:
            with torch.autocast(dense.device.type, dtype=self.autocast_dtype):
                return self._interact(dense, sparse)
        return self._interact(dense, sparse)

    def _interact(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        if self.kind == "dot":
            t = torch.cat([dense.unsqueeze(1), sparse.view(-1, self.num_features, self.dim)], dim=1)
            z = torch.bmm(t, t.transpose(1, 2))  # B x (F+1) x (F+1)
            return torch.cat([dense, z.flatten(1).index_select(1, self.pairs)], dim=1)
        flat = torch.cat([dense, sparse], dim=1)
        if self.crossnet is not None:
            return self.crossnet(flat)
        return flat
