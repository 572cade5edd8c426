"""How a constant tensor is stored, as arrays aligned element by element with its float value.

Pure numpy (`decode`, `encode`, `take`) plus `emit`, which writes the storage back as standard ONNX
nodes: `Dense` (a float constant), `Quantized` (`DequantizeLinear` of 2- to 32-bit codes, per tensor,
per channel or in blocks), `Codebook` (`Gather`/`GatherElements` of a codebook by an index tensor),
`NBits` (onnxruntime's `MatMulNBits`). `onnxcompress.weights` finds these behind a layer's inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import graph as G

__all__ = ["Storage", "Dense", "Quantized", "Codebook", "NBits", "as_codebook", "as_quantized", "INT_RANGES",
           "pack_bits", "unpack_bits", "constant", "add_node"]

INT_RANGES = {  # onnx code type -> (bits, signed)
    onnx.TensorProto.INT8: (8, True), onnx.TensorProto.UINT8: (8, False),
    onnx.TensorProto.INT16: (16, True), onnx.TensorProto.UINT16: (16, False),
    onnx.TensorProto.INT32: (32, True),
    onnx.TensorProto.INT4: (4, True), onnx.TensorProto.UINT4: (4, False),
}
for _name, _bits in (("INT2", (2, True)), ("UINT2", (2, False))):  # newer onnx only
    if hasattr(onnx.TensorProto, _name):
        INT_RANGES[getattr(onnx.TensorProto, _name)] = _bits


def _qrange(elem_type: int) -> tuple[int, int]:
    bits, signed = INT_RANGES[elem_type]
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
        return constant(graph, base, self.value)

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
    q: np.ndarray                 # integer codes (`elem_type` in the file; see `compact`)
    scale: np.ndarray             # aligned with q (a read-only broadcast of its table, once compact)
    zero_point: np.ndarray        # aligned with q (int64)
    elem_type: int
    axis: int | None = None       # value-layout axis of per-channel or blocked scales
    block_size: int = 0
    has_zero_point: bool = True
    scalar_shape: tuple[int, ...] = ()   # the shape of a per-tensor scale: () or (1,)

    def decode(self) -> np.ndarray:
        return ((self.q - self.zero_point) * self.scale.astype(np.float64)).astype(self.scale.dtype)

    @property
    def bits(self) -> int:
        return INT_RANGES[self.elem_type][0]

    def take(self, flat: np.ndarray) -> "Quantized":
        out = replace(self, q=self.q.ravel()[flat], scale=self.scale.ravel()[flat],
                      zero_point=self.zero_point.ravel()[flat])
        if out.axis is not None and not out._consistent():   # a slice cut through blocks
            out = out.encode(out.decode(), refit=True)
        return out

    def compact(self) -> "Quantized":
        """The same storage in less memory: codes in the smallest integer type that holds them, and a
        per-tensor or per-channel scale and zero point as read-only broadcasts of their tables (one
        byte a weight instead of twenty: the quantize pass holds every layer of a 25M-parameter model
        at once). Arithmetic on the codes still promotes to int64 through the zero point."""
        bits, signed = INT_RANGES[self.elem_type]
        q = self.q.astype(f"{'' if signed else 'u'}int{max(8, bits)}", copy=False)
        if self.block_size or self.q.ndim == 0:
            return replace(self, q=q)
        corner = tuple(slice(None) if a == self.axis else slice(0, 1) for a in range(self.q.ndim))
        scale = np.broadcast_to(self.scale[corner].copy(), self.q.shape)      # copies: a view would keep the
        zp = np.broadcast_to(self.zero_point[corner].astype(np.int64), self.q.shape)   # full arrays alive
        if not (np.array_equal(scale, self.scale) and np.array_equal(zp, self.zero_point)):
            return replace(self, q=q)
        return replace(self, q=q, scale=scale, zero_point=zp)

    def _consistent(self) -> bool:
        groups = _group_ids(self.q.shape, self.axis, self.block_size)
        first = _per_group(self.scale.astype(np.float64), groups, np.maximum, -np.inf)
        return bool(np.all(first[groups] == self.scale))

    @property
    def binary(self) -> bool:
        """2-bit codes that are all -1 or +1: binary weights (+-scale), which stay binary when rewritten."""
        return self.bits == 2 and not self.has_zero_point and bool(np.all(np.abs(self.q) == 1))

    def encode(self, value: np.ndarray, refit: bool) -> "Quantized":
        value = value.astype(np.float64)
        if self.binary:
            q = np.where(value < 0, -1, 1).astype(np.int64)
            scale = self.scale.astype(np.float64)
            if refit:           # per group, the scale closest to |value| in least squares: mean |value|
                groups = _group_ids(value.shape, self.axis, self.block_size)
                sums = _per_group(np.abs(value), groups, np.add, 0.0)
                counts = _per_group(np.ones(value.shape), groups, np.add, 0.0)
                scale = (sums / np.maximum(counts, 1))[groups]
            return replace(self, q=q, scale=scale.astype(self.scale.dtype)).compact()
        lo, hi = _qrange(self.elem_type)
        scale, zp = self.scale.astype(np.float64), self.zero_point
        if refit:
            scale, zp = self._fit_scales(value, lo, hi)
        q = np.clip(np.round(value / scale) + zp, lo, hi).astype(np.int64)
        return replace(self, q=q, scale=scale.astype(self.scale.dtype), zero_point=zp.astype(np.int64)).compact()

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
        inputs = [constant(graph, base + "_q", self.q, self.elem_type), constant(graph, base + "_scale", scale)]
        if self.has_zero_point:
            inputs.append(constant(graph, base + "_zero_point", zp, self.elem_type))
        attrs = {} if self.axis is None else {"axis": int(self.axis)}
        if self.block_size:
            attrs["block_size"] = int(self.block_size)
        return add_node(graph, "DequantizeLinear", inputs, attrs, base, scale.dtype)

    def nbytes(self) -> float:
        scale, zp = self.tables()
        return self.q.size * self.bits / 8 + scale.nbytes + (zp.size * self.bits / 8 if self.has_zero_point else 0)


@dataclass
class Codebook(Storage):
    """value = codebook[index] (one codebook), or codebook[c, index] along `axis` (one per channel)."""
    kind: ClassVar[str] = "codebook"
    index: np.ndarray             # aligned codes (the smallest unsigned type that holds them; `elem_type` in the file)
    codebook: np.ndarray          # [k], or [C, k] with C the size of `axis`
    elem_type: int = onnx.TensorProto.UINT8
    axis: int | None = None

    def __post_init__(self) -> None:   # a byte a weight, not eight: every clustered layer is held at once
        self.index = np.asarray(self.index).astype(np.min_scalar_type(max(self.codebook.shape[-1] - 1, 0)), copy=False)

    def _channel(self) -> np.ndarray:
        """Each index's channel along `axis`, as a broadcast (no array the weight's size)."""
        shape = [1] * self.index.ndim
        shape[self.axis] = self.index.shape[self.axis]
        return np.broadcast_to(np.arange(shape[self.axis]).reshape(shape), self.index.shape)

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
        book = constant(graph, base + "_codebook", self.codebook)
        if self.axis is None:
            idx = constant(graph, base + "_index", self.index, self.elem_type)
            wide = add_node(graph, "Cast", [idx], {"to": onnx.TensorProto.INT64}, base + "_index_i64", np.int64)
            return add_node(graph, "Gather", [book, wide], {"axis": 0}, base, self.codebook.dtype)
        moved = np.moveaxis(self.index, self.axis, 0)
        idx = constant(graph, base + "_index", moved.reshape(moved.shape[0], -1), self.elem_type)
        wide = add_node(graph, "Cast", [idx], {"to": onnx.TensorProto.INT64}, base + "_index_i64", np.int64)
        flat = add_node(graph, "GatherElements", [book, wide], {"axis": 1}, base + "_rows", self.codebook.dtype)
        shape = constant(graph, base + "_shape", np.array(moved.shape, dtype=np.int64))
        out = add_node(graph, "Reshape", [flat, shape], {}, base + ("" if self.axis == 0 else "_moved"), self.codebook.dtype)
        if self.axis == 0:
            return out
        order = [self.axis] + [a for a in range(self.index.ndim) if a != self.axis]
        perm = np.argsort(order)
        return add_node(graph, "Transpose", [out], {"perm": [int(p) for p in perm]}, base, self.codebook.dtype)

    def nbytes(self) -> float:
        return self.index.size * INT_RANGES[self.elem_type][0] / 8 + self.codebook.nbytes


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
        packed = pack_bits(q.astype(np.uint8), self.bits)
        base = G.layer_id(node)
        scale = self.scale[::self.block_size].T.reshape(-1).astype(self.scale.dtype)
        node.inputs[1] = constant(graph, base + "_B", packed)
        node.inputs[2] = constant(graph, base + "_scales", scale)
        if self.has_zero_point:
            zp = np.pad(self.zero_point[::self.block_size].T, ((0, 0), (0, (-blocks) % (8 // self.bits))),
                        constant_values=0).astype(np.uint8)
            G.ensure_inputs(node, 4)
            node.inputs[3] = constant(graph, base + "_zero_points", pack_bits(zp, self.bits).reshape(-1))
        node.attrs.update(K=int(k), N=int(n))

    def nbytes(self) -> float:
        return self.q.size * self.bits / 8 + self.scale[::self.block_size].nbytes


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes along the last axis, lowest bits first (8 // bits codes per byte)."""
    per = 8 // bits
    q = q.reshape(*q.shape[:-1], -1, per).astype(np.uint8)
    out = np.zeros(q.shape[:-1], dtype=np.uint8)
    for i in range(per):
        out |= (q[..., i] & ((1 << bits) - 1)) << (bits * i)
    return out


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    parts = [(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(per)]
    return np.stack(parts, -1).reshape(*packed.shape[:-1], -1).astype(np.int64)


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
    return Codebook(index, book, elem_type, axis)        # (the index narrows to its own type there)


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


# -- emitting nodes ------------------------------------------------------------------------------

def constant(graph: gs.Graph, base: str, value: np.ndarray, elem_type: int | None = None) -> gs.Constant:
    return G.make_constant(G.unique_name(graph, base), value, elem_type)


def add_node(graph: gs.Graph, op: str, inputs: list[gs.Tensor], attrs: dict, base: str, dtype) -> gs.Variable:
    out = gs.Variable(G.unique_name(graph, base), dtype=np.dtype(dtype))
    graph.nodes.append(gs.Node(op, G.unique_name(graph, base + "_" + op), dict(attrs), list(inputs), [out]))
    return out
