"""Channel-dependency analysis: which channels of which tensors must be removed together.

Every channel of every tensor gets an id; ops couple ids (a residual Add ties its two inputs
channel by channel, a depthwise Conv ties input channel c to output channel c, Flatten ties channel
c to its H*W features, Concat places its inputs' ids side by side). Union-find turns the couplings
into *units*: sets of (tensor, channel) that are removed as one. Units that reach an op the table
does not know, a graph input or a graph output are frozen, with the op and node that froze them.

Per-op knowledge lives in one table, `RULES`: each entry couples channels (`couple`) and, after a
removal, cuts the node's parameters and attributes to the kept channels (`cut`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import graph as G, weights as W
from .metrics import static_shapes

log = logging.getLogger(__name__)

__all__ = ["analyze", "Analysis", "Group", "apply_removal", "RULES", "branch_end", "remove_branches"]


class UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.find(i) for i in ids.tolist()], dtype=np.int64)


@dataclass
class Group:
    """Tensors whose channels are coupled, with the layers that produce and consume them.
    Layers are named by their stable ids (first output tensor); `name` is for people and options:
    the first producer's node name when that is set and unique, else its id."""
    name: str
    tensors: list[str]
    producers: list[str] = field(default_factory=list)   # layer ids whose output channels live here
    consumers: list[str] = field(default_factory=list)   # layer ids whose input channels live here
    units: list[int] = field(default_factory=list)        # unit roots, in channel order of the first tensor
    frozen: str | None = None                              # why the group cannot be pruned
    id: str = ""                                           # the first producer's layer id

    def names(self, an: "Analysis", consumers: bool = False) -> set[str]:
        """Every name an option may use for this group: its name and id, and the ids and node
        names of its producers (and of its consumers, when asked)."""
        layers = self.producers + (self.consumers if consumers else [])
        return {self.name, self.id, *layers, *(an.nodes[i].name for i in layers if i in an.nodes and an.nodes[i].name)}


@dataclass
class Analysis:
    graph: gs.Graph
    shapes: dict[str, list[int]]
    uf: UnionFind = field(default_factory=UnionFind)
    ids: dict[str, np.ndarray] = field(default_factory=dict)     # tensor -> channel ids
    axis: dict[str, int] = field(default_factory=dict)           # tensor -> channel axis
    freezes: list[tuple[np.ndarray, str]] = field(default_factory=list)
    producers: dict[str, str] = field(default_factory=dict)      # layer id -> its output tensor
    consumers: dict[str, str] = field(default_factory=dict)      # layer id -> its weighted input tensor
    nodes: dict[str, gs.Node] = field(default_factory=dict)      # layer id -> node
    groups: list[Group] = field(default_factory=list)
    frozen: dict[int, str] = field(default_factory=dict)         # unit root -> reason

    # -- building ------------------------------------------------------------------------------
    def channels(self, name: str, axis: int = 1) -> int | None:
        shape = self.shapes.get(name)
        if not shape or len(shape) <= axis or shape[axis] <= 0:
            return None
        return shape[axis]

    def fresh(self, tensor: gs.Tensor, axis: int = 1) -> np.ndarray | None:
        c = self.channels(tensor.name, axis if axis >= 0 else len(self.shapes.get(tensor.name, [])) + axis)
        if c is None:
            return None
        self.ids[tensor.name] = self.uf.new(c)
        self.axis[tensor.name] = axis if axis >= 0 else len(self.shapes[tensor.name]) + axis
        return self.ids[tensor.name]

    def same(self, dst: gs.Tensor, src: gs.Tensor, axis: int | None = None) -> None:
        if src.name in self.ids:
            self.ids[dst.name] = self.ids[src.name]
            self.axis[dst.name] = self.axis[src.name] if axis is None else axis

    def freeze(self, tensor: gs.Tensor, reason: str) -> None:
        if tensor.name in self.ids:
            self.freezes.append((self.ids[tensor.name], reason))

    def keep(self, name: str, removed: set[int]) -> np.ndarray | None:
        """Boolean keep-mask of a tensor's channels after removing the units `removed`."""
        if name not in self.ids:
            return None
        return ~np.isin(self.uf.roots(self.ids[name]), list(removed))


# -- per-op rules ---------------------------------------------------------------------------------

Couple = Callable[[gs.Node, Analysis], "str | None"]
Cut = Callable[[gs.Graph, gs.Node, Analysis, set], None]


@dataclass(frozen=True)
class Rule:
    couple: Couple                 # links channels; returns a reason to freeze, or None
    cut: Cut | None = None         # slices parameters to the kept channels


def _passthrough(node: gs.Node, an: Analysis) -> str | None:
    an.same(node.outputs[0], node.inputs[0])
    return None


def _masks(node: gs.Node, an: Analysis, removed: set) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Keep-masks of a node's first input and first output; None where nothing is removed."""
    masks = [an.keep(t.name, removed) for t in (node.inputs[0], node.outputs[0])]
    return tuple(None if m is None or m.all() else m for m in masks)


def _weighted_out(node: gs.Node, an: Analysis, axis: int = 1) -> str | None:
    an.fresh(node.outputs[0], axis)
    an.producers[G.layer_id(node)] = node.outputs[0].name
    an.nodes[G.layer_id(node)] = node
    if node.inputs[0].name in an.ids:
        an.consumers[G.layer_id(node)] = node.inputs[0].name
    return None


def _params_missing(node: gs.Node) -> bool:
    """The weight, or a bias the node names, is not a constant of any storage."""
    bias = W.LAYERS[node.op].bias
    has_bias = bias is not None and len(node.inputs) > bias and node.inputs[bias].name
    return W.layer_weight(node) is None or bool(has_bias and W.layer_bias(node) is None)


def _conv_couple(node: gs.Node, an: Analysis) -> str | None:
    if _params_missing(node):
        return "weights are not constants"
    _weighted_out(node, an)
    g = int(node.attrs.get("group", 1))
    x, y = node.inputs[0].name, node.outputs[0].name
    if g > 1 and x in an.ids and y in an.ids:
        # A grouped conv ties each group's input block to its output block: whole groups go together.
        cin, cout = len(an.ids[x]), len(an.ids[y])
        for gi in range(g):
            block = np.concatenate([an.ids[x][gi * cin // g:(gi + 1) * cin // g], an.ids[y][gi * cout // g:(gi + 1) * cout // g]])
            an.uf.union(np.full(len(block) - 1, block[0]), block[1:])
    return None


def _sel(keep: np.ndarray | None):
    return slice(None) if keep is None else keep


def _weight_indexer(node: gs.Node, in_keep: np.ndarray | None, out_keep: np.ndarray | None):
    """How to slice the node's weight (in its own layout) to the kept input and output channels."""
    g = int(node.attrs.get("group", 1))
    if node.op == "ConvTranspose":  # [C_in, C_out/g, k...]
        if g > 1:
            return lambda w: w[_sel(in_keep)][:, _in_block(out_keep, g)]
        return lambda w: w[_sel(in_keep)][:, _sel(out_keep)]
    if node.op == "Conv":  # [C_out, C_in/g, k...]
        if g > 1:
            return lambda w: w[_sel(out_keep)]
        return lambda w: w[_sel(out_keep)][:, _sel(in_keep)]
    if node.op == "Gemm" and node.attrs.get("transB", 0):  # [N, K]
        return lambda w: w[_sel(out_keep)][:, _sel(in_keep)]
    return lambda w: w[_sel(in_keep)][:, _sel(out_keep)]   # Gemm [K, N], MatMul and MatMulNBits [K, N]


def _layer_cut(graph, node, an, removed) -> None:
    """Slice a weighted layer's weight and bias (every piece of their storage) to the kept channels."""
    in_keep, out_keep = _masks(node, an, removed)
    if in_keep is None and out_keep is None:
        return
    spec = W.LAYERS[node.op]
    W.take(graph, node, spec.weight, W.layer_weight(node), _weight_indexer(node, in_keep, out_keep))
    g = int(node.attrs.get("group", 1))
    if g > 1:   # whole groups go: the count left follows the channels on the group's side
        node.attrs["group"] = _groups_kept(in_keep if node.op == "ConvTranspose" else out_keep, g)
    bias = W.layer_bias(node)
    if bias is not None and out_keep is not None and bias.value.shape[-1] == len(out_keep):
        W.take(graph, node, spec.bias, bias, lambda b: b[..., out_keep])


def _groups_kept(keep: np.ndarray | None, g: int) -> int:
    if keep is None:
        return g
    return int(keep.reshape(g, -1).all(1).sum())


def _in_block(keep: np.ndarray | None, g: int):
    """For a grouped ConvTranspose: the kept columns of one group's block (whole groups are removed)."""
    if keep is None:
        return slice(None)
    blocks = keep.reshape(g, -1)
    return blocks[blocks.all(1)][0] if blocks.all(1).any() else slice(None)


def _gemm_couple(node: gs.Node, an: Analysis) -> str | None:
    if _params_missing(node) or node.attrs.get("transA", 0):
        return "weight is not a constant, or transA is set"
    c = W.layer_bias(node)
    if c is not None and c.value.ndim == 2 and c.value.shape[0] != 1:
        return "bias varies per row"
    return _weighted_out(node, an)


def _matmul_couple(node: gs.Node, an: Analysis) -> str | None:
    if _params_missing(node):
        return "MatMul between two activations"
    return _weighted_out(node, an, axis=-1)


def _norm_couple(node: gs.Node, an: Analysis) -> str | None:
    if any(W.value_of(t) is None for t in node.inputs[1:]):
        return "parameters are not constants"
    return _passthrough(node, an)


def _cut_params(graph, node, an, removed) -> None:
    """Slice every constant input that holds one value per channel (BN/IN/PRelu parameters,
    per-channel constants of elementwise ops), whatever its storage."""
    keep = _masks(node, an, removed)[1]
    if keep is None:
        return
    rank = len(an.shapes.get(node.outputs[0].name, [])) or 4
    axis = an.axis.get(node.outputs[0].name, 1)
    for i, t in enumerate(node.inputs):
        if t.name in an.ids:
            continue
        v = W.value_of(t)
        if v is None or v.ndim == 0:
            continue
        ax = 0 if node.op in ("BatchNormalization", "InstanceNormalization") and i > 0 else axis - (rank - v.ndim)
        if 0 <= ax < v.ndim and v.shape[ax] == len(keep):
            _take_axis(graph, node, i, keep, ax)


def _take_axis(graph: gs.Graph, node: gs.Node, i: int, keep: np.ndarray, ax: int) -> None:
    s = W.stored(node.inputs[i])
    if s is None:   # an integer constant: no storage to keep
        G.set_constant(graph, node, i, np.compress(keep, G.constant_value(node.inputs[i]), axis=ax), "_pruned")
    else:
        W.take(graph, node, i, s, lambda a: np.compress(keep, a, axis=ax))


def _qdq_couple(node: gs.Node, an: Analysis) -> str | None:
    """QuantizeLinear/DequantizeLinear of an activation pass channels through; scales per channel
    are sliced with them; blocked scales would need whole blocks."""
    x = node.inputs[0].name
    if x not in an.ids:
        return None   # a weight's decode: the layer's rule handles it
    if int(node.attrs.get("block_size", 0)):
        return "blocked quantization of an activation"
    if any(W.value_of(t) is None for t in node.inputs[1:] if t.name):
        return "scale or zero point is not a constant"
    return _passthrough(node, an)


def _qdq_cut(graph, node, an, removed) -> None:
    keep = _masks(node, an, removed)[1]
    x = node.inputs[0].name
    if keep is None or x not in an.ids:
        return
    rank = len(an.shapes.get(x, [])) or 4
    if int(node.attrs.get("axis", 1)) % rank != an.axis.get(x, 1):
        return
    for i, t in enumerate(node.inputs[1:3], start=1):
        v = G.constant_value(t) if t.name else None
        if v is not None and v.ndim == 1 and v.size == len(keep) and v.size > 1:
            G.set_constant(graph, node, i, v[keep], "_pruned")


def _elementwise_couple(node: gs.Node, an: Analysis) -> str | None:
    """Add/Sub/Mul/Div/Max/Min/Sum/Pow/PRelu: inputs with all channels are tied channel by channel;
    any other input (a constant or an activation) must hold one value per channel or broadcast."""
    out = node.outputs[0]
    rank = len(an.shapes.get(out.name, []))
    known = [t for t in node.inputs if t.name in an.ids]
    if not known or not rank:
        return "no input with known channels"
    axis = an.axis[known[0].name]
    c = an.channels(out.name, axis)
    full = [t for t in known if len(an.ids[t.name]) == c]
    if not full:
        return "channel counts differ"
    for t in node.inputs:
        if t in full:
            an.uf.union(an.ids[full[0].name], an.ids[t.name])
            continue
        v = W.value_of(t)
        shape = list(v.shape) if v is not None else an.shapes.get(t.name)
        if shape is None:
            return f"input '{t.name}' has an unknown shape"
        ax = axis - (rank - len(shape))
        if 0 <= ax < len(shape) and shape[ax] != 1 and (shape[ax] != c or v is None):
            return f"input '{t.name}' does not broadcast over channels"
    an.ids[out.name], an.axis[out.name] = an.ids[full[0].name], axis
    return None


def _concat_couple(node: gs.Node, an: Analysis) -> str | None:
    out = node.outputs[0]
    if any(t.name not in an.ids for t in node.inputs):
        return "an input has no known channels"
    axis = an.axis[node.inputs[0].name]
    rank = len(an.shapes.get(out.name, [])) or 4
    if int(node.attrs.get("axis", 0)) % rank == axis:
        an.ids[out.name] = np.concatenate([an.ids[t.name] for t in node.inputs])
    else:
        for t in node.inputs[1:]:
            an.uf.union(an.ids[node.inputs[0].name], an.ids[t.name])
        an.ids[out.name] = an.ids[node.inputs[0].name]
    an.axis[out.name] = axis
    return None


def _split_couple(node: gs.Node, an: Analysis) -> str | None:
    x = node.inputs[0]
    if x.name not in an.ids:
        return "input has no known channels"
    axis = an.axis[x.name]
    rank = len(an.shapes.get(x.name, [])) or 4
    if int(node.attrs.get("axis", 0)) % rank != axis:
        for y in node.outputs:
            an.same(y, x)
        return None
    start = 0
    for y in node.outputs:
        c = an.channels(y.name, axis)
        if c is None:
            return "output shapes unknown"
        an.ids[y.name], an.axis[y.name] = an.ids[x.name][start:start + c], axis
        start += c
    return None


def _split_cut(graph, node, an, removed) -> None:
    if _masks(node, an, removed)[0] is None:
        return
    sizes = [int(an.keep(y.name, removed).sum()) for y in node.outputs if y.name in an.ids]
    if len(sizes) != len(node.outputs) or int(node.attrs.get("axis", 0)) % 4 != an.axis.get(node.inputs[0].name, 1):
        return
    if len(node.inputs) > 1 and G.constant_value(node.inputs[1]) is not None:
        G.set_constant(graph, node, 1, np.array(sizes, dtype=np.int64), "_pruned")
    elif "split" in node.attrs:
        node.attrs["split"] = sizes


def _slice_params(node: gs.Node) -> tuple | None:
    vals = [G.constant_value(t) if len(node.inputs) > i else None for i, t in
            zip(range(1, 5), node.inputs[1:5])]
    if len(node.inputs) < 3 or any(v is None for v in vals[:2]):
        return None
    starts, ends = vals[0], vals[1]
    axes = vals[2] if len(vals) > 2 and vals[2] is not None else np.arange(len(starts))
    steps = vals[3] if len(vals) > 3 and vals[3] is not None else np.ones(len(starts), np.int64)
    return starts, ends, axes, steps


def _slice_couple(node: gs.Node, an: Analysis) -> str | None:
    x, y = node.inputs[0], node.outputs[0]
    if x.name not in an.ids:
        return "input has no known channels"
    params = _slice_params(node)
    if params is None:
        return "slice bounds are not constants"
    starts, ends, axes, steps = params
    axis, rank, c = an.axis[x.name], len(an.shapes.get(x.name, [])) or 4, len(an.ids[x.name])
    hit = [i for i, a in enumerate(axes) if int(a) % rank == axis]
    if not hit:
        an.same(y, x)
        return None
    i = hit[0]
    if int(steps[i]) != 1:
        return "strided slice on the channel axis"
    lo, hi = (int(np.clip(v + c if v < 0 else v, 0, c)) for v in (starts[i], ends[i]))
    an.ids[y.name], an.axis[y.name] = an.ids[x.name][lo:hi], axis
    return None


def _slice_cut(graph, node, an, removed) -> None:
    params = _slice_params(node)
    x = node.inputs[0].name
    if params is None or x not in an.ids:
        return
    starts, ends, axes, _ = params
    axis, rank, c = an.axis[x], len(an.shapes.get(x, [])) or 4, len(an.ids[x])
    hit = [i for i, a in enumerate(axes) if int(a) % rank == axis]
    if not hit:
        return
    i, keep = hit[0], an.keep(x, removed)
    if keep.all():
        return
    lo, hi = (int(np.clip(v + c if v < 0 else v, 0, c)) for v in (starts[i], ends[i]))
    new_starts, new_ends = starts.copy(), ends.copy()
    new_starts[i], new_ends[i] = int(keep[:lo].sum()), int(keep[:hi].sum())
    G.set_constant(graph, node, 1, new_starts, "_pruned")
    G.set_constant(graph, node, 2, new_ends, "_pruned")


def _flatten_couple(node: gs.Node, an: Analysis) -> str | None:
    """Flatten (or Reshape to [N, -1]) of [N, C, H, W]: channel c owns features c*H*W .. (c+1)*H*W - 1."""
    x, y = node.inputs[0], node.outputs[0]
    shape = an.shapes.get(x.name)
    if x.name not in an.ids or an.axis[x.name] != 1 or not shape or min(shape[1:]) <= 0:
        return "input channels or spatial size unknown"
    if node.op == "Flatten" and int(node.attrs.get("axis", 1)) != 1:
        return "Flatten axis is not 1"
    if node.op == "Reshape":
        target = G.constant_value(node.inputs[1])
        if target is None or len(target) != 2 or int(target[1]) not in (-1, int(np.prod(shape[1:]))):
            return "Reshape is not a flatten to [N, C*H*W]"
    hw = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    an.ids[y.name], an.axis[y.name] = np.repeat(an.ids[x.name], hw), 1
    return None


def _reshape_cut(graph, node, an, removed) -> None:
    if node.op != "Reshape":
        return
    target = G.constant_value(node.inputs[1])
    keep = _masks(node, an, removed)[1]
    if target is not None and keep is not None and int(target[1]) != -1:
        new = target.copy()
        new[1] = int(keep.sum())
        G.set_constant(graph, node, 1, new, "_pruned")


def _squeeze_couple(node: gs.Node, an: Analysis) -> str | None:
    x, y = node.inputs[0], node.outputs[0]
    if x.name not in an.ids:
        return "input has no known channels"
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        v = G.constant_value(node.inputs[1])
        axes = None if v is None else v.tolist()
    rank = len(an.shapes.get(x.name, []))
    if axes is None or not rank:
        return "axes unknown"
    axis = an.axis[x.name]
    if node.op == "Squeeze":
        axes = [a % rank for a in axes]
        if axis in axes:
            return "squeezes the channel axis"
        new_axis = axis - sum(a < axis for a in axes)
    else:
        out_rank = rank + len(axes)
        new_axis = axis
        for a in sorted(a % out_rank for a in axes):
            if a <= new_axis:
                new_axis += 1
    an.same(y, x, new_axis)
    return None


def _pad_couple(node: gs.Node, an: Analysis) -> str | None:
    pads = node.attrs.get("pads")
    if pads is None and len(node.inputs) > 1:
        v = G.constant_value(node.inputs[1])
        pads = None if v is None else v.tolist()
    if pads is None:
        return "pads are not constant"
    axis, rank = an.axis.get(node.inputs[0].name, 1), len(pads) // 2
    if pads[axis] or pads[axis + rank]:
        return "pads the channel axis"
    return _passthrough(node, an)


def _softmax_couple(node: gs.Node, an: Analysis) -> str | None:
    x = node.inputs[0].name
    rank = len(an.shapes.get(x, []))
    if x in an.ids and rank and int(node.attrs.get("axis", -1)) % rank == an.axis[x]:
        return "normalizes over the channel axis"
    return _passthrough(node, an)


PASSTHROUGH = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Softplus",
               "Softsign", "Gelu", "Erf", "Identity", "Dropout", "Cast", "Clip", "Neg", "Abs", "Exp", "Log", "Sqrt",
               "Reciprocal", "Floor", "Ceil", "Round", "Mish", "ThresholdedRelu", "Celu",
               "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
               "Resize", "Upsample")

RULES: dict[str, Rule] = {
    **{op: Rule(_passthrough) for op in PASSTHROUGH},
    "Conv": Rule(_conv_couple, _layer_cut),
    "ConvTranspose": Rule(_conv_couple, _layer_cut),
    "Gemm": Rule(_gemm_couple, _layer_cut),
    "MatMul": Rule(_matmul_couple, _layer_cut),
    "MatMulNBits": Rule(_matmul_couple, _layer_cut),
    "QuantizeLinear": Rule(_qdq_couple, _qdq_cut),
    "DequantizeLinear": Rule(_qdq_couple, _qdq_cut),
    "BatchNormalization": Rule(_norm_couple, _cut_params),
    "InstanceNormalization": Rule(_norm_couple, _cut_params),
    "PRelu": Rule(_elementwise_couple, _cut_params),
    **{op: Rule(_elementwise_couple, _cut_params) for op in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Pow")},
    "Concat": Rule(_concat_couple),
    "Split": Rule(_split_couple, _split_cut),
    "Slice": Rule(_slice_couple, _slice_cut),
    "Flatten": Rule(_flatten_couple),
    "Reshape": Rule(_flatten_couple, _reshape_cut),
    "Squeeze": Rule(_squeeze_couple),
    "Unsqueeze": Rule(_squeeze_couple),
    "Pad": Rule(_pad_couple),
    "Softmax": Rule(_softmax_couple),
    "LogSoftmax": Rule(_softmax_couple),
}


# -- analysis -------------------------------------------------------------------------------------

def _outer_names(node: gs.Node) -> set[str]:
    names = set()
    for sub in node.subgraphs():
        for n in G.iter_nodes(sub):
            names.update(t.name for t in n.inputs)
    return names


def analyze(graph: gs.Graph, model: onnx.ModelProto | None = None,
            input_shapes: dict[str, list[int]] | None = None) -> Analysis:
    """Find the channel units and groups of a graph. Tensor shapes come from shape inference on
    `model` (the graph exported, by default) with the graph inputs pinned to `input_shapes`
    (symbolic dimensions become 1 otherwise)."""
    model = model if model is not None else G.to_model(graph)
    an = Analysis(graph, static_shapes(model, input_shapes))
    for t in graph.inputs:
        an.fresh(t)
        an.freeze(t, "graph input")
    for node in graph.toposort().nodes:
        rule = RULES.get(node.op)
        if list(node.subgraphs()) or rule is None:
            reason = f"{node.op} '{G.display_name(node)}' is not in the channel table"
            for t in node.inputs:
                an.freeze(t, reason)
            for name in _outer_names(node):
                if name in an.ids:
                    an.freezes.append((an.ids[name], reason))
            continue
        why = rule.couple(node, an)
        if why:
            for t in list(node.inputs) + list(node.outputs):
                an.freeze(t, f"{node.op} '{G.display_name(node)}': {why}")
            an.producers.pop(G.layer_id(node), None)
            an.consumers.pop(G.layer_id(node), None)
    for t in graph.outputs:
        an.freeze(t, "graph output")
    for ids, reason in an.freezes:
        for r in an.uf.roots(ids).tolist():
            an.frozen.setdefault(r, reason)
    an.groups = _groups(an)
    _name_groups(an)
    return an


def _name_groups(an: Analysis) -> None:
    """A group is called by its first producer's node name when that name is set and unique in the
    graph, else by the producer's id (its output tensor's name, unique by construction)."""
    counts: dict[str, int] = {}
    for n in an.graph.nodes:
        counts[n.name] = counts.get(n.name, 0) + 1
    for g in an.groups:
        node = an.nodes.get(g.id)
        g.name = node.name if node is not None and node.name and counts[node.name] == 1 else g.id


def _groups(an: Analysis) -> list[Group]:
    """Tensors connected through shared units form a group; its units are the roots it holds."""
    owner: dict[int, int] = {}
    groups: list[Group] = []
    producers_of = {}
    for node, tensor in an.producers.items():
        producers_of.setdefault(tensor, []).append(node)
    for name, ids in an.ids.items():
        roots = an.uf.roots(ids)
        hits = {owner[r] for r in roots.tolist() if r in owner}
        if hits:
            gi = min(hits)
            for other in sorted(hits - {gi}, reverse=True):  # merge
                g = groups[other]
                groups[gi].tensors += g.tensors
                for r, o in owner.items():
                    if o == other:
                        owner[r] = gi
                groups[other] = Group("", [])
        else:
            gi = len(groups)
            groups.append(Group("", []))
        groups[gi].tensors.append(name)
        for r in roots.tolist():
            owner[r] = gi
    result = []
    for gi, g in enumerate(groups):
        if not g.tensors:
            continue
        g.producers = [n for t in g.tensors for n in producers_of.get(t, [])]
        g.consumers = [n for n, t in an.consumers.items() if t in g.tensors]
        units: list[int] = []
        for t in g.tensors:
            for r in an.uf.roots(an.ids[t]).tolist():
                if owner[r] == gi and r not in units:
                    units.append(r)
        g.units = units
        g.id = g.producers[0] if g.producers else g.tensors[0]
        reasons = [an.frozen[r] for r in units if r in an.frozen]
        if not g.producers:
            g.frozen = "no layer produces these channels"
        elif reasons:
            g.frozen = reasons[0]
        result.append(g)
    return result


def apply_removal(graph: gs.Graph, an: Analysis, removed: set[int]) -> None:
    """Cut every node's parameters to the channels that remain after removing the units `removed`."""
    if not removed:
        return
    for node in list(graph.nodes):
        rule = RULES.get(node.op)
        touched = any(t.name in an.ids for t in list(node.inputs) + list(node.outputs))
        if rule is not None and rule.cut is not None and touched:
            rule.cut(graph, node, an, removed)
    for t in graph.tensors().values():  # shapes change: let shape inference recompute them
        if isinstance(t, gs.Variable) and t not in graph.inputs and t not in graph.outputs:
            t.shape = None


# -- whole branches -------------------------------------------------------------------------------

MERGES = ("Add", "Sum")


def branch_end(an: Analysis, group: Group) -> str | None:
    """The tensor a residual branch adds to the rest of the graph, where the group is the branch's
    inner width and every channel of it can go at once; else None.

    All of a group's channels gone, the layer that reads them would compute a constant, and so
    would everything after it up to the sum: the branch is then its mean (`remove_branches`), and
    the sum is the shortcut plus that. So: one weighted layer reads the group and nothing outside
    the group does; from that layer's output, nodes that read only it (and constants) lead to an
    Add (or Sum) whose other input has the same shape (a residual sum, not a broadcast)."""
    if group.frozen or not group.producers or len(group.consumers) != 1 or group.consumers[0] not in an.nodes:
        return None
    layer, inside, tensors = an.nodes[group.consumers[0]], set(group.tensors), an.graph.tensors()
    for name in inside:
        readers = tensors[name].outputs if name in tensors else []
        if any(n is not layer and not (n.outputs and all(o.name in inside for o in n.outputs)) for n in readers):
            return None
    outputs = {t.name for t in an.graph.outputs}
    t = layer.outputs[0]
    while t.name not in outputs and len(t.outputs) == 1:
        node = t.outputs[0]
        others = [i for i in node.inputs if i is not t and W.value_of(i) is None]
        if others:
            shape = an.shapes.get(t.name)
            fits = len(others) == 1 and shape is not None and an.shapes.get(others[0].name) == shape
            return t.name if node.op in MERGES and fits and t.name in an.ids else None
        if len(node.outputs) != 1:
            return None
        t = node.outputs[0]
    return None


def remove_branches(graph: gs.Graph, means: dict[str, np.ndarray]) -> list[str]:
    """Each branch ({the tensor `branch_end` found: its mean, broadcastable}) replaced by its mean:
    the sum reads the constant, and the branch's nodes, now read by nothing, go. Returns the ids of
    the weighted layers that read the sums (they see the shortcut plus a constant now: refit them)."""
    tensors, readers = graph.tensors(), []
    for name, value in means.items():
        t = tensors[name]
        node = t.outputs[0]          # the sum, its one reader (`branch_end`)
        G.set_constant(graph, node, next(i for i, x in enumerate(node.inputs) if x is t), value, suffix="_mean")
        readers += _weighted_after(node)
    G.tidy(graph)
    return list(dict.fromkeys(G.layer_id(n) for n in readers))


def _weighted_after(node: gs.Node) -> list[gs.Node]:
    """The weighted layers that read `node`'s output, directly or through nodes without weights."""
    found, todo, seen = [], [node], set()
    while todo:
        n = todo.pop()
        for t in n.outputs:
            for r in t.outputs:
                if id(r) in seen:
                    continue
                seen.add(id(r))
                (found if W.layer_weight(r) is not None else todo).append(r)
    return found
