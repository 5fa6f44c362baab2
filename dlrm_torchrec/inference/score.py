"""Score raw Criteo text with an exported model: click probabilities for new logs, through
exactly the transforms the model was trained with.

    python -m dlrm_torchrec.score runs/x/export day_24.gz -o scores.txt [--program int8] [--no-labels]

The export folder (`python -m dlrm_torchrec.export`) holds the program, the training config
and, in export.json, the row transform: the preprocessing settings and stored table sizes
of the data the model was trained on, so raw values map to the ids the tables were trained
on. Hash-mode models need nothing else; frequency vocabularies are read from the data
folder's vocab/ (recorded at export; --data-dir names another place, and takes the whole
transform from that folder's meta.json). A row goes through the preprocessing parser (dense
log(max(x, 0) + 1), hexadecimal ids, hash or vocabulary), the training loader's id folding
and multi-hot expansion (`criteo.RowEncoder`), and the exported program.

Output: one line per input line (inputs in the order given): the click probability, or
`nan` for a malformed line, which is also reported with its line number and reason. With
labels (the Criteo layout's first column; --no-labels for 39-column rows), the AUC, log
loss and accuracy of the scored rows are printed at the end. The output is written under a
temporary name and renamed when complete.
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

from dlrm_torchrec.config import CRITEO_SOURCES, Config, feature_names, load_config
from dlrm_torchrec.data import criteo_text as ct
from dlrm_torchrec.data.converters import preprocess as pp
from dlrm_torchrec.data.criteo import RowEncoder, read_meta
from dlrm_torchrec.data.file_checks import input_problem
from dlrm_torchrec.inference.export import (
    CONFIG_FILE,
    INFO_FILE,
    batch_inputs,
    export_flag,
    load_program,
    program_file,
)
from dlrm_torchrec.inference.onnx import ONNX_KINDS, OnnxUnavailable, require_packages
from dlrm_torchrec.train.metrics import prediction_metrics

# adopted data (settings.source) whose raw-row transform cannot be reproduced, and why
UNSCORABLE_SOURCES = {
    "torchrec_npy": "TorchRec's preprocessing, whose dense transform depends on each day "
                    "file's smallest value; raw rows cannot be transformed the same way",
    "dlrm_reference": "the DLRM reference's preprocessing, whose ids come from its "
                      "per-feature dictionaries (*_fea_dict_*.npz), which are not adopted; "
                      "raw rows cannot be given the same ids",
}


class ScoreError(Exception):
    """A user-facing problem: printed as `error: ...` with exit status 2, no traceback."""


class RawRowScorer:
    """Raw Criteo rows -> click probabilities, as the exported model saw its training rows."""

    def __init__(self, export_dir: str, data_dir: Optional[str] = None,
                 program: str = "float"):
        folder = Path(export_dir)
        name = program_file(program)
        for f in (CONFIG_FILE, name):
            if not (folder / f).is_file():
                raise ScoreError(f"{folder / f}: not found (the output of python -m "
                                 "dlrm_torchrec.export"
                                 + (f" {export_flag(program)}" if program != "float" else "")
                                 + ")")
        self.cfg: Config = load_config(str(folder / CONFIG_FILE))
        if self.cfg.data.source not in CRITEO_SOURCES:
            raise ScoreError(f"the model was trained on data.source={self.cfg.data.source!r}; "
                             "only models trained on Criteo data score raw Criteo rows")
        recorded = None
        if (folder / INFO_FILE).is_file():
            recorded = json.loads((folder / INFO_FILE).read_text()).get("row_transform")
        if data_dir or not recorded:
            data_dir = data_dir or self.cfg.data.path
            meta = read_meta(data_dir)
        else:
            data_dir, meta = recorded["data_path"], recorded["meta"]
        settings = meta["settings"]
        adopted_from = settings.get("source")  # only dlrm_torchrec.data.preprocess leaves none
        if adopted_from:
            raise ScoreError(f"{data_dir} was adopted from "
                             + UNSCORABLE_SOURCES.get(adopted_from, adopted_from))
        if meta.get("multi_hot_sizes") is not None:
            raise ScoreError(f"{data_dir} holds materialised multi-hot bags; raw rows have no "
                             "bags to score")
        self.settings = pp.Settings(inputs=[], output=data_dir, dataset=settings["dataset"],
                                    max_ind_range=settings["max_ind_range"],
                                    frequency_threshold=settings["frequency_threshold"])
        self.vocab = pp.load_vocab(data_dir) if self.settings.mode == "vocab" else None
        if self.settings.mode == "vocab" and self.vocab is None:
            raise ScoreError(f"{data_dir}/vocab: missing; the model's ids come from that "
                             "frequency vocabulary (--data-dir: the folder that holds it now)")
        self.encoder = RowEncoder(self.cfg.data, self.cfg.embeddings, meta)
        self.names = feature_names(self.cfg.embeddings)
        if program in ONNX_KINDS:
            try:
                require_packages(f"--program {program}")
            except OnnxUnavailable as e:
                raise ScoreError(str(e)) from None
        self.program = load_program(folder, program)

    @torch.no_grad()
    def score(self, parsed: ct.ParsedChunk, batch_size: int) -> np.ndarray:
        """Probabilities of the chunk's valid rows (float32, in their order)."""
        ids = pp.map_ids(parsed.sparse, self.settings, self.vocab)
        out = np.empty(len(parsed.labels), dtype=np.float32)
        for lo in range(0, len(out), batch_size):
            hi = min(len(out), lo + batch_size)
            batch = self.encoder.make(parsed.dense[lo:hi], ids[lo:hi], parsed.labels[lo:hi],
                                      hi - lo)
            out[lo:hi] = self.program(*batch_inputs(batch, self.names)).numpy()
        return out


def add_labels(data: bytes) -> bytes:
    """39-column lines (no label) -> the 40-column layout with label 0."""
    out = b"0\t" + data.replace(b"\n", b"\n0\t")
    return out[:-2] if data.endswith(b"\n") else out


def score_files(scorer: RawRowScorer, inputs: Sequence[str], out_path: str,
                batch_size: int = 8192, labelled: bool = True,
                chunk_bytes: int = 8 << 20) -> dict:
    """Score `inputs` into `out_path` (one line per input line); returns a summary."""
    missing = [p for p in inputs if input_problem(p) == "not found"]
    if missing:
        raise ScoreError("input file(s) not found: " + ", ".join(missing))
    for p in inputs:
        problem = input_problem(p)
        if problem:
            raise ScoreError(f"input {p}: {problem}")
    if os.path.isdir(out_path):
        raise ScoreError(f"-o {out_path}: a folder; name the file to write the "
                         "probabilities to")
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ScoreError(f"-o {out_path}: cannot write there ({folder} is not a writable "
                         "folder)")
    report = pp.Report()
    probs: List[np.ndarray] = []
    labels: List[np.ndarray] = []
    start = time.perf_counter()
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as out:
            for path in inputs:
                bad = report.bad.setdefault(path, ct.BadRows())
                for chunk in _line_chunks(path, chunk_bytes, bad,
                                          ct.NUM_COLUMNS - (not labelled)):
                    parsed = ct.parse_chunk(chunk.data if labelled else add_labels(chunk.data),
                                            chunk.first_line)
                    bad.merge(parsed.bad)
                    p = scorer.score(parsed, batch_size)
                    # one output line per input line: nan where the line is malformed
                    line_probs = np.full(chunk.num_lines, np.nan, dtype=np.float32)
                    line_probs[parsed.lines - chunk.first_line] = p
                    out.write("\n".join(f"{x:.7f}" if x == x else "nan"
                                        for x in line_probs.tolist()) + "\n")
                    probs.append(p)
                    labels.append(parsed.labels.astype(np.float32))
                    report.lines += chunk.num_lines
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    seconds = time.perf_counter() - start
    p = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    summary = {"lines": report.lines, "scored": len(p),
               "malformed": sum(b.rejected() for b in report.bad.values()),
               "seconds": seconds}
    if labelled:
        y = np.concatenate(labels) if labels else np.zeros(0, np.float32)
        summary.update(prediction_metrics(torch.from_numpy(p), torch.from_numpy(y)))
    pp.print_report(report, out=sys.stderr, verb="scored as nan")
    return summary


def _line_chunks(path: str, chunk_bytes: int, bad: ct.BadRows,
                 columns: int) -> Iterator[ct.Chunk]:
    """`path` as chunks of whole lines of `columns` fields (`criteo_text.read_chunks`), a
    last line cut short included as one more chunk (scored nan, as it is malformed); a
    removed byte-order mark and a gzip stream error are recorded in `bad`."""
    ends: List[ct.StreamEnd] = []
    try:
        for chunk in ct.read_chunks(path, chunk_bytes, ends, columns):
            if chunk.bom_removed:
                bad.add(ct.BOM, 1)
            yield chunk
    except ValueError as e:
        raise ScoreError(f"{path}: not Criteo text ({e})") from None
    end = ends[0] if ends else ct.StreamEnd(1)
    if end.partial:  # scored like any other line
        yield ct.Chunk(end.partial + b"\n", end.next_line, 1)
    if end.error is not None:
        bad.add(end.error.reason, end.next_line + bool(end.partial), end.error.detail)
