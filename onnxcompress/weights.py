"""The weight of a layer, whatever its storage: one view to read it, write it back and slice it.

A layer reads its weight (or bias, or BatchNormalization parameter) from a *source* through a chain
of layout ops (Identity, Cast, Reshape, Transpose, Squeeze, Unsqueeze, Flatten). The sources:
- a float constant (an initializer or a `Constant` node): `Dense`;
- `DequantizeLinear` of integer codes (8, 4 or 2 bits, 16/32-bit biases; per tensor, per channel
  or in blocks; or of `QuantizeLinear(float constant)`): `Quantized`;
- a codebook decode, `Gather(codebook[k], Cast(indices))`, or one codebook per channel,
  `GatherElements(codebook[C, k], Cast(indices[C, n]), axis=1)`: `Codebook`;
- the packed blocks of `MatMulNBits` (onnxruntime's contrib op): `NBits`.

`stored(tensor)` returns a `Stored`: the float value the layer computes with (in the layer's own
layout) and its storage as arrays aligned element by element with that value (codes, scales, zero
points, indices). Every edit works on those aligned arrays and is emitted in the layer's layout with
the same kind of storage: `write` re-encodes a new value (codes keep their bits and granularity, a
codebook stays a codebook of at most k values), `take` slices every piece at once. `LAYERS` is the
one table of which input of which op holds a layer's weight and bias.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import graph as G
from .layers import out_rows

log = logging.getLogger(__name__)

__all__ = ["LAYERS", "LayerSpec", "Stored", "Dense", "Quantized", "Codebook", "NBits", "StorageError",
           "stored", "layer_weight", "layer_bias", "value_of", "write", "take", "write_rows", "write_bias", "set_codebook",
           "is_layer", "StorageSummary", "storage_summary", "as_codebook", "as_quantized", "convert",
           "rows_of"]


class StorageError(ValueError):
    """A storage this view can read but not re-emit (the message says why); callers leave the layer."""


@dataclass(frozen=True)
class LayerSpec:
    weight: int                 # input index of the weight
    bias: int | None            # input index of the bias (None: the op has none)
    domain: str = ""


# The one table of weighted layers: which input holds the weight and which the bias.
LAYERS: dict[str, LayerSpec] = {
    "Conv": LayerSpec(1, 2),
    "ConvTranspose": LayerSpec(1, 2),
    "Gemm": LayerSpec(1, 2),
    "MatMul": LayerSpec(1, None),
    "Gather": LayerSpec(0, None),           # an embedding: constant table, token ids as input 1
    "MatMulNBits": LayerSpec(1, 5, "com.microsoft"),
}

_LAYOUT_OPS = frozenset({"Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})
_INT_RANGES = {  # onnx code type -> (bits, signed)
    onnx.TensorProto.INT8: (8, True), onnx.TensorProto.UINT8: (8, False),
    onnx.TensorProto.INT16: (16, True), onnx.TensorProto.UINT16: (16, False),
    onnx.TensorProto.INT32: (32, True),
    onnx.TensorProto.INT4: (4, True), onnx.TensorProto.UINT4: (4, False),
}
for _name, _bits in (("INT2", (2, True)), ("UINT2", (2, False))):  # newer onnx only
    if hasattr(onnx.TensorProto, _name):
        _INT_RANGES[getattr(onnx.TensorProto, _name)] = _bits


def _qrange(elem_type: int) -> tuple[int, int]:
    bits, signed = _INT_RANGES[elem_type]
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


# -- storages: aligned arrays + how to emit them ------------------------------------------------

class Storage:
    """Base: a tensor's storage, its pieces aligned element by element with the decoded value."""
    kind: ClassVar[str] = ""

    def decode(self) -> np.ndarray:
        raise NotImplementedError

    def take(self, flat: np.ndarray) -> "Storage":
        """The storage of value.ravel()[flat] (flat: flat indices in the new shape)."""
        raise NotImplementedError

    def encode(self, value: np.ndarray, refit: bool) -> "Storage":
        """A storage of the same kind holding `value` (as closely as the kind allows)."""
        raise NotImplementedError

    def emit(self, graph: gs.Graph, base: str) -> gs.Tensor:
        raise NotImplementedError

    def nbytes(self) -> float:
        raise NotImplementedError


@dataclass
class Dense(Storage):
    kind: ClassVar[str] = "dense"
    value: np.ndarray

    def decode(self) -> np.ndarray:
        return self.value

    def take(self, flat: np.ndarray) -> "Dense":
        return Dense(self.value.ravel()[flat])

    def encode(self, value: np.ndarray, refit: bool) -> "Dense":
        return Dense(np.ascontiguousarray(value.astype(self.value.dtype, copy=False)))

    def emit(self, graph: gs.Graph, base: str) -> gs.Tensor:
        return _constant(graph, base, self.value)

    def nbytes(self) -> float:
        return float(self.value.nbytes)


def _group_ids(shape: tuple[int, ...], axis: int | None, block: int) -> np.ndarray:
    """Which scale each element uses: one for the tensor, one per index along `axis`, or one per
    block of `block` elements along `axis` (per position on the other axes)."""
    if axis is None:
        return np.zeros(shape, dtype=np.int64)
    idx = np.indices(shape)
    if not block:
        return idx[axis]
    idx[axis] //= block
    dims = list(shape)
    dims[axis] = -(-shape[axis] // block)
    return np.ravel_multi_index(tuple(idx), dims)


def _per_group(values: np.ndarray, groups: np.ndarray, fn: np.ufunc, init: float) -> np.ndarray:
    out = np.full(int(groups.max()) + 1 if groups.size else 1, init)
    fn.at(out, groups.ravel(), values.ravel())
    return out


@dataclass
class Quantized(Storage):
    """`DequantizeLinear(codes, scale, zero_point, axis, block_size)`: value = (q - zp) * scale."""
    kind: ClassVar[str] = "qdq"
    q: np.ndarray                 # integer codes (int64 here; `elem_type` in the file)
    scale: np.ndarray             # aligned with q
    zero_point: np.ndarray        # aligned with q
    elem_type: int
    axis: int | None = None       # value-layout axis of per-channel or blocked scales
    block_size: int = 0
    has_zero_point: bool = True
    scalar_shape: tuple[int, ...] = ()   # the shape of a per-tensor scale: () or (1,)

    def decode(self) -> np.ndarray:
        return ((self.q - self.zero_point) * self.scale.astype(np.float64)).astype(self.scale.dtype)

    @property
    def bits(self) -> int:
        return _INT_RANGES[self.elem_type][0]

    def take(self, flat: np.ndarray) -> "Quantized":
        out = replace(self, q=self.q.ravel()[flat], scale=self.scale.ravel()[flat],
                      zero_point=self.zero_point.ravel()[flat])
        if out.axis is not None and not out._consistent():   # a slice cut through blocks
            out = out.encode(out.decode(), refit=True)
        return out

    def _consistent(self) -> bool:
        groups = _group_ids(self.q.shape, self.axis, self.block_size)
        first = _per_group(self.scale.astype(np.float64), groups, np.maximum, -np.inf)
        return bool(np.all(first[groups] == self.scale))

    def encode(self, value: np.ndarray, refit: bool) -> "Quantized":
        value = value.astype(np.float64)
        lo, hi = _qrange(self.elem_type)
        scale, zp = self.scale.astype(np.float64), self.zero_point
        if refit:
            scale, zp = self._fit_scales(value, lo, hi)
        q = np.clip(np.round(value / scale) + zp, lo, hi).astype(np.int64)
        return replace(self, q=q, scale=scale.astype(self.scale.dtype), zero_point=zp.astype(np.int64))

    def _fit_scales(self, value: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Per granularity group: symmetric max-abs scales when every zero point is the range's
        middle (0 for signed codes), else asymmetric min/max ones."""
        groups = _group_ids(value.shape, self.axis, self.block_size)
        mid = 0 if lo < 0 else (hi + 1) // 2
        if not self.has_zero_point or np.all(self.zero_point == mid):
            amax = _per_group(np.abs(value), groups, np.maximum, 0.0)
            s = np.where(amax > 0, amax / max(hi - mid, 1), 1.0)
            return s[groups], np.full(value.shape, mid, dtype=np.int64)
        vmin = np.minimum(_per_group(value, groups, np.minimum, np.inf), 0.0)
        vmax = np.maximum(_per_group(value, groups, np.maximum, -np.inf), 0.0)
        s = np.where(vmax > vmin, (vmax - vmin) / (hi - lo), 1.0)
        z = np.clip(np.round(lo - vmin / s), lo, hi).astype(np.int64)
        return s[groups], z[groups]

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """The scale and zero-point tensors as DequantizeLinear wants them."""
        if self.axis is None:
            return (self.scale.ravel()[:1].reshape(self.scalar_shape), self.zero_point.ravel()[:1].reshape(self.scalar_shape))
        index = [slice(None) if (a == self.axis or self.block_size) else 0 for a in range(self.q.ndim)]
        if self.block_size:
            index[self.axis] = slice(None, None, self.block_size)
        return self.scale[tuple(index)], self.zero_point[tuple(index)]

    def emit(self, graph: gs.Graph, base: str) -> gs.Tensor:
        scale, zp = self.tables()
        inputs = [_constant(graph, base + "_q", self.q, self.elem_type), _constant(graph, base + "_scale", scale)]
        if self.has_zero_point:
            inputs.append(_constant(graph, base + "_zero_point", zp, self.elem_type))
        attrs = {} if self.axis is None else {"axis": int(self.axis)}
        if self.block_size:
            attrs["block_size"] = int(self.block_size)
        return _node(graph, "DequantizeLinear", inputs, attrs, base, scale.dtype)

    def nbytes(self) -> float:
        scale, zp = self.tables()
        return self.q.size * self.bits / 8 + scale.nbytes + (zp.size * self.bits / 8 if self.has_zero_point else 0)


@dataclass
class Codebook(Storage):
    """value = codebook[index] (one codebook), or codebook[c, index] along `axis` (one per channel)."""
    kind: ClassVar[str] = "codebook"
    index: np.ndarray             # aligned codes (int64 here; `elem_type` in the file)
    codebook: np.ndarray          # [k], or [C, k] with C the size of `axis`
    elem_type: int = onnx.TensorProto.UINT8
    axis: int | None = None

    def _channel(self) -> np.ndarray:
        return np.indices(self.index.shape)[self.axis]

    def decode(self) -> np.ndarray:
        if self.axis is None:
            return self.codebook[self.index]
        return self.codebook[self._channel(), self.index]

    @property
    def k(self) -> int:
        return self.codebook.shape[-1]

    def take(self, flat: np.ndarray) -> "Codebook":
        index = self.index.ravel()[flat]
        if self.axis is None:
            return replace(self, index=index)
        channel = self._channel().ravel()[flat]
        kept = np.moveaxis(channel, self.axis, 0).reshape(channel.shape[self.axis], -1)[:, 0]
        return replace(self, index=index, codebook=self.codebook[kept])

    def encode(self, value: np.ndarray, refit: bool) -> "Codebook":
        """Nearest centroid of the current codebook (with zero made a centroid where the value has
        exact zeros, so sparsity survives); `refit` then moves each centroid to its members' mean."""
        if self.axis is None:
            index, book = _assign(value.ravel(), self.codebook, refit)
            return replace(self, index=index.reshape(value.shape), codebook=book.astype(self.codebook.dtype))
        moved = np.moveaxis(value, self.axis, 0)
        rows = [_assign(moved[c].ravel(), self.codebook[c], refit) for c in range(moved.shape[0])]
        index = np.stack([r[0].reshape(moved.shape[1:]) for r in rows])
        book = np.stack([r[1] for r in rows]).astype(self.codebook.dtype)
        return replace(self, index=np.moveaxis(index, 0, self.axis), codebook=book)

    def emit(self, graph: gs.Graph, base: str) -> gs.Tensor:
        book = _constant(graph, base + "_codebook", self.codebook)
        if self.axis is None:
            idx = _constant(graph, base + "_index", self.index, self.elem_type)
            wide = _node(graph, "Cast", [idx], {"to": onnx.TensorProto.INT64}, base + "_index_i64", np.int64)
            return _node(graph, "Gather", [book, wide], {"axis": 0}, base, self.codebook.dtype)
        moved = np.moveaxis(self.index, self.axis, 0)
        idx = _constant(graph, base + "_index", moved.reshape(moved.shape[0], -1), self.elem_type)
        wide = _node(graph, "Cast", [idx], {"to": onnx.TensorProto.INT64}, base + "_index_i64", np.int64)
        flat = _node(graph, "GatherElements", [book, wide], {"axis": 1}, base + "_rows", self.codebook.dtype)
        shape = _constant(graph, base + "_shape", np.array(moved.shape, dtype=np.int64))
        out = _node(graph, "Reshape", [flat, shape], {}, base + ("" if self.axis == 0 else "_moved"), self.codebook.dtype)
        if self.axis == 0:
            return out
        order = [self.axis] + [a for a in range(self.index.ndim) if a != self.axis]
        perm = np.argsort(order)
        return _node(graph, "Transpose", [out], {"perm": [int(p) for p in perm]}, base, self.codebook.dtype)

    def nbytes(self) -> float:
        return self.index.size * _INT_RANGES[self.elem_type][0] / 8 + self.codebook.nbytes


def _assign(values: np.ndarray, book: np.ndarray, refit: bool) -> tuple[np.ndarray, np.ndarray]:
    book = book.astype(np.float64).copy()
    if np.any(values == 0) and not np.any(book == 0):
        book[np.argmin(np.abs(book))] = 0.0
    index = np.abs(values[:, None].astype(np.float64) - book[None, :]).argmin(1)
    if refit:
        sums = np.bincount(index, values.astype(np.float64), minlength=len(book))
        counts = np.bincount(index, minlength=len(book))
        fixed = book == 0
        book = np.where((counts > 0) & ~fixed, sums / np.maximum(counts, 1), book)
    return index.astype(np.int64), book.astype(np.float32)


# -- MatMulNBits: the node itself holds the packed weight ----------------------------------------

@dataclass
class NBits(Storage):
    """onnxruntime's MatMulNBits: B [N, blocks, blob] packed codes, value = (q - zp) * scale per
    block of `block_size` along K. Here aligned with the logical weight [K, N]."""
    kind: ClassVar[str] = "nbits"
    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    block_size: int
    has_zero_point: bool = False

    def _as_quantized(self) -> Quantized:
        et = {4: onnx.TensorProto.UINT4, 8: onnx.TensorProto.UINT8}[self.bits]
        return Quantized(self.q, self.scale, self.zero_point, et, axis=0, block_size=self.block_size,
                         has_zero_point=self.has_zero_point)

    def _from(self, q: Quantized) -> "NBits":
        return replace(self, q=q.q, scale=q.scale, zero_point=q.zero_point)

    def decode(self) -> np.ndarray:
        return self._as_quantized().decode()

    def take(self, flat: np.ndarray) -> "NBits":
        return self._from(self._as_quantized().take(flat))

    def encode(self, value: np.ndarray, refit: bool) -> "NBits":
        q = self._as_quantized()
        q.zero_point = np.clip(q.zero_point, 0, (1 << self.bits) - 1)
        out = q.encode(value, refit)
        out.q = np.clip(out.q, 0, (1 << self.bits) - 1)
        return self._from(out)

    def emit_into(self, graph: gs.Graph, node: gs.Node) -> None:
        k, n = self.q.shape
        blocks = -(-k // self.block_size)
        pad = blocks * self.block_size - k
        q = np.pad(self.q, ((0, pad), (0, 0)), constant_values=1 << (self.bits - 1)).T.reshape(n, blocks, self.block_size)
        packed = _pack(q.astype(np.uint8), self.bits)
        base = G.layer_id(node)
        scale = self.scale[::self.block_size].T.reshape(-1).astype(self.scale.dtype)
        node.inputs[1] = _constant(graph, base + "_B", packed)
        node.inputs[2] = _constant(graph, base + "_scales", scale)
        if self.has_zero_point:
            zp = np.pad(self.zero_point[::self.block_size].T, ((0, 0), (0, (-blocks) % (8 // self.bits))),
                        constant_values=0).astype(np.uint8)
            _ensure_inputs(node, 4)
            node.inputs[3] = _constant(graph, base + "_zero_points", _pack(zp, self.bits).reshape(-1))
        node.attrs.update(K=int(k), N=int(n))

    def nbytes(self) -> float:
        return self.q.size * self.bits / 8 + self.scale[::self.block_size].nbytes


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes along the last axis, lowest bits first (8 // bits codes per byte)."""
    per = 8 // bits
    q = q.reshape(*q.shape[:-1], -1, per).astype(np.uint8)
    out = np.zeros(q.shape[:-1], dtype=np.uint8)
    for i in range(per):
        out |= (q[..., i] & ((1 << bits) - 1)) << (bits * i)
    return out


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    parts = [(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(per)]
    return np.stack(parts, -1).reshape(*packed.shape[:-1], -1).astype(np.int64)


def _read_nbits(node: gs.Node) -> Stored | None:
    k, n = int(node.attrs["K"]), int(node.attrs["N"])
    bits, bs = int(node.attrs.get("bits", 4)), int(node.attrs["block_size"])
    packed, scales = G.constant_value(node.inputs[1]), G.constant_value(node.inputs[2])
    if packed is None or scales is None or bits not in (4, 8) or (len(node.inputs) > 4 and node.inputs[4].name):
        return None
    blocks = -(-k // bs)
    q = _unpack(packed.reshape(n, blocks, -1), bits).reshape(n, -1)[:, :k].T        # [K, N]
    s = np.repeat(scales.reshape(n, blocks).T, bs, axis=0)[:k]
    zp_t = G.constant_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    if zp_t is not None and zp_t.dtype.kind == "f":
        return None   # float zero points: not supported here
    if zp_t is None:
        zp = np.full((k, n), 1 << (bits - 1), dtype=np.int64)
    else:
        zp = np.repeat(_unpack(zp_t.reshape(n, -1), bits)[:, :blocks].T, bs, axis=0)[:k]
    storage = NBits(q, s, zp, bits, bs, zp_t is not None)
    return Stored(storage.decode(), storage, (node.inputs[1].name,), node.inputs[1], [])


# -- reading: the source behind a chain of layout ops ----------------------------------------------

@dataclass
class Stored:
    """A constant-valued tensor as a layer sees it, and how it is stored."""
    value: np.ndarray                    # what the layer computes with, in its layout
    storage: Storage
    sources: tuple[str, ...]             # the tensors holding the storage (for sharing and sizes)
    tensor: gs.Tensor                    # the layer input it was read from
    chain: list[gs.Node] = field(default_factory=list)   # layout ops between the source and the layer

    @property
    def kind(self) -> str:
        return self.storage.kind


def stored(tensor: gs.Tensor | None) -> Stored | None:
    """How a constant-valued tensor is stored, or None if it is not a constant (an activation)."""
    if tensor is None or not tensor.name:
        return None
    chain, src = [], tensor
    while not isinstance(src, gs.Constant) and (p := G.producer(src)) is not None and p.op in _LAYOUT_OPS:
        chain.append(p)
        src = p.inputs[0]
    chain.reverse()
    storage = _source(src)
    if storage is None:
        return None
    try:
        storage = _through(storage, chain)
    except (ValueError, KeyError, IndexError):
        return None
    value = storage.decode()
    for node in chain:   # the dtype the layer sees: the last Cast's
        if node.op == "Cast":
            value = value.astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    return Stored(value, storage, _source_names(src), tensor, chain)


def value_of(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The float value of a constant-valued tensor whatever its storage, else `constant_value`."""
    s = stored(tensor)
    return s.value if s is not None else G.constant_value(tensor)


def _source_names(src: gs.Tensor) -> tuple[str, ...]:
    node = G.producer(src)
    if node is None or node.op == "Constant":
        return (src.name,)
    return tuple(t.name for t in node.inputs if t.name)


def _source(src: gs.Tensor) -> Storage | None:
    node = G.producer(src)
    if isinstance(src, gs.Constant) or (node is not None and node.op == "Constant"):
        v = G.constant_value(src)
        return Dense(v) if v is not None and v.dtype.kind == "f" else None
    if node is None:
        return None
    if node.op == "DequantizeLinear":
        return _read_dq(node)
    if node.op in ("Gather", "GatherElements"):
        return _read_codebook(node)
    return None


def _codes(tensor: gs.Tensor) -> tuple[np.ndarray, int] | None:
    """Integer codes and their onnx type, from an initializer or Constant (through Casts)."""
    node = G.producer(tensor)
    if node is not None and node.op == "Cast":
        return _codes(node.inputs[0])
    v = G.constant_value(tensor)
    if v is None or v.dtype.kind not in "iu" and "int" not in str(v.dtype):
        return None
    return v.astype(np.int64), G.elem_type(tensor)


def _read_dq(node: gs.Node) -> Quantized | None:
    x = node.inputs[0]
    scale = G.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    zp_t = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if scale is None or (zp_t is not None and G.constant_value(zp_t) is None):
        return None
    codes = _codes(x) or _fake_quant(x)
    if codes is None:
        return None
    q, et = codes
    if et not in _INT_RANGES:
        return None
    zp = G.constant_value(zp_t).astype(np.int64) if zp_t is not None else np.zeros(scale.shape, np.int64)
    block = int(node.attrs.get("block_size", 0))
    per_tensor = scale.size == 1 and not block
    axis = None if per_tensor else int(node.attrs.get("axis", 1)) % q.ndim
    return Quantized(q, _expand(scale, q.shape, axis, block), _expand(zp, q.shape, axis, block), et, axis, block,
                     zp_t is not None, tuple(scale.shape) if per_tensor else ())


def _fake_quant(x: gs.Tensor) -> tuple[np.ndarray, int] | None:
    """Codes of `QuantizeLinear(float constant)` (fake-quantized weights), computed here."""
    node = G.producer(x)
    if node is None or node.op != "QuantizeLinear" or len(node.inputs) < 2:
        return None
    f, scale = G.constant_value(node.inputs[0]), G.constant_value(node.inputs[1])
    zp_t = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    zp = G.constant_value(zp_t) if zp_t is not None else None
    if f is None or scale is None or (zp_t is not None and zp is None):
        return None
    et = G.elem_type(zp_t) if zp_t is not None else onnx.TensorProto.UINT8
    if et not in _INT_RANGES or node.attrs.get("block_size", 0):
        return None
    axis = None if scale.size == 1 else int(node.attrs.get("axis", 1)) % f.ndim
    s = _expand(scale, f.shape, axis, 0).astype(np.float64)
    z = _expand(np.zeros(scale.shape) if zp is None else zp, f.shape, axis, 0)
    lo, hi = _qrange(et)
    return np.clip(np.round(f / s) + z, lo, hi).astype(np.int64), et


def _expand(table: np.ndarray, shape: tuple[int, ...], axis: int | None, block: int) -> np.ndarray:
    """A per-tensor, per-axis or blocked table broadcast to one entry per element."""
    if axis is None:
        return np.broadcast_to(table.reshape(()) if table.size == 1 else table, shape).copy()
    if block:
        return np.repeat(table, block, axis=axis)[tuple(slice(0, d) for d in shape)].copy()
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(table.reshape(view), shape).copy()


def _read_codebook(node: gs.Node) -> Codebook | None:
    book = G.constant_value(node.inputs[0])
    codes = _codes(node.inputs[1]) if len(node.inputs) > 1 else None
    if book is None or codes is None or book.dtype.kind != "f":
        return None
    index, et = codes
    if node.op == "Gather" and book.ndim == 1 and int(node.attrs.get("axis", 0)) == 0:
        return Codebook(index, book, et if et in _INT_RANGES else onnx.TensorProto.UINT8)
    if node.op == "GatherElements" and book.ndim == 2 and index.ndim == 2 and int(node.attrs.get("axis", 0)) % 2 == 1 \
            and index.shape[0] == book.shape[0]:
        return Codebook(index, book, et if et in _INT_RANGES else onnx.TensorProto.UINT8, axis=0)
    return None


# -- the layout chain, applied to aligned arrays -------------------------------------------------

def _through(storage: Storage, chain: list[gs.Node]) -> Storage:
    """The storage as the layer sees it: every aligned array sent through the layout chain, and
    the scale or codebook axis mapped to the layer's layout (a chain that merges it fails)."""
    if not chain:
        return storage
    fwd = lambda a: _forward(a, chain)
    if isinstance(storage, Dense):
        out = Dense(fwd(storage.value))
        for node in chain:   # a Cast in the chain: keep the stored dtype (float16 weights stay float16)
            if node.op == "Cast":
                out = Dense(out.value.astype(storage.value.dtype))
        return out
    shape = storage.decode().shape
    axis = _map_axis(shape, storage.axis, chain)
    if isinstance(storage, Quantized):
        return replace(storage, q=fwd(storage.q), scale=fwd(storage.scale), zero_point=fwd(storage.zero_point), axis=axis)
    if isinstance(storage, Codebook):
        return replace(storage, index=fwd(storage.index), axis=axis)
    raise ValueError("unknown storage")


def _map_axis(shape: tuple[int, ...], axis: int | None, chain: list[gs.Node]) -> int | None:
    """The layer-layout axis that the source's `axis` became (its index runs 0..C-1 along it and
    nowhere else); a chain that merges it with other axes raises ValueError."""
    if axis is None:
        return None
    tag = _forward(np.indices(shape)[axis], chain)
    for a in range(tag.ndim):
        along = np.moveaxis(tag, a, 0).reshape(tag.shape[a], -1)
        if np.all(along == along[:, :1]) and np.array_equal(along[:, 0], np.arange(shape[axis])):
            return a
    raise ValueError("the layout chain merges the quantization axis with others")


def _forward(a: np.ndarray, chain: list[gs.Node]) -> np.ndarray:
    for node in chain:
        if node.op in ("Identity", "Cast"):
            continue
        if node.op == "Flatten":
            ax = int(node.attrs.get("axis", 1)) % max(a.ndim, 1)
            a = a.reshape(int(np.prod(a.shape[:ax], dtype=np.int64)), -1)
        elif node.op == "Transpose":
            a = np.transpose(a, node.attrs.get("perm"))
        else:
            out = G.FOLDABLE[node.op](node, a)
            if out is None:
                raise ValueError(f"{node.op} parameters are not constants")
            a = out
    return np.ascontiguousarray(a)


# -- layers ------------------------------------------------------------------------------------

def is_layer(node: gs.Node) -> bool:
    """A weighted layer whose weight is a constant of some storage (an embedding Gather: a
    constant table indexed by an activation)."""
    spec = LAYERS.get(node.op)
    if spec is None or len(node.inputs) <= spec.weight:
        return False
    if node.op == "Gather" and (G.constant_value(node.inputs[1]) is not None or int(node.attrs.get("axis", 0)) != 0):
        return False
    return layer_weight(node) is not None


def layer_weight(node: gs.Node) -> Stored | None:
    spec = LAYERS.get(node.op)
    if spec is None or len(node.inputs) <= spec.weight:
        return None
    if node.op == "MatMulNBits":
        return _read_nbits(node)
    s = stored(node.inputs[spec.weight])
    if s is None or (node.op == "MatMul" and s.value.ndim != 2):
        return None
    return s


def layer_bias(node: gs.Node) -> Stored | None:
    spec = LAYERS.get(node.op)
    if spec is None or spec.bias is None or len(node.inputs) <= spec.bias:
        return None
    return stored(node.inputs[spec.bias])


def rows_of(node: gs.Node, s: Stored) -> np.ndarray:
    """The weight as [out_channels, fan_in] rows."""
    return out_rows(node, s.value)


# -- writing -----------------------------------------------------------------------------------

def write(graph: gs.Graph, node: gs.Node, index: int, s: Stored, value: np.ndarray, refit: bool | None = None,
          suffix: str = "_refit", in_place: bool = False) -> Stored:
    """Give input `index` of `node` a new value, keeping its storage (re-encoded; scales or
    centroids refit unless `refit` is False; 32-bit codes such as biases keep their scales).
    `in_place`: every user of the tensor gets the value (a dense initializer keeps its name)."""
    if refit is None:
        refit = not (isinstance(s.storage, Quantized) and s.storage.bits >= 32)
    new = s.storage.encode(np.asarray(value).reshape(s.value.shape), refit)
    if in_place and isinstance(new, Dense):
        return _replace_everywhere(graph, s, new, suffix)
    return _place(graph, node, index, s, new, suffix)


def _replace_everywhere(graph: gs.Graph, s: Stored, new: Dense, suffix: str) -> Stored:
    """A dense value for every user of the tensor: an initializer changes in place (keeping its
    name); a Constant node or a chain is replaced by one new initializer."""
    if isinstance(s.tensor, gs.Constant) and not s.chain:
        s.tensor.values = new.value
        return Stored(new.value, new, s.sources, s.tensor)
    const = _constant(graph, (s.sources[0] if s.sources else s.tensor.name) + suffix, new.value.astype(s.value.dtype))
    for user in list(s.tensor.outputs):
        for i, t in enumerate(list(user.inputs)):
            if t is s.tensor:
                user.inputs[i] = const
    return Stored(new.value, new, (const.name,), const)


def take(graph: gs.Graph, node: gs.Node, index: int, s: Stored, indexer: Callable[[np.ndarray], np.ndarray],
         suffix: str = "_pruned") -> Stored:
    """Slice input `index` of `node` with `indexer` (any numpy indexing of an array of the value's
    shape, e.g. `lambda a: a[keep]`), cutting every piece of its storage alike."""
    flat = indexer(np.arange(s.value.size).reshape(s.value.shape))
    return _place(graph, node, index, s, s.storage.take(flat), suffix)


def write_rows(graph: gs.Graph, node: gs.Node, rows: np.ndarray, refit: bool | None = None) -> Stored:
    """Write a layer's weight given as [out, fan_in] rows (in its own layout and storage)."""
    from .layers import from_out_rows

    s = layer_weight(node)
    return write(graph, node, LAYERS[node.op].weight, s, from_out_rows(node, rows, s.value.shape), refit)


def write_bias(graph: gs.Graph, node: gs.Node, value: np.ndarray) -> None:
    """Give a layer a new bias in its storage. A 32-bit quantized bias of a layer whose input and
    weight are quantized is stored at scale input_scale x weight_scale per channel, the convention
    onnxruntime's integer kernels rely on (they read the codes directly), so it follows the weight's
    current scales; a layer without a bias gets a dense one."""
    spec = LAYERS[node.op]
    old = layer_bias(node)
    value = np.asarray(value)
    if old is None or old.value.size != value.size:
        G.set_constant(graph, node, spec.bias, value.astype(layer_weight(node).value.dtype), "_refit")
        return
    st, scale = old.storage, _kernel_bias_scale(node)
    if isinstance(st, Quantized) and st.bits >= 32 and scale is not None and old.value.ndim:
        per_channel = st.axis is not None or not np.all(scale == scale[0])   # scales per channel need an axis
        st = replace(st, scale=np.broadcast_to(scale.reshape(-1), old.value.shape).astype(st.scale.dtype),
                     zero_point=np.zeros(old.value.shape, np.int64), axis=old.value.ndim - 1 if per_channel else None)
        _place(graph, node, spec.bias, old, st.encode(value.reshape(old.value.shape), refit=False), "_refit")
        return
    write(graph, node, spec.bias, old, value.reshape(old.value.shape))


def _kernel_bias_scale(node: gs.Node) -> np.ndarray | None:
    """input scale x weight scale per output channel, when both are quantized (else None)."""
    x = G.producer(node.inputs[0])
    w = layer_weight(node)
    if x is None or x.op != "DequantizeLinear" or w is None or not isinstance(w.storage, Quantized):
        return None
    sx = value_of(x.inputs[1])
    if sx is None or sx.size != 1:
        return None
    return float(sx.reshape(-1)[0]) * out_rows(node, w.storage.scale.astype(np.float64))[:, 0]


def set_codebook(graph: gs.Graph, node: gs.Node, s: Stored, book: np.ndarray, index: np.ndarray | None = None) -> Stored:
    """New centroids for a clustered layer, and a new index (in the weight's layout) if given."""
    storage = replace(s.storage, codebook=book) if index is None else replace(s.storage, codebook=book, index=index)
    return _place(graph, node, LAYERS[node.op].weight, s, storage, "_refit")


def _place(graph: gs.Graph, node: gs.Node, index: int, s: Stored, storage: Storage, suffix: str) -> Stored:
    base = (s.sources[0] if s.sources else G.layer_id(node)) + suffix
    if isinstance(storage, NBits):
        storage.emit_into(graph, node)
        return Stored(storage.decode(), storage, s.sources, node.inputs[1])
    out = storage.emit(graph, G.unique_name(graph, base))
    want = s.value.dtype
    if storage.decode().dtype != want:
        out = _node(graph, "Cast", [out], {"to": onnx.helper.np_dtype_to_tensor_dtype(want)}, base + "_cast", want)
    _ensure_inputs(node, index + 1)
    node.inputs[index] = out
    return Stored(storage.decode().astype(want), storage, (out.name,), out)


def _ensure_inputs(node: gs.Node, n: int) -> None:
    while len(node.inputs) < n:
        node.inputs.append(gs.Variable.empty())


def _constant(graph: gs.Graph, base: str, value: np.ndarray, elem_type: int | None = None) -> gs.Constant:
    return G.make_constant(G.unique_name(graph, base), value, elem_type)


def _node(graph: gs.Graph, op: str, inputs: list[gs.Tensor], attrs: dict, base: str, dtype) -> gs.Variable:
    out = gs.Variable(G.unique_name(graph, base), dtype=np.dtype(dtype))
    graph.nodes.append(gs.Node(op, G.unique_name(graph, base + "_" + op), dict(attrs), list(inputs), [out]))
    return out


# -- changing the storage on purpose -------------------------------------------------------------

def as_codebook(value: np.ndarray, book: np.ndarray, axis: int | None = None,
                elem_type: int = onnx.TensorProto.UINT8) -> Codebook:
    """`value` as a codebook storage: each weight becomes its nearest centroid of `book` ([k], or
    [C, k] with one codebook per index along `axis`)."""
    book = np.asarray(book, dtype=value.dtype)
    if axis is None:
        index = np.abs(value.reshape(-1, 1).astype(np.float64) - book.reshape(1, -1)).argmin(1).reshape(value.shape)
    else:
        moved = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1, 1).astype(np.float64)
        index = np.abs(moved - book[:, None, :]).argmin(2).reshape(np.moveaxis(value, axis, 0).shape)
        index = np.moveaxis(index, 0, axis)
    return Codebook(index.astype(np.int64), book, elem_type, axis)


def as_quantized(value: np.ndarray, elem_type: int = onnx.TensorProto.INT8, axis: int | None = None,
                 block_size: int = 0, symmetric: bool = True) -> Quantized:
    """`value` as DequantizeLinear codes with scales fit per tensor, per channel (`axis`) or per
    block of `block_size` along `axis`: symmetric max-abs scales, or asymmetric min/max ones."""
    lo, hi = _qrange(elem_type)
    mid = 0 if lo < 0 else (hi + 1) // 2
    zp = np.full(value.shape, mid if symmetric else lo - 1, dtype=np.int64)   # lo - 1: asymmetric marker
    seed = Quantized(np.zeros(value.shape, np.int64), np.ones(value.shape, np.float32), zp, elem_type, axis,
                     block_size, True, ())
    return seed.encode(value, refit=True)


def convert(graph: gs.Graph, node: gs.Node, index: int, s: Stored, storage: Storage, suffix: str = "") -> Stored:
    """Store input `index` of `node` in a new storage (dense to codebook, dense to QDQ, ...)."""
    return _place(graph, node, index, s, storage, suffix or "_" + storage.kind)


# -- what the weights cost ------------------------------------------------------------------------

@dataclass(frozen=True)
class StorageSummary:
    """Every distinct layer weight of a graph (bodies of If/Loop/Scan included): how many weights,
    how many are exactly zero once decoded (a quantized zero is its zero point), and the bytes
    each storage kind takes."""
    weights: int
    zeros: int
    bytes_by_kind: dict[str, int]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * sum(self.bytes_by_kind.values()) / self.weights if self.weights else 0.0

    @property
    def sparsity(self) -> float:
        return self.zeros / self.weights if self.weights else 0.0


def storage_summary(graph: gs.Graph) -> StorageSummary:
    seen: set[tuple[str, ...]] = set()
    total = zeros = 0
    by_kind: dict[str, float] = {}
    for node in G.iter_nodes(graph):
        s = layer_weight(node) if is_layer(node) else None
        if s is None or s.sources in seen:
            continue
        seen.add(s.sources)
        total += s.value.size
        zeros += int(s.value.size - np.count_nonzero(s.value))
        by_kind[s.kind] = by_kind.get(s.kind, 0.0) + s.storage.nbytes()
    return StorageSummary(total, zeros, {k: int(round(v)) for k, v in sorted(by_kind.items())})
