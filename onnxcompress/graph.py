"""Graph surgery helpers shared by every pass (on onnx-graphsurgeon's mutable graph).

Passes edit a `gs.Graph`; the pass manager converts to and from `onnx.ModelProto` with `to_graph`
and `to_model`, which keep what graphsurgeon drops (metadata, model version, doc string).
"""
from __future__ import annotations

import logging
import re
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from . import io

log = logging.getLogger(__name__)

__all__ = [
    "to_graph", "to_model", "default_opset", "iter_nodes", "constant_value", "producer", "layer_id", "display_name",
    "set_constant", "make_constant", "elem_type", "ensure_inputs", "unique_name", "tidy", "input_names", "output_names",
    "FOLDABLE",
]

# Sub-byte integer types: numpy (ml_dtypes) holds one per byte, ONNX packs them; graphsurgeon's
# exporter gets that wrong for loaded values, so such constants are kept as ONNX tensors here.
_SUBBYTE = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4} | {
    getattr(onnx.TensorProto, n) for n in ("INT2", "UINT2", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def layer_id(node: gs.Node) -> str:
    """A node's stable id: the name of its first output tensor (unique in a valid graph), since
    node names are optional and may repeat."""
    return node.outputs[0].name if node.outputs else node.name


def display_name(node: gs.Node) -> str:
    """What to call a node in reports: its name, or its output tensor's when it has none."""
    return node.name or layer_id(node)


def input_names(model: onnx.ModelProto) -> list[str]:
    """The graph inputs a caller feeds (initializers some exporters also list as inputs excluded)."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """The model as a mutable graph. Weights stay where they are: in the model's tensors, or, for a
    model over the protobuf limit, in their files (read when a pass asks for them)."""
    graph = gs.import_onnx(model)
    _keep_overrides(graph, model)
    for g in [graph, *(s for n in iter_nodes(graph) for s in n.subgraphs())]:
        for t in g.tensors().values():
            if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues) \
                    and t._values.tensor.data_location == onnx.TensorProto.EXTERNAL:
                t._values, t.data_location = OnDisk(t._values.tensor), None
    return graph


def _keep_overrides(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Keep 0-d initializers the model lists as graph inputs among the inputs: they are per-call
    knobs with a default (early-exit's `exit_threshold`, width-knob's `width`), not weights. Others
    listed as inputs (old exporters list every weight) are imported as constants, so passes can
    change them."""
    listed = [i.name for i in model.graph.input]
    scalars = {t.name for t in model.graph.initializer if len(t.dims) == 0 and t.name in listed}
    if scalars:
        tensors = graph.tensors()
        graph.inputs = [tensors[n] for n in listed if n in tensors and (n in scalars or tensors[n] in graph.inputs)]


class OnDisk(LazyValues):
    """Values kept in an external data file (absolute location), read on demand without copying
    the data into the tensor as onnx's own loader does."""

    def load(self) -> np.ndarray:
        return io.read_tensor(self.tensor)


def _spill_constants(graph: gs.Graph) -> None:
    """When a graph's constants outweigh the protobuf limit, move those a pass computed (numpy
    arrays) to the scratch data file before export: the exported model refers to them, so neither
    the graph nor the model holds them in memory (sessions read them from disk)."""
    graphs = [graph, *(s for n in iter_nodes(graph) for s in n.subgraphs())]
    consts = [t for g in graphs for t in g.tensors().values() if isinstance(t, gs.Constant)]
    if sum(int(t._values.nbytes) for t in consts) <= io.EXTERNAL_DATA_THRESHOLD:
        return
    for t in consts:
        v = t._values
        if isinstance(v, np.ndarray) and v.nbytes >= io.EXTERNAL_MIN_BYTES and not _is_subbyte(v.dtype) \
                and v.dtype != object:
            t._values, t.data_location = OnDisk(io.spill(v, t.name)), None


def to_model(graph: gs.Graph, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export a graph; copy from `like` the model-level fields graphsurgeon does not carry. The
    default-domain opset is the higher of `like`'s and the graph's (a pass that needs a newer
    opset raises `graph.opset`), and the IR version at least what that opset needs."""
    _pack_subbyte(graph)
    _spill_constants(graph)
    _sort_bodies(graph)
    model = gs.export_onnx(graph, do_type_check=False)
    _drop_outer_value_info(model.graph, top=True)
    if like is not None:
        model.ir_version = like.ir_version
        model.model_version = like.model_version
        model.domain = like.domain
        model.doc_string = like.doc_string
        model.producer_name = like.producer_name
        model.producer_version = like.producer_version
        del model.metadata_props[:]
        model.metadata_props.extend(like.metadata_props)
        opset = max(default_opset(like), int(graph.opset or 0))
        del model.opset_import[:]
        model.opset_import.extend(like.opset_import)
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = opset
        declared = {o.domain for o in model.opset_import} | {"ai.onnx"}
        for domain in sorted({n.domain or "" for n in iter_nodes(graph)} - declared - {""}):
            model.opset_import.append(onnx.helper.make_opsetid(domain, 1))   # a node a pass added (com.microsoft)
        model.ir_version = max(like.ir_version, onnx.helper.find_min_ir_version_for(list(model.opset_import), True))
    return model


def _sort_bodies(graph: gs.Graph) -> None:
    """Put the nodes of every If/Loop/Scan body in topological order. Rewrites append their new
    nodes (a dequantized weight, a dynamic int8 chain) at the end of the body they edit; the top
    level is sorted by `tidy` before every export, a body that a pass edited was not, and
    onnxruntime refuses an unsorted body."""
    for node in list(iter_nodes(graph)):
        for sub in node.subgraphs():
            sub.toposort(recurse_subgraphs=False, recurse_functions=False)


def _drop_outer_value_info(g: onnx.GraphProto, top: bool = False) -> None:
    """graphsurgeon declares outer-scope tensors again inside If/Loop/Scan bodies, with the outer
    graph's symbolic dims; shape inference then trusts those over the outer scope's. Keep only the
    value_info of tensors a body computes itself."""
    for node in g.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _drop_outer_value_info(sub)
    if top:
        return
    own = {o for n in g.node for o in n.output}
    kept = [vi for vi in g.value_info if vi.name in own]
    del g.value_info[:]
    g.value_info.extend(kept)


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the default ONNX domain (0 if it declares none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _pack_subbyte(graph: gs.Graph) -> None:
    """Constants of sub-byte types whose values were loaded go back to packed ONNX tensors."""
    from onnx import numpy_helper
    from onnx_graphsurgeon.ir.tensor import LazyValues

    for g in [graph, *(s for n in iter_nodes(graph) for s in n.subgraphs())]:
        for t in g.tensors().values():
            if isinstance(t, gs.Constant) and not isinstance(t._values, LazyValues) and _is_subbyte(t._values.dtype):
                t._values = LazyValues(numpy_helper.from_array(t._values, t.name))


def _is_subbyte(dtype: np.dtype) -> bool:
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) in _SUBBYTE
    except (KeyError, TypeError, ValueError):
        return False


def tidy(graph: gs.Graph) -> gs.Graph:
    """Drop dead nodes and tensors and restore topological order (graph inputs are never removed)."""
    return graph.cleanup(remove_unused_graph_inputs=False).toposort()


def iter_nodes(graph: gs.Graph, recurse: bool = True) -> Iterator[gs.Node]:
    """All nodes, including those inside If/Loop/Scan bodies when `recurse`."""
    for node in graph.nodes:
        yield node
        if recurse:
            for sub in node.subgraphs():
                yield from iter_nodes(sub, recurse=True)


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor, else None: an initializer, a `Constant` node's output, or
    Identity/Cast/Reshape/Squeeze/Unsqueeze of constants (exporters often emit those for biases)."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return _loaded(tensor)
    node = producer(tensor)
    if node is None:
        return None
    if node.op == "Constant" and "value" in node.attrs:
        v = node.attrs["value"]
        return np.asarray(v.values if isinstance(v, gs.Constant) else v)
    if node.op not in FOLDABLE or not node.inputs:
        return None
    x = constant_value(node.inputs[0])
    if x is None:
        return None
    return FOLDABLE[node.op](node, x)


def _axes(node: gs.Node) -> list[int] | None:
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    if len(node.inputs) > 1:
        v = constant_value(node.inputs[1])
        return None if v is None else [int(a) for a in v]
    return None


def _reshape(node: gs.Node, x: np.ndarray) -> np.ndarray | None:
    shape = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if shape is None:
        return None
    shape = [x.shape[i] if d == 0 and not node.attrs.get("allowzero", 0) else int(d) for i, d in enumerate(shape)]
    return x.reshape(shape)


def _unsqueeze(node: gs.Node, x: np.ndarray) -> np.ndarray | None:
    axes = _axes(node)
    return None if axes is None else np.expand_dims(x, [a % (x.ndim + len(axes)) for a in axes])


def _squeeze(node: gs.Node, x: np.ndarray) -> np.ndarray | None:
    axes = _axes(node)
    return np.squeeze(x) if axes is None else np.squeeze(x, tuple(a % x.ndim for a in axes))


def _cast(node: gs.Node, x: np.ndarray) -> np.ndarray | None:
    import onnx

    return x.astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))


def _transpose(node: gs.Node, x: np.ndarray) -> np.ndarray:
    return np.transpose(x, node.attrs.get("perm"))


FOLDABLE = {"Identity": lambda node, x: x, "Reshape": _reshape, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
            "Cast": _cast, "Transpose": _transpose}


def _loaded(c: gs.Constant) -> np.ndarray:
    """A constant's values; sub-byte tensors are decoded without replacing the packed original."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    if isinstance(c._values, LazyValues) and c._values.tensor.data_type in _SUBBYTE:
        from onnx import numpy_helper

        return numpy_helper.to_array(c._values.tensor)
    return np.asarray(c.values)


def elem_type(tensor: gs.Tensor) -> int:
    """The ONNX element type of a constant tensor (an initializer or a Constant node's output)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    if isinstance(tensor, gs.Constant) and isinstance(tensor._values, LazyValues):
        return int(tensor._values.tensor.data_type)
    node = producer(tensor)
    if node is not None and node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
        return elem_type(node.attrs["value"])
    v = constant_value(tensor)
    return onnx.helper.np_dtype_to_tensor_dtype(v.dtype) if v is not None else onnx.TensorProto.UNDEFINED


def make_constant(name: str, value: np.ndarray, elem_type: int | None = None) -> gs.Constant:
    """A new constant holding `value` as ONNX type `elem_type` (default: the array's own)."""
    value = np.asarray(value)
    value = value if value.flags.c_contiguous else value.copy()   # keeps 0-d scalars 0-d
    if elem_type is None:
        return gs.Constant(name, value)
    np_type = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    if elem_type in _SUBBYTE:
        from onnx import numpy_helper
        from onnx_graphsurgeon.ir.tensor import LazyValues

        return gs.Constant(name, LazyValues(numpy_helper.from_array(value.astype(np_type), name)))
    return gs.Constant(name, value.astype(np_type))


def ensure_inputs(node: gs.Node, n: int) -> None:
    """Pad a node's inputs with empty (omitted) ones up to `n`."""
    while len(node.inputs) < n:
        node.inputs.append(gs.Variable.empty())


def _signature(graph: gs.Graph) -> tuple:
    return len(graph.nodes), id(graph.nodes[-1]) if graph.nodes else None, len(graph.inputs), len(graph.outputs)


def unique_name(graph: gs.Graph, base: str) -> str:
    """`base`, or `base_1`, `base_2`, ...: a name no node or tensor of the graph has, nor any name
    this function returned for it before. The names are cached on the graph until a node is
    added or removed (rewrites add hundreds of nodes to graphs of thousands)."""
    cached = graph.__dict__.get("_unique_names")      # not getattr: graphsurgeon looks missing names up as functions
    if cached is None or cached[0] != _signature(graph):
        names = {n.name for n in graph.nodes} | {t.name for t in list(graph.inputs) + list(graph.outputs)}
        names |= {t.name for n in graph.nodes for t in list(n.inputs) + list(n.outputs)}
        names |= cached[1] if cached is not None else set()
        cached = (_signature(graph), names)
        graph._unique_names = cached
    names = cached[1]
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    names.add(name)
    return name


_DERIVED = re.compile(r"(_(refit|bnfold|folded|pruned|codebook|index|i64|cast|\d+))+$")


def stem(name: str) -> str:
    """A tensor's name without the suffixes rewrites append ("w_bnfold_refit_codebook" -> "w"), so
    that a weight rewritten by several passes keeps a short name (they add up in a packed file)."""
    return _DERIVED.sub("", name) or name


def set_constant(graph: gs.Graph, node: gs.Node, index: int, value: np.ndarray, suffix: str = "") -> gs.Constant:
    """Give `node` a new constant as input `index`, never mutating a tensor other nodes may share.

    The new initializer keeps the old one's dtype; `suffix` names it after the change (e.g. "_folded")."""
    old = node.inputs[index] if len(node.inputs) > index else None
    dtype = np.asarray(constant_value(old)).dtype if old is not None and constant_value(old) is not None else value.dtype
    base = stem(old.name if old is not None and old.name else f"{node.name}_in{index}") + suffix
    const = gs.Constant(unique_name(graph, base), np.ascontiguousarray(value.astype(dtype, copy=False)))
    ensure_inputs(node, index + 1)
    node.inputs[index] = const
    return const
