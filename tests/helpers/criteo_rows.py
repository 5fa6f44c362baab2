"""Criteo text rows for tests: random well-formed rows (`good_row`), every malformed case
the preprocessing must catch (`bad_rows`), files of them (`make_lines`, `write`), and a
plain line-by-line parser of one row (`ref_parse`), written independently of the
vectorised one in dlrm_torchrec.data.converters.preprocess."""

import gzip
import math
import random
import re

import numpy as np


def good_row(rng: random.Random) -> str:
    label = rng.choice("01")
    dense = []
    for _ in range(13):
        r = rng.random()
        dense.append("" if r < 0.15 else str(rng.choice([-2, -1, 0, 1, 7, 123456789,
                                                          9999999999999999, rng.randrange(5000)]))
                     if r < 0.4 else str(rng.randrange(100)))
    cats = []
    for _ in range(26):
        r = rng.random()
        cats.append("" if r < 0.1 else rng.choice(["ffffffff", "00000000", "7fffffff", "ABCDEF01",
                                                   "1", f"{rng.randrange(2 ** 32):08x}"])
                    if r < 0.3 else f"{rng.randrange(50):08x}")
    return "\t".join([label] + dense + cats)


def bad_rows(rng: random.Random):
    """(text, reason) of every malformed case the pipeline must catch."""
    g = good_row(rng).split("\t")
    return [
        ("", "empty line"),
        ("\t".join(g[:39]), "wrong column count"),
        ("\t".join(g) + "\t", "wrong column count"),  # trailing tab
        ("\t".join(g + ["abc"]), "wrong column count"),
        ("\t".join(["2"] + g[1:]), "label not 0/1"),
        ("\t".join([""] + g[1:]), "label not 0/1"),
        ("\t".join(g[:3] + ["1.5"] + g[4:]), "non-integer dense value"),
        ("\t".join(g[:5] + ["x12"] + g[6:]), "non-integer dense value"),
        ("\t".join(g[:5] + ["12345678901234567"] + g[6:]), "non-integer dense value"),
        ("\t".join(g[:5] + ["-"] + g[6:]), "non-integer dense value"),
        ("\t".join(g[:20] + ["zz12ab34"] + g[21:]), "non-hex categorical value"),
        ("\t".join(g[:20] + ["123456789"] + g[21:]), "non-hex categorical value"),
        ("\t".join(g[:39] + ["ab cd"]), "non-hex categorical value"),
    ]


def make_lines(n: int, seed: int = 0, with_bad: bool = True):
    """n lines (as text without newline) and the expected reason (None: good) of each;
    some lines end in CR (CRLF files are repaired)."""
    rng = random.Random(seed)
    lines = [good_row(rng) for _ in range(n)]
    if with_bad:
        for text, _ in bad_rows(rng):
            lines.insert(rng.randrange(len(lines)), text)
        for _ in range(3):
            i = rng.randrange(len(lines))
            if lines[i]:
                lines[i] += "\r"
    return lines


def write(path, lines, gz=False, final_newline=True):
    data = ("\n".join(lines) + ("\n" if final_newline else "")).encode()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)
    return path


DENSE_RE = re.compile(r"-?[0-9]{1,16}")
HEX_RE = re.compile(r"[0-9a-fA-F]{0,8}")


def ref_parse(line: str):
    """(label, dense, raw ids) or None for a malformed line."""
    if line.endswith("\r"):
        line = line[:-1]
    f = line.split("\t")
    if len(f) != 40 or f[0] not in ("0", "1"):
        return None
    if any(x and not DENSE_RE.fullmatch(x) for x in f[1:14]):
        return None
    if any(not HEX_RE.fullmatch(x) for x in f[14:]):
        return None
    dense = [np.float32(math.log1p(max(int(x or 0), 0))) for x in f[1:14]]
    return int(f[0]), dense, [int(x or "0", 16) for x in f[14:]]
