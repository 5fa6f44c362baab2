"""ONNX export (`export --onnx`): the scatter-add pooling equals a loop over the bags; the
ONNX programs, run by ONNX Runtime, predict what the plain eager model predicts for any
batch size, empty bags, ids past a table's rows and QR/MD/cat/DCN models; int8 MLPs stay
within a tolerance; large tables go to an external data file; missing packages and unknown
kinds are one error line. (The program against the 2-rank sharded model:
tests/integration/test_export.py.)"""

import shutil
import sys
from pathlib import Path

import pytest
import torch

from dlrm_torchrec.cli import export as export_cli
from dlrm_torchrec.config import feature_names, load_config
from dlrm_torchrec.data.qr_split import split_qr_ids
from dlrm_torchrec.inference import export
from dlrm_torchrec.inference import onnx as export_onnx
from tests.helpers.batches import first_val_batch
from tests.helpers.checkpoints import fake_checkpoint

# int8 MLPs (ONNX Runtime's dynamic quantization) against float32, on these small models
MLP_INT8_MAX_PROB_DIFF = 0.05


def _loop_bag_sum(weight, ids, lengths):
    """The definition: bag b sums the rows of its ids, one bag at a time."""
    out, pos = torch.zeros(len(lengths), weight.shape[1]), 0
    for b, n in enumerate(lengths.tolist()):
        for i in ids[pos:pos + n].tolist():
            out[b] += weight[i]
        pos += n
    return out


@pytest.mark.parametrize("lengths", [[2, 0, 3, 1], [0, 0, 4, 0, 0], [0], [5], [1, 1, 1], [0, 3]])
def test_scatter_add_pooling_equals_a_loop_over_the_bags(lengths):
    g = torch.Generator().manual_seed(len(lengths))
    weight = torch.randn(9, 4, generator=g)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    ids = torch.randint(0, 9, (int(lengths.sum()),), generator=g)
    got = export_onnx.bag_sum(weight[ids], lengths)
    torch.testing.assert_close(got, _loop_bag_sum(weight, ids, lengths), rtol=0, atol=1e-6)


def test_int8_rows_are_within_half_a_step_of_the_weights_and_span_the_codes():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=g) * torch.rand(50, 1, generator=g)
    weight[7] = 0.25  # a constant row
    before = weight.clone()
    codes, scale, bias = export_onnx.quantize_rows(weight)
    assert torch.equal(weight, before)  # the model's weights are left as they were
    # worked in blocks of rows (bounded memory): the same codes, whatever the block size
    for block_rows in (1, 7, 49):
        blocked = export_onnx.quantize_rows(weight, block_rows=block_rows)
        assert all(torch.equal(a, b) for a, b in zip(blocked, (codes, scale, bias))), block_rows
    assert codes.dtype == torch.uint8 and scale.shape == bias.shape == (50, 1)
    w = weight.double()
    step = (w.max(1, keepdim=True).values - w.min(1, keepdim=True).values) / 255
    back = codes.double() * scale.double() + bias.double()
    assert bool(((back - w).abs() <= step / 2 + 1e-6).all())
    assert torch.equal(back[7], w[7])
    varied = [r for r in range(50) if r != 7]
    assert bool((codes[varied].amin(1) == 0).all()) and bool((codes[varied].amax(1) == 255).all())
    # the ONNX lookup pools the dequantized rows
    ids, lengths = torch.tensor([3, 7, 7, 49, 0]), torch.tensor([2, 0, 3])
    rows = export_onnx.Int8Rows(weight)(ids)
    want = torch.stack([back[[3, 7]].sum(0), torch.zeros(8, dtype=torch.float64),
                        back[[7, 49, 0]].sum(0)])
    torch.testing.assert_close(export_onnx.bag_sum(rows, lengths).double(), want,
                               rtol=0, atol=1e-5)


def _export_fake(tmp_path, overrides, onnx="float,mlp-int8,int8", eval_split="val"):
    cfg = load_config("configs/tiny_cpu.yaml", ["data.eval_samples=512", *overrides])
    ckpt, model = fake_checkpoint(cfg, tmp_path / "ck")
    out = tmp_path / "out"
    info = export.export(cfg, ckpt, out, onnx=onnx, eval_split=eval_split, log=lambda _: None)
    return cfg, model, out, info


def _eager(model, cfg, dense, ids, lengths):
    """The plain DLRM (TorchRec's EmbeddingBagCollection) on ids folded by hand."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    rows = cfg.embeddings.table_sizes()
    kjt = KeyedJaggedTensor(keys=feature_names(cfg.embeddings),
                            values=torch.cat([i % r for i, r in zip(ids, rows)]),
                            lengths=torch.cat(lengths))
    kjt = split_qr_ids(kjt, export.embedding_layout(cfg.embeddings))
    with torch.no_grad():
        return torch.sigmoid(model(dense, kjt))


@pytest.fixture(scope="module")
def plain_export(tmp_path_factory):
    return _export_fake(tmp_path_factory.mktemp("onnx"), [])


def test_onnx_program_takes_any_batch_size_empty_bags_and_ids_past_the_rows(plain_export):
    cfg, model, out, info = plain_export
    program = export_onnx.OnnxProgram(out / "model.onnx")
    assert program.input_names == info["onnx"]["input_names"]
    rows = cfg.embeddings.table_sizes()
    g = torch.Generator().manual_seed(1)
    for b, most in ((1, 1), (1, 0), (5, 0), (33, 4), (700, 3)):
        dense = torch.rand(b, cfg.model.dense_in_features, generator=g)
        lengths = [torch.randint(0, most + 1, (b,), generator=g) for _ in rows]
        # ids up to 3x past each table's rows: folded (id mod rows) as the training loader does
        ids = [torch.randint(0, 3 * r, (int(n.sum()),), generator=g) for n, r in zip(lengths, rows)]
        got = program(dense, ids, lengths)
        assert got.shape == (b,) and got.dtype == torch.float32
        torch.testing.assert_close(got, _eager(model, cfg, dense, ids, lengths),
                                   rtol=0, atol=1e-6)


def test_int8_mlp_program_is_quantized_and_stays_within_tolerance(plain_export):
    import onnx

    cfg, model, out, info = plain_export
    ops = [n.op_type for n in onnx.load(str(out / "model_mlp_int8.onnx")).graph.node]
    linear_layers = len(cfg.model.bottom_mlp) + len(cfg.model.top_mlp)
    assert ops.count("MatMulInteger") == linear_layers and "Gemm" not in ops
    v = info["validation"]
    assert v["max_abs_prob_diff"]["onnx"] < 1e-6
    assert 0 < v["max_abs_prob_diff_onnx-mlp-int8_vs_float"] < MLP_INT8_MAX_PROB_DIFF
    assert v["metrics"]["onnx-mlp-int8"]["samples"] == 512
    # eager check on one batch, independent of the export's own validation
    batch = first_val_batch(cfg)
    inputs = export.batch_inputs(batch, feature_names(cfg.embeddings))
    got = export_onnx.OnnxProgram(out / "model_mlp_int8.onnx")(*inputs)
    diff = (got - _eager(model, cfg, *inputs)).abs().max()
    assert 0 < diff < MLP_INT8_MAX_PROB_DIFF


def _write_onnx_only(tmp_path, overrides):
    """model.onnx (and model_mlp_int8.onnx) of a random model, without the rest of an
    export (no torch.export file, no validation): what differs from model.pt2 is only the
    ONNX side."""
    cfg = load_config("configs/tiny_cpu.yaml", ["data.eval_samples=512", *overrides])
    _, model = fake_checkpoint(cfg, tmp_path / "ck")
    out = tmp_path / "out"
    out.mkdir()
    export_onnx.write_program(export.onnx_export_program(model, cfg), out, "model.onnx")
    return cfg, model, out


def test_int8_program_stores_its_tables_as_int8_codes_and_stays_within_tolerance(plain_export):
    import onnx

    cfg, model, out, info = plain_export
    graph = onnx.load(str(out / "model_int8.onnx")).graph
    dims = {tuple(t.dims): t.data_type for t in graph.initializer}
    for rows in cfg.embeddings.table_sizes():
        assert dims.get((rows, cfg.embeddings.dim)) == onnx.TensorProto.UINT8
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") == len(cfg.model.bottom_mlp) + len(cfg.model.top_mlp)
    def weight_bytes(path):
        return sum(onnx.numpy_helper.to_array(t).nbytes
                   for t in onnx.load(str(path)).graph.initializer)

    # a byte a value, plus 8 a row: 3/8 of the float tables (d = 16), MLPs a quarter
    assert weight_bytes(out / "model_int8.onnx") < 0.4 * weight_bytes(out / "model.onnx")
    v = info["validation"]
    assert 0 < v["max_abs_prob_diff_onnx-int8_vs_float"] < MLP_INT8_MAX_PROB_DIFF
    batch = first_val_batch(cfg)
    inputs = export.batch_inputs(batch, feature_names(cfg.embeddings))
    got = export.load_program(out, "onnx-int8")(*inputs)
    assert 0 < (got - _eager(model, cfg, *inputs)).abs().max() < MLP_INT8_MAX_PROB_DIFF


@pytest.mark.parametrize("overrides", [
    ["embeddings.qr_threshold=600", "embeddings.qr_collisions=7", "embeddings.qr_operation=mult"],
    ["embeddings.md_alpha=0.3"],
    ["model.interaction=cat"],
    ["model.interaction=dcn"],
    ["precision.embedding_dtype=fp16"],
], ids=["qr-mult", "md", "cat", "dcn", "fp16-tables"])
def test_compressed_and_other_architectures_export_to_onnx(tmp_path, overrides):
    cfg, model, out = _write_onnx_only(tmp_path, overrides)
    batch = first_val_batch(cfg)
    inputs = export.batch_inputs(batch, feature_names(cfg.embeddings))
    got = export_onnx.OnnxProgram(out / "model.onnx")(*inputs)
    torch.testing.assert_close(got, _eager(model, cfg, *inputs), rtol=0, atol=2e-6)


def test_large_tables_go_to_an_external_data_file_beside_the_program(tmp_path, monkeypatch):
    monkeypatch.setattr(export_onnx, "EXTERNAL_DATA_BYTES", 0)
    cfg, model, out = _write_onnx_only(tmp_path, [])
    export_onnx.write_mlp_int8(out / "model.onnx", out, "model_mlp_int8.onnx")
    table_bytes = 4 * cfg.embeddings.dim * sum(cfg.embeddings.table_sizes())
    for name in ("model.onnx", "model_mlp_int8.onnx"):
        assert (out / f"{name}.data").stat().st_size > table_bytes
        assert (out / name).stat().st_size < table_bytes / 2  # the graph, without the tables
    assert not list(out.glob(".tmp*")) and not list(out.glob("*inferred*"))
    moved = tmp_path / "moved"  # the folder is self-contained: it moves as a whole
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    batch = first_val_batch(cfg)
    inputs = export.batch_inputs(batch, feature_names(cfg.embeddings))
    want = _eager(model, cfg, *inputs)
    torch.testing.assert_close(export_onnx.OnnxProgram(moved / "model.onnx")(*inputs), want,
                               rtol=0, atol=1e-6)
    got8 = export_onnx.OnnxProgram(moved / "model_mlp_int8.onnx")(*inputs)
    assert (got8 - want).abs().max() < MLP_INT8_MAX_PROB_DIFF


def test_missing_onnx_packages_is_one_error_line_before_any_work(tmp_path, monkeypatch, capsys):
    cfg = load_config("configs/tiny_cpu.yaml")
    ckpt, _ = fake_checkpoint(cfg, tmp_path / "ck")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    out = tmp_path / "out"
    assert export_cli.main(["--checkpoint", str(ckpt), "--out", str(out), "--onnx", "float"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --onnx needs") and "missing: onnxruntime" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_a_full_disk_while_writing_a_program_is_an_error_naming_it_and_leaves_nothing(
        tmp_path, monkeypatch):
    """write_program's temp folder and _write_onnx's error, with the ONNX conversion replaced
    by a program whose save writes half a file and finds the disk full."""
    from types import SimpleNamespace

    def full_disk(path, **kwargs):
        Path(path).write_bytes(b"half a program")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: SimpleNamespace(save=full_disk))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(export.ExportError) as e:
        export._write_onnx("onnx", out, lambda int8: SimpleNamespace(state_dict={}))
    assert str(e.value) == f"{out / 'model.onnx'}: cannot write (No space left on device)"
    assert list(out.iterdir()) == []  # no program, no temp folder


@pytest.mark.parametrize("spec,kinds", [
    ("float", ["onnx"]), ("mlp-int8", ["onnx", "onnx-mlp-int8"]), ("int8", ["onnx-int8"]),
    ("int8, mlp-int8", ["onnx", "onnx-mlp-int8", "onnx-int8"]), ("", [])])
def test_onnx_kinds_parse_and_int8_brings_the_float_program(spec, kinds):
    assert export.parse_onnx(spec) == kinds


def test_unknown_onnx_kind_is_a_config_error(tmp_path, capsys):
    assert export_cli.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"),
                        "--onnx", "float,int3"]) == 2
    err = capsys.readouterr().err
    assert "error: --onnx 'float,int3': 'int3' unknown; choose from float, mlp-int8, int8" in err


def test_the_program_carries_no_source_paths_of_the_exporting_machine(tmp_path):
    """The exporter records each node's Python stack trace, absolute paths included; the
    written program drops them, so its graph file does not grow with where the repository
    lies, and a program handed to others does not name this machine's folders."""
    import onnx

    _, _, out = _write_onnx_only(tmp_path, [])
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    keys = {p.key for node in graph.graph.node for p in node.metadata_props}
    assert "pkg.torch.onnx.stack_trace" not in keys
    assert keys  # the rest of the exporter's metadata stays
    source_dir = str(Path(export.__file__).resolve().parents[1])
    assert source_dir.encode() not in (out / "model.onnx").read_bytes()
