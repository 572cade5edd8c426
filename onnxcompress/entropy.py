"""Entropy coding of symbol streams (weight indices, integer codes): canonical Huffman codes with
table-driven decoding, vectorized over many chunks of the stream decoded in lockstep, so that no
Python loop runs per symbol; and the gap form Deep Compression uses for sparse streams (the
positions of the symbols that are not the dominant one, as relative gaps, plus those symbols).

    stream = encode(symbols)          # a dict of arrays and ints (what a container stores)
    symbols = decode(stream)
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

__all__ = ["code_lengths", "Huffman", "encode", "decode", "entropy_bits", "MAX_CODE_LENGTH"]

MAX_CODE_LENGTH = 15     # longest code (lengths fit a nibble); the decode table has up to 2 ** 15 entries
CHUNKS = 4096            # a stream is cut into up to this many chunks, decoded side by side
MIN_CHUNK = 1024         # ... of at least this many symbols (each chunk costs a 4- or 8-byte offset)
MAX_GAP = 255            # gaps are coded as bytes; a longer run gets a filler entry (Deep Compression)


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


# -- streams ------------------------------------------------------------------------------------

def encode(symbols: np.ndarray) -> dict:
    """A stream of small non-negative integers (< 2 ** 16) as Huffman-coded arrays: plain, or (when
    one symbol dominates and it is smaller) as gaps between the other symbols plus those symbols.
    The result holds numpy arrays and ints only."""
    symbols = np.ascontiguousarray(symbols.ravel()).astype(np.int64)
    plain = _huffman_part(symbols)
    counts = np.bincount(symbols) if symbols.size else np.zeros(1, np.int64)
    top = int(counts.argmax())
    if symbols.size and counts[top] > symbols.size / 2:
        gaps, others = _gaps(symbols, top)
        gapped = {"gaps": _huffman_part(gaps), "others": _huffman_part(others)}
        if _size(gapped["gaps"]) + _size(gapped["others"]) < _size(plain):
            return {"form": "gaps", "n": int(symbols.size), "dominant": top, **gapped}
    return {"form": "plain", "n": int(symbols.size), "plain": plain}


def decode(stream: dict) -> np.ndarray:
    """Inverse of `encode`."""
    if stream["form"] == "plain":
        return _unhuffman(stream["plain"])
    gaps, others = _unhuffman(stream["gaps"]), _unhuffman(stream["others"])
    out = np.full(stream["n"], stream["dominant"], dtype=np.int64)
    where = np.cumsum(gaps + 1) - 1          # each entry sits after its gap of dominant symbols
    if len(where) and where[-1] >= stream["n"]:
        raise ValueError("gap stream runs past its end")
    out[where] = others
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


def _huffman_part(symbols: np.ndarray) -> dict:
    if symbols.size == 0:
        return {"lengths": np.zeros(0, np.uint8), "data": np.zeros(0, np.uint8), "offsets": np.zeros(0, np.uint32), "n": 0}
    code = Huffman(code_lengths(np.bincount(symbols)))
    data, offsets = code.pack(symbols)
    kind = np.uint32 if len(data) * 8 < 2 ** 32 else np.uint64
    return {"lengths": _nibbles(code.lengths), "data": data, "offsets": offsets.astype(kind), "n": int(symbols.size)}


def _nibbles(lengths: np.ndarray) -> np.ndarray:
    """Code lengths (0-15) two to a byte, the first in the low nibble."""
    padded = np.concatenate([lengths, np.zeros(len(lengths) % 2, lengths.dtype)]).astype(np.uint8)
    return padded[0::2] | (padded[1::2] << 4)


def _unhuffman(part: dict) -> np.ndarray:
    n = int(part["n"])
    if n == 0:
        return np.zeros(0, np.int64)
    packed = np.asarray(part["lengths"], dtype=np.int64)
    lengths = np.stack([packed & 15, packed >> 4], 1).reshape(-1)
    if lengths.max(initial=0) > MAX_CODE_LENGTH or len(part["offsets"]) != -(-n // chunk_size(n)):
        raise ValueError("malformed Huffman stream header")
    if len(part["offsets"]) and int(np.max(part["offsets"])) > len(part["data"]) * 8:
        raise ValueError("Huffman chunk offsets point past the data")
    return Huffman(lengths).unpack(np.asarray(part["data"], dtype=np.uint8), np.asarray(part["offsets"]), n)


def _size(part: dict) -> int:
    return part["data"].nbytes + part["offsets"].nbytes + part["lengths"].nbytes
