"""Entropy coding of symbol streams (weight indices, integer codes), two coders:

- canonical Huffman codes (what Deep Compression used), table-driven decoding;
- rANS (Duda's range variant of asymmetric numeral systems), which codes a symbol of probability
  p in about -log2(p) bits, so it gets within a fraction of a percent of the entropy where
  Huffman's whole-bit codes cannot (a symbol of probability 0.9 still costs one Huffman bit).

Both are vectorized the same way: the stream is cut into chunks (lanes) decoded side by side in
lockstep, so no Python loop runs per symbol. A stream may also take the gap form Deep Compression
uses for sparse data (the positions of the symbols that are not the dominant one, as relative gaps,
plus those symbols). `encode` tries each form and coder and keeps the smallest.

    data = encode(symbols)            # bytes (layout in `encode`)
    symbols = decode(data)
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

__all__ = ["code_lengths", "Huffman", "rans_freqs", "rans_encode", "rans_decode", "encode", "decode",
           "describe", "entropy_bits", "MAX_CODE_LENGTH"]

MAX_CODE_LENGTH = 15     # longest code (lengths fit a nibble); the decode table has up to 2 ** 15 entries
CHUNKS = 4096            # a stream is cut into up to this many chunks, decoded side by side
MIN_CHUNK = 4096         # ... of at least this many symbols (each chunk costs a 4- or 8-byte offset)
MAX_GAP = 255            # gaps are coded as bytes; a longer run gets a filler entry (Deep Compression)
SCALE_BITS = 15          # rANS: symbol frequencies are quantized to sum to 2 ** 15
RANS_LOW = 1 << 16       # rANS states live in [2 ** 16, 2 ** 32) and move 16-bit words in and out
RANS_STEPS = 8192        # rANS lanes: one per 8192 symbols (a 4-byte final state each), at most RANS_LANES
RANS_LANES = 1 << 14
RANS_ALPHABET = 1 << 12  # larger alphabets are Huffman-coded only


def entropy_bits(symbols: np.ndarray) -> float:
    """The empirical (order-0) entropy of a stream, in bits for the whole stream."""
    counts = np.bincount(symbols.ravel().astype(np.int64))
    p = counts[counts > 0] / symbols.size
    return float(-(counts[counts > 0] * np.log2(p)).sum())


def code_lengths(counts: np.ndarray, limit: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths for symbol counts (0 for absent symbols), at most `limit` bits: when
    the tree is too deep, the counts are flattened (halved, kept >= 1) and the tree rebuilt."""
    counts = np.asarray(counts, dtype=np.int64)
    present = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(present) == 1:
        lengths[present] = 1
        return lengths
    work = counts[present].copy()
    while True:
        heap = [(int(c), i, (i,)) for i, c in enumerate(work)]
        heapq.heapify(heap)
        depth = np.zeros(len(work), dtype=np.int64)
        tie = len(work)
        while len(heap) > 1:
            c1, _, a = heapq.heappop(heap)
            c2, _, b = heapq.heappop(heap)
            depth[list(a + b)] += 1
            heapq.heappush(heap, (c1 + c2, tie, a + b))
            tie += 1
        if depth.max() <= limit:
            lengths[present] = depth
            return lengths
        work = np.maximum(work >> 1, 1)


@dataclass(frozen=True)
class Huffman:
    """A canonical Huffman code given by its code lengths per symbol."""
    lengths: np.ndarray

    def codes(self) -> np.ndarray:
        """Canonical codes: shorter first, then by symbol value, consecutive within a length."""
        order = np.lexsort((np.arange(len(self.lengths)), self.lengths))
        order = order[self.lengths[order] > 0]
        codes = np.zeros(len(self.lengths), dtype=np.int64)
        code, prev = 0, int(self.lengths[order[0]]) if len(order) else 0
        for s in order:
            code <<= int(self.lengths[s]) - prev
            prev = int(self.lengths[s])
            codes[s] = code
            code += 1
        return codes

    def pack(self, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bytes, bit offset of every chunk start): the codes written MSB first, back to back."""
        lens = self.lengths[symbols]
        codes = self.codes()[symbols]
        ends = np.cumsum(lens)
        starts = ends - lens
        bits = np.zeros(int(ends[-1]) if len(ends) else 0, dtype=np.uint8)
        for j in range(int(lens.max()) if len(lens) else 0):
            m = lens > j
            bits[starts[m] + j] = (codes[m] >> (lens[m] - 1 - j)) & 1
        return np.packbits(bits), starts[::chunk_size(len(symbols))]

    def unpack(self, data: np.ndarray, offsets: np.ndarray, n: int) -> np.ndarray:
        """n symbols from `data`, the chunks (`offsets`) decoded in lockstep through a table of
        2 ** L entries (L the longest code) giving each L-bit window's first symbol and length."""
        L = int(self.lengths.max())
        codes = self.codes()
        sym_of = np.zeros(1 << L, dtype=np.int64)
        len_of = np.zeros(1 << L, dtype=np.int64)
        for s in np.flatnonzero(self.lengths):
            lo = int(codes[s]) << (L - int(self.lengths[s]))
            hi = (int(codes[s]) + 1) << (L - int(self.lengths[s]))
            sym_of[lo:hi], len_of[lo:hi] = s, self.lengths[s]
        size = chunk_size(n)
        buf = np.concatenate([data, np.zeros(4, np.uint8)]).astype(np.int64)
        pos = offsets.astype(np.int64).copy()
        out = np.empty(len(offsets) * size, dtype=np.int64)
        last = n - (len(offsets) - 1) * size            # symbols in the last chunk
        for step in range(size):
            live = slice(None) if step < last else slice(0, len(offsets) - 1)
            p = pos[live]
            byte = p >> 3
            word = (buf[byte] << 16) | (buf[byte + 1] << 8) | buf[byte + 2]
            window = (word >> (24 - (p & 7) - L)) & ((1 << L) - 1)
            out[np.arange(len(offsets))[live] * size + step] = sym_of[window]
            pos[live] = p + len_of[window]
        return out[:n]


def chunk_size(n: int) -> int:
    return max(MIN_CHUNK, -(-n // CHUNKS))


# -- rANS ---------------------------------------------------------------------------------------

def rans_freqs(counts: np.ndarray) -> np.ndarray:
    """Counts quantized to frequencies summing to 2 ** SCALE_BITS, every present symbol >= 1."""
    counts = np.asarray(counts, dtype=np.int64)
    total = 1 << SCALE_BITS
    f = np.where(counts > 0, np.maximum(1, counts * total // max(int(counts.sum()), 1)), 0)
    f[int(np.argmax(counts))] += total - int(f.sum())       # the remainder to the most frequent symbol
    for s in np.argsort(-f):                                 # ... which may have to give some back
        if f.sum() <= total:
            break
        f[s] -= min(int(f[s]) - 1, int(f.sum()) - total)
    return f


def _lanes(n: int) -> tuple[int, int]:
    lanes = min(RANS_LANES, max(1, -(-n // RANS_STEPS)))
    return lanes, -(-n // lanes)


def rans_encode(symbols: np.ndarray, freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(final state per lane as uint32, the 16-bit words). Lane j codes symbols [j*steps, (j+1)*steps);
    the lanes run backwards in lockstep (rANS decodes in the reverse order it encodes), and the words
    of one step are stored in lane order, the steps in decoding order."""
    n = len(symbols)
    lanes, steps = _lanes(n)
    freqs = np.asarray(freqs, dtype=np.int64)
    cum = np.cumsum(freqs) - freqs
    grid = np.zeros(lanes * steps, np.int64)
    grid[:n] = symbols
    grid = np.ascontiguousarray(grid.reshape(lanes, steps).T)           # [step, lane]
    last = n - (lanes - 1) * steps                                      # symbols in the last lane
    x = np.full(lanes, RANS_LOW, np.int64)
    blocks = []
    for t in range(steps - 1, -1, -1):
        live = lanes if t < last else lanes - 1
        s = grid[t, :live]
        f, xl = freqs[s], x[:live]
        out = xl >= f << (32 - SCALE_BITS)                              # would leave [2**16, 2**32): flush 16 bits
        blocks.append(xl[out] & 0xFFFF)
        xl[out] >>= 16
        x[:live] = ((xl // f) << SCALE_BITS) + xl % f + cum[s]
    words = np.concatenate(blocks[::-1]) if blocks else np.zeros(0, np.int64)
    return x.astype(np.uint32), words.astype(np.uint16)


def rans_decode(states: np.ndarray, words: np.ndarray, freqs: np.ndarray, n: int) -> np.ndarray:
    """Inverse of `rans_encode`; a stream that does not end in the encoder's start state is refused."""
    lanes, steps = _lanes(n)
    freqs = np.asarray(freqs, dtype=np.int64)
    if len(states) != lanes or int(freqs.sum()) != 1 << SCALE_BITS or freqs.min(initial=0) < 0:
        raise ValueError("malformed rANS stream header")
    cum = np.cumsum(freqs) - freqs
    sym_of = np.repeat(np.arange(len(freqs)), freqs)                    # slot -> symbol
    x = states.astype(np.int64)
    if np.any(x < RANS_LOW):
        raise ValueError("malformed rANS stream header")
    words = words.astype(np.int64)
    out = np.zeros((steps, lanes), np.int64)
    last, pos, mask = n - (lanes - 1) * steps, 0, (1 << SCALE_BITS) - 1
    for t in range(steps):
        live = lanes if t < last else lanes - 1
        xl = x[:live]
        slot = xl & mask
        s = sym_of[slot]
        out[t, :live] = s
        xl = freqs[s] * (xl >> SCALE_BITS) + slot - cum[s]
        low = xl < RANS_LOW
        k = int(np.count_nonzero(low))
        if pos + k > len(words):
            raise ValueError("rANS stream ends early")
        xl[low] = (xl[low] << 16) | words[pos:pos + k]
        x[:live], pos = xl, pos + k
    if pos != len(words) or np.any(x != RANS_LOW):
        raise ValueError("rANS stream does not decode to its start state")
    return out.T.reshape(-1)[:n]


# -- streams ------------------------------------------------------------------------------------
#
# A stream is bytes (integers are LEB128 varints unless a width is given, arrays little-endian):
#
#   stream  = form:u8 (0 plain, 1 gaps) n  [plain: part] | [gaps: dominant part(gaps) part(others)]
#   part    = coder:u8 (0 Huffman, 1 rANS, 2 one symbol) n body
#   Huffman = symbols, code lengths as nibbles (low first), width:u8 (4 or 8), one offset per chunk
#             (the bit where it starts, `width` bytes each), data bytes, the codes MSB first
#   rANS    = symbols, frequency per symbol, lanes' final states (u32 each), words, u16 each
#   one     = the symbol

def encode(symbols: np.ndarray) -> bytes:
    """A stream of small non-negative integers (< 2 ** 16) as bytes: the form (plain, or gaps when one
    symbol dominates) and the coder of each part that take the fewest bytes (sizes computed from the
    symbol counts; only the winner is encoded)."""
    symbols = np.ascontiguousarray(np.asarray(symbols).ravel()).astype(np.int64)
    counts = np.bincount(symbols) if symbols.size else np.zeros(1, np.int64)
    plain = _choose(counts)
    top = int(counts.argmax())
    if symbols.size and counts[top] > symbols.size / 2:
        gaps, others = _gaps(symbols, top)
        g, o = _choose(np.bincount(gaps)), _choose(np.bincount(others))
        if g[1] + o[1] < plain[1]:
            return bytes([1]) + _varint(symbols.size) + _varint(top) + _part(gaps, g[0]) + _part(others, o[0])
    return bytes([0]) + _varint(symbols.size) + _part(symbols, plain[0])


def _choose(counts: np.ndarray) -> tuple[int, float]:
    """(coder, bytes it will take about) for symbols with these counts."""
    n, present = int(counts.sum()), np.flatnonzero(counts)
    if len(present) <= 1:
        return 2, 4.0
    huffman = (counts * code_lengths(counts)).sum() / 8 + 4 * -(-n // chunk_size(n)) + len(counts) / 2
    if len(counts) > RANS_ALPHABET:
        return 0, float(huffman)
    f = rans_freqs(counts)
    rans = (counts[present] * (SCALE_BITS - np.log2(f[present]))).sum() / 8 + 4 * _lanes(n)[0] + 1.5 * len(counts) + 2
    return (0, float(huffman)) if huffman <= rans else (1, float(rans))


def decode(data: bytes, limit: int | None = None) -> np.ndarray:
    """Inverse of `encode`; malformed data, or a stream announcing more than `limit` symbols, raises
    ValueError (before anything of that size is allocated)."""
    r = _Bytes(data)
    form, n = r.u8(), r.varint()
    if limit is not None and n > limit:
        raise ValueError(f"stream announces {n} symbols, at most {limit} expected")
    r.limit = 2 * n + 1                      # no part is longer (gaps add at most one filler per 256)
    if form == 0:
        out = _unpart(r)
        if len(out) != n:
            raise ValueError("stream length does not match")
    elif form == 1:
        dominant = r.varint()
        gaps, others = _unpart(r), _unpart(r)
        out = np.full(n, dominant, dtype=np.int64)
        where = np.cumsum(gaps + 1) - 1          # each entry sits after its gap of dominant symbols
        if len(gaps) != len(others) or (len(where) and where[-1] >= n):
            raise ValueError("gap stream runs past its end")
        out[where] = others
    else:
        raise ValueError(f"unknown stream form {form}")
    if r.pos != len(data):
        raise ValueError("stream has trailing bytes")
    return out


def describe(data: bytes) -> dict[str, int]:
    """Symbols per coder in a stream (what `encode` chose), e.g. {"rans": 800000}."""
    r = _Bytes(data)
    form, _ = r.u8(), r.varint()
    if form == 1:
        r.varint()
    names = ("huffman", "rans", "one")
    out: dict[str, int] = {}
    for _ in range(1 + form):
        coder, n = _unpart(r, decode=False)
        out[names[coder]] = out.get(names[coder], 0) + n
    return out


def _gaps(symbols: np.ndarray, dominant: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the non-dominant symbols as gaps (runs of the dominant one before each);
    a run longer than MAX_GAP is cut by filler entries that hold the dominant symbol itself."""
    where = np.flatnonzero(symbols != dominant)
    runs = np.diff(np.concatenate([[-1], where])) - 1
    fillers = runs // (MAX_GAP + 1)                  # entries inserted before each real one
    total = len(where) + int(fillers.sum())
    gaps = np.full(total, MAX_GAP, dtype=np.int64)
    others = np.full(total, dominant, dtype=np.int64)
    real = np.cumsum(fillers + 1) - 1                # slots of the real entries
    gaps[real] = runs - fillers * (MAX_GAP + 1)
    others[real] = symbols[where]
    return gaps, others


def _part(symbols: np.ndarray, coder: int) -> bytes:
    n = len(symbols)
    counts = np.bincount(symbols) if n else np.zeros(1, np.int64)
    if coder == 2:
        return bytes([2]) + _varint(n) + _varint(int(counts.argmax()))
    if coder == 0:
        code = Huffman(code_lengths(counts))
        data, offsets = code.pack(symbols)
        width = 4 if len(data) * 8 < 2 ** 32 else 8
        return (bytes([0]) + _varint(n) + _varint(len(counts)) + _nibbles(code.lengths).tobytes() + bytes([width])
                + offsets.astype(f"<u{width}").tobytes() + _varint(len(data)) + data.tobytes())
    freqs = rans_freqs(counts)
    states, words = rans_encode(symbols, freqs)
    return (bytes([1]) + _varint(n) + _varint(len(freqs)) + b"".join(_varint(int(f)) for f in freqs)
            + states.astype("<u4").tobytes() + _varint(len(words)) + words.astype("<u2").tobytes())


def _unpart(r: "_Bytes", decode: bool = True):
    """The next part's symbols; with decode=False only (coder, number of symbols), the body skipped."""
    coder, n = r.u8(), r.varint()
    if n > r.limit:
        raise ValueError("a part of the stream is longer than the stream")
    if coder == 2:
        symbol = r.varint()
        return np.full(n, symbol, dtype=np.int64) if decode else (coder, n)
    size = r.varint()
    if size > 1 << 16:
        raise ValueError("alphabet too large")
    if coder == 0:
        packed = r.array("u1", (size + 1) // 2).astype(np.int64)
        lengths = np.stack([packed & 15, packed >> 4], 1).reshape(-1)[:size]
        width = r.u8()
        if width not in (4, 8) or not n or not lengths.any():
            raise ValueError("malformed Huffman stream header")
        offsets = r.array(f"<u{width}", -(-n // chunk_size(n)))
        data = r.array("u1", r.varint())
        if int(offsets.max()) > len(data) * 8:
            raise ValueError("Huffman chunk offsets point past the data")
        return Huffman(lengths).unpack(data, offsets, n) if decode else (coder, n)
    if coder == 1:
        freqs = np.array([r.varint() for _ in range(size)], dtype=np.int64)
        states = r.array("<u4", _lanes(n)[0])
        words = r.array("<u2", r.varint())
        return rans_decode(states, words, freqs, n) if decode else (coder, n)
    raise ValueError(f"unknown coder {coder}")


def _nibbles(lengths: np.ndarray) -> np.ndarray:
    """Code lengths (0-15) two to a byte, the first in the low nibble."""
    padded = np.concatenate([lengths, np.zeros(len(lengths) % 2, lengths.dtype)]).astype(np.uint8)
    return padded[0::2] | (padded[1::2] << 4)


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


class _Bytes:
    """A bounds-checked reader over a stream's bytes."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.limit = memoryview(data), 0, 1 << 62

    def u8(self) -> int:
        return int(self.array("u1", 1)[0])

    def varint(self) -> int:
        v = shift = 0
        while True:
            b = self.u8()
            v |= (b & 0x7F) << shift
            if b < 0x80:
                return v
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def array(self, dtype: str, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        if count < 0 or self.pos + size > len(self.data):
            raise ValueError("stream is truncated")
        out = np.frombuffer(self.data[self.pos:self.pos + size], dtype)
        self.pos += size
        return out
