"""Criteo data as TorchRec's own preprocessing writes it: random raw text rows TorchRec's
parser takes (`raw_row`), converted day by day by `BinaryCriteoUtils.tsv_to_npys`
(`torchrec_folder`)."""

import os
import random

from torchrec.datasets.criteo import BinaryCriteoUtils


def raw_row(rng: random.Random) -> str:
    """A Criteo text row TorchRec's parser takes (its dense values must fit int32)."""
    dense = ["" if rng.random() < 0.2 else str(rng.randrange(-3, 5000)) for _ in range(13)]
    cats = ["" if rng.random() < 0.1 else f"{rng.randrange(2 ** 32 if rng.random() < 0.3 else 60):08x}"
            for _ in range(26)]
    return "\t".join([rng.choice("01")] + dense + cats)


def torchrec_folder(tmp_path, stems_rows, dataset="criteo_1tb", seed=0):
    """Raw text per stem, converted by TorchRec's own tsv_to_npys into tmp_path/npy."""
    rng = random.Random(seed)
    raw, npy = tmp_path / "raw", tmp_path / "npy"
    raw.mkdir()
    npy.mkdir()
    for stem, rows in stems_rows:
        (raw / stem).write_text("".join(raw_row(rng) + "\n" for _ in range(rows)))
        # a relative input name: TorchRec reads a Kaggle file whose path contains "test"
        # (as pytest's folders do) as unlabelled
        BinaryCriteoUtils.tsv_to_npys(os.path.relpath(raw / stem),
                                      str(npy / f"{stem}_dense.npy"),
                                      str(npy / f"{stem}_sparse.npy"),
                                      str(npy / f"{stem}_labels.npy"), dataset)
    return npy
