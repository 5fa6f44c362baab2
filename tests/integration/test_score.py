"""Scoring raw Criteo text with an exported model (`python -m dlrm_torchrec.score`): each
line's probability equals the exported program's on the same row as the training loader
serves it, and the eager model's on the row parsed by the plain line-by-line reference;
malformed lines score nan in place; mistakes are one `error:` line."""

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_torchrec.cli import score as score_cli
from dlrm_torchrec.config import load_config
from dlrm_torchrec.data.converters import preprocess as pp
from dlrm_torchrec.data.criteo import CriteoSource
from dlrm_torchrec.inference import export, score
from tests.helpers.checkpoints import fake_checkpoint
from tests.helpers.criteo_rows import make_lines, ref_parse, write
from tests.helpers.reference_preprocessing import reference_days, write_bins
from tests.helpers.tolerances import INT8_MAX_PROB_DIFF

ROWS = 1000  # max_ind_range of the hash-mode data, and every table's rows


def _exported(tmp_path, mode, quantize=""):
    lines = make_lines(700, seed=5)
    raw = write(tmp_path / "train.txt", lines)
    data = tmp_path / "data"
    kw = {"max_ind_range": ROWS} if mode == "hash" else {"frequency_threshold": 2}
    pp.run(pp.Settings(inputs=[str(raw)], output=str(data), dataset="kaggle", workers=0,
                       progress=False, **kw))
    cfg = load_config("configs/criteo_kaggle.yaml", [
        f"data.path={data}", f"embeddings.max_ind_range={ROWS}", "model.bottom_mlp=[32,16]",
        "model.top_mlp=[32,1]", "data.eval_batch_size=64", "data.batch_size=64"])
    ckpt, _ = fake_checkpoint(cfg, tmp_path / "ckpt")
    out = tmp_path / "export"
    export.export(cfg, ckpt, out, quantize=quantize, eval_split="none", log=lambda m: None)
    return lines, cfg, out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """mode -> (lines, config, export folder), each made once."""
    made = {}

    def get(mode):
        if mode not in made:
            made[mode] = _exported(tmp_path_factory.mktemp(mode), mode)
        return made[mode]
    return get


@pytest.fixture(params=["hash", "vocab"])
def exported(request, exports):
    return exports(request.param)


def read_scores(path):
    return np.array([float(x) for x in path.read_text().split("\n")[:-1]])


def test_each_line_scores_what_the_program_gives_the_loaders_row(exported, tmp_path, capsys):
    lines, cfg, out = exported
    # gzip, no final newline, chunks of a few lines: every line in place all the same
    raw = write(tmp_path / "new.gz", lines, gz=True, final_newline=False)
    scorer = score.RawRowScorer(str(out))
    s = score.score_files(scorer, [str(raw)], str(tmp_path / "p.txt"), batch_size=50,
                          chunk_bytes=1 << 16)
    got = read_scores(tmp_path / "p.txt")
    assert len(got) == len(lines) == s["lines"]
    bad = [i for i, line in enumerate(lines) if ref_parse(line) is None]
    assert np.isnan(got[bad]).all() and s["malformed"] == len(bad) > 0
    assert not np.isnan(np.delete(got, bad)).any()
    assert "malformed row(s) scored as nan" in capsys.readouterr().err
    # the loader's rows in file order: days 0-5, then day 6's test half and val half
    src = CriteoSource(cfg.data, cfg.embeddings)
    program = torch.export.load(str(out / "model.pt2")).module()
    names = [f"cat_{f}" for f in range(26)]
    want = []
    for split in ("train", "test", "val"):
        for b in src.batches(split):
            p = program(*export.batch_inputs(b, names))
            want.append(p[b.weights > 0].detach().numpy())
    np.testing.assert_allclose(np.delete(got, bad), np.concatenate(want), rtol=0, atol=1e-6)
    # metrics of the scored rows against their labels
    labels = np.array([ref_parse(line)[0] for line in lines if ref_parse(line) is not None])
    p = np.clip(np.delete(got, bad), 1e-12, 1 - 1e-12)
    want_ll = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert s["log_loss"] == pytest.approx(want_ll, rel=1e-5)
    assert 0 < s["auc"] < 1


def test_scores_equal_the_eager_model_on_rows_parsed_by_the_reference(exports, tmp_path):
    lines, cfg, out = exports("hash")
    good = [line for line in lines if ref_parse(line) is not None][:40]
    raw = write(tmp_path / "few.txt", good)
    scorer = score.RawRowScorer(str(out))
    score.score_files(scorer, [str(raw)], str(tmp_path / "p.txt"))
    got = read_scores(tmp_path / "p.txt")
    model = export.load_weights(cfg, out / "weights.pt").eval()
    parsed = [ref_parse(line) for line in good]
    dense = torch.tensor([p[1] for p in parsed], dtype=torch.float32)
    # hashed into ROWS ids by preprocessing, then folded into each (smaller) table
    sizes = cfg.embeddings.table_sizes()
    ids = torch.tensor([[i % ROWS % n for i, n in zip(p[2], sizes)] for p in parsed]).T
    kjt = KeyedJaggedTensor(keys=[f"cat_{f}" for f in range(26)], values=ids.reshape(-1),
                            lengths=torch.ones(26 * len(good), dtype=torch.int64))
    with torch.no_grad():
        want = torch.sigmoid(model(dense, kjt)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["hash", "vocab"])
def test_export_carries_the_row_transform_so_the_data_folder_may_move(tmp_path, mode):
    lines, cfg, out = _exported(tmp_path, mode)
    raw = write(tmp_path / "t.txt", [x for x in lines if ref_parse(x) is not None][:50])
    assert score_cli.main([str(out), str(raw), "-o", str(tmp_path / "before.txt")]) == 0
    (tmp_path / "data").rename(tmp_path / "moved")
    args = [str(out), str(raw), "-o", str(tmp_path / "after.txt")]
    if mode == "vocab":  # the vocabulary itself stays in the data folder
        with pytest.raises(score.ScoreError, match="vocab: missing"):
            score.RawRowScorer(str(out))
        args += ["--data-dir", str(tmp_path / "moved")]
    assert score_cli.main(args) == 0
    np.testing.assert_array_equal(read_scores(tmp_path / "before.txt"),
                                  read_scores(tmp_path / "after.txt"))


def test_quantized_exports_score_within_the_export_tolerance(tmp_path):
    lines, _, out = _exported(tmp_path, "hash", quantize="int8,int4")
    raw = write(tmp_path / "t.txt", lines)
    assert score_cli.main([str(out), str(raw), "-o", str(tmp_path / "f.txt")]) == 0
    assert score_cli.main([str(out), str(raw), "-o", str(tmp_path / "q.txt"), "--int8"]) == 0
    assert score_cli.main([str(out), str(raw), "-o", str(tmp_path / "q4.txt"), "--program",
                       "int4"]) == 0
    f, q, q4 = (read_scores(tmp_path / n) for n in ("f.txt", "q.txt", "q4.txt"))
    np.testing.assert_array_equal(np.isnan(f), np.isnan(q))
    diff, diff4 = np.nanmax(np.abs(f - q)), np.nanmax(np.abs(f - q4))
    assert 0 < diff < INT8_MAX_PROB_DIFF  # int8 rows: close, not identical
    assert diff < diff4 < 0.25  # int4 rows: further off, still near


def test_onnx_exports_score_what_the_program_scores(exports, tmp_path):
    from dlrm_torchrec.inference.onnx import write_program

    lines, cfg, out = exports("hash")
    if not (out / "model.onnx").exists():  # what export --onnx float adds to the folder
        model = export.load_weights(cfg, out / "weights.pt")
        write_program(export.onnx_export_program(model, cfg), out, "model.onnx")
    raw = write(tmp_path / "t.txt", lines)
    for program in ("float", "onnx"):
        assert score_cli.main([str(out), str(raw), "-o", str(tmp_path / f"{program}.txt"),
                           "--program", program]) == 0
    f, o = (read_scores(tmp_path / f"{n}.txt") for n in ("float", "onnx"))
    assert np.isnan(f).sum() > 0  # the malformed lines score nan in both
    np.testing.assert_allclose(o, f, rtol=0, atol=1e-6, equal_nan=True)


def test_unlabelled_rows_score_the_same(exported, tmp_path):
    lines, _, out = exported
    good = [line.rstrip("\r") for line in lines if ref_parse(line) is not None][:100]
    labelled = write(tmp_path / "l.txt", good)
    unlabelled = write(tmp_path / "u.txt", [line.split("\t", 1)[1] for line in good])
    assert score_cli.main([str(out), str(labelled), "-o", str(tmp_path / "a.txt")]) == 0
    assert score_cli.main([str(out), str(unlabelled), "-o", str(tmp_path / "b.txt"),
                       "--no-labels"]) == 0
    np.testing.assert_array_equal(read_scores(tmp_path / "a.txt"),
                                  read_scores(tmp_path / "b.txt"))


def test_mistakes_are_one_error_line_and_write_nothing(exported, tmp_path, capsys):
    _, cfg, out = exported
    text = write(tmp_path / "t.txt", make_lines(5, with_bad=False))
    binary = tmp_path / "x.bin"
    binary.write_bytes(bytes(range(1, 256)).replace(b"\n", b"") * 8000)
    synthetic = load_config("configs/tiny_cpu.yaml")
    ckpt, _ = fake_checkpoint(synthetic, tmp_path / "ckpt")
    export.export(synthetic, ckpt, tmp_path / "synthetic_export", eval_split="none",
                  log=lambda m: None)
    from dlrm_torchrec.data.converters import from_reference

    write_bins(tmp_path / "ref", "terabyte_processed", reference_days([6, 5])[0])
    from_reference.adopt(str(tmp_path / "ref"), str(tmp_path / "adopted"), log=lambda m: None)
    cases = [
        ([str(tmp_path / "nope"), str(text)], "nope/config.yaml: not found"),
        ([str(out), str(text), "--data-dir", str(tmp_path / "adopted")],
         "adopted from the DLRM reference's preprocessing"),
        ([str(out), str(tmp_path / "missing.txt")], "input file(s) not found"),
        ([str(out), str(binary)], "not Criteo text"),
        ([str(tmp_path / "synthetic_export"), str(text)], "data.source='synthetic'"),
        ([str(out), str(text), "--data-dir", str(tmp_path)], "no meta.json there"),
        ([str(out), str(text), "-o", str(tmp_path / "no" / "o.txt")], "cannot write there"),
        ([str(out), str(text), "-o", str(tmp_path)], f"-o {tmp_path}: a folder"),
    ]
    for args, expect in cases:
        assert score_cli.main(["-o", str(tmp_path / "o.txt")] + args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expect in err and "Traceback" not in err, err
        assert not (tmp_path / "o.txt").exists()
        assert not list(tmp_path.glob("o.txt.tmp*"))
