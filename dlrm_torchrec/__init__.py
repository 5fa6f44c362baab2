"""dlrm_torchrec: a sharded DLRM trainer on TorchRec."""

__version__ = "0.1.0"
