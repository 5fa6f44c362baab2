"""The quotient-remainder id split as a batch transform: a QR feature cat_i becomes the two
keys cat_i_q (id // c) and cat_i_r (id mod c) before the batch reaches the model.

It is a transform of the batch, not a step inside the model, because TorchRec's
TrainPipelineSparseDist only overlaps the input distribution of a sharded module whose
input is read straight off the batch. Multi-hot bags follow the reference: each of the
two tables is sum-pooled over the whole bag (`model.compressed` combines them), so for a
bag {a, b} under mult the result is (q_a + q_b) * (r_a + r_b), not q_a * r_a + q_b * r_b.
"""

import dataclasses
from typing import Iterator, List, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_torchrec.config import EmbeddingsConfig
from dlrm_torchrec.config.embedding_layout import FeatureSpec, embedding_layout
from dlrm_torchrec.data import SourceWrapper


def split_qr_ids(kjt: KeyedJaggedTensor, layout: Sequence[FeatureSpec]) -> KeyedJaggedTensor:
    """cat_i -> (cat_i_q: id // c, cat_i_r: id mod c) for QR features, same bag lengths; other
    keys pass unchanged. Keys follow `layout`'s table order. Per-id weights are duplicated."""
    stride = kjt.stride()
    index = {k: i for i, k in enumerate(kjt.keys())}
    values, lengths, weights = kjt.values(), kjt.lengths(), kjt.weights_or_none()
    offsets = kjt.offset_per_key()
    keys: List[str] = []
    vals: List[torch.Tensor] = []
    lens: List[torch.Tensor] = []
    wts: List[torch.Tensor] = []
    per_key: List[int] = []
    for spec in layout:
        i = index[spec.feature]
        v = values[offsets[i]:offsets[i + 1]]
        ln = lengths[i * stride:(i + 1) * stride]
        w = weights[offsets[i]:offsets[i + 1]] if weights is not None else None
        if spec.qr_collisions:
            c = spec.qr_collisions
            parts = [torch.div(v, c, rounding_mode="floor"), torch.remainder(v, c)]
        else:
            parts = [v]
        for table, part in zip(spec.tables, parts):
            keys.append(table.feature)
            vals.append(part)
            lens.append(ln)
            per_key.append(offsets[i + 1] - offsets[i])
            if w is not None:
                wts.append(w)
    cum = [0]
    for n in per_key:
        cum.append(cum[-1] + n)
    return KeyedJaggedTensor(
        keys=keys, values=torch.cat(vals), lengths=torch.cat(lens),
        weights=torch.cat(wts) if weights is not None else None, stride=stride,
        length_per_key=per_key, offset_per_key=cum,
    )


class QRSplitSource(SourceWrapper):
    """A data source whose batches carry the QR-split KJT (`split_qr_ids`); everything
    else is the wrapped source's."""

    def __init__(self, source, layout: Sequence[FeatureSpec]):
        super().__init__(source)
        self.layout = list(layout)

    def batches(self, *args, **kwargs) -> Iterator:
        for b in self.source.batches(*args, **kwargs):
            yield dataclasses.replace(b, sparse_features=split_qr_ids(b.sparse_features, self.layout))


def wrap_source(source, e: EmbeddingsConfig):
    """`source` itself unless some feature is QR-compressed."""
    layout = embedding_layout(e)
    if any(f.qr_collisions for f in layout):
        return QRSplitSource(source, layout)
    return source
