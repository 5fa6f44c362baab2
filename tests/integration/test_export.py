"""Export: a checkpoint written by 2 sharded ranks becomes a plain state dict and a
torch.export program that predict what the sharded model predicts; int8 tables stay within
a stated tolerance; QR and MD models export; bad input gives `error: ...`."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from dlrm_torchrec.cli import export as export_cli
from dlrm_torchrec.config import ConfigError, feature_names, load_config
from dlrm_torchrec.inference import export
from dlrm_torchrec.train import checkpoint
from tests.helpers.batches import first_val_batch
from tests.helpers.checkpoints import fake_checkpoint
from tests.helpers.dist_utils import run_cli, run_ranks
from tests.helpers.tolerances import INT8_MAX_AUC_LOSS, INT8_MAX_PROB_DIFF

BASE = [
    "data.train_samples=4096", "data.eval_samples=1024", "data.batch_size=256",
    "training.eval_every_n_steps=0", "logging.log_every_n_steps=4",
    "logging.progress_bar=false", "sharding.sharding_type=column_wise",
]


def _train_and_predict(rank, world_size, overrides, out):
    """Train with the real Trainer, then predict validation batch 0 through its pipeline (the
    sharded eval path) and save this rank's share of the logits."""
    from dlrm_torchrec.config import validate
    from dlrm_torchrec.parallel.distributed import init_distributed, shutdown
    from dlrm_torchrec.train.trainer import Trainer

    cfg = load_config("configs/tiny_cpu.yaml", overrides)
    info = init_distributed(cfg.sharding)
    try:
        validate(cfg, world_size=info.world_size)
        trainer = Trainer(cfg, info)
        trainer.fit()
        trainer.model.eval()
        with torch.no_grad():
            _, logits, labels, weights = trainer.pipeline.progress(trainer.source.batches("val", 0))
        torch.save({"logits": logits, "labels": labels, "weights": weights}, f"{out}/rank{rank}.pt")
        trainer.run_logger.close()
    finally:
        shutdown()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    run_ranks(2, _train_and_predict, BASE + [f"logging.run_dir={d}"], str(d))
    parts = [torch.load(d / f"rank{r}.pt", weights_only=True) for r in range(2)]
    sharded = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # rank-major = global order
    return d, sharded


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    run, _ = trained
    out = tmp_path_factory.mktemp("export")
    rc = export_cli.main(["--config", "configs/tiny_cpu.yaml", "--checkpoint", "auto", "--out",
                      str(out), "--quantize", "int8", "--onnx", "float", *BASE, f"logging.run_dir={run}"])
    assert rc == 0
    return out


def test_exported_weights_and_program_predict_what_the_sharded_model_predicts(trained, exported):
    run, sharded = trained
    cfg = load_config(str(exported / "config.yaml"))
    batch = first_val_batch(cfg)
    assert torch.equal(batch.labels, sharded["labels"])  # the same samples, in the same order
    real = batch.weights > 0
    want = torch.sigmoid(sharded["logits"])

    # the unsharded weights in the plain (non-distributed) DLRM
    plain = export.load_weights(cfg, exported / "weights.pt")
    with torch.no_grad():
        got_plain = torch.sigmoid(plain(batch.dense_features, batch.sparse_features))
    assert (got_plain - want)[real].abs().max() < 1e-6

    # the torch.export program on plain tensors
    program = torch.export.load(str(exported / "model.pt2")).module()
    inputs = export.batch_inputs(batch, feature_names(cfg.embeddings))
    got_program = program(*inputs).detach()
    assert (got_program - want)[real].abs().max() < 1e-6

    # the ONNX program in ONNX Runtime (export --onnx)
    got_onnx = export.load_program(exported, "onnx")(*inputs)
    assert (got_onnx - want)[real].abs().max() < 1e-6

    # over the whole validation split: the program's metrics are the sharded eval's
    final = json.loads((run / "metrics.json").read_text())["final"]
    info = json.loads((exported / "export.json").read_text())
    v = info["validation"]
    assert v["samples"] == final["samples"] == 1024
    assert v["metrics"]["float"]["log_loss"] == pytest.approx(final["log_loss"], abs=1e-6)
    assert v["metrics"]["float"]["auc"] == pytest.approx(final["auc"], abs=1e-6)
    assert v["max_abs_prob_diff"]["float"] < 1e-6
    assert v["max_abs_prob_diff"]["onnx"] < 1e-6
    # AUC counts positive-negative pairs in order (here about 2.6e5 of them, 3.9e-6 each):
    # ONNX Runtime's kernels round differently from torch's, within the 1e-6 above, which
    # flips a pair whose two probabilities are closer than that (seen on an AMD EPYC
    # machine with onnxruntime 1.32: one pair). Up to two pairs, then.
    assert v["metrics"]["onnx"]["auc"] == pytest.approx(final["auc"], abs=8e-6)
    assert v["metrics"]["onnx"]["log_loss"] == pytest.approx(final["log_loss"], abs=1e-6)
    assert info["inputs"]["feature_order"] == feature_names(cfg.embeddings)
    assert info["written_by_world_size"] == 2


def test_program_takes_any_batch_size_and_empty_bags(exported):
    cfg = load_config(str(exported / "config.yaml"))
    program = torch.export.load(str(exported / "model.pt2")).module()
    plain = export.InferenceModel(export.load_weights(cfg, exported / "weights.pt"),
                                  export.embedding_layout(cfg.embeddings))
    n = len(feature_names(cfg.embeddings))
    for b, ids_per_bag in ((1, 1), (3, 0), (33, 3)):
        dense = torch.rand(b, cfg.model.dense_in_features)
        ids = [torch.randint(0, 100, (b * ids_per_bag,)) for _ in range(n)]
        lengths = [torch.full((b,), ids_per_bag, dtype=torch.int64) for _ in range(n)]
        got = program(dense, ids, lengths)
        assert got.shape == (b,)
        assert torch.allclose(got, plain(dense, ids, lengths), atol=1e-6)


def test_program_folds_ids_beyond_a_capped_table_as_the_training_loader_does(exported):
    """Ids at or past a table's rows (preprocessed ids of a table capped by max_ind_range)
    predict what their value mod rows predicts, in the program and the int8 program."""
    cfg = load_config(str(exported / "config.yaml"))
    rows = cfg.embeddings.table_sizes()
    b, n = 17, len(rows)
    g = torch.Generator().manual_seed(3)
    dense = torch.rand(b, cfg.model.dense_in_features, generator=g)
    ids = [torch.randint(0, r, (2 * b,), generator=g) for r in rows]
    lengths = [torch.full((b,), 2, dtype=torch.int64) for _ in range(n)]
    wrapped = [i + r * torch.randint(1, 1000, i.shape, generator=g) for i, r in zip(ids, rows)]
    assert all(bool((w >= r).all()) for w, r in zip(wrapped, rows))
    import fbgemm_gpu  # noqa: F401  (the int8 program's kernels)

    for name in ("model.pt2", "model_int8.pt2"):
        program = torch.export.load(str(exported / name)).module()
        want = program(dense, ids, lengths)
        torch.testing.assert_close(program(dense, wrapped, lengths), want, rtol=0, atol=0)


def test_int8_tables_stay_within_tolerance_and_report_the_auc_change(exported):
    import fbgemm_gpu  # noqa: F401  (registers the IntNBit kernel the int8 program calls)

    v = json.loads((exported / "export.json").read_text())["validation"]
    print(f"int8: max |dp| {v['max_abs_prob_diff_int8_vs_float']:.3g}, auc change "
          f"{v['auc_change_int8']:+.6f}, log loss change {v['log_loss_change_int8']:+.6f}")
    assert 0 < v["max_abs_prob_diff_int8_vs_float"] < INT8_MAX_PROB_DIFF
    assert v["auc_change_int8"] > -INT8_MAX_AUC_LOSS
    assert abs(v["log_loss_change_int8"]) < 1e-3

    cfg = load_config(str(exported / "config.yaml"))
    program = torch.export.load(str(exported / "model_int8.pt2")).module()
    float_program = torch.export.load(str(exported / "model.pt2")).module()
    inputs = export.batch_inputs(first_val_batch(cfg), feature_names(cfg.embeddings))
    diff = (program(*inputs) - float_program(*inputs)).abs().max()
    assert 0 < diff < INT8_MAX_PROB_DIFF


@pytest.mark.parametrize("compression", [
    ["embeddings.qr_threshold=600", "embeddings.qr_collisions=7", "embeddings.qr_operation=mult"],
    ["embeddings.qr_threshold=600", "embeddings.qr_operation=concat", "model.bottom_mlp=[64,32]"],
    ["embeddings.md_alpha=0.3"],
])
def test_qr_and_md_models_export_with_raw_feature_ids(tmp_path, compression):
    from dlrm_torchrec.data.qr_split import split_qr_ids

    over = ["data.eval_samples=512", *compression]
    cfg = load_config("configs/tiny_cpu.yaml", over)
    ckpt, model = fake_checkpoint(cfg, tmp_path / "ck")
    out = tmp_path / "out"
    info = export.export(cfg, ckpt, out, quantize="int8", eval_split="val", log=lambda _: None)
    layout = export.embedding_layout(cfg.embeddings)
    batch = first_val_batch(cfg)  # raw keys cat_i
    with torch.no_grad():
        want = torch.sigmoid(model(batch.dense_features, split_qr_ids(batch.sparse_features, layout)))
    program = torch.export.load(str(out / "model.pt2")).module()
    got = program(*export.batch_inputs(batch, feature_names(cfg.embeddings)))
    assert (got - want).abs().max() < 1e-6
    assert info["validation"]["max_abs_prob_diff"]["float"] < 1e-6
    assert info["validation"]["max_abs_prob_diff_int8_vs_float"] < 0.05


def _cli(*args):
    return run_cli(["-m", "dlrm_torchrec.export", *args], timeout=300)


def test_missing_checkpoint_is_an_error_without_traceback(tmp_path):
    proc = _cli("--config", "configs/tiny_cpu.yaml", "--checkpoint", "auto", "--out",
                str(tmp_path / "out"), f"logging.run_dir={tmp_path}")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: --checkpoint auto: no usable checkpoint in")
    assert "Traceback" not in proc.stderr


def test_checkpoint_of_another_model_is_refused_naming_the_difference(trained, tmp_path, capsys):
    run, _ = trained
    rc = export_cli.main(["--config", "configs/tiny_cpu.yaml", "--checkpoint", "auto", "--out",
                      str(tmp_path / "out"), *BASE, f"logging.run_dir={run}",
                      "embeddings.dim=8", "model.bottom_mlp=[64,32,8]"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("error: ") and "was written by a different model" in err
    assert "table t_cat_0: checkpoint rows x dim 1000 x 16, config 1000 x 8" in err
    assert not (tmp_path / "out" / "weights.pt").exists()


def test_fewer_bits_per_table_row_give_larger_prediction_errors(trained, tmp_path):
    """One export with every table precision: each program is written and checked, and its
    largest prediction error against float32 tables grows as the rows lose bits (fp16 keeps
    11 significant bits, then int8, int4, int2 with a row-wise scale and bias)."""
    import fbgemm_gpu  # noqa: F401  (registers the quantized kernels the programs call)

    run, _ = trained
    ckpt = checkpoint.latest_checkpoint(run / "checkpoints").path
    cfg = load_config("configs/tiny_cpu.yaml", BASE + [f"logging.run_dir={run}"])
    out = tmp_path / "out"
    info = export.export(cfg, ckpt, out, quantize="int2,int4,int8,fp16", log=lambda _: None)
    v = info["validation"]
    errors = [v[f"max_abs_prob_diff_{k}_vs_float"] for k in ("fp16", "int8", "int4", "int2")]
    print("max |dp| fp16, int8, int4, int2:", errors,
          {k: round(v[f"auc_change_{k}"], 6) for k in ("fp16", "int8", "int4", "int2")})
    assert errors == sorted(errors) and len(set(errors)) == 4
    assert errors[0] < 1e-3 and errors[1] < INT8_MAX_PROB_DIFF
    inputs = export.batch_inputs(first_val_batch(cfg), feature_names(cfg.embeddings))
    with torch.no_grad():
        float_p = torch.export.load(str(out / "model.pt2")).module()(*inputs)
        for kind in ("fp16", "int8", "int4", "int2"):
            assert info["files"][f"program_{kind}"] == f"model_{kind}.pt2"
            p = torch.export.load(str(out / f"model_{kind}.pt2")).module()(*inputs)
            assert float((p - float_p).abs().max()) <= v[f"max_abs_prob_diff_{kind}_vs_float"]
    with pytest.raises(ConfigError, match="--quantize 'int3': 'int3' unknown; choose from int8"):
        export.export(cfg, ckpt, tmp_path / "bad", quantize="int3", log=lambda _: None)
    assert not (tmp_path / "bad").exists()


def test_unwritable_output_folder_is_an_error(trained, tmp_path, capsys):
    run, _ = trained
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    rc = export_cli.main(["--config", "configs/tiny_cpu.yaml", "--checkpoint", "auto", "--out",
                      str(blocker / "out"), *BASE, f"logging.run_dir={run}"])
    err = capsys.readouterr().err
    # a mistake in the command line, found before the checkpoint is read: status 2
    assert rc == 2
    assert err.startswith(f"error: --out {blocker / 'out'}: cannot create {blocker / 'out'}: "
                          f"{blocker} is a file, not a folder")


def test_config_defaults_to_the_checkpoint_s_own(trained, tmp_path):
    run, _ = trained
    ckpt = checkpoint.latest_checkpoint(run / "checkpoints").path
    rc = export_cli.main(["--checkpoint", str(ckpt), "--out", str(tmp_path), "--eval-split", "none"])
    assert rc == 0
    assert (tmp_path / "model.pt2").is_file() and (tmp_path / "weights.pt").is_file()
    assert "validation" not in json.loads((tmp_path / "export.json").read_text())


def test_truncated_or_malicious_checkpoint_is_refused(trained, tmp_path, capsys):
    import os
    import pickle
    import shutil

    run, _ = trained
    src = checkpoint.latest_checkpoint(run / "checkpoints").path
    bad = tmp_path / src.name
    shutil.copytree(src, bad)
    shard = next(bad.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    args = ["--config", "configs/tiny_cpu.yaml", "--checkpoint", str(bad), "--out",
            str(tmp_path / "out"), *BASE]
    assert export_cli.main(args) == 1
    # the manifest finds the short shard before any reader runs
    assert capsys.readouterr().err.startswith(
        f"error: {shard}: 1000 bytes, manifest.json records")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch PWNED_BY_EXPORT",))

    # an attacker rewrites the manifest too, so the checksums pass and the reader is tried
    shutil.copy(src / shard.name, shard)
    evil = pickle.dumps(Evil())
    (bad / ".metadata").write_bytes(evil)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"][".metadata"] = {"bytes": len(evil),
                                      "sha256": hashlib.sha256(evil).hexdigest()}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert export_cli.main(args) == 1
    err = capsys.readouterr().err
    assert "refusing to load" in err and "system" in err
    assert not Path("PWNED_BY_EXPORT").exists()


def _limit_file_size(limit_bytes):
    """preexec_fn: files this process writes may not grow past `limit_bytes` (a write past
    it fails with EFBIG, as a full disk fails with ENOSPC), and SIGXFSZ, which would kill
    the process first, is ignored."""
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


@pytest.mark.parametrize("failing", ["weights.pt", "model.pt2"])
def test_a_write_that_fails_mid_file_is_one_error_naming_the_file(trained, exported, tmp_path,
                                                                  failing):
    """The file system refuses a write half-way (here a file size limit; a full disk does the
    same): one error line naming the file, no half-written file, no crash. torch's own zip
    writer would abort the process while writing the program."""
    import subprocess
    import sys

    run, _ = trained
    out = tmp_path / "export"
    # weights.pt is written first, then model.pt2 (the weights and the graph): a limit
    # below the weights' size fails the first, one just above it the second
    weights = (exported / "weights.pt").stat().st_size
    limit = weights // 2 if failing == "weights.pt" else weights + 4096
    assert (exported / "model.pt2").stat().st_size > limit
    proc = subprocess.run(
        [sys.executable, "-m", "dlrm_torchrec.export", "--config", "configs/tiny_cpu.yaml",
         "--checkpoint", "auto", "--out", str(out), "--eval-split", "none", *BASE,
         f"logging.run_dir={run}"],
        capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(limit))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {out / failing}: cannot write (File too large); the partial file was removed")
    assert "Traceback" not in proc.stderr
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]
    assert not (out / failing).exists()
