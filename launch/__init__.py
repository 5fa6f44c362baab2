"""TorchX components and cluster scripts that launch dlrm_torchrec (see components.py)."""
