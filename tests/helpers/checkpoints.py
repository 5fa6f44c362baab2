"""A checkpoint written without training (`fake_checkpoint`): a randomly initialised model
saved by one process in the trainer's layout, for the export, ONNX, scoring and inference
benchmark code that starts from a checkpoint."""

import json
from pathlib import Path

import torch

from dlrm_torchrec.config import to_dict
from dlrm_torchrec.train import checkpoint


def fake_checkpoint(cfg, folder: Path):
    """A single-process checkpoint of a randomly initialised model, laid out as the
    trainer's (DCP shards under "model", trainer_state.json with the signature)."""
    import torch.distributed.checkpoint as dcp

    from dlrm_torchrec.model.dlrm import build_train_module
    from dlrm_torchrec.train.checkpoint import model_signature

    module = build_train_module(cfg, device=torch.device("cpu"))
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "embedding_bags" in name:
                p.uniform_(-0.5, 0.5)
    path = folder / "step_00000001"
    dcp.save({"model": module.state_dict()}, checkpoint_id=str(path), no_dist=True)
    (path / checkpoint.STATE_FILE).write_text(json.dumps({
        "step": 1, "world_size": 1, "signature": model_signature(cfg, module.model.tables),
        "config": to_dict(cfg)}))
    return path, module.model.eval()
