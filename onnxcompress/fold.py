"""Folding inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it.

Used by the `fold-bn` pass and by `quantize`, which folds first: an integer kernel cannot apply a
BatchNormalization after its requantization, so an unfolded one would run in float between a
DequantizeLinear and a QuantizeLinear (PP-OCR's angle classifier keeps 35 of them unfolded).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress import graph as G, weights as W
from onnxcompress.layers import from_out_rows, gemm_rows, out_rows

FOLDABLE = frozenset({"Conv", "ConvTranspose", "Gemm"})


def fold_batchnorms(graph: gs.Graph) -> tuple[int, list[str]]:
    """Fold every BatchNormalization that can be folded; return how many, and a note for each left."""
    folded, notes = 0, []
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        reason = fold_one(graph, bn)
        if reason:
            notes.append(f"BatchNormalization '{G.display_name(bn)}' left as is: {reason}")
        else:
            folded += 1
    return folded, notes


def fold_one(graph: gs.Graph, bn: gs.Node) -> str | None:
    """Fold one BatchNormalization (exact up to rounding); return why not, or None on success."""
    x = bn.inputs[0]
    prev = G.producer(x)
    if prev is None or prev.op not in FOLDABLE:
        return f"its input comes from {prev.op if prev else 'a graph input'}, not Conv/ConvTranspose/Gemm"
    if len(x.outputs) != 1 or x in graph.outputs:
        return f"the output of '{G.display_name(prev)}' is also used elsewhere"
    if int(bn.attrs.get("training_mode", 0)) or len(bn.outputs) != 1:
        return "training mode"
    params = [W.value_of(t) for t in bn.inputs[1:5]]
    weight, bias_s = W.layer_weight(prev), W.layer_bias(prev)
    if any(p is None for p in params) or weight is None or (len(prev.inputs) > 2 and bias_s is None and prev.inputs[2].name):
        return f"parameters of it or of '{G.display_name(prev)}' are not constants"
    w, bias = weight.value, None if bias_s is None else bias_s.value
    scale, beta, mean, var = (p.astype(np.float64) for p in params)
    s = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    if prev.op == "Gemm":
        eff = gemm_rows(prev, w, bias, len(s))
        if eff is None:
            return f"Gemm '{G.display_name(prev)}' has a per-row bias"
        rows, b = eff
        prev.attrs.update(alpha=1.0, beta=1.0)
    else:
        rows = out_rows(prev, w).astype(np.float64)
        b = np.zeros(len(s)) if bias is None else bias.astype(np.float64).reshape(-1)
    # Written back in each tensor's own storage (a quantized layer stays quantized).
    W.write(graph, prev, 1, weight, from_out_rows(prev, rows * s[:, None], w.shape), suffix="_bnfold")
    W.write_bias(graph, prev, ((b - mean) * s + beta).astype(w.dtype))
    prev.outputs = list(bn.outputs)
    bn.outputs.clear()
    return None
