"""QDQ placement that onnxruntime's CPU provider turns into integer kernels, and what it costs.

`insert_qdq` puts QuantizeLinear -> DequantizeLinear on an activation so that onnxruntime fuses the
DQ -> layer -> Q groups into QLinearConv / QLinearMatMul / QGemm, while keeping the layers left in
float really in float; `pad_input_channels` gives convs the channel multiple onnxruntime's fast int8
kernel needs; `integer_layers` tells whether a model is quantized already; `input_noise` estimates
what a layer's output loses when its input is rounded to uint8.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from . import graph as G, weights as W
from .layers import out_rows
from .storage import Quantized, add_node, constant

__all__ = ["ABSORBED", "CODE_OPS", "FLOAT_GUARDED", "QLINEAR_POOLS", "TINY", "insert_qdq", "integer_layers", "input_noise",
           "pad_input_channels"]

ABSORBED = frozenset({"Relu", "Clip"})          # an activation the output's requantization can absorb
CODE_OPS = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "MaxPool"})
                                                # run on the uint8 codes when the DQ before and Q after share a scale
QLINEAR_POOLS = frozenset({"GlobalAveragePool", "AveragePool"})   # have integer kernels (QLinear*) of their own
CHANNEL_MULTIPLE = 4                            # input channels onnxruntime's fast int8 conv kernels want
FLOAT_GUARDED = frozenset({"Conv", "ConvTranspose", "Gemm"})   # what onnxruntime would quantize itself
TINY = float(np.finfo(np.float32).tiny) * 127   # a weight row with a smaller range counts as zero: its int8
                                                # scale (range / 127) would underflow float32 (PP-OCR has such rows)
INTEGER_OPS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulNBits",
                         "DynamicQuantizeLSTM", "DynamicQuantizeMatMul"})


def insert_qdq(graph: gs.Graph, tensor: gs.Tensor, scale: float, zero_point: int, layers: list[gs.Node]) -> None:
    """tensor -> QuantizeLinear -> DequantizeLinear -> every consumer (a graph output stays float).

    A Conv, ConvTranspose or Gemm left in float reads the float tensor, or, where that tensor is a
    quantized layer's requantized output (reading it in float would undo that layer's fusion), the
    codes through a DequantizeLinear of its own whose scale is repeated per input channel: given a
    per-tensor one, onnxruntime (WeightBiasQuantization) would quantize the float layer's weight
    itself, per tensor, when its output leads to a QuantizeLinear; on PP-OCRv4 rec that took the
    lines decoded as fp32 from 88% to 16% for a model with every weight in float."""
    base = G.stem(tensor.name)
    sc = constant(graph, base + "_scale", np.array(scale, np.float32))
    zp = constant(graph, base + "_zero_point", np.array(zero_point, np.uint8))
    consumers = list(tensor.outputs)
    q = add_node(graph, "QuantizeLinear", [tensor, sc, zp], {}, base + "_q", np.uint8)
    dq = add_node(graph, "DequantizeLinear", [q, sc, zp], {}, base + "_dq", np.float32)
    quantized = {id(n) for n in layers}
    producer = G.producer(tensor)
    if producer is not None and producer.op in ABSORBED and producer.inputs:
        producer = G.producer(producer.inputs[0])
    fused = producer is not None and id(producer) in quantized       # its output requantized by a kernel
    for node in consumers:
        source = dq
        if node.op in FLOAT_GUARDED and id(node) not in quantized:
            channels = _input_channels(node)
            if not fused or channels is None:
                source = tensor                                      # the float layer reads the float tensor
            else:
                axis, n = channels
                source = add_node(graph, "DequantizeLinear", [q, constant(graph, base + "_scales", np.full(n, scale, np.float32)),
                                                              constant(graph, base + "_zero_points", np.full(n, zero_point, np.uint8))],
                                  {"axis": axis}, base + "_dq_float", np.float32)
        node.inputs = [source if t is tensor else t for t in node.inputs]


def pad_input_channels(graph: gs.Graph, layers: list[gs.Node]) -> list[str]:
    """Quantized Convs (group 1) whose input channels are not a multiple of CHANNEL_MULTIPLE get
    zero weight channels up to it, and their uint8 input codes padded with the zero point between
    the QuantizeLinear and the DequantizeLinear, so that onnxruntime runs its fast int8 kernel: on
    the MNIST ResNet's 1-channel stem at batch 32 the generic one took 598 us, fp32 94 us. Returns
    the names of the convs padded."""
    padded = []
    for node in layers:
        s = W.layer_weight(node) if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1 else None
        if s is None or not isinstance(s.storage, Quantized) or s.value.ndim < 3:
            continue
        pad = -s.value.shape[1] % CHANNEL_MULTIPLE
        dq = G.producer(node.inputs[0])
        q = G.producer(dq.inputs[0]) if dq is not None and dq.op == "DequantizeLinear" and len(dq.inputs) == 3 else None
        if not pad or q is None or q.op != "QuantizeLinear":
            continue
        w = s.storage
        widths = [(0, 0), (0, pad)] + [(0, 0)] * (w.q.ndim - 2)
        W.convert(graph, node, 1, s, replace(w, q=np.pad(w.q, widths), scale=np.pad(w.scale, widths, mode="edge"),
                                             zero_point=np.pad(w.zero_point, widths)))
        pads = np.zeros(2 * w.q.ndim, np.int64)
        pads[w.q.ndim + 1] = pad                                 # at the end of the channel axis
        base = G.stem(dq.inputs[0].name) + "_cpad"
        codes = add_node(graph, "Pad", [dq.inputs[0], constant(graph, base + "s", pads), dq.inputs[2]],
                         {"mode": "constant"}, base, np.uint8)
        node.inputs[0] = add_node(graph, "DequantizeLinear", [codes, dq.inputs[1], dq.inputs[2]], {}, base + "_dq", np.float32)
        padded.append(G.display_name(node))
    return padded


def _input_channels(node: gs.Node) -> tuple[int, int] | None:
    """(axis, size) of a known dimension of a Conv, ConvTranspose or Gemm's first input."""
    s = W.layer_weight(node) if len(node.inputs) > 1 else None
    w = s.value if s is not None else None
    if w is None or w.ndim < 2:
        return None
    if node.op == "Conv":
        return 1, int(w.shape[1]) * int(node.attrs.get("group", 1))
    if node.op == "ConvTranspose":
        return 1, int(w.shape[0])
    k = int(w.shape[1] if node.attrs.get("transB", 0) else w.shape[0])
    return (0, k) if node.attrs.get("transA", 0) else (1, k)


def integer_layers(graph: gs.Graph) -> int:
    """Layers that already compute with integer weights: QDQ or MatMulNBits weights, or QOperator
    and integer kernels (QLinearConv, ConvInteger, ...)."""
    count = 0
    for node in graph.nodes:
        if node.op in INTEGER_OPS:
            count += 1
        elif node.op in W.LAYERS and node.op != "Gather":
            s = W.layer_weight(node)
            count += s is not None and s.kind in ("qdq", "nbits")
    return count


def input_noise(node: gs.Node | None, x: np.ndarray, scale: float, zero_point: int) -> float:
    """The layer's output error from its input's uint8 round trip, relative to its output, with
    each input channel weighted by the energy of the weights that read it (noise assumed white):
    sum_c a_c ||x_c - dq(q(x_c))||^2 / sum_c a_c ||x_c||^2."""
    if node is None:                                        # not a layer's input: plain relative error
        x = x.astype(np.float64)
        back = (np.clip(np.round(x / scale) + zero_point, 0, 255) - zero_point) * scale
        return float(np.sum((x - back) ** 2) / max(np.sum(x ** 2), 1e-30))
    w = W.layer_weight(node).value
    rows = out_rows(node, w).astype(np.float64)
    if node.op == "Conv":
        g, cg = int(node.attrs.get("group", 1)), w.shape[1]
        energy = (rows.reshape(g, rows.shape[0] // g, cg, -1) ** 2).sum((1, 3)).reshape(-1)
        axis = 1
    else:
        energy, axis = (rows ** 2).sum(0), x.ndim - 1
    x = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])
    noise = x - (np.clip(np.round(x / scale) + zero_point, 0, 255) - zero_point) * scale
    if energy.size != x.shape[1]:
        return float(np.sum(noise ** 2) / max(np.sum(x ** 2), 1e-30))
    return float(energy @ (noise ** 2).sum(0) / max(energy @ (x ** 2).sum(0), 1e-30))
