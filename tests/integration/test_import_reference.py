"""`python -m dlrm_torchrec.import_reference`: a model saved by the DLRM reference
(`dlrm_s_pytorch.py --save-model`) becomes a checkpoint that predicts what the reference
model predicts.

The reference's file is written here as the reference writes it: `torch.save` of a dict with
its counters (numpy scalars among them), "state_dict" with the reference's module names
(`emb_l.<k>.weight`, QR `weight_q`/`weight_r`, MD `embs.weight` + `proj.weight`,
`bot_l.<i>` / `top_l.<i>` with Linear layers at even i) and "opt_state_dict". Expected
predictions come from `tests/helpers/reference_dlrm.py`'s plain DLRM; compressed tables
enter it as the equivalent full table, exact for one-hot bags (QR mult: q[i // c] *
r[i mod c]; MD: E[i] P^T)."""

import json
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from dlrm_torchrec.cli import import_reference as import_reference_cli
from dlrm_torchrec.config import feature_names, load_config
from dlrm_torchrec.config.embedding_layout import embedding_layout
from dlrm_torchrec.data import build_data_source
from dlrm_torchrec.inference import export
from dlrm_torchrec.inference import import_reference as ir
from tests.helpers.dist_utils import run_cli
from tests.helpers.reference_dlrm import ReferenceDLRM, unpack_kjt

CONFIG = "configs/tiny_cpu.yaml"
VARIANTS = {"plain": [], "qr": ["embeddings.qr_threshold=600", "embeddings.qr_collisions=4"],
            "md": ["embeddings.md_alpha=0.3"]}


def reference_model(cfg, seed=0, gain=2.0):
    """The reference's state dict for `cfg` (random weights), and the same model as
    ReferenceDLRM inputs: full tables, bottom and top (W, b) lists."""
    g = torch.Generator().manual_seed(seed)
    e = cfg.embeddings
    d = e.dim
    state, tables = {}, []
    for k, spec in enumerate(embedding_layout(e)):
        n = spec.rows
        ids = torch.arange(n)
        if spec.qr_collisions:
            c = spec.qr_collisions
            q = torch.randn(math.ceil(n / c), d, generator=g) * 0.7
            r = torch.randn(c, d, generator=g) * 0.7
            state[f"emb_l.{k}.weight_q"], state[f"emb_l.{k}.weight_r"] = q, r
            tables.append(q[ids // c] * r[ids % c])
        elif spec.project:
            dk = spec.tables[0].dim
            emb = torch.randn(n, dk, generator=g) * 0.5
            proj = torch.randn(d, dk, generator=g) * 0.3
            state[f"emb_l.{k}.embs.weight"], state[f"emb_l.{k}.proj.weight"] = emb, proj
            tables.append(emb @ proj.T)
        else:
            t = torch.randn(n, d, generator=g) * 0.5
            state[f"emb_l.{k}.weight"] = t
            tables.append(t)
    f = len(tables)
    widths = {"bot_l": [cfg.model.dense_in_features] + list(cfg.model.bottom_mlp),
              "top_l": [d + f * (f + 1) // 2] + list(cfg.model.top_mlp)}
    layers = {}
    for name, dims in widths.items():
        layers[name] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            w = torch.randn(b, a, generator=g) * gain / math.sqrt(a)
            bias = torch.randn(b, generator=g) * 0.1
            state[f"{name}.{2 * i}.weight"], state[f"{name}.{2 * i}.bias"] = w, bias
            layers[name].append((w, bias))
    return state, tables, layers["bot_l"], layers["top_l"]


def save_like_the_reference(path, state):
    torch.save({"epoch": 1, "nepochs": 2, "nbatches": 100, "nbatches_test": 10, "iter": 37,
                "state_dict": state, "train_acc": np.float64(0.78), "train_loss": np.float32(0.46),
                "test_acc": 0.77, "test_loss": 0.47, "total_loss": 0.0, "total_accu": 0,
                "opt_state_dict": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}},
               path)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_imported_model_predicts_what_the_reference_model_predicts(tmp_path, variant):
    cfg = load_config(CONFIG, VARIANTS[variant])
    state, tables, bottom, top = reference_model(cfg)
    save_like_the_reference(tmp_path / "model.pt", state)
    ckpt = ir.import_reference(str(tmp_path / "model.pt"), cfg, tmp_path / "ckpts",
                               log=lambda m: None)
    saved = json.loads((ckpt / "trainer_state.json").read_text())
    assert saved["weights_only"] and saved["imported_from"]["reference_state"]["iter"] == 37
    dlrm, _ = export.load_checkpoint(cfg, ckpt)
    ours = export.InferenceModel(dlrm, embedding_layout(cfg.embeddings))
    ref = ReferenceDLRM(tables, bottom, top, "dot")
    names = feature_names(cfg.embeddings)
    source = build_data_source(cfg.data, cfg.embeddings, cfg.model.dense_in_features, 0, 1)
    batch = next(iter(source.batches("val")))
    with torch.no_grad():
        got = ours(*export.batch_inputs(batch, names))
    want = torch.sigmoid(ref.forward(batch.dense_features,
                                     unpack_kjt(batch.sparse_features, names)))
    torch.testing.assert_close(got.double(), want.detach(), rtol=0, atol=2e-5)  # float32
    assert float(want.std()) > 0.1  # predictions that differ between samples


def _auc(scores, labels):
    """Probability that a positive outscores a negative (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater) / (len(pos) * len(neg))


def test_two_ranks_evaluate_and_train_on_from_an_imported_model(tmp_path):
    """Loaded into the sharded model on 2 ranks (DCP reshards the plain tensors), the
    imported weights give the AUC of the reference model's own predictions; training on
    from them starts a fresh optimizer at step 0."""
    overrides = ["data.eval_samples=2048", "data.eval_batch_size=512", "logging.progress_bar=false"]
    cfg = load_config(CONFIG, overrides)
    state, tables, bottom, top = reference_model(cfg, seed=1, gain=1.0)
    save_like_the_reference(tmp_path / "model.pt", state)
    imp = run_cli(["-m", "dlrm_torchrec.import_reference", str(tmp_path / "model.pt"),
                   "--config", CONFIG, "-o", str(tmp_path / "ckpts"), *overrides], timeout=120)
    assert imp.returncode == 0, imp.stderr[-2000:]
    assert "epoch 1, iteration 37" in imp.stderr
    ckpt = tmp_path / "ckpts" / "step_00000000"
    ref = ReferenceDLRM(tables, bottom, top, "dot")
    names = feature_names(cfg.embeddings)
    scores, labels = [], []
    source = build_data_source(cfg.data, cfg.embeddings, cfg.model.dense_in_features, 0, 1)
    for batch in source.batches("val"):
        scores.append(ref.forward(batch.dense_features,
                                  unpack_kjt(batch.sparse_features, names)).detach())
        labels.append(batch.labels)
    prob = torch.sigmoid(torch.cat(scores).float())  # as the trainer evaluates: float32
    assert 0 < float(prob.min()) and float(prob.max()) < 1  # no ties from saturation
    want = _auc(prob.numpy(), torch.cat(labels).numpy())

    def torchrun(*args):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                               "2", "-m", "dlrm_torchrec.train", "--config", CONFIG, *args,
                               *overrides], capture_output=True, text=True, timeout=300)

    run = torchrun("--eval-only", f"checkpoint.resume={ckpt}",
                   f"logging.run_dir={tmp_path / 'eval'}")
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads((tmp_path / "eval" / "eval_val.json").read_text())
    assert got["auc"] == pytest.approx(want, abs=1e-5)
    run = torchrun(f"checkpoint.resume={ckpt}", "training.max_steps=4",
                   "training.eval_every_n_steps=0", "checkpoint.at_end=false",
                   f"logging.run_dir={tmp_path / 'tune'}")
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads((tmp_path / "tune" / "metrics.json").read_text())
    assert m["steps"] == 4 and m["train_samples_seen"] == 4 * 256


class NotAWeight:
    pass


@pytest.mark.parametrize("case, expect", [
    ("missing", "model.pt: not found"),
    ("bottom mlp", "bot_l.0.weight: shape [64, 13], but this config's "
                   "model.dense_arch.layers.0.weight is [48, 13]"),
    ("weighted pooling", "learned weighted pooling is not supported"),
    ("pickled object", "never unpickled"),
    ("fewer tables", "emb_l.7.weight: missing from the reference's file"),
])
def test_mismatches_and_unsafe_files_are_one_error_line_and_write_nothing(tmp_path, capsys,
                                                                          case, expect):
    cfg = load_config(CONFIG)
    state = reference_model(cfg)[0]
    args = []
    if case == "bottom mlp":
        args = ["model.bottom_mlp=[48,32,16]"]
    if case == "weighted pooling":
        state.update({f"v_W_l.{k}": torch.ones(10) for k in range(8)})
    if case == "fewer tables":
        del state["emb_l.7.weight"]
    if case == "pickled object":
        with open(tmp_path / "model.pt", "wb") as f:
            pickle.dump({"state_dict": state, "extra": NotAWeight()}, f)
    elif case != "missing":
        save_like_the_reference(tmp_path / "model.pt", state)
    rc = import_reference_cli.main([str(tmp_path / "model.pt"), "--config", CONFIG, "-o", str(tmp_path / "out"),
                  *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and expect in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_checkpoint_folder_under_a_file_is_refused_before_the_model_is_read(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    # the model file does not exist either: the output is checked first, before any reading
    rc = import_reference_cli.main([str(tmp_path / "model.pt"), "--config", CONFIG, "-o",
                                    str(tmp_path / "a_file" / "ckpt")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"error: -o {tmp_path / 'a_file' / 'ckpt'}: cannot create "), err
    assert f"{tmp_path / 'a_file'} is a file, not a folder" in err and "Traceback" not in err
