"""The onnxcompress container: one file holding an ONNX model with its weights entropy-coded, for
storage and download; `unpack` restores the model bit for bit.

Layout (all integers little-endian):

    offset 0   magic     8 bytes  b"ONNXCPK\\0"
    offset 8   version   u16      2
    offset 10  flags     u16      0
    offset 12  manifest  u32      length in bytes of the manifest that follows
    offset 16  crc       u32      CRC-32 of the manifest (as stored)
    offset 20  manifest  UTF-8 JSON, zlib-compressed: {"format", "version", "payload_bytes",
               "sections": [[length, crc32], ...], "graph": section, "tensors": [...]}
    then       payload   the sections back to back, in order

The graph (section "graph") is the model with the raw data of its large initializers removed,
compressed with LZMA. Each removed initializer (`tensors`, by position in the graph) has a codec
and the sections that hold it:

- "entropy": integer tensors (8-, 4- and 2-bit codes: clustering indices, quantized weights): the
  raw bytes read as a stream of 8-, 4- or 2-bit symbols (ONNX's packing order), coded by
  `entropy.encode` (rANS or canonical Huffman, plain or as gaps plus symbols where one symbol
  dominates, whichever is smallest; the stream's own layout is documented there);
- "sparse": float tensors at least half zeros: the nonzero mask as an entropy-coded stream
  (`positions`, where the gap form stores relative positions) and the nonzero values (`values`)
  compressed with LZMA;
- "lzma": every other tensor's raw bytes (`data`), or "raw" where LZMA would not make them smaller.

LZMA sections are raw LZMA2 streams (no .xz framing: its headers and check would cost about 60
bytes a section; the CRC-32 above covers them), compressed with preset 9e and a 16 MiB dictionary.

Every section is checked (bounds, CRC-32) and every size bounded before anything is decoded.
"""
from __future__ import annotations

import json
import lzma
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import entropy, io
from .errors import InputError

__all__ = ["MAGIC", "VERSION", "ContainerError", "PackStats", "pack", "unpack", "load", "session"]

MAGIC = b"ONNXCPK\x00"
VERSION = 2
HEADER = struct.Struct("<8sHHII")
MIN_BYTES = 256                          # smaller initializers stay in the graph
MAX_MANIFEST = 64 << 20                  # bytes a manifest may decompress to
MAX_EXPANSION = 4096                     # no section may decode to more than this x its stored size (+ 1 MB)
CODE_BITS = {onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT4: 4}
for _name in ("UINT2", "INT2"):
    if hasattr(onnx.TensorProto, _name):
        CODE_BITS[getattr(onnx.TensorProto, _name)] = 2
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 24}]
FLOATS = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64}


class ContainerError(InputError):
    """A container that cannot be read: wrong magic or version, truncated, corrupted, inconsistent."""


@dataclass(frozen=True)
class PackStats:
    """What a container holds: its size, the part that is entropy-coded, and that part's bound."""
    bytes: int
    coded_bytes: int             # the entropy-coded streams of integer tensors, headers and tables included
    entropy_bytes: float         # their symbols' empirical order-0 entropy
    codebook_bytes: int          # float tensors of at most 256 values stored beside them (codebooks)
    tensors: dict[str, int]      # tensors per codec
    coders: dict[str, int]       # symbols of those streams per coder ("rans", "huffman", "one")


# -- writing ------------------------------------------------------------------------------------

class _Writer:
    def __init__(self) -> None:
        self.sections: list[bytes] = []

    def put(self, data: bytes) -> int:
        self.sections.append(data)
        return len(self.sections) - 1


def pack(model: onnx.ModelProto) -> tuple[bytes, PackStats]:
    """The container's bytes for a model, and what they hold."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    w = _Writer()
    tensors, counts = [], {"entropy": 0, "sparse": 0, "lzma": 0, "raw": 0}
    entropy_bits, coded, codebook_bytes, coders = 0.0, 0, 0, {}
    for i, t in enumerate(m.graph.initializer):
        raw = t.raw_data
        if not t.HasField("raw_data") or len(raw) < MIN_BYTES or t.data_location == onnx.TensorProto.EXTERNAL:
            if t.data_type in FLOATS and t.HasField("raw_data") and len(raw) // np.dtype(FLOATS[t.data_type]).itemsize <= 256:
                codebook_bytes += len(raw)
            continue
        entry: dict = {"index": i, "bytes": len(raw)}
        if t.data_type in CODE_BITS:
            symbols = _units(np.frombuffer(raw, np.uint8), CODE_BITS[t.data_type])
            stream = entropy.encode(symbols)
            entry.update(codec="entropy", bits=CODE_BITS[t.data_type], stream=w.put(stream))
            coded += len(stream)
            entropy_bits += entropy.entropy_bits(symbols)
            for coder, n in entropy.describe(stream).items():
                coders[coder] = coders.get(coder, 0) + n
        elif t.data_type in FLOATS and _zero_share(raw, FLOATS[t.data_type]) >= 0.5:
            values = np.frombuffer(raw, FLOATS[t.data_type])
            nonzero = values.view(np.dtype(f"u{values.itemsize}")) != 0      # +0.0 only: -0.0 is a value
            entry.update(codec="sparse", positions=w.put(entropy.encode(nonzero.astype(np.int64))),
                         values=w.put(_lzma(values[nonzero].tobytes())))
        else:
            packed = _lzma(raw)
            entry.update(codec="lzma", data=w.put(packed)) if len(packed) < len(raw) else entry.update(codec="raw", data=w.put(raw))
        counts[entry["codec"]] += 1
        tensors.append(entry)
        t.ClearField("raw_data")
    graph = w.put(_lzma(m.SerializeToString()))
    manifest = {"format": "onnxcompress-container", "version": VERSION, "payload_bytes": sum(map(len, w.sections)),
                "sections": [[len(s), zlib.crc32(s)] for s in w.sections], "graph": graph, "tensors": tensors}
    text = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9)
    blob = HEADER.pack(MAGIC, VERSION, 0, len(text), zlib.crc32(text)) + text + b"".join(w.sections)
    stats = PackStats(len(blob), coded, entropy_bits / 8, codebook_bytes, counts, coders)
    return blob, stats


def _lzma(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)


def _units(data: np.ndarray, bits: int) -> np.ndarray:
    """Bytes as a stream of `bits`-bit units, lowest bits first (ONNX's packing order)."""
    if bits == 8:
        return data.astype(np.int64)
    per = 8 // bits
    shifts = np.arange(per) * bits
    return ((data[:, None].astype(np.int64) >> shifts) & ((1 << bits) - 1)).reshape(-1)


def _bytes(units: np.ndarray, bits: int) -> bytes:
    if bits == 8:
        return units.astype(np.uint8).tobytes()
    per = 8 // bits
    shifts = np.arange(per) * bits
    return (units.reshape(-1, per) << shifts).sum(1).astype(np.uint8).tobytes()


def _zero_share(raw: bytes, dtype) -> float:
    a = np.frombuffer(raw, dtype)
    return float(np.mean(a.view(np.dtype(f"u{a.itemsize}")) == 0)) if a.size else 0.0


# -- reading ------------------------------------------------------------------------------------

class _Reader:
    def __init__(self, blob: bytes):
        if len(blob) < HEADER.size:
            raise ContainerError(f"not an onnxcompress container: {len(blob)} bytes is shorter than the header")
        magic, version, _, length, crc = HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise ContainerError("not an onnxcompress container (wrong magic bytes)")
        if version != VERSION:
            raise ContainerError(f"container version {version} is not supported (this onnxcompress reads version {VERSION})")
        if HEADER.size + length > len(blob):
            raise ContainerError(f"truncated container: the header announces a {length}-byte manifest, "
                                 f"{len(blob) - HEADER.size} bytes follow")
        text = blob[HEADER.size:HEADER.size + length]
        if zlib.crc32(text) != crc:
            raise ContainerError("corrupted container: the manifest's checksum does not match")
        try:
            d = zlib.decompressobj()
            plain = d.decompress(text, MAX_MANIFEST)
            if d.unconsumed_tail or not d.eof:
                raise ValueError("the manifest does not end where announced")
            self.manifest = json.loads(plain)
            self.base = HEADER.size + length
            sections = [(int(n), int(crc)) for n, crc in self.manifest["sections"]]
            payload = int(self.manifest["payload_bytes"])
            self.starts = np.cumsum([0] + [n for n, _ in sections]).tolist()
            if any(n < 0 for n, _ in sections) or self.starts[-1] != payload:
                raise ValueError("the section lengths do not add up to the payload")
        except (ValueError, KeyError, TypeError, zlib.error) as e:
            raise ContainerError(f"corrupted container: unreadable manifest ({e})") from None
        if self.base + payload != len(blob):
            raise ContainerError(f"truncated or padded container: the manifest announces {payload} payload bytes, "
                                 f"the file has {len(blob) - self.base}")
        self.blob, self.sections = blob, sections

    def section(self, i: int) -> bytes:
        if not isinstance(i, int) or not 0 <= i < len(self.sections):
            raise ContainerError(f"corrupted container: no section {i!r}")
        start = self.base + self.starts[i]
        data = self.blob[start:start + self.sections[i][0]]
        if zlib.crc32(data) != self.sections[i][1]:
            raise ContainerError(f"corrupted container: section {i} fails its checksum")
        return data

    def lzma(self, i: int, limit: int) -> bytes:
        """LZMA data that may not expand past `limit` bytes (a sane bound, checked as it decodes)."""
        data = self.section(i)
        try:
            d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
            out = d.decompress(data, max_length=limit + 1)
        except lzma.LZMAError as e:
            raise ContainerError(f"corrupted container: section {i}: {e}") from None
        if len(out) > limit or not d.eof:
            raise ContainerError(f"corrupted container: section {i} expands beyond its announced size")
        return out


def unpack(blob: bytes) -> onnx.ModelProto:
    """The model a container holds, bit for bit as it was packed."""
    r = _Reader(blob)
    man = r.manifest
    graph_ref = man.get("graph")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(r.lzma(graph_ref, _bound(r, graph_ref)))
    except ContainerError:
        raise
    except Exception as e:
        raise ContainerError(f"corrupted container: the graph does not parse ({type(e).__name__})") from None
    for entry in man.get("tensors", []):
        try:
            raw = _decode_tensor(r, entry)
            t = model.graph.initializer[int(entry["index"])]
        except ContainerError:
            raise
        except Exception as e:
            raise ContainerError(f"corrupted container: tensor {entry.get('index', '?')} does not decode "
                                 f"({type(e).__name__}: {e})") from None
        if t.HasField("raw_data") or len(raw) != int(entry["bytes"]):
            raise ContainerError(f"corrupted container: tensor {entry['index']} ('{t.name}') does not match the graph")
        t.raw_data = raw
    return model


def _bound(r: _Reader, i: int) -> int:
    return len(r.section(i)) * MAX_EXPANSION + (1 << 20)


def _decode_tensor(r: _Reader, entry: dict) -> bytes:
    size, codec = int(entry["bytes"]), entry["codec"]
    if size < 0 or size > len(r.blob) * MAX_EXPANSION + (1 << 20):
        raise ContainerError(f"corrupted container: tensor {entry['index']!r} announces {size} bytes")
    if codec == "lzma":
        return r.lzma(entry["data"], size)
    if codec == "raw":
        data = r.section(entry["data"])
        if len(data) != size:
            raise ContainerError(f"corrupted container: tensor {entry['index']!r} holds {len(data)} bytes, not {size}")
        return data
    if codec == "entropy":
        bits = int(entry["bits"])
        units = entropy.decode(r.section(entry["stream"]), size * 8 // max(int(entry["bits"]), 1))
        if bits not in (2, 4, 8) or units.size != size * 8 // bits:
            raise ContainerError(f"corrupted container: tensor {entry['index']!r} has a stream of the wrong length")
        if units.size and int(units.max()) >= 1 << bits:
            raise ContainerError(f"corrupted container: tensor {entry['index']!r} decodes to symbols wider than {bits} bits")
        return _bytes(units, bits)
    if codec == "sparse":
        nonzero = entropy.decode(r.section(entry["positions"]), size // 2).astype(bool)
        n = nonzero.size
        if n <= 0 or size % n or size // n not in (2, 4, 8):
            raise ContainerError(f"corrupted container: tensor {entry['index']!r} has a position stream of the wrong length")
        dtype = np.dtype(f"f{size // n}")
        values = np.frombuffer(r.lzma(entry["values"], int(nonzero.sum()) * dtype.itemsize), dtype)
        if len(values) != int(nonzero.sum()):
            raise ContainerError(f"corrupted container: tensor {entry['index']!r} has {len(values)} values for "
                                 f"{int(nonzero.sum())} positions")
        out = np.zeros(n, dtype)
        out[nonzero] = values
        return out.tobytes()
    raise ContainerError(f"corrupted container: unknown codec {codec!r}")


# -- files --------------------------------------------------------------------------------------

def load(path: str | Path) -> onnx.ModelProto:
    """The ModelProto of a container file."""
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    return unpack(blob)


def session(path: str | Path, providers=("CPUExecutionProvider",)):
    """An onnxruntime session for a container file, without writing the model anywhere."""
    from .runtime import make_session
    return make_session(load(path), providers)


def write(path: str | Path, blob: bytes) -> Path:
    """Write a container atomically."""
    return io.write_bytes(path, blob)
