"""The batch a config's predictions are checked on: validation batch 0 of its data source,
as one rank of one serves it."""


def first_val_batch(cfg):
    from dlrm_torchrec.data import build_data_source

    source = build_data_source(cfg.data, cfg.embeddings, cfg.model.dense_in_features, 0, 1)
    return next(source.batches("val", 0))
