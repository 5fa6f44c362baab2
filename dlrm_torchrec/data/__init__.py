"""Data sources. Each one yields this rank's `Batch`es of a split:

    source.num_samples(split) -> int            # real samples in the split (all ranks)
    source.num_batches(split) -> int            # global batches per epoch (tail kept)
    source.batches(split, epoch, start_batch)   # Iterator[Batch], this rank's share

Splits are "train", "val" and "test". A global batch of B samples is cut into world-size
contiguous shares of B / W; the last batch of an epoch is padded with weight-0 samples.
"""

from typing import List

from dlrm_torchrec.config import DataConfig, EmbeddingsConfig

__all__ = ["Batch", "SourceWrapper", "build_data_source", "bag_sizes"]


def __getattr__(name: str):
    # Batch needs torch and torchrec; the preprocessing CLI, which imports this package,
    # does not, and starts seconds faster without them
    if name == "Batch":
        from dlrm_torchrec.data.batch import Batch

        return Batch
    raise AttributeError(name)


class SourceWrapper:
    """Base of a source that changes how another source's batches are made (`batches`) and
    is that source in everything else: attributes it lacks are the wrapped source's."""

    def __init__(self, source):
        self.source = source

    def __getattr__(self, name: str):
        if name == "source":  # not yet set (unpickling): no delegation loop
            raise AttributeError(name)
        return getattr(self.source, name)


def bag_sizes(data: DataConfig, num_features: int) -> List[int]:
    """Ids per bag of each feature: multi_hot_sizes, else num_indices_per_lookup."""
    return list(data.multi_hot_sizes) or [data.num_indices_per_lookup] * num_features


def build_data_source(data: DataConfig, embeddings: EmbeddingsConfig, dense_in_features: int,
                      rank: int, world_size: int):
    """The configured source, producing `rank`'s share."""
    eval_batch = data.eval_batch_size or data.batch_size
    sizes = embeddings.table_sizes()
    if data.source in ("random", "synthetic"):
        from dlrm_torchrec.data.synthetic import GeneratedSource

        return GeneratedSource(
            kind=data.source, table_sizes=sizes, dense_in_features=dense_in_features,
            batch_size=data.batch_size, eval_batch_size=eval_batch,
            train_samples=data.train_samples, eval_samples=data.eval_samples,
            bag_sizes=bag_sizes(data, len(sizes)),
            fixed_bag_size=data.num_indices_per_lookup_fixed or bool(data.multi_hot_sizes),
            seed=data.seed, rank=rank, world_size=world_size,
            multi_hot_distribution=data.multi_hot_distribution,
            id_distribution=data.id_distribution, zipf_exponent=data.zipf_exponent,
        )
    from dlrm_torchrec.data.criteo import CriteoSource

    return CriteoSource(data, embeddings, rank=rank, world_size=world_size)
