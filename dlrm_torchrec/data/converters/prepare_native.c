/* The hot loops of prepare_mlperf, compiled once per machine (`native.py`) and called
 * through ctypes on numpy arrays: the text parser, the id tables (first occurrences of a
 * day, the global numbering of a feature), the scatter of rows to their buckets, and the
 * placing of a bucket's rows. Everything that decides what the output bytes are (TorchRec's
 * rules, the error reports) stays in Python; these only make it fast.
 *
 * C99 with GCC/Clang builtins, no Python headers: built with `cc -O3 -shared -fPIC`.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NUM_DENSE 13
#define NUM_SPARSE 26
#define EMPTY 0xFFFFFFFFu /* a free slot: no value ever reaches it (table_assign checks) */
#define PREFETCH 64 /* values ahead whose first slot is fetched early: far enough for a DRAM miss */

/* ------------------------------------------------------------------ the text parser */

/* hexadecimal digit values, 0xFF for every other byte; DEC: the same for 0-9 */
static uint8_t HEX[256], DEC[256];
static int tables_ready = 0;

static void init_tables(void) {
    memset(HEX, 0xFF, sizeof HEX);
    memset(DEC, 0xFF, sizeof DEC);
    for (int c = 0; c < 10; c++) HEX['0' + c] = DEC['0' + c] = (uint8_t)c;
    for (int c = 0; c < 6; c++) HEX['a' + c] = HEX['A' + c] = (uint8_t)(10 + c);
    tables_ready = 1;
}

/* The number of decimal digits that `word`'s bytes (8 bytes of text, little-endian:
 * the first byte lowest) start with, 8 if all are. A byte is a digit when its high nibble
 * is 3 and adding 6 keeps it so; a carry out of a non-digit byte only disturbs the bytes
 * after it, which do not count. */
static inline int digits_before(uint64_t word) {
    const uint64_t high = 0xF0F0F0F0F0F0F0F0ull, threes = 0x3030303030303030ull;
    uint64_t other = ((word & high) ^ threes) | (((word + 0x0606060606060606ull) & high) ^ threes);
    return other ? __builtin_ctzll(other) >> 3 : 8;
}

/* The numbers whose 4 digits (0-9) are the bytes of each 32-bit half of v, the most
 * significant in the lowest byte, in the low 16 bits of each half: pairs, then quads
 * combined by multiplication. */
static inline uint64_t digits_quads(uint64_t v) {
    v = (v * 10 + (v >> 8)) & 0x00FF00FF00FF00FFull;
    return (v * 100 + (v >> 16)) & 0x0000FFFF0000FFFFull;
}

/* The number whose 8 digits (0-9) are v's bytes, the most significant in the lowest byte:
 * its two quads combined by one more multiplication. */
static inline uint32_t digits_combined(uint64_t v) {
    v = digits_quads(v);
    return (uint32_t)((v * 10000 + (v >> 32)) & 0xFFFFFFFFull);
}

/* The value of the first nd (1..7) digits of `word`: their bytes moved to the top (the
 * rest shifted out, zeros below as leading zeros), then combined. Subtracting '0' borrows
 * only into the bytes after them. */
static inline uint32_t digits_value(uint64_t word, int nd) {
    return digits_combined((word - 0x3030303030303030ull) << (8 * (8 - nd)));
}

/* parse_plain_line reads at most this many bytes from a line's start: the label (2), the
 * 64 bytes searched for the dense values' tabs (the words read at the values' starts end
 * inside those and the ids), the 26 ids of 8 digits with their separators (234); lines
 * nearer the buffer's end are left to the byte by byte parser. */
#define PLAIN_BYTES 320
#define TEXT_AHEAD 1024 /* how far ahead of the line parse_lines prefetches the text */

/* The positions of `word`'s bytes equal to `c8`'s (one byte below 0x80, repeated), as
 * bits 0-7. Exact for every byte: the low 7 bits are tested by an addition that cannot
 * carry out of its byte; the high bits then gathered by one multiplication, each landing
 * on its own bit of the top byte with no carries. */
static inline uint64_t bytes_equal(uint64_t word, uint64_t c8) {
    const uint64_t low7 = 0x7F7F7F7F7F7F7F7Full;
    uint64_t x = word ^ c8;
    uint64_t zero = ~(((x & low7) + low7) | x | low7);
    return (zero >> 7) * 0x0102040810204080ull >> 56;
}

/* -1 for '-', 0 for every other byte: a sign as a mask by one load (a comparison's flags
 * would cost more instructions and tie the values' ones together) */
static const int8_t MINUS[256] = {['-'] = -1};

/* The next dense value of a line whose dense text starts at q (bit i of *tabs: a tab at
 * q[i]), starting at *f: its tab taken off *tabs and *f moved past it. Returns the
 * value's first 8 bytes (as many past it as there are), *len its length and *neg -1 when
 * it starts with '-', else 0. */
static inline uint64_t next_value(const uint8_t *q, uint64_t *tabs, const uint8_t **f,
                                  uint64_t *len, uint64_t *neg) {
    const uint8_t *tab = q + __builtin_ctzll(*tabs);
    uint64_t word;
    *tabs &= *tabs - 1;
    memcpy(&word, *f, sizeof word);
    *len = (uint64_t)(tab - *f);
    *neg = (uint64_t)(int64_t)MINUS[word & 0xFF];
    *f = tab + 1;
    return word;
}

/* How a dense value of n bytes is set out for digits_combined: PLACE8[2 n + m]
 * (m = 1 when it starts with '-') for n <= 8 in 64 bits, PLACE4 for n <= 4 in 32. First
 * what its first byte is xored with after '0' (0x1D = '-' ^ '0': a '-' as a leading 0,
 * but a '-' alone stays a non-digit), then the factor that moves its n bytes to the top
 * (0 for n = 0: all moved out, the value 0). */
static const uint64_t PLACE8[18][2] = {
    {0, 0}, {0, 0}, {0, 1ull << 56}, {0, 1ull << 56}, {0, 1ull << 48}, {0x1D, 1ull << 48},
    {0, 1ull << 40}, {0x1D, 1ull << 40}, {0, 1ull << 32}, {0x1D, 1ull << 32},
    {0, 1ull << 24}, {0x1D, 1ull << 24}, {0, 1ull << 16}, {0x1D, 1ull << 16},
    {0, 1ull << 8}, {0x1D, 1ull << 8}, {0, 1}, {0x1D, 1}};
static const uint32_t PLACE4[10][2] = {
    {0, 0}, {0, 0}, {0, 1u << 24}, {0, 1u << 24}, {0, 1u << 16}, {0x1D, 1u << 16},
    {0, 1u << 8}, {0x1D, 1u << 8}, {0, 1}, {0x1D, 1}};

/* 16-byte vectors of GCC's generic vector extension, which the compiler maps on what the
 * target has (SSE2 on x86-64, NEON on AArch64, plain words elsewhere) */
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef uint64_t u64x2 __attribute__((vector_size(16)));

/* The elements of a and b (numbered on after a's) at constant indices, as a vector of
 * `type`: the builtin that Clang and GCC 12 share, else GCC's older one */
#if defined(__clang__) || __GNUC__ >= 12
#define PICK(type, a, b, ...) ((type)__builtin_shufflevector(a, b, __VA_ARGS__))
#else
#define PICK(type, a, b, ...) ((type)__builtin_shuffle(a, b, (type){__VA_ARGS__}))
#endif

/* Two ids of 8 hexadecimal digits, one per half of x: the values of their digit pairs
 * (n0 << 4 | n1), each in the high byte of 16 bits, the id's last pair first. Clears the
 * bytes of *ok for x's bytes that are no hexadecimal digit (0-9, a-f, A-F): a byte is in
 * [lo, lo + n) when adding 0x80 - lo (wrapping) lands it in [-128, -128 + n), the
 * letters tested with their case folded (| 0x20 brings only 0x41-0x46 to them). A
 * letter's value is its low 4 bits + 9; one multiplication by 0x1001 makes n0 << 4 | n1
 * in the high byte of (n0 | n1 << 8). */
static inline u16x8 hex_pairs(i8x16 x, i8x16 *ok) {
    i8x16 digit = (i8x16)(x + 0x50) < -118;
    i8x16 letter = (i8x16)((x | 0x20) + 0x1F) < -122;
    *ok &= digit | letter;
    u16x8 pairs = (u16x8)((x & 0x0F) + (letter & 9)) * 0x1001;
    return PICK(u16x8, pairs, pairs, 3, 2, 1, 0, 7, 6, 5, 4);
}

/* The values of the ids of 8 digits at a, b, c, d written to col[0], col[stride], ...
 * (the first n of them, n = 2 or 4), *ok's bytes cleared as hex_pairs does: the pairs'
 * bytes gathered, which puts each id's in the order of its 32 bits. */
static inline void id_values(const uint8_t *a, const uint8_t *b, const uint8_t *c,
                             const uint8_t *d, uint32_t *col, int64_t stride, int n,
                             i8x16 *ok) {
    uint64_t wa, wb, wc, wd;
    memcpy(&wa, a, sizeof wa);
    memcpy(&wb, b, sizeof wb);
    memcpy(&wc, c, sizeof wc);
    memcpy(&wd, d, sizeof wd);
    u16x8 ab = hex_pairs((i8x16)(u64x2){wa, wb}, ok);
    u16x8 cd = hex_pairs((i8x16)(u64x2){wc, wd}, ok);
    u32x4 v = (u32x4)PICK(u8x16, (u8x16)ab, (u8x16)cd, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21,
                          23, 25, 27, 29, 31);
    col[0] = v[0];
    col[stride] = v[1];
    if (n > 2) {
        col[2 * stride] = v[2];
        col[3 * stride] = v[3];
    }
}

/* The digits of the id at *f, *f moved past it and its separator `sep`: an id of 8
 * digits as it is (id_values checks them), an empty one as "00000000" (its value, 0);
 * NULL for any other length. */
static const uint8_t ZERO_ID[8] = {'0', '0', '0', '0', '0', '0', '0', '0'};

static inline const uint8_t *next_id(const uint8_t **f, uint8_t sep) {
    const uint8_t *id = *f;
    if (__builtin_expect(id[8] == sep, 1)) { *f = id + 9; return id; }
    if (id[0] == sep) { *f = id + 1; return ZERO_ID; }
    return NULL;
}

/* One line at `p`, at least PLAIN_BYTES before the buffer's end, in its common form:
 * label "0" or "1"; 13 dense values of up to 8 bytes (digits, or a '-' and up to 7
 * digits: inside int32), all within 64 bytes; 26 ids of 8 hexadecimal digits or empty.
 * Every such line is plainly valid; writes its values as parse_lines would, folds its
 * smallest dense value into *low and returns the next line's start. Returns NULL for any
 * other line, whose outputs may then be partly written: the byte by byte parser takes it
 * from its start. Branches only on the shape of the line: the bytes' checks are gathered
 * in the high bits of `bad` and of the vector `hex`, tested once at the end. */
static inline const uint8_t *parse_plain_line(const uint8_t *p, int32_t *label, int32_t *d,
                                              uint32_t *col, int64_t col_stride,
                                              int64_t *low) {
    if ((p[0] != '0' && p[0] != '1') || p[1] != '\t') return NULL;
    const uint8_t *q = p + 2, *f = q;
    /* the tabs of the dense text: bit i for q[i] */
    uint64_t tabs = 0;
    for (int i = 0; i < 8; i++) {
        uint64_t word;
        memcpy(&word, q + 8 * i, sizeof word);
        tabs |= bytes_equal(word, 0x0909090909090909ull) << (8 * i);
    }
    /* the 13th tab ends the dense text; in it, the runs of bytes without a tab (5 in a
     * row from bit i: bit i of run5) give the longest value */
    uint64_t end13 = tabs;
    for (int c = 0; c < NUM_DENSE - 1; c++) end13 &= end13 - 1;
    if (!end13) return NULL;
    uint64_t text = ~tabs & ((end13 << 1) - 1);
    uint64_t run4 = text & text >> 1;
    run4 &= run4 >> 2;
    uint64_t run5 = run4 & text >> 4, run9 = run4 & run4 >> 4 & text >> 8;
    if (run9) return NULL;
    uint64_t bad = 0, len, neg[2];
    int64_t line_low = INT64_MAX;
    if (!run5) {
        /* no value over 4 bytes (nearly always): two at a time, one in each half of a word,
         * digits_quads making both */
        for (int c = 0; c < NUM_DENSE; c += 2) {
            uint64_t two = 0;
            neg[1] = 0;
            for (int h = 0; h < 2 && c + h < NUM_DENSE; h++) {
                uint64_t word = next_value(q, &tabs, &f, &len, &neg[h]);
                const uint32_t *place = PLACE4[2 * len + (neg[h] & 1)];
                two |= (uint64_t)(((uint32_t)word ^ 0x30303030u ^ place[0]) * place[1])
                       << (32 * h);
            }
            /* a byte above 9 (no digit) sets its high bit: one below 0x80 by the addition
             * (which carries out only of those with it set already) */
            bad |= two | (two + 0x7676767676767676ull);
            two = digits_quads(two);
            for (int h = 0; h < 2 && c + h < NUM_DENSE; h++) {
                int64_t value = (int64_t)((two >> (32 * h)) & 0xFFFF);
                value = (value ^ (int64_t)neg[h]) - (int64_t)neg[h];
                if (value < line_low) line_low = value;
                d[c + h] = (int32_t)value;
            }
        }
    } else {
        for (int c = 0; c < NUM_DENSE; c++) {
            uint64_t word = next_value(q, &tabs, &f, &len, &neg[0]);
            const uint64_t *place = PLACE8[2 * len + (neg[0] & 1)];
            uint64_t v = (word ^ 0x3030303030303030ull ^ place[0]) * place[1];
            bad |= v | (v + 0x7676767676767676ull);
            int64_t value = (int64_t)digits_combined(v);
            value = (value ^ (int64_t)neg[0]) - (int64_t)neg[0];
            if (value < line_low) line_low = value;
            d[c] = (int32_t)value;
        }
    }
    /* the ids: nearly always all of 8 digits, at fixed places */
    i8x16 hex = (i8x16)(u64x2){~0ull, ~0ull};
    int fixed = f[9 * NUM_SPARSE - 1] == '\n';
#pragma GCC unroll 32 /* a comparison each */
    for (int c = 0; c < NUM_SPARSE - 1; c++)
        if (f[9 * c + 8] != '\t') fixed = 0;
    if (fixed) {
        for (int c = 0; c < NUM_SPARSE - 2; c += 4, f += 36)
            id_values(f, f + 9, f + 18, f + 27, col + c * col_stride, col_stride, 4, &hex);
        id_values(f, f + 9, f, f + 9, col + (NUM_SPARSE - 2) * col_stride, col_stride, 2, &hex);
        f += 18;
    } else {
        const uint8_t *id[NUM_SPARSE];
        for (int c = 0; c < NUM_SPARSE; c++) {
            id[c] = next_id(&f, c == NUM_SPARSE - 1 ? '\n' : '\t');
            if (!id[c]) return NULL;
        }
        for (int c = 0; c < NUM_SPARSE - 2; c += 4)
            id_values(id[c], id[c + 1], id[c + 2], id[c + 3], col + c * col_stride, col_stride,
                      4, &hex);
        id_values(id[NUM_SPARSE - 2], id[NUM_SPARSE - 1], id[NUM_SPARSE - 2],
                  id[NUM_SPARSE - 1], col + (NUM_SPARSE - 2) * col_stride, col_stride, 2, &hex);
    }
    uint64_t all_hex = ((u64x2)hex)[0] & ((u64x2)hex)[1];
    if ((bad | ~all_hex) & 0x8080808080808080ull) return NULL;
    *label = p[0] - '0';
    if (line_low < *low) *low = line_low;
    return f;
}

/* Parse the whole Criteo lines (label, 13 integers, 26 hexadecimal ids; tab separated,
 * each ending in '\n') at the start of `buf`, writing row r's label to labels[r], its
 * dense values to dense[13 r ..] and its id of feature f to sparse[f * col_stride + r]
 * (feature-major: each feature's ids are then numbered in one pass over a contiguous
 * column). Takes only rows that are plainly valid: label "0" or "1"; dense values empty
 * (0) or an optional '-' and 1-16 digits, inside int32; ids of 0-8 hexadecimal digits
 * (empty: 0); exactly 40 fields; no '\r'. Stops at the first line that is anything else
 * (*stop = 1: the caller parses from there with the exact parser, which names the
 * problem or repairs the line as the other readers do), at a line the buffer ends inside
 * (*stop = 0), or after max_rows rows (*stop = 2). Returns the rows parsed; *consumed
 * becomes their bytes, *dense_min the smallest dense value of those rows (untouched without
 * rows: a line stopped at does not count, as the exact parser may drop it).
 * Lines in their common form are read a word or a vector at a time (parse_plain_line);
 * every other line, and those near the buffer's end, byte by byte, which decides. The
 * row a stop leaves behind (row `rows`) may hold values of the line stopped at. */
int64_t parse_lines(const uint8_t *buf, int64_t len, int64_t max_rows, int64_t col_stride,
                    int32_t *labels, int32_t *dense, uint32_t *sparse, int64_t *dense_min,
                    int64_t *consumed, int64_t *stop) {
    if (!tables_ready) init_tables();
    const uint8_t *p = buf, *end = buf + len, *line = buf;
    int64_t rows = 0, low = INT64_MAX;
    for (;; rows++) {
        line = p;
        if (p == end) { *stop = 0; break; }
        if (rows == max_rows) { *stop = 2; break; }
        if (end - p >= PLAIN_BYTES) {
            /* the text a few lines ahead fetched now, a line's worth per line: the
             * hardware's own prefetching alone leaves the parser waiting on memory */
            if (end - p >= TEXT_AHEAD + PLAIN_BYTES)
                for (int k = 0; k < PLAIN_BYTES; k += 64) __builtin_prefetch(p + TEXT_AHEAD + k);
            const uint8_t *next = parse_plain_line(p, labels + rows, dense + rows * NUM_DENSE,
                                                   sparse + rows, col_stride, &low);
            if (next) { p = next; continue; }
        }
        /* label */
        if (end - p < 2) goto short_or_bad;
        if ((p[0] != '0' && p[0] != '1') || p[1] != '\t') goto bad;
        labels[rows] = p[0] - '0';
        p += 2;
        int32_t *d = dense + rows * NUM_DENSE;
        int64_t line_low = INT64_MAX; /* folded into low once the line is whole and valid */
        for (int c = 0; c < NUM_DENSE; c++) {
            int neg = 0, nd = 0;
            int64_t v = 0;
            if (p < end && *p == '-') { neg = 1; p++; }
            /* a value of at most 7 digits, then its tab (nearly all of them): read from one
             * 8-byte word instead of a branch per byte */
            if (end - p >= 8) {
                uint64_t word;
                memcpy(&word, p, sizeof word);
                nd = digits_before(word);
                if (nd < 8 && p[nd] == '\t' && !(neg && nd == 0)) {
                    v = nd ? (int64_t)digits_value(word, nd) : 0;
                    p += nd + 1;
                    if (neg) v = -v;
                    if (v < line_low) line_low = v;
                    d[c] = (int32_t)v;
                    continue;
                }
                nd = 0;
            }
            while (p < end && DEC[*p] != 0xFF) {
                v = v * 10 + DEC[*p++];
                if (++nd > 16) goto bad;
            }
            if (p >= end) goto short_or_bad;
            if (*p != '\t' || (neg && nd == 0)) goto bad;
            p++;
            if (neg) v = -v;
            if (v < INT32_MIN || v > INT32_MAX) goto bad;
            if (v < line_low) line_low = v;
            d[c] = (int32_t)v;
        }
        for (int c = 0; c < NUM_SPARSE; c++) {
            const uint8_t sep = c == NUM_SPARSE - 1 ? '\n' : '\t';
            uint32_t v = 0;
            /* nearly every id is 8 digits: their values looked up at once, without a
             * branch per byte (a digit's value is at most 15, any other byte's 0xFF) */
            if (end - p > 8 && p[8] == sep) {
                uint32_t h0 = HEX[p[0]], h1 = HEX[p[1]], h2 = HEX[p[2]], h3 = HEX[p[3]],
                         h4 = HEX[p[4]], h5 = HEX[p[5]], h6 = HEX[p[6]], h7 = HEX[p[7]];
                if ((h0 | h1 | h2 | h3 | h4 | h5 | h6 | h7) < 16) {
                    sparse[c * col_stride + rows] = h0 << 28 | h1 << 24 | h2 << 20 |
                                                    h3 << 16 | h4 << 12 | h5 << 8 | h6 << 4 | h7;
                    p += 9;
                    continue;
                }
            }
            int nd = 0;
            uint8_t h;
            while (p < end && (h = HEX[*p]) != 0xFF) {
                v = (v << 4) | h;
                p++;
                if (++nd > 8) goto bad;
            }
            if (p >= end) goto short_or_bad;
            if (*p != sep) goto bad;
            p++;
            sparse[c * col_stride + rows] = v;
        }
        if (line_low < low) low = line_low;
        continue;
    short_or_bad:
        /* the buffer ends inside this line, unless a newline comes before its end */
        *stop = memchr(line, '\n', (size_t)(end - line)) ? 1 : 0;
        break;
    bad:
        *stop = 1;
        break;
    }
    *consumed = line - buf;
    if (rows && low < *dense_min) *dense_min = low;
    return rows;
}

/* ------------------------------------------------------------------ id tables */

/* uint32 value -> uint32 number, numbers given in order of first sight from `base`: open
 * addressing with linear probing, at most 70 % full; optionally the values in order. */
typedef struct {
    uint64_t *slots; /* value << 32 | number; number EMPTY: a free slot */
    uint64_t mask, count;
    uint32_t base;
    uint32_t *order; /* the values in order of first sight (keep_order), else NULL */
    uint64_t order_cap;
    /* memory the caller lends for slot arrays (`table_lend`), taken from its start on:
     * a process's pages already in use, where malloc's would be new ones */
    uint8_t *lent;
    uint64_t lent_left;
    int slots_lent; /* the slots lie in lent memory: not freed here */
} table_t;

static inline uint64_t slot_of(uint32_t value, uint64_t mask) {
    return ((uint64_t)value * 0x9E3779B97F4A7C15ull >> 20) & mask;
}

static int table_resize(table_t *t, uint64_t capacity) {
    uint64_t bytes = capacity * sizeof(uint64_t), *slots;
    int lent = t->lent && bytes <= t->lent_left;
    if (lent) {
        slots = (uint64_t *)t->lent;
        t->lent += bytes;
        t->lent_left -= bytes;
    } else {
        slots = malloc(bytes);
    }
    if (!slots) return -1;
    for (uint64_t i = 0; i < capacity; i++) slots[i] = EMPTY;
    uint64_t mask = capacity - 1;
    if (t->slots) {
        for (uint64_t i = 0; i <= t->mask; i++) {
            uint64_t s = t->slots[i];
            if ((uint32_t)s == EMPTY) continue;
            uint64_t j = slot_of((uint32_t)(s >> 32), mask);
            while ((uint32_t)slots[j] != EMPTY) j = (j + 1) & mask;
            slots[j] = s;
        }
        if (!t->slots_lent) free(t->slots);
    }
    t->slots = slots;
    t->slots_lent = lent;
    t->mask = mask;
    return 0;
}

/* Lend the table `bytes` at `space` (8-byte aligned) for the slot arrays it grows into
 * from now on, until it is freed; the caller keeps the memory alive that long. */
void table_lend(table_t *t, void *space, uint64_t bytes) {
    t->lent = space;
    t->lent_left = bytes;
}

void table_free(table_t *t) {
    if (!t) return;
    if (!t->slots_lent) free(t->slots);
    free(t->order);
    free(t);
}

table_t *table_new(uint32_t base, int keep_order) {
    table_t *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->base = base;
    if (table_resize(t, 1 << 12)) { free(t); return NULL; }
    if (keep_order) {
        t->order_cap = 1 << 12;
        t->order = malloc(t->order_cap * sizeof *t->order);
        if (!t->order) { table_free(t); return NULL; }
    }
    return t;
}

/* For i < n: out[i * stride] = the number of values[i * stride] (new values numbered on,
 * in order). `out` may be `values`. Returns the table's size after, or -1 when memory ran
 * out or the numbers would reach 2**32 - 1 (the table is then as before the value that
 * failed). */
int64_t table_assign(table_t *t, const uint32_t *values, int64_t n, int64_t stride,
                     uint32_t *out) {
    uint64_t mask = t->mask, *slots = t->slots;
    for (int64_t i = 0; i < n; i++) {
        uint32_t v = values[i * stride];
        /* the slot a later value probes first, fetched while this one is looked up: the
         * probes of a large table miss the caches, and so overlap */
        if (i + PREFETCH < n)
            __builtin_prefetch(slots + slot_of(values[(i + PREFETCH) * stride], mask));
        uint64_t j = slot_of(v, mask);
        for (;;) {
            uint64_t s = slots[j];
            if ((uint32_t)s == EMPTY) break;
            if ((uint32_t)(s >> 32) == v) goto found;
            j = (j + 1) & mask;
        }
        /* a new value */
        if ((uint64_t)t->base + t->count >= EMPTY) return -1;
        if ((t->count + 1) * 10 > (mask + 1) * 7) {
            if (table_resize(t, (mask + 1) * 2)) return -1;
            mask = t->mask;
            slots = t->slots;
            j = slot_of(v, mask);
            while ((uint32_t)slots[j] != EMPTY) j = (j + 1) & mask;
        }
        if (t->order) {
            if (t->count == t->order_cap) {
                uint32_t *grown = realloc(t->order, 2 * t->order_cap * sizeof *grown);
                if (!grown) return -1;
                t->order = grown;
                t->order_cap *= 2;
            }
            t->order[t->count] = v;
        }
        slots[j] = (uint64_t)v << 32 | (uint32_t)(t->base + t->count);
        t->count++;
    found:
        out[i * stride] = (uint32_t)slots[j];
    }
    return (int64_t)t->count;
}

/* Empty the table, keeping its memory: the next day's values reuse the slots already
 * paged in (growing a table afresh faults in and zeroes every page again). */
void table_clear(table_t *t) {
    memset(t->slots, 0xFF, (t->mask + 1) * sizeof *t->slots); /* number EMPTY: free */
    t->count = 0;
}

/* Room for `count` values in all without growing (a known bound spares the rehashes).
 * Returns 0, or -1 when memory ran out (the table is then as before). */
int64_t table_reserve(table_t *t, int64_t count) {
    uint64_t capacity = t->mask + 1;
    while ((uint64_t)count * 10 > capacity * 7) capacity *= 2;
    return capacity == t->mask + 1 ? 0 : table_resize(t, capacity);
}

int64_t table_size(const table_t *t) { return (int64_t)t->count; }

/* the values in order of first sight (a table made with keep_order) */
void table_order(const table_t *t, uint32_t *out) {
    memcpy(out, t->order, t->count * sizeof *out);
}

/* ------------------------------------------------------------------ rows, scatter, place */

#define ROW_WORDS (1 + NUM_DENSE + NUM_SPARSE) /* a parsed row: label, dense, local ids */

/* A parsed day's rows as the parse stage stores them: packed, a group of rows (a "pack")
 * at a time. A row has ROW_WORDS values: its label, its 13 raw dense values (int32) and its
 * 26 day-local numbers (uint32). In a pack, column c holds value - bases[c] (uint32
 * arithmetic) in widths[c] bytes, 0 to 4: for the label and the dense values, bases[c] is
 * the column's smallest in the pack (signed) and the width what its range needs; for the
 * ids, bases[c] is 0 and the width what the largest number the day's table could have
 * given needs (`pack_rows`).
 * A row's columns follow one another, little-endian, and its bytes are the widths' sum:
 * most columns need one to three bytes, so the rows cross the disk twice in far fewer
 * bytes than 4 a value. Each value is stored and loaded as a whole 4-byte word whose
 * bytes beyond its width the next value overwrites (no branch per width): the output
 * takes 4 bytes of room past its end, the input is read up to 3 bytes past it. */
static const uint32_t WIDTH_MASK[5] = {0, 0xFFu, 0xFFFFu, 0xFFFFFFu, 0xFFFFFFFFu};

static inline uint8_t range_width(uint32_t range) {
    return range == 0 ? 0 : range < 1u << 8 ? 1 : range < 1u << 16 ? 2 : range < 1u << 24 ? 3 : 4;
}

/* The parser's n rows (labels, dense row-major n * 13, sparse feature-major: feature f's
 * column at sparse + f * col_stride, its values at most id_top[f]) -> one pack at out
 * (n * row bytes + 4 bytes of room); bases and widths: ROW_WORDS each. The label and dense
 * columns are stored less their smallest value; the ids (day-local numbers, below the
 * day's count so far, which id_top gives) as they are, in the bytes id_top needs: their
 * smallest is near 0 in any pack, and a pass for it cost more than the rest of the packing.
 * Returns the row bytes, or -1 if an id is above its id_top. */
int64_t pack_rows(int64_t n, const int32_t *labels, const int32_t *dense,
                  const uint32_t *sparse, int64_t col_stride, const uint32_t *id_top,
                  uint32_t *bases, uint8_t *widths, uint8_t *out) {
    /* the label and the 13 dense values as 16 lanes (the label again in the last two), so
     * that the compiler keeps the running extremes in vector registers */
    int32_t lo[16], hi[16];
    for (int c = 0; c < 16; c++) { lo[c] = INT32_MAX; hi[c] = INT32_MIN; }
    for (int64_t i = 0; i < n; i++) {
        int32_t r[16];
        r[0] = r[14] = r[15] = labels[i];
        memcpy(r + 1, dense + i * NUM_DENSE, NUM_DENSE * sizeof *r);
        for (int c = 0; c < 16; c++) {
            lo[c] = r[c] < lo[c] ? r[c] : lo[c];
            hi[c] = r[c] > hi[c] ? r[c] : hi[c];
        }
    }
    int64_t row_bytes = 0;
    /* local copies: the stores through `out` (bytes) could alias anything, and the
     * compiler would load these again after each of them */
    uint32_t base[ROW_WORDS];
    int64_t offset[ROW_WORDS]; /* each column's place in a row */
    uint32_t limit[NUM_SPARSE];
    for (int f = 0; f < NUM_SPARSE; f++) limit[f] = id_top[f];
    for (int c = 0; c < ROW_WORDS; c++) {
        uint32_t low = c <= NUM_DENSE ? (uint32_t)lo[c] : 0;
        uint32_t top = c <= NUM_DENSE ? (uint32_t)hi[c] : id_top[c - 1 - NUM_DENSE];
        base[c] = bases[c] = n ? low : 0;
        widths[c] = n ? range_width(top - low) : 0;
        offset[c] = row_bytes;
        row_bytes += widths[c];
    }
    /* 16 rows at a time gathered into a block first: a feature's ids are read a cache
     * line at a time, instead of one value from each of 26 columns per row */
    for (int64_t i0 = 0; i0 < n; i0 += 16) {
        int m = n - i0 < 16 ? (int)(n - i0) : 16;
        uint32_t block[16][ROW_WORDS];
        for (int f = 0; f < NUM_SPARSE; f++) {
            const uint32_t *col = sparse + f * col_stride + i0;
            for (int k = 0; k < m; k++) block[k][1 + NUM_DENSE + f] = col[k];
        }
        for (int k = 0; k < m; k++) {
            int64_t i = i0 + k;
            uint8_t *at = out + i * row_bytes;
            uint32_t v = (uint32_t)labels[i] - base[0];
            memcpy(at, &v, 4);
            for (int j = 0; j < NUM_DENSE; j++) {
                v = (uint32_t)dense[i * NUM_DENSE + j] - base[1 + j];
                memcpy(at + offset[1 + j], &v, 4);
            }
            for (int f = 0; f < NUM_SPARSE; f++) {
                v = block[k][1 + NUM_DENSE + f];
                if (v > limit[f]) return -1;
                memcpy(at + offset[1 + NUM_DENSE + f], &v, 4);
            }
        }
    }
    return row_bytes;
}

/* One pack's n rows (at in, read up to 3 bytes past them) -> rows of ROW_WORDS uint32 words
 * at out. The output may overlap the input if it starts at least (4 * ROW_WORDS * n - the
 * pack's bytes) before it: each row is decoded whole before it is stored, and the rows
 * before it then end no later than its packed bytes start. */
void unpack_rows(int64_t n, const uint8_t *in, const uint32_t *bases, const uint8_t *widths,
                 uint32_t *out) {
    /* local copies (out may alias what they point at), and each column's fixed place in a
     * row, so that a row's loads do not wait on one another */
    uint32_t mask[ROW_WORDS], base[ROW_WORDS];
    int64_t offset[ROW_WORDS], row_bytes = 0;
    for (int c = 0; c < ROW_WORDS; c++) {
        mask[c] = WIDTH_MASK[widths[c]];
        base[c] = bases[c];
        offset[c] = row_bytes;
        row_bytes += widths[c];
    }
    for (int64_t i = 0; i < n; i++, in += row_bytes) {
        uint32_t row[ROW_WORDS];
        for (int c = 0; c < ROW_WORDS; c++) {
            uint32_t v;
            memcpy(&v, in + offset[c], 4);
            row[c] = base[c] + (v & mask[c]);
        }
        memcpy(out + i * ROW_WORDS, row, sizeof row);
    }
}

/* A row on its way to its bucket, as bytes: its row in the bucket with its label (0 or 1)
 * in the top bit (uint32), then its 13 dense values and its 26 ids, value c in widths[c]
 * bytes (1 to 4, little-endian: as many as the column's largest over the training days
 * needs, so the records cross the disk twice in fewer bytes). A dense value is stored as
 * its day's shifted value x - (m - 2) (int32 arithmetic, m the day's smallest): the place
 * stage takes its logarithm, which is TorchRec's transform, so the record carries an
 * integer of usually two or three bytes instead of a float32 of four. With every width 4
 * it is numpy's native.RECORD_DTYPE, the size of a parsed row. */
#define RECORD_COLUMNS (NUM_DENSE + NUM_SPARSE)

static inline void put_value(uint8_t *at, uint32_t v, int width) {
    switch (width) {
    case 1: at[0] = (uint8_t)v; break;
    case 2: memcpy(at, &v, 2); break;
    case 3: memcpy(at, &v, 2); at[2] = (uint8_t)(v >> 16); break;
    default: memcpy(at, &v, 4);
    }
}

static inline int32_t get_value(const uint8_t *at, int width) {
    uint32_t v = 0;
    switch (width) {
    case 1: v = at[0]; break;
    case 2: memcpy(&v, at, 2); break;
    case 3: memcpy(&v, at, 2); v |= (uint32_t)at[2] << 16; break;
    default: memcpy(&v, at, 4);
    }
    return (int32_t)v;
}

/* The bucket of each of n rows going to global rows dest: the b with bucket_starts[b] <=
 * dest[i] < bucket_starts[b + 1] (nb buckets, the last open-ended), into bucket_of; counts[b]
 * becomes the rows of bucket b. Returns 0, or -1 if a destination is before the first
 * bucket. */
int64_t bucket_rows(int64_t n, const uint32_t *dest, const int64_t *bucket_starts, int64_t nb,
                    int64_t *counts, int32_t *bucket_of) {
    memset(counts, 0, nb * sizeof *counts);
    for (int64_t i = 0; i < n; i++) {
        int64_t lo = 0, hi = nb; /* the last start <= dest */
        if ((int64_t)dest[i] < bucket_starts[0]) return -1;
        while (hi - lo > 1) {
            int64_t mid = (lo + hi) / 2;
            if (bucket_starts[mid] <= (int64_t)dest[i]) lo = mid; else hi = mid;
        }
        bucket_of[i] = (int32_t)lo;
        counts[lo]++;
    }
    return 0;
}

/* The map entries of a later parsed row fetched while the loops over rows work on this
 * one: a day's 26 maps outgrow the caches, and the misses so overlap. */
#define SCATTER_AHEAD 8
static inline void prefetch_ids(const uint32_t *const *maps, const uint32_t *row) {
    const uint32_t *local = row + 1 + NUM_DENSE;
    for (int f = 0; f < NUM_SPARSE; f++) __builtin_prefetch(maps[f] + local[f]);
}

/* Parsed rows i < n of a training day (rows: n * ROW_WORDS; shift: the day's m - 2, the
 * int32 its dense values are shifted by; bucket_of: their buckets, from bucket_rows) ->
 * records of record_bytes (4 + the widths): row i's at records + next[its bucket] *
 * record_bytes, and next[b] moves on (so calls for consecutive parts of a chunk, next
 * starting at each bucket's first record of the chunk, group the chunk's records by
 * bucket, rows in order within one). Its ids are maps[f][its local number of feature f],
 * through float32 (as TorchRec's shuffle) unless `exact`. Every value must fit its width.
 * Returns 0, -1 if a row's place in its bucket is 2**31 or more, -3 if a value does not
 * fit its width, -4 if a row's bucket is not one of the nb, or its record would fall
 * outside the `capacity` records of `records`. */
int64_t fill_records(int64_t n, const uint32_t *rows, int32_t shift,
                     const uint32_t *const *maps, int exact, const uint32_t *dest,
                     const int32_t *bucket_of, const int64_t *bucket_starts, int64_t nb,
                     const uint8_t *widths, int64_t record_bytes, uint8_t *records,
                     int64_t capacity, int64_t *next) {
    uint32_t limit[RECORD_COLUMNS]; /* each width's largest unsigned value */
    uint8_t width[RECORD_COLUMNS];
    for (int c = 0; c < RECORD_COLUMNS; c++) {
        width[c] = widths[c];
        limit[c] = width[c] >= 4 ? 0xFFFFFFFFu : (1u << (8 * width[c])) - 1;
    }
    for (int64_t i = 0; i < n; i++) {
        int32_t b = bucket_of[i];
        const uint32_t *row = rows + i * ROW_WORDS;
        if (i + SCATTER_AHEAD < n) prefetch_ids(maps, rows + (i + SCATTER_AHEAD) * ROW_WORDS);
        if (b < 0 || b >= nb || next[b] < 0 || next[b] >= capacity) return -4;
        uint8_t *r = records + next[b]++ * record_bytes;
        int64_t k = (int64_t)dest[i] - bucket_starts[b];
        if (k >= (1ll << 31)) return -1;
        uint32_t dest_label = (uint32_t)k | (row[0] ? 1u << 31 : 0);
        memcpy(r, &dest_label, 4);
        uint8_t *at = r + 4;
        for (int c = 0; c < NUM_DENSE; c++) {
            uint32_t v = row[1 + c] - (uint32_t)shift; /* int32 arithmetic, wrapping */
            if (v > limit[c]) return -3;
            put_value(at, v, width[c]);
            at += width[c];
        }
        for (int f = 0; f < NUM_SPARSE; f++) {
            uint32_t id = maps[f][row[1 + NUM_DENSE + f]];
            int32_t out;
            if (exact) {
                out = (int32_t)id;
            } else {
                float x = (float)id; /* rounded to nearest, as numpy's astype */
                /* numpy's float32 -> int32 gives INT32_MIN out of range on x86-64 */
                out = x >= 2147483648.0f ? INT32_MIN : (int32_t)x;
            }
            int c = NUM_DENSE + f;
            if ((uint32_t)out > limit[c]) return -3;
            put_value(at, (uint32_t)out, width[c]);
            at += width[c];
        }
    }
    return 0;
}

/* A bucket's n records (of record_bytes, value c in widths[c] bytes) -> their rows of the
 * output columns (rows rows): shifted (rows, 13) (the dense values as the records hold
 * them: the caller takes their logarithm), sparse (rows, 26), labels (rows,). `filled`:
 * rows bytes, the rows placed so far. top[f] rises to feature f's largest id (the table
 * size the output needs, found here while the values pass through instead of by reading
 * the output again). Returns 0, or -1 if a record's row is outside the bucket or already
 * filled (a damaged work file). */
#define PLACE_AHEAD 64
int64_t place_records(const uint8_t *records, int64_t n, const uint8_t *widths,
                      int64_t record_bytes, int64_t rows, int32_t *shifted, int32_t *sparse,
                      int32_t *labels, uint8_t *filled, int32_t *top) {
    int32_t high[NUM_SPARSE];
    uint8_t width[RECORD_COLUMNS];
    memcpy(high, top, sizeof high);
    memcpy(width, widths, sizeof width);
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *r = records + i * record_bytes;
        uint32_t dest_label, k;
        memcpy(&dest_label, r, 4);
        k = dest_label & 0x7FFFFFFFu;
        /* the rows a later record fills, fetched while this one is placed: each is a cache
         * miss anywhere in the bucket's output, and so they overlap */
        if (i + PLACE_AHEAD < n) {
            uint32_t later;
            memcpy(&later, r + PLACE_AHEAD * record_bytes, 4);
            later &= 0x7FFFFFFFu;
            if (later < rows) {
                __builtin_prefetch(shifted + (int64_t)later * NUM_DENSE, 1);
                __builtin_prefetch(sparse + (int64_t)later * NUM_SPARSE, 1);
                __builtin_prefetch(sparse + (int64_t)later * NUM_SPARSE + 16, 1);
                __builtin_prefetch(filled + later, 1);
            }
        }
        if (k >= rows || filled[k]) return -1;
        filled[k] = 1;
        labels[k] = (int32_t)(dest_label >> 31);
        const uint8_t *at = r + 4;
        int32_t *d = shifted + (int64_t)k * NUM_DENSE;
        for (int c = 0; c < NUM_DENSE; c++) {
            d[c] = get_value(at, width[c]);
            at += width[c];
        }
        int32_t *out = sparse + (int64_t)k * NUM_SPARSE;
        for (int f = 0; f < NUM_SPARSE; f++) {
            int32_t id = get_value(at, width[NUM_DENSE + f]);
            at += width[NUM_DENSE + f];
            out[f] = id;
            high[f] = id > high[f] ? id : high[f];
        }
    }
    memcpy(top, high, sizeof high);
    return 0;
}

/* ------------------------------------------------------------------ the permutation */

/* The destinations of source rows lo .. hi-1 under the permutation perm (n entries; perm[k]:
 * the source row that lands on row k): out[s - lo] = k where perm[k] = s. One sequential
 * pass over perm whose writes stay inside out (a day or a few: it fits the caches far
 * better than the whole inverse, and unlike following the cycles in place, the loads do
 * not wait on each other). Entries of out whose row is not in perm stay as they were. */
void destinations(const uint32_t *perm, int64_t n, int64_t lo, int64_t hi, uint32_t *out) {
    uint64_t width = (uint64_t)(hi - lo);
    for (int64_t k = 0; k < n; k++) {
        /* the slot a later row is written to, fetched while this one is: the writes land
         * all over `out` and miss the caches (0.14 s instead of 0.21 s for 23 million) */
        if (k + PREFETCH < n) {
            uint64_t later = (uint64_t)perm[k + PREFETCH] - (uint64_t)lo;
            if (later < width) __builtin_prefetch(out + later, 1);
        }
        uint64_t s = (uint64_t)perm[k] - (uint64_t)lo; /* wraps for rows below lo */
        if (s < width) out[s] = (uint32_t)k;
    }
}

/* ------------------------------------------------------------------ the legacy shuffle */

/* MT19937 (Matsumoto and Nishimura's generator), seeded as numpy's RandomState(seed) seeds
 * it for an integer seed: the 624-word state from the seed by the generator's own
 * initialisation recurrence. */
#define MT_WORDS 624
#define MT_SHIFT 397

typedef struct {
    uint32_t key[MT_WORDS];
    int pos;
} mt_t;

static void mt_seed(mt_t *s, uint32_t seed) {
    s->key[0] = seed;
    for (int i = 1; i < MT_WORDS; i++)
        s->key[i] = 1812433253u * (s->key[i - 1] ^ (s->key[i - 1] >> 30)) + (uint32_t)i;
    s->pos = MT_WORDS;
}

/* the next 624 words of state, each made from words already renewed where the recurrence
 * reaches past the end */
static void mt_renew(mt_t *s) {
    for (int i = 0; i < MT_WORDS; i++) {
        uint32_t y = (s->key[i] & 0x80000000u) | (s->key[(i + 1) % MT_WORDS] & 0x7FFFFFFFu);
        s->key[i] = s->key[(i + MT_SHIFT) % MT_WORDS] ^ (y >> 1) ^ (y & 1u ? 0x9908B0DFu : 0u);
    }
    s->pos = 0;
}

static inline uint32_t mt_next(mt_t *s) {
    if (s->pos == MT_WORDS) mt_renew(s);
    uint32_t y = s->key[s->pos++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9D2C5680u;
    y ^= (y << 15) & 0xEFC60000u;
    return y ^ (y >> 18);
}

/* A uniform integer in 0 .. most (most < 2**32) as numpy's legacy random_interval draws it:
 * 32-bit words masked to the bits of `most` until one is not above it. */
static inline uint32_t mt_interval(mt_t *s, uint32_t most) {
    uint32_t mask = most, v;
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    mask |= mask >> 16;
    while ((v = mt_next(s) & mask) > most) {}
    return v;
}

/* x (n values, 1 <= n <= 2**32) shuffled exactly as numpy's RandomState(seed).shuffle(x)
 * shuffles a 1-d array: for i = n-1 down to 1, x[i] swapped with x[random_interval(i)].
 * The draws do not depend on x, so each j is drawn SHUFFLE_AHEAD swaps early and its
 * element fetched then: the swaps of a large x are cache misses, which so overlap. */
#define SHUFFLE_AHEAD 32
void legacy_shuffle(uint32_t *x, int64_t n, uint32_t seed) {
    mt_t s;
    uint32_t ahead[2 * SHUFFLE_AHEAD];
    mt_seed(&s, seed);
    int64_t drawn = n - 1; /* the next i whose j is drawn, in the draws' order */
    for (int64_t i = n - 1; i >= 1; i--) {
        for (; drawn >= 1 && drawn >= i - SHUFFLE_AHEAD; drawn--) {
            uint32_t j = mt_interval(&s, (uint32_t)drawn);
            ahead[drawn % (2 * SHUFFLE_AHEAD)] = j;
            __builtin_prefetch(x + j, 1);
        }
        uint32_t j = ahead[i % (2 * SHUFFLE_AHEAD)], t = x[i];
        x[i] = x[j];
        x[j] = t;
    }
}

/* ------------------------------------------------------------------ day 23 */

/* Parsed rows i < n of the evaluation day -> out[i * 26 + f] = maps[f][its local number of
 * feature f] as int64 (the day is not shuffled, so its ids keep their width); top[f] rises
 * to feature f's largest. Returns 0, or -1 if a local number is outside its map (sizes[f]
 * entries: a damaged work file). */
int64_t lookup_ids(int64_t n, const uint32_t *rows, const uint32_t *const *maps,
                   const int64_t *sizes, int64_t *out, int64_t *top) {
    int64_t high[NUM_SPARSE];
    memcpy(high, top, sizeof high);
    for (int64_t i = 0; i < n; i++) {
        const uint32_t *local = rows + i * ROW_WORDS + 1 + NUM_DENSE;
        if (i + SCATTER_AHEAD < n) prefetch_ids(maps, rows + (i + SCATTER_AHEAD) * ROW_WORDS);
        for (int f = 0; f < NUM_SPARSE; f++) {
            if ((int64_t)local[f] >= sizes[f]) return -1;
            int64_t id = maps[f][local[f]];
            out[i * NUM_SPARSE + f] = id;
            high[f] = id > high[f] ? id : high[f];
        }
    }
    memcpy(top, high, sizeof high);
    return 0;
}
