"""Reading and parsing raw Criteo text (Kaggle `train.txt`, Terabyte `day_N[.gz]`).

A row is a label, 13 integer ("dense") features and 26 categorical features written as
hexadecimal strings, separated by tabs, ended by a newline; any feature may be empty.

`parse_chunk` turns a block of complete lines into numpy arrays with vectorised numpy only
(no per-line Python), validating every row; `read_chunks` streams a plain or gzip file in
blocks that end on a line boundary, with the line number of each block's first line.

Two things editors and spreadsheet exports leave are repaired (and reported): a UTF-8
byte-order mark before the first row is removed, and a last row without its newline is a
row like the others when it has all its columns and the stream ended cleanly. A last line
with fewer columns, or one followed by a damaged gzip stream, was cut short: "truncated".
"""

import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

NUM_DENSE = 13
NUM_SPARSE = 26
NUM_COLUMNS = 1 + NUM_DENSE + NUM_SPARSE
MAX_DENSE_DIGITS = 16  # two 8-byte windows; longer integers are rejected as malformed
MAX_HEX_DIGITS = 8  # ids are 32-bit
MAX_LINE_BYTES = 1 << 20  # a Criteo row is < 1 KB; a longer "line" means not a text file
NUM_EXAMPLES = 5  # bad lines kept (with their reason) per reason and chunk

# reasons a row is rejected; CRLF rows and a byte-order mark are repaired and kept, but
# counted (and strict mode rejects them)
EMPTY = "empty line"
COLUMNS = "wrong column count"
LABEL = "label not 0/1"
DENSE = "non-integer dense value"
HEX = "non-hex categorical value"
TRUNCATED_LINE = "truncated last line (no newline at end of file, too few columns)"
TRUNCATED_GZIP = "truncated gzip stream"
CORRUPT_GZIP = "corrupt gzip stream"
CRLF = "CRLF line ending (repaired, row kept)"
BOM = "UTF-8 byte-order mark at the start of the file (removed, row kept)"
REPAIRED = (CRLF, BOM)  # reported, not rejected
UTF8_BOM = b"\xef\xbb\xbf"

_DEC = np.full(256, 255, dtype=np.uint8)
_DEC[48:58] = np.arange(10)
_HEX = _DEC.copy()
_HEX[97:103] = np.arange(10, 16)  # a-f
_HEX[65:71] = np.arange(10, 16)  # A-F
_HEX_BYTES = _HEX.tobytes()  # the same table for bytes.translate


@dataclass
class BadRows:
    """Counts of rejected (or repaired) rows per reason, with the first few examples."""

    counts: Dict[str, int] = field(default_factory=dict)
    examples: Dict[str, List[Tuple[int, str]]] = field(default_factory=dict)

    def add(self, reason: str, line: int, detail: str = "", count: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count
        ex = self.examples.setdefault(reason, [])
        if len(ex) < NUM_EXAMPLES:
            ex.append((line, detail))

    def merge(self, other: "BadRows") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.examples.get(reason, [])[: NUM_EXAMPLES - len(ex)])

    def rejected(self) -> int:
        return sum(n for r, n in self.counts.items() if r not in REPAIRED)

    def first(self) -> Optional[Tuple[int, str, str]]:
        """(line, reason, detail) of the earliest example, repairs included."""
        best = None
        for reason, ex in self.examples.items():
            for line, detail in ex:
                if best is None or line < best[0]:
                    best = (line, reason, detail)
        return best


@dataclass
class ParsedChunk:
    """The valid rows of a chunk. `lines` are their 1-based line numbers in the file."""

    labels: np.ndarray  # (n,) int32
    dense: np.ndarray  # (n, 13) float32, log(max(x, 0) + 1)
    sparse: np.ndarray  # (n, 26) uint32, the raw hexadecimal values
    lines: np.ndarray  # (n,) int64
    num_lines: int
    bad: BadRows
    bad_in_head: int  # rejected rows among the first HEAD_LINES lines of the chunk
    head_lines: int
    dense_raw: Optional[np.ndarray] = None  # (n, 13) int64 as written, negatives kept
    # (parse_chunk(..., raw_dense=True) only: TorchRec's transform needs them)


HEAD_LINES = 1000


def _field_text(buf: np.ndarray, start: int, stop: int) -> str:
    text = bytes(buf[start:stop]).decode("utf-8", errors="replace")
    return repr(text if len(text) <= 24 else text[:24] + "...")


_LANES = (np.uint64(0x00FF00FF00FF00FF), np.uint64(0x0000FFFF0000FFFF), np.uint64(0xFFFFFFFF))
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
_HIGH_BITS = np.uint64(0x8080808080808080)


def _windows(padded: np.ndarray) -> np.ndarray:
    """Unaligned little-endian uint64 view: element i holds padded[i:i + 8]."""
    return np.ndarray(shape=(len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))


_DEC_CHECK = np.uint64(0x7676767676767676)  # + a hex digit value: the high bit set iff >= 10


def _window_value(win: np.ndarray, ends: np.ndarray, ndig: np.ndarray,
                  base: int) -> Tuple[np.ndarray, np.ndarray]:
    """Value of the last `ndig` (0..8) characters before each `ends` (indices into the
    8-byte-padded buffer, so `win[ends]` is the 8 bytes ending there); `win` holds the
    buffer's hexadecimal digit values (`_HEX`, 0xFF for other bytes), so base 10 also
    rejects the digits a-f. Returns (uint64 values, valid mask). Digits are packed
    pairwise (SWAR) in three steps."""
    digits = win[ends]
    # 0xFF in the bytes of the used (last ndig) characters
    shift = (np.uint64(8) * (np.uint64(8) - ndig.astype(np.uint64))).clip(0, 63)
    used = (_ALL << shift) * (ndig > 0)
    x = digits & used
    ok = (x & _HIGH_BITS) == 0  # the lookup table marks non-digits 0xFF
    if base == 10:
        # every byte is <= 15 where ok, so adding 0x76 carries into no other byte
        ok &= ((x + _DEC_CHECK) & used & _HIGH_BITS) == 0
    m1, m2, m3 = _LANES
    x = (x & m1) * np.uint64(base) + ((x >> np.uint64(8)) & m1)
    x = (x & m2) * np.uint64(base ** 2) + ((x >> np.uint64(16)) & m2)
    x = (x & m3) * np.uint64(base ** 4) + (x >> np.uint64(32))
    return x, ok


def _parse_numbers(win: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                   base: int, max_digits: int) -> Tuple[np.ndarray, np.ndarray]:
    """Digits padded[starts:ends] -> (uint64 values, valid mask); `max_digits` <= 16.
    Empty fields are 0; fields longer than `max_digits` or with a non-digit are invalid."""
    nd = ends - starts
    ok = nd <= max_digits
    value, ok_lo = _window_value(win, ends, np.minimum(nd, 8), base)
    ok &= ok_lo
    if max_digits > 8:
        long = np.flatnonzero(nd > 8)
        if len(long):
            hi, ok_hi = _window_value(win, ends[long] - 8, np.clip(nd[long] - 8, 0, 8), base)
            value[long] += hi * np.uint64(base ** 8)
            ok[long] &= ok_hi
    return value, ok


BLOCK_BYTES = 1 << 20  # numpy temporaries of a 1 MB block stay in the CPU caches


def log_dense(values: np.ndarray) -> np.ndarray:
    """Dense values >= 0 -> log(x + 1) as float32 (computed in float64: every path that
    stores or loads dense values gives the same bits)."""
    return np.log1p(np.asarray(values, dtype=np.float64)).astype(np.float32)


def parse_chunk(data: bytes, first_line: int, raw_dense: bool = False) -> ParsedChunk:
    """Parse `data` (whole lines, each ending in a newline) whose first line is line
    `first_line` of its file. Malformed rows are dropped and recorded in `bad`. With
    `raw_dense`, `dense_raw` also holds the dense values as written (missing ones 0)."""
    parts = []
    pos, line = 0, first_line
    while pos < len(data):
        cut = data.rfind(b"\n", pos, pos + BLOCK_BYTES) + 1
        if cut <= pos:  # a line longer than a block
            cut = data.index(b"\n", pos) + 1
        part = _parse_block(data[pos:cut], line, raw_dense)
        parts.append(part)
        pos, line = cut, line + part.num_lines
    if len(parts) == 1:
        return parts[0]
    bad = BadRows()
    for p in parts:
        bad.merge(p.bad)
    return ParsedChunk(
        labels=np.concatenate([p.labels for p in parts]),
        dense=np.concatenate([p.dense for p in parts]),
        sparse=np.concatenate([p.sparse for p in parts]),
        lines=np.concatenate([p.lines for p in parts]),
        num_lines=sum(p.num_lines for p in parts),
        bad=bad,
        bad_in_head=parts[0].bad_in_head,
        head_lines=parts[0].head_lines,
        dense_raw=np.concatenate([p.dense_raw for p in parts]) if raw_dense else None,
    )


def _parse_block(data: bytes, first_line: int, raw_dense: bool = False) -> ParsedChunk:
    buf = np.frombuffer(data, dtype=np.uint8)
    is_nl = buf == 10
    nl = np.flatnonzero(is_nl)
    num_lines = len(nl)
    if num_lines and nl[-1] != len(buf) - 1:
        raise ValueError("parse_chunk needs whole lines")
    delim = np.flatnonzero(is_nl | (buf == 9))
    del is_nl
    nl_at = np.flatnonzero(buf[delim] == 10)  # index in `delim` of each line's newline
    ntabs = np.diff(nl_at, prepend=-1) - 1
    line_start = np.empty(num_lines, dtype=np.int64)
    line_start[:1] = 0
    line_start[1:] = nl[:-1] + 1
    crlf = (nl > line_start) & (buf[nl - 1] == 13)
    line_end = nl - crlf  # end of the last field
    line_no = first_line + np.arange(num_lines, dtype=np.int64)
    bad = BadRows()
    ok_line = ntabs == NUM_COLUMNS - 1
    reject = np.zeros(num_lines, dtype=bool)

    # rows with the wrong number of columns (an empty line is a special case)
    wrong = np.flatnonzero(~ok_line)
    if len(wrong):
        empty = (line_end[wrong] == line_start[wrong]) & (ntabs[wrong] == 0)
        for is_empty in (True, False):
            sel = wrong[empty == is_empty]
            if not len(sel):
                continue
            for i in sel[:NUM_EXAMPLES]:
                if is_empty:
                    detail = ""
                else:
                    trailing = line_end[i] > line_start[i] and buf[line_end[i] - 1] == 9
                    detail = f"{ntabs[i] + 1} columns, expected {NUM_COLUMNS}" + (
                        " (trailing tab)" if trailing else "")
                bad.add(EMPTY if is_empty else COLUMNS, int(line_no[i]), detail)
            bad.counts[EMPTY if is_empty else COLUMNS] += len(sel) - min(len(sel), NUM_EXAMPLES)
        reject[wrong] = True

    gi = np.flatnonzero(ok_line)
    if len(gi) == num_lines:  # the usual case: every line has 40 fields
        ends = delim.reshape(num_lines, NUM_COLUMNS)
    else:
        ends = delim[nl_at[gi][:, None] + np.arange(-(NUM_COLUMNS - 1), 1)]  # (g, 40)
    ends[:, -1] = line_end[gi]
    starts = np.empty_like(ends)
    starts[:, 0] = line_start[gi]
    starts[:, 1:] = ends[:, :-1] + 1

    # label: exactly "0" or "1"
    lab = buf[starts[:, 0]].astype(np.int32) - 48
    lab_ok = (ends[:, 0] - starts[:, 0] == 1) & (lab >= 0) & (lab <= 1)

    # every field ends 8 bytes later in the padded copy, so an 8-byte window ending at a
    # field never starts before the buffer
    # the digit values of the whole block in one table lookup (a byte per byte of text),
    # rather than one per byte of every field's 8-byte window
    # (bytes.translate: numpy's fancy indexing by uint8 is several times slower)
    padded = np.frombuffer(bytes(8) + bytes(data).translate(_HEX_BYTES), dtype=np.uint8)
    win = _windows(padded)
    g = len(gi)

    # dense: optional leading '-', then decimal digits; negatives become 0
    ds = np.ascontiguousarray(starts[:, 1:1 + NUM_DENSE]).ravel()
    de = np.ascontiguousarray(ends[:, 1:1 + NUM_DENSE]).ravel()
    neg = (de > ds) & (buf[np.minimum(ds, len(buf) - 1)] == 45)
    dval, dok = _parse_numbers(win, ds + neg, de, 10, MAX_DENSE_DIGITS)
    dok &= ~neg | (de - ds > 1)
    signed = None
    if raw_dense:
        signed = dval.astype(np.int64)  # at most 16 digits: below 2^63
        signed[neg] *= -1
    dval[neg] = 0
    dval, dok = dval.reshape(g, NUM_DENSE), dok.reshape(g, NUM_DENSE)
    ds, de = ds.reshape(g, NUM_DENSE), de.reshape(g, NUM_DENSE)

    # categorical: up to 8 hexadecimal digits
    cs = np.ascontiguousarray(starts[:, 1 + NUM_DENSE:]).ravel()
    ce = np.ascontiguousarray(ends[:, 1 + NUM_DENSE:]).ravel()
    cval, cok = _parse_numbers(win, cs, ce, 16, MAX_HEX_DIGITS)
    cval, cok = cval.reshape(g, NUM_SPARSE), cok.reshape(g, NUM_SPARSE)
    cs, ce = cs.reshape(g, NUM_SPARSE), ce.reshape(g, NUM_SPARSE)

    dense_row_ok = dok.all(axis=1)
    cat_row_ok = cok.all(axis=1)
    checks = [(LABEL, lab_ok, None, None, None), (DENSE, dense_row_ok, dok, ds, de),
              (HEX, cat_row_ok, cok, cs, ce)]
    row_ok = np.ones(len(gi), dtype=bool)
    for reason, good, field_ok, fs, fe in checks:
        sel = np.flatnonzero(row_ok & ~good)  # report each row once, first reason wins
        if len(sel):
            for r in sel[:NUM_EXAMPLES]:
                if field_ok is None:
                    detail = _field_text(buf, starts[r, 0], ends[r, 0])
                else:
                    c = int(np.flatnonzero(~field_ok[r])[0])
                    name = f"I{c + 1}" if reason == DENSE else f"C{c + 1}"
                    detail = f"column {name} = {_field_text(buf, fs[r, c], fe[r, c])}"
                bad.add(reason, int(line_no[gi[r]]), detail)
            bad.counts[reason] += len(sel) - min(len(sel), NUM_EXAMPLES)
            row_ok[sel] = False
    reject[gi[~row_ok]] = True
    kept_crlf = np.flatnonzero(crlf & ~reject)
    if len(kept_crlf):
        for i in kept_crlf[:NUM_EXAMPLES]:
            bad.add(CRLF, int(line_no[i]))
        bad.counts[CRLF] += len(kept_crlf) - min(len(kept_crlf), NUM_EXAMPLES)

    head = min(num_lines, HEAD_LINES)
    keep = row_ok
    dense = log_dense(dval[keep])
    return ParsedChunk(
        labels=lab[keep].astype(np.int32),
        dense=dense,
        sparse=cval[keep].astype(np.uint32),
        lines=line_no[gi[keep]],
        num_lines=num_lines,
        bad=bad,
        bad_in_head=int(reject[:head].sum()),
        head_lines=head,
        dense_raw=signed.reshape(g, NUM_DENSE)[keep] if raw_dense else None,
    )


# --------------------------------------------------------------------------- reading


def is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


class StreamError(Exception):
    """The input stream ended badly (truncated or corrupt gzip); `reason` is one of the
    reasons above. Raised after every complete line before the damage was delivered."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _raw_blocks(path: str, block: int) -> Iterator[bytes]:
    """Decompressed (if gzip, concatenated members included) blocks of the file."""
    with open(path, "rb") as f:
        if not is_gzip(path):
            while True:
                b = f.read(block)
                if not b:
                    return
                yield b
        d = zlib.decompressobj(wbits=31)
        in_block = max(block // 4, 1 << 16)
        while True:
            comp = f.read(in_block)
            if not comp:
                if not d.eof:
                    raise StreamError(TRUNCATED_GZIP, "the file ends inside the gzip stream")
                return
            while comp:
                if d.eof:  # a further gzip member (or zero padding) follows
                    comp = comp.lstrip(b"\x00")
                    if not comp:
                        break
                    d = zlib.decompressobj(wbits=31)
                before = d.copy()  # to recover the output of a call that fails
                try:
                    out = d.decompress(comp)
                except zlib.error as e:
                    out = _output_before_damage(before, comp)
                    if out:
                        yield out
                    raise StreamError(CORRUPT_GZIP, str(e)) from None
                if out:
                    yield out
                comp = d.unused_data if d.eof else b""


def _output_before_damage(d, comp: bytes) -> bytes:
    """What decompressor `d` gives for `comp` up to the byte where it fails. A failing call
    returns nothing, so a damaged stream (a CRC mismatch is found only in the member's
    trailer) would lose the lines of the whole call; fed in 1 KB steps, then byte by byte
    from the failing step, everything before the damage comes out."""
    parts = []
    pos = 0
    for step in (1 << 10, 1):
        while pos < len(comp):
            before = d.copy()
            try:
                parts.append(d.decompress(comp[pos:pos + step]))
            except zlib.error:
                d = before
                break
            pos += step
    return b"".join(parts)


@dataclass
class Chunk:
    data: bytes  # whole lines
    first_line: int  # 1-based number of its first line in the file
    num_lines: int
    bom_removed: bool = False  # a UTF-8 byte-order mark preceded its first line


@dataclass
class StreamEnd:
    """What follows the last whole line: a partial line, and/or a stream error."""

    next_line: int
    partial: bytes = b""
    error: Optional[StreamError] = None


def read_chunks(path: str, chunk_bytes: int, end: List[StreamEnd],
                columns: int = NUM_COLUMNS) -> Iterator[Chunk]:
    """Yield `path` as chunks of about `chunk_bytes` of whole lines; on exhaustion append a
    StreamEnd to `end` (a partial last line, a gzip error). A byte-order mark at the start is
    removed (the first chunk says so); a last line without newline that has `columns`
    tab-separated fields, in a stream that ended cleanly, is delivered as a whole line.
    Lines over MAX_LINE_BYTES raise ValueError: the file is not Criteo text."""
    carry = b""
    line = 1
    pending: List[bytes] = []
    pending_len = 0
    error = None
    head = True  # the file's first bytes are still to be looked at
    bom = False  # a removed byte-order mark not yet reported with a chunk
    try:
        for block in _raw_blocks(path, chunk_bytes):
            pending.append(block)
            pending_len += len(block)
            if pending_len < chunk_bytes:
                continue
            data = carry + b"".join(pending)
            pending, pending_len = [], 0
            if head:
                head, bom = False, data.startswith(UTF8_BOM)
                data = data[len(UTF8_BOM):] if bom else data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                if len(data) > MAX_LINE_BYTES:
                    raise ValueError(f"line {line} is longer than {MAX_LINE_BYTES} bytes")
                carry = data
                continue
            chunk, carry = data[:cut], data[cut:]
            if len(carry) > MAX_LINE_BYTES:
                long_line = line + chunk.count(b"\n")
                raise ValueError(f"line {long_line} is longer than {MAX_LINE_BYTES} bytes")
            n = chunk.count(b"\n")
            yield Chunk(chunk, line, n, bom)
            line += n
            bom = False
    except StreamError as e:
        error = e
    data = carry + b"".join(pending)
    if head:
        bom = data.startswith(UTF8_BOM)
        data = data[len(UTF8_BOM):] if bom else data
    cut = data.rfind(b"\n") + 1
    if error is None and len(data) > cut and data.count(b"\t", cut) == columns - 1:
        data += b"\n"  # a complete last row that only lacks its newline
        cut = len(data)
    if cut:
        n = data.count(b"\n", 0, cut)
        yield Chunk(data[:cut], line, n, bom)
        line += n
    if len(data) - cut > MAX_LINE_BYTES:
        raise ValueError(f"line {line} is longer than {MAX_LINE_BYTES} bytes")
    end.append(StreamEnd(line, data[cut:], error))
