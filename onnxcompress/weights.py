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
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from . import graph as G
from .layers import from_out_rows, out_rows
from .storage import (INT_RANGES, Codebook, Dense, NBits, Quantized, Storage, _qrange, add_node, as_codebook,
                      as_quantized, constant, unpack_bits)

log = logging.getLogger(__name__)

__all__ = ["LAYERS", "LayerSpec", "Stored", "Dense", "Quantized", "Codebook", "NBits",
           "stored", "layer_weight", "layer_bias", "value_of", "write", "take", "write_rows", "write_bias", "set_codebook",
           "is_layer", "StorageSummary", "storage_summary", "as_codebook", "as_quantized", "convert",
           "rows_of", "distinct_weights"]


@dataclass(frozen=True)
class LayerSpec:
    weight: int                 # input index of the weight
    bias: int | None            # input index of the bias (None: the op has none)


# The one table of weighted layers: which input holds the weight and which the bias.
LAYERS: dict[str, LayerSpec] = {
    "Conv": LayerSpec(1, 2),
    "ConvTranspose": LayerSpec(1, 2),
    "Gemm": LayerSpec(1, 2),
    "MatMul": LayerSpec(1, None),
    "Gather": LayerSpec(0, None),           # an embedding: constant table, token ids as input 1
    "MatMulNBits": LayerSpec(1, 5),          # com.microsoft (onnxruntime)
}

_LAYOUT_OPS = frozenset({"Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})


def _read_nbits(node: gs.Node) -> Stored | None:
    k, n = int(node.attrs["K"]), int(node.attrs["N"])
    bits, bs = int(node.attrs.get("bits", 4)), int(node.attrs["block_size"])
    packed, scales = G.constant_value(node.inputs[1]), G.constant_value(node.inputs[2])
    if packed is None or scales is None or bits not in (4, 8) or (len(node.inputs) > 4 and node.inputs[4].name):
        return None
    blocks = -(-k // bs)
    q = unpack_bits(packed.reshape(n, blocks, -1), bits).reshape(n, -1)[:, :k].T        # [K, N]
    s = np.repeat(scales.reshape(n, blocks).T, bs, axis=0)[:k]
    zp_t = G.constant_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    if zp_t is not None and zp_t.dtype.kind == "f":
        return None   # float zero points: not supported here
    if zp_t is None:
        zp = np.full((k, n), 1 << (bits - 1), dtype=np.int64)
    else:
        zp = np.repeat(unpack_bits(zp_t.reshape(n, -1), bits)[:, :blocks].T, bs, axis=0)[:k]
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
    if et not in INT_RANGES:
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
    if et not in INT_RANGES or node.attrs.get("block_size", 0):
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
        return Codebook(index, book, et if et in INT_RANGES else onnx.TensorProto.UINT8)
    if node.op == "GatherElements" and book.ndim == 2 and index.ndim == 2 and int(node.attrs.get("axis", 0)) % 2 == 1 \
            and index.shape[0] == book.shape[0]:
        return Codebook(index, book, et if et in INT_RANGES else onnx.TensorProto.UINT8, axis=0)
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
    """A dense value for every user of the tensor in `graph`: an initializer changes in place
    (keeping its name); a Constant node or a chain is replaced by one new initializer. Nodes inside
    If/Loop/Scan bodies that read the tensor from the outer scope keep the old value (passes leave
    bodies as they are): the graph's own users then get a new initializer."""
    top = {id(n) for n in graph.nodes}
    users = [u for u in s.tensor.outputs if id(u) in top]
    if isinstance(s.tensor, gs.Constant) and not s.chain and len(users) == len(s.tensor.outputs):
        s.tensor.values = new.value
        return Stored(new.value, new, s.sources, s.tensor)
    const = constant(graph, G.stem(s.sources[0] if s.sources else s.tensor.name) + suffix, new.value.astype(s.value.dtype))
    for user in users:
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
    base = G.stem(s.sources[0] if s.sources else G.layer_id(node)) + suffix
    if isinstance(storage, NBits):
        storage.emit_into(graph, node)
        return Stored(storage.decode(), storage, s.sources, node.inputs[1])
    out = storage.emit(graph, base)            # each piece it adds gets a unique name of its own
    want = s.value.dtype
    if storage.decode().dtype != want:
        out = add_node(graph, "Cast", [out], {"to": onnx.helper.np_dtype_to_tensor_dtype(want)}, base + "_cast", want)
    G.ensure_inputs(node, index + 1)
    node.inputs[index] = out
    return Stored(storage.decode().astype(want), storage, (out.name,), out)


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


def distinct_weights(graph: gs.Graph, ops: frozenset[str], exclude: tuple[str, ...] = ()
                     ) -> tuple[dict[tuple, list[tuple[gs.Node, Stored]]], list[str]]:
    """The distinct constant weights of the layers whose op is in `ops`, whatever their storage,
    keyed by their sources (layers sharing one weight are listed together); layers named in
    `exclude` (node name or output tensor) and Gathers that are not embeddings are skipped. Notes
    name the layers whose weight is not a constant."""
    users: dict[tuple, list[tuple[gs.Node, Stored]]] = {}
    notes = []
    for node in graph.nodes:
        if node.op not in ops or exclude and {node.name, G.layer_id(node)} & set(exclude):
            continue
        s = layer_weight(node)
        if s is None or (node.op == "Gather" and not is_layer(node)):
            if node.op != "Gather":
                src = G.producer(node.inputs[LAYERS[node.op].weight]) if len(node.inputs) > 1 else None
                notes.append(f"{node.op} '{G.display_name(node)}': weight is not a constant"
                             f"{f' (made by {src.op})' if src else ''}; left as is")
            continue
        users.setdefault(s.sources, []).append((node, s))
    return users, notes


def quantizable_layers(graph: gs.Graph, ops: frozenset[str], exclude: tuple[str, ...] = ()
                       ) -> tuple[list[gs.Node], list[str]]:
    """The layers a quantizer can take, in graph order: a dense float weight of their own (2-D for
    MatMul; Gemm without transA or alpha). Notes say why each other layer is left as it is."""
    users, notes = distinct_weights(graph, ops)
    layers = []
    for pairs in users.values():
        node, s = pairs[0]
        label = f"{node.op} '{G.display_name(node)}'"
        if node.name in exclude or any(t.name in exclude for t in node.outputs):
            notes.append(f"{label}: excluded; left in float")
        elif len(pairs) > 1:
            notes.append(f"{label}: weight shared by {len(pairs)} layers; left in float")
        elif s.kind != "dense" or not np.issubdtype(s.value.dtype, np.floating):
            notes.append(f"{label}: weight stored as {s.kind}; left as is")
        elif node.op == "MatMul" and s.value.ndim != 2:
            notes.append(f"{label}: {s.value.ndim}-D weight; left in float")
        elif node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0):
            notes.append(f"{label}: transA or alpha != 1; left in float")
        else:
            layers.append(node)
    return layers, notes             # in graph order: distinct_weights lists weights by their first layer


def to_matmul_nbits(graph: gs.Graph, node: gs.Node, storage: NBits) -> None:
    """Turn a MatMul (x @ W) or a Gemm (x @ W(^T) * 1 + beta * bias) into onnxruntime's MatMulNBits
    holding `storage` (the logical weight [K, N]); a Gemm's bias becomes its bias input."""
    bias = None
    if node.op == "Gemm":
        b = layer_bias(node)
        if b is not None:
            value = b.value.reshape(-1) * float(node.attrs.get("beta", 1.0))
            bias = G.make_constant(G.unique_name(graph, G.layer_id(node) + "_bias"),
                                   np.broadcast_to(value, storage.q.shape[1:]).astype(storage.scale.dtype).copy())
    empty = gs.Variable.empty()
    node.op, node.domain = "MatMulNBits", "com.microsoft"
    node.attrs = {"K": int(storage.q.shape[0]), "N": int(storage.q.shape[1]), "bits": int(storage.bits),
                  "block_size": int(storage.block_size)}
    node.inputs = [node.inputs[0], empty, empty] + ([empty, empty, bias] if bias is not None else [])
    storage.emit_into(graph, node)


def storage_summary(graph: gs.Graph) -> StorageSummary:
    """Weights, zeros and bytes by storage kind. Each weight is read and let go: the constants not
    loaded yet are left unloaded (a graph made only for this summary would otherwise hold every
    weight, read from disk for a large model, until the cycle collector frees it)."""
    lazy = {t.name: (t, t._values) for g in [graph, *(s for n in G.iter_nodes(graph) for s in n.subgraphs())]
            for t in g.tensors().values() if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues)}
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
        for name in s.sources:
            if name in lazy:
                tensor, values = lazy[name]
                tensor._values = values
    return StorageSummary(total, zeros, {k: int(round(v)) for k, v in sorted(by_kind.items())})
