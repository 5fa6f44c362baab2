"""Numeric formats, from the `precision` config section.

- `tf32`: fp32 matmuls and convolutions may use TF32 tensor cores (CUDA only; on CPU the
  setting changes nothing).
- `dense_autocast=bf16`: the bottom MLP, the interaction and the top MLP run under
  `torch.autocast(dtype=torch.bfloat16)`. The autocast sits inside those modules' own
  forward (see `model.MLP` and `model.Interaction`), not around `DLRM.forward`: TorchRec's
  train pipeline re-traces `DLRM.forward` with torch.fx, which would drop a `with` block
  there, while the non-sharded submodules are fx leaf modules that run as written. Weights,
  gradients, the optimizers and the loss stay fp32; the logits are cast back to fp32.
- `embedding_dtype=fp16`: tables stored in fp16 (`EmbeddingBagConfig.data_type`); FBGEMM's
  kernels (CPU and CUDA) look them up into fp32 pooled outputs and update them with
  stochastic rounding.
- `comms_forward` / `comms_backward`: TorchRec qcomms. The pooled embeddings (forward) and
  their gradients (backward) cross the sharding all-to-alls and reduce-scatters in fp16 or
  bf16 (FBGEMM's QuantizedCommCodec), halving those messages.
"""

from typing import Dict, Optional

import torch
from torchrec.modules.embedding_configs import DataType

from dlrm_torchrec.config import Config, ConfigError, PrecisionConfig

_TABLE_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}


def apply_matmul_precision(cfg: PrecisionConfig, device: torch.device) -> None:
    """Set (or reset) TF32 for fp32 matmuls and cuDNN convolutions on a CUDA device. These
    are process-wide switches; on CPU nothing is changed."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = cfg.tf32


def autocast_dtype(cfg: PrecisionConfig) -> Optional[torch.dtype]:
    """The dtype the dense modules autocast to, or None for plain fp32."""
    return torch.bfloat16 if cfg.dense_autocast == "bf16" else None


def embedding_data_type(cfg: PrecisionConfig) -> DataType:
    """TorchRec's DataType of the embedding tables."""
    return _TABLE_TYPES[cfg.embedding_dtype]


def qcomms_config(cfg: PrecisionConfig):
    """TorchRec's QCommsConfig for the sharding collectives, or None when both are fp32."""
    from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig

    if cfg.comms_forward == "fp32" and cfg.comms_backward == "fp32":
        return None
    types = {"fp32": CommType.FP32, "fp16": CommType.FP16, "bf16": CommType.BF16}
    return QCommsConfig(forward_precision=types[cfg.comms_forward],
                        backward_precision=types[cfg.comms_backward])


def qcomm_codecs_registry(cfg: PrecisionConfig, device: torch.device) -> Optional[Dict]:
    """Codecs per TorchRec CommOp name, for EmbeddingBagCollectionSharder(qcomm_codecs_registry=...).

    TorchRec's `get_qcomm_codecs_registry` replaces bf16 by fp16 on CPU (with a warning that
    gloo lacks bf16). Gloo in the torch versions this project uses does move bf16 tensors
    through the all-to-all that CPU sharding uses (tests/integration/test_precision.py trains with it),
    so on CPU the bf16 codecs the user asked for are put back in."""
    from torchrec.distributed.fbgemm_qcomm_codec import get_qcomm_codecs, get_qcomm_codecs_registry

    qcfg = qcomms_config(cfg)
    if qcfg is None:
        return None
    registry = get_qcomm_codecs_registry(qcfg, device=device)
    if registry is not None and device.type == "cpu" and "bf16" in (cfg.comms_forward,
                                                                   cfg.comms_backward):
        for op in registry:
            registry[op] = get_qcomm_codecs(qcfg)
    return registry


def describe(cfg: PrecisionConfig) -> str:
    """One line for the run log."""
    return (f"precision: tf32 {'on' if cfg.tf32 else 'off'}, dense autocast {cfg.dense_autocast}, "
            f"tables {cfg.embedding_dtype}, all-to-all forward {cfg.comms_forward} / backward "
            f"{cfg.comms_backward}")


def check_precision_supported(cfg: Config, device_type: str) -> None:
    """Reject precision settings this device cannot run, naming the key (ConfigError).

    On CPU every setting runs (tests/integration/test_precision.py): FBGEMM's CPU kernels take fp16
    tables (fused and dense kernels, SGD and the Adagrads), CPU autocast has bf16, and gloo
    carries the fp16/bf16 all-to-alls; tf32 is a no-op there. On CUDA, bf16 autocast needs a
    GPU with bf16 (Ampere or newer)."""
    p = cfg.precision
    if device_type == "cuda" and p.dense_autocast == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"precision.dense_autocast='bf16': {torch.cuda.get_device_name()} has "
                          "no bfloat16 support; use precision.dense_autocast=none")
