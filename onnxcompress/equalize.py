"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"): rescale channels between
two consecutive layers so that each channel's weight range is the same in both, without changing
what the model computes.

For layers a -> f -> b where f is positively homogeneous per channel (ReLU, LeakyReLU, MaxPool,
nothing), f(x / s) = f(x) / s for s > 0, so dividing a's output channel c (its weight row and bias)
by s_c and multiplying b's input channel c by s_c leaves b's output unchanged. With
s_c = sqrt(r_a[c] / r_b[c]) (r: the channel's largest |weight| in a's rows and in b's input
channel), both ranges become sqrt(r_a[c] r_b[c]): channels that were tiny in one layer stop wasting
the grid that one scale per tensor gives them (depthwise convs). Clip (ReLU6) and HardSwish are not
homogeneous, so such pairs are left alone.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import graph as G, weights as W
from .layers import out_rows

__all__ = ["equalize"]

HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "MaxPool", "Identity"})
SWEEPS = 4             # chains (a -> b -> c) settle within a few passes over the pairs


def equalize(graph: gs.Graph, exclude: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Equalize every eligible pair of dense-weight Conv/Gemm layers in place; returns the pairs."""
    pairs = [p for p in (_pair(graph, a, exclude) for a in graph.nodes) if p is not None]
    nodes = {id(n): n for pair in pairs for n in pair}
    rows = {k: out_rows(n, W.layer_weight(n).value).astype(np.float64) for k, n in nodes.items()}
    bias = {k: W.layer_bias(n).value.astype(np.float64).reshape(-1) for k, n in nodes.items()
            if W.layer_bias(n) is not None}
    for _ in range(SWEEPS):
        for a, b in pairs:
            ra = np.abs(rows[id(a)]).max(1)
            view = _by_input(b, rows[id(b)])
            rb = np.abs(view).max((0, 2))
            s = np.where((ra > 0) & (rb > 0), np.sqrt(ra / np.where(rb > 0, rb, 1.0)), 1.0)
            rows[id(a)] = rows[id(a)] / s[:, None]
            if id(a) in bias:
                bias[id(a)] = bias[id(a)] / s
            rows[id(b)] = (view * s[None, :, None]).reshape(rows[id(b)].shape)
    for k, node in nodes.items():
        dtype = W.layer_weight(node).value.dtype
        W.write_rows(graph, node, rows[k].astype(dtype))
        if k in bias:
            W.write_bias(graph, node, bias[k].astype(dtype))
    return [(G.display_name(a), G.display_name(b)) for a, b in pairs]


def _pair(graph: gs.Graph, a: gs.Node, exclude: tuple[str, ...]) -> tuple[gs.Node, gs.Node] | None:
    """(a, b) when a's output reaches only b's data input, through homogeneous ops only."""
    if not _dense(a, exclude):
        return None
    outputs = {t.name for t in graph.outputs}
    y = a.outputs[0]
    while len(y.outputs) == 1 and y.outputs[0].op in HOMOGENEOUS and y.name not in outputs:
        y = y.outputs[0].outputs[0]
    if len(y.outputs) != 1 or y.name in outputs:
        return None
    b = y.outputs[0]
    if not _dense(b, exclude) or b.inputs[0] is not y:
        return None
    n = out_rows(a, W.layer_weight(a).value).shape[0]
    bias = W.layer_bias(a)
    view = _by_input(b, out_rows(b, W.layer_weight(b).value))
    ok = view is not None and view.shape[1] == n and (bias is None or bias.value.size == n)
    return (a, b) if ok else None


def _dense(node: gs.Node, exclude: tuple[str, ...]) -> bool:
    if node.op not in ("Conv", "Gemm") or {node.name, G.layer_id(node)} & set(exclude):
        return False
    s, b = W.layer_weight(node), W.layer_bias(node)
    return s is not None and s.kind == "dense" and (b is None or b.kind == "dense") \
        and not (node.op == "Gemm" and node.attrs.get("transA", 0))


def _by_input(b: gs.Node, rows: np.ndarray) -> np.ndarray | None:
    """b's [out, fan_in] rows viewed as [.., input channel, ..] (axis 1); None for grouped convs
    other than depthwise."""
    if b.op == "Gemm":
        return rows.reshape(rows.shape[0], rows.shape[1], 1)
    g, w = int(b.attrs.get("group", 1)), W.layer_weight(b).value
    if g == 1:
        return rows.reshape(rows.shape[0], w.shape[1], -1)
    if w.shape[1] == 1:                                   # depthwise: each input channel's rows are contiguous
        return rows.reshape(1, g, -1)
    return None
