"""Converters that write the data layout the Criteo sources read: from raw Criteo text
(`preprocess`), from TorchRec's .npy files (`from_torchrec`), from the DLRM reference's
outputs (`from_reference`)."""
