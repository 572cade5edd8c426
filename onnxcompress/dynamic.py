"""Dynamic quantization: int8 weights, activations quantized at run time from their own range.

Two forms onnxruntime's CPU provider runs with integer kernels and no calibration:

- MatMul / Gemm: `DynamicQuantizeLinear(x)` -> `MatMulInteger(x_q, W_q, x_zp)` -> `Cast` -> `Mul` by
  x_scale x w_scale (one per output column) -> `Add` bias, which onnxruntime fuses into
  `DynamicQuantizeMatMul`;
- LSTM: onnxruntime's `DynamicQuantizeLSTM` (com.microsoft), W and R as int8 per gate row.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import graph as G
from . import weights as W
from .layers import out_rows
from .qdq import TINY
from .storage import add_node, constant

__all__ = ["symmetric_int8", "dynamic_matmul", "dynamic_lstm"]


def symmetric_int8(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8 codes and scales of a [out, fan_in] matrix (max |w| -> 127)."""
    amax = np.abs(rows).max(1)
    scale = np.where(amax > TINY, amax / 127, 1.0).astype(np.float32)
    return np.clip(np.round(rows / scale[:, None].astype(np.float64)), -127, 127).astype(np.int8), scale


def dynamic_matmul(graph: gs.Graph, node: gs.Node) -> None:
    """Replace a MatMul (x @ W, W [K, N]) or Gemm (transA 0, alpha 1) with the dynamic int8 chain."""
    w = W.layer_weight(node).value
    codes, scale = symmetric_int8(out_rows(node, w).astype(np.float64))        # [N, K], [N]
    bias = W.layer_bias(node) if node.op == "Gemm" else None
    base = G.stem(G.layer_id(node))
    x, y = node.inputs[0], node.outputs[0]
    xq, xs, xzp = (gs.Variable(G.unique_name(graph, base + s), dtype=d)
                   for s, d in (("_x_q", np.uint8), ("_x_scale", np.float32), ("_x_zero_point", np.uint8)))
    graph.nodes.append(gs.Node("DynamicQuantizeLinear", G.unique_name(graph, base + "_dql"), {}, [x], [xq, xs, xzp]))
    wq = constant(graph, base + "_weight_q", np.ascontiguousarray(codes.T))
    wzp = constant(graph, base + "_weight_zero_point", np.zeros(len(scale), np.int8))
    acc = add_node(graph, "MatMulInteger", [xq, wq, xzp, wzp], {}, base + "_int32", np.int32)
    wide = add_node(graph, "Cast", [acc], {"to": onnx.TensorProto.FLOAT}, base + "_float", np.float32)
    both = add_node(graph, "Mul", [xs, constant(graph, base + "_weight_scale", scale)], {}, base + "_scale", np.float32)
    out = add_node(graph, "Mul", [wide, both], {}, base + "_scaled", np.float32)
    if bias is not None:
        beta = float(node.attrs.get("beta", 1.0))
        out = add_node(graph, "Add", [out, constant(graph, base + "_bias", (bias.value * beta).astype(np.float32))],
                       {}, base + "_biased", np.float32)
    last = graph.nodes[-1]
    last.outputs = [y]                       # the chain's end takes over the layer's output tensor
    node.outputs = [out]
    graph.nodes.remove(node)


def dynamic_lstm(graph: gs.Graph, node: gs.Node) -> bool:
    """LSTM with constant W [dirs, 4H, I] and R [dirs, 4H, H] -> DynamicQuantizeLSTM (int8 per
    gate row); False (left as is) when the weights are not constants or the layout is batch-first."""
    wt, rt = (G.constant_value(node.inputs[i]) if len(node.inputs) > i else None for i in (1, 2))
    if wt is None or rt is None or wt.ndim != 3 or rt.ndim != 3 or node.attrs.get("layout", 0):
        return False
    base = G.stem(G.layer_id(node))
    parts = []
    for name, m in (("W", wt), ("R", rt)):
        dirs, rows, cols = m.shape
        codes, scale = symmetric_int8(m.reshape(dirs * rows, cols).astype(np.float64))
        q = np.ascontiguousarray(codes.reshape(dirs, rows, cols).transpose(0, 2, 1))      # [dirs, in, 4H]
        parts.append((constant(graph, f"{base}_{name}_q", q),
                      constant(graph, f"{base}_{name}_scale", scale.reshape(dirs, rows)),
                      constant(graph, f"{base}_{name}_zero_point", np.zeros((dirs, rows), np.int8))))
    (wq, ws, wz), (rq, rs, rz) = parts
    empty = gs.Variable.empty()
    rest = list(node.inputs[3:8]) + [empty] * (5 - len(node.inputs[3:8]))
    node.inputs = [node.inputs[0], wq, rq, *rest, ws, wz, rs, rz]
    node.op, node.domain = "DynamicQuantizeLSTM", "com.microsoft"
    node.attrs = {k: v for k, v in node.attrs.items() if k != "layout"}
    return True
