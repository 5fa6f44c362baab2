"""The model: DLRM (`dlrm`), its interactions (`interaction`) and the model side of
compressed embeddings (`compressed`)."""
