"""quantize: static int8 QDQ that onnxruntime's CPU provider runs with integer kernels.

Placement follows what onnxruntime fuses: every quantized layer (Conv, Gemm, MatMul with constant
weights) reads its input through QuantizeLinear -> DequantizeLinear, and its output (after a Relu
or Clip it feeds alone, which the requantization absorbs) goes through one too, so that the
DQ -> layer -> Q group becomes QLinearConv / QLinearMatMul / QGemm. Activations are asymmetric
uint8 per tensor, ranged on calibration data (`onnxcompress.calibration`: minmax, percentile, mse,
entropy, or per tensor the range with least round-trip error); weights are symmetric int8 (zero
point 0, the kernels' fast path), per output channel; biases int32 at input scale x weight scale,
the scale the integer kernels assume.

Accuracy tools: weights are rounded by data (`rounding="gptq"`, the default: layers front to back
on the model as quantized so far, each rounding error compensated on the columns not yet rounded
through the inverse Gram matrix of the layer's quantized inputs), and the shift this leaves in each
output channel's mean is folded into the bias (`bias_correction`). Per-channel weight scales need
DequantizeLinear's `axis` (opset 13): a model below it is converted by onnx's version converter
first, and the report says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress import calibration as Cal, graph as G, weights as W
from onnxcompress.layers import channel_spread, from_out_rows, group_slices, out_axis, out_rows
from onnxcompress.pass_api import Context, Pass, PassResult
from onnxcompress.recovery import sequential
from onnxcompress.runtime import capture
from onnxcompress.solvers import gptq
from onnxcompress.storage import Quantized, add_node, constant

__all__ = ["Quantize"]

ABSORBED = frozenset({"Relu", "Clip"})     # an activation the output's requantization can absorb
INT8 = onnx.TensorProto.INT8
DEPTHWISE_SPREAD = 3.0    # max / median channel range above which a depthwise conv keeps per-channel scales


@dataclass
class Quantize(Pass):
    """Static int8 QDQ: uint8 activations calibrated on data, int8 symmetric per-channel weights."""

    name = "quantize"
    handles = frozenset({"Conv", "Gemm", "MatMul"})
    calibration: Literal["auto", "minmax", "percentile", "mse", "entropy"] = "auto"
    percentile: float = 99.99
    per_channel: bool = True
    depthwise_per_channel: bool = False   # depthwise convs: one scale per tensor unless this is set
    rounding: Literal["nearest", "gptq"] = "gptq"
    bias_correction: bool = True
    calib_samples: int = 512          # samples whose activations set the ranges
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")

    def required_opset(self) -> int:
        return 13 if self.per_channel else 10

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        done = _integer_layers(graph)
        if done:
            return PassResult(graph, False, {"layers_quantized": 0},
                              [f"the model is already quantized ({done} layers with integer weights or kernels); "
                               "left as it is"])
        data = ctx.require_calib(self.name)
        layers, notes = self._layers(graph)
        if not layers:
            return PassResult(graph, False, {"layers_quantized": 0}, notes)
        acts = self._activations(graph, layers)
        values = capture(G.to_model(graph, like=ctx.original), data, list(acts), ctx.providers, ctx.batch_size,
                         max_samples=self.calib_samples)
        params = {name: Cal.uint8_params(*Cal.activation_range(Cal.summarize([values[name]]), self.calibration,
                                                               self.percentile)) for name in acts}
        x_scale = {id(n): params[n.inputs[0].name][0] for n in layers}
        for name, tensor in acts.items():
            _insert_qdq(graph, tensor, *params[name])
        errors: list[float] = []
        visit = lambda node, grams: errors.append(self._weights(graph, node, x_scale[id(node)], grams))
        targets = {id(n): visit for n in layers}
        if self.rounding == "gptq" or self.bias_correction:
            sequential(graph, ctx, data.take(self.calib_samples), targets)
        else:
            for node in layers:
                visit(node, None)
        stats = {"layers_quantized": len(layers), "activations_quantized": len(acts),
                 "weight_rel_error": float(np.mean(errors))}
        return PassResult(graph, True, stats, notes)

    def _layers(self, graph: gs.Graph) -> tuple[list[gs.Node], list[str]]:
        users, notes = W.distinct_weights(graph, self.handles)
        layers = []
        for pairs in users.values():
            node, s = pairs[0]
            label = f"{node.op} '{G.display_name(node)}'"
            if node.name in self.exclude or any(t.name in self.exclude for t in node.outputs):
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
        return layers, notes

    def _activations(self, graph: gs.Graph, layers: list[gs.Node]) -> dict[str, gs.Tensor]:
        """The tensors to quantize: each layer's input, and its output (after a Relu/Clip it feeds
        alone) unless it reaches a graph output before any other quantized layer: a head's logits
        stay float (8-bit logits over thousands of classes flip argmax decisions)."""
        outputs = {t.name for t in graph.outputs}
        ids = {id(n) for n in layers}

        def head(t: gs.Tensor) -> bool:          # reaches a graph output through unquantized ops only
            stack, seen = [t], {t.name}
            while stack:
                t = stack.pop()
                if t.name in outputs:
                    return True
                nxt = [o for n in t.outputs if id(n) not in ids for o in n.outputs if o.name not in seen]
                seen.update(o.name for o in nxt)
                stack.extend(nxt)
            return False

        acts: dict[str, gs.Tensor] = {}
        for node in layers:
            acts[node.inputs[0].name] = node.inputs[0]
            y = node.outputs[0]
            if len(y.outputs) == 1 and y.outputs[0].op in ABSORBED and y.name not in outputs:
                y = y.outputs[0].outputs[0]
            if not head(y):
                acts[y.name] = y
        return acts

    def _weights(self, graph: gs.Graph, node: gs.Node, x_scale: float, grams: list[np.ndarray] | None) -> float:
        """Quantize one layer's weight (int8, per channel) and bias (int32); the weight's relative
        error on the layer's inputs (or on its values without a Gram)."""
        s = W.layer_weight(node)
        rows = out_rows(node, s.value).astype(np.float64)
        per_channel = self._per_channel(node)
        amax = np.abs(rows).max(1) if per_channel else np.full(rows.shape[0], np.abs(rows).max())
        scale = np.where(amax > 0, amax / 127, 1.0).astype(np.float32).astype(np.float64)
        grid = lambda v, sc: np.clip(np.round(v / sc), -127, 127) * sc
        groups = [] if grams is None else list(zip(group_slices(len(rows), len(grams)), grams))
        if groups and self.rounding == "gptq":
            new = np.concatenate([gptq(rows[part], gram[:-1, :-1], lambda col, j, sc=scale[part]: grid(col, sc))
                                  for part, gram in groups])
        else:
            new = grid(rows, scale[:, None])
        delta = np.zeros(rows.shape[0])
        if groups and self.bias_correction:                 # keep each output channel's mean
            delta = np.concatenate([(rows - new)[part] @ (gram[-1, :-1] / gram[-1, -1]) for part, gram in groups])
        err = _relative_error(rows, new, groups)
        q = np.round(new / scale[:, None]).astype(np.int64)
        axis = out_axis(node) if per_channel else None
        storage = Quantized(from_out_rows(node, q, s.value.shape),
                            from_out_rows(node, np.broadcast_to(scale[:, None], rows.shape), s.value.shape).astype(np.float32),
                            np.zeros(s.value.shape, np.int64), INT8, axis, 0, True, ())
        W.convert(graph, node, W.LAYERS[node.op].weight, s, storage)
        self._bias(graph, node, x_scale * scale, delta, per_channel)
        return err

    def _per_channel(self, node: gs.Node) -> bool:
        """One weight scale per output channel, except for depthwise convs whose channels' ranges are
        alike (max over median of their max |w| at most DEPTHWISE_SPREAD), unless
        `depthwise_per_channel`: onnxruntime's int8 depthwise kernel is slower with per-channel
        scales and 8 bits per tensor keep such a conv's accuracy. PP-OCR cls at batch 1 against fp32
        (fp32 97.7%): every depthwise per channel 1.65x and 95.3%, all per tensor 1.1x and 96.9%,
        this rule (8 of 11 per channel) 1.47x and 96.9%; PP-OCRv4 rec, whose BatchNorm-folded
        depthwise convs need their per-channel scales: 84.4%, 76.6% and 83.6% of lines as fp32."""
        if not self.per_channel:
            return False
        w = W.layer_weight(node).value
        if self.depthwise_per_channel or not (node.op == "Conv" and int(node.attrs.get("group", 1)) > 1 and w.shape[1] == 1):
            return True
        return channel_spread(node, w) > DEPTHWISE_SPREAD

    def _bias(self, graph: gs.Graph, node: gs.Node, scale: np.ndarray, delta: np.ndarray, per_channel: bool) -> None:
        """The bias (plus the correction) as int32 codes at input scale x weight scale."""
        if node.op == "MatMul":
            return
        b = W.layer_bias(node)
        if b is not None and b.value.size != len(scale):
            return                                           # a broadcast Gemm bias: left as is
        value = (np.zeros(len(scale)) if b is None else b.value.astype(np.float64).reshape(-1)) + delta
        sc = scale.astype(np.float32)
        q = np.clip(np.round(value / sc), -2 ** 31, 2 ** 31 - 1).astype(np.int64)
        axis = 0 if per_channel else None                  # one scale per tensor needs no axis (opset < 13)
        storage = Quantized(q, sc, np.zeros(len(sc), np.int64), onnx.TensorProto.INT32, axis, 0, True, ())
        index = W.LAYERS[node.op].bias
        if b is None:
            G.set_constant(graph, node, index, value.astype(W.layer_weight(node).value.dtype), "_bias")
            b = W.layer_bias(node)
        W.convert(graph, node, index, b, storage)


def _integer_layers(graph: gs.Graph) -> int:
    """Layers that already compute with integer weights: QDQ or MatMulNBits weights, or QOperator
    and integer kernels (QLinearConv, ConvInteger, ...)."""
    count = 0
    for node in graph.nodes:
        if node.op in ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulNBits"):
            count += 1
        elif node.op in W.LAYERS and node.op != "Gather":
            s = W.layer_weight(node)
            count += s is not None and s.kind in ("qdq", "nbits")
    return count


def _relative_error(rows: np.ndarray, new: np.ndarray, groups: list[tuple[slice, np.ndarray]]) -> float:
    """||(W - Q) x|| / ||W x|| over the inputs (tr(D H D^T) / tr(W H W^T)), or over the weights."""
    d = rows - new
    if not groups:
        return float(np.sum(d ** 2) / max(np.sum(rows ** 2), 1e-30))
    quad = lambda a: sum(np.einsum("ij,jk,ik->", a[part], h[:-1, :-1], a[part]) for part, h in groups)
    return float(quad(d) / max(quad(rows), 1e-30))


def _insert_qdq(graph: gs.Graph, tensor: gs.Tensor, scale: float, zero_point: int) -> None:
    """tensor -> QuantizeLinear -> DequantizeLinear -> every consumer (a graph output stays float)."""
    base = G.stem(tensor.name)
    sc = constant(graph, base + "_scale", np.array(scale, np.float32))
    zp = constant(graph, base + "_zero_point", np.array(zero_point, np.uint8))
    consumers = list(tensor.outputs)
    q = add_node(graph, "QuantizeLinear", [tensor, sc, zp], {}, base + "_q", np.uint8)
    dq = add_node(graph, "DequantizeLinear", [q, sc, zp], {}, base + "_dq", np.float32)
    for node in consumers:
        node.inputs = [dq if t is tensor else t for t in node.inputs]
