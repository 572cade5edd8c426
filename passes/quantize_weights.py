"""quantize-weights: weight-only int4 or binary weights; activations stay float.

- `bits=4`: MatMul and Gemm become onnxruntime's `MatMulNBits` (4-bit codes in blocks of
  `block_size` along the input dimension, one scale per block, symmetric or with zero points), which
  its CPU provider runs with a 4-bit kernel. Conv weights become int4 `DequantizeLinear` (opset 21),
  one scale per output channel: onnxruntime has no int4 convolution, so it dequantizes them (the
  saving is the file, not the time).
- `bits=1`: binary weights, each +alpha_c or -alpha_c with one alpha per output channel, stored as
  2-bit `DequantizeLinear` codes (opset 25). The first and last layers stay at int8 (per channel)
  unless `keep_ends` is off.

With calibration data, weights are chosen front to back on the model as quantized so far: GPTQ's
column-by-column rounding (signs, for binary) against the inputs' Gram matrix, then each output
channel's scale (alpha) refit by least squares on the same inputs, and the mean shift left in each
output channel folded into the bias. Without data: nearest rounding and max-abs (mean-abs) scales.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress import graph as G, weights as W
from onnxcompress.layers import from_out_rows, group_slices, out_axis, out_rows
from onnxcompress.pass_api import Context, Pass, PassResult
from onnxcompress.recovery import mean_shift, sequential
from onnxcompress.solvers import gptq
from onnxcompress.storage import NBits, Quantized

__all__ = ["QuantizeWeights"]

T = onnx.TensorProto


@dataclass
class QuantizeWeights(Pass):
    """Weight-only int4 (MatMulNBits, int4 QDQ for Conv) or binary (+-alpha per channel) weights."""

    name = "quantize-weights"
    handles = frozenset({"Conv", "Gemm", "MatMul"})
    bits: Literal[4, 1] = 4
    block_size: int = 32              # int4 MatMul/Gemm: weights per scale along the input dimension
    symmetric: bool = True            # int4: symmetric codes (zero point 8) or per-block zero points
    rounding: Literal["gptq", "nearest"] = "gptq"
    keep_ends: bool = True            # binary: the first and last layers at int8
    calib_samples: int = 512
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16 (MatMulNBits), got {self.block_size}")

    def required_opset(self) -> int:
        return 25 if self.bits == 1 else 21

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        layers, notes = W.quantizable_layers(graph, self.handles, self.exclude)
        if not layers:
            return PassResult(graph, False, {"layers_quantized": 0}, notes)
        ends = {id(layers[0]), id(layers[-1])} if self.bits == 1 and self.keep_ends and len(layers) > 2 else set()
        errors: list[float] = []
        visit = lambda node, grams: errors.append(self._layer(graph, node, grams, 8 if id(node) in ends else self.bits))
        if ctx.calib is not None and self.rounding == "gptq":
            sequential(graph, ctx, ctx.calib.take(self.calib_samples), {id(n): visit for n in layers})
        else:
            for node in layers:
                visit(node, None)
            if self.rounding == "gptq":
                notes.append("no calibration data: weights rounded to nearest, scales not refit")
        if ends:
            notes.append("kept at int8 (keep_ends): " + ", ".join(f"{n.op} '{G.display_name(n)}'" for n in layers if id(n) in ends))
        stats = {"layers_quantized": len(layers), "weight_rel_error": float(np.mean(errors)), "bits": self.bits}
        return PassResult(graph, True, stats, notes)

    def _layer(self, graph: gs.Graph, node: gs.Node, grams: list[np.ndarray] | None, bits: int) -> float:
        s = W.layer_weight(node)
        rows = out_rows(node, s.value).astype(np.float64)
        groups = [] if grams is None else list(zip(group_slices(len(rows), len(grams)), grams))
        nbits = bits == 4 and node.op in ("MatMul", "Gemm")
        block = self.block_size if nbits else rows.shape[1]
        lo, hi, scale, zp = _grid(rows, bits, block, self.symmetric or not nbits)
        cols = np.arange(rows.shape[1]) // block
        grid = lambda c, j, p: _dq(_codes(c, scale[p, cols[j]], zp[p, cols[j]], lo, hi), scale[p, cols[j]], zp[p, cols[j]])
        if groups and self.rounding == "gptq":
            new = np.concatenate([gptq(rows[p], g[:-1, :-1], lambda c, j, p=p: grid(c, j, p)) for p, g in groups])
        else:
            new = rows
        codes = _codes(new, scale[:, cols], zp[:, cols], lo, hi)
        if groups and block == rows.shape[1]:          # one scale per row: refit it on the inputs
            scale = np.concatenate([_refit(rows[p], codes[p] - zp[p][:, cols], g[:-1, :-1], scale[p]) for p, g in groups])
        new = (codes - zp[:, cols]) * scale[:, cols]
        if groups:
            delta = mean_shift(rows, new, groups)
            b = W.layer_bias(node)
            if node.op != "MatMul" and (b is None or b.value.size == len(delta)) and np.any(delta):
                W.write_bias(graph, node, (0 if b is None else b.value.reshape(-1)) + delta.astype(np.float32))
        err = float(np.sum((rows - new) ** 2) / max(np.sum(rows ** 2), 1e-30))
        full = lambda a: from_out_rows(node, a, s.value.shape)
        aligned = lambda t: full(t[:, cols])
        if nbits:
            W.to_matmul_nbits(graph, node, NBits((codes + 8 * self.symmetric).T.astype(np.int64),  # [K, N], unsigned
                                                 scale[:, cols].T.astype(np.float32),
                                                 (zp[:, cols] + 8 * self.symmetric).T.astype(np.int64), 4, self.block_size,
                                                 not self.symmetric))
        else:
            et = {8: T.INT8, 4: T.INT4, 1: T.INT2}[bits]
            W.convert(graph, node, W.LAYERS[node.op].weight, s,
                      Quantized(full(codes).astype(np.int64), aligned(scale).astype(np.float32),
                                np.zeros(s.value.shape, np.int64), et, out_axis(node), 0, False, ()))
        return err


def _grid(rows: np.ndarray, bits: int, block: int, symmetric: bool) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Code range and per (row, block) scale and zero point: max-abs symmetric codes, min/max
    asymmetric ones (unsigned 4-bit), or for 1 bit the codes -1/+1 times the mean |w|."""
    n, k = rows.shape
    blocks = -(-k // block)
    padded = np.pad(rows, ((0, 0), (0, blocks * block - k))).reshape(n, blocks, block)
    if bits == 1:
        return -1, 1, np.maximum(np.abs(rows).mean(1, keepdims=True), 1e-12), np.zeros((n, 1))
    if symmetric:
        top = (1 << (bits - 1)) - 1
        amax = np.abs(padded).max(2)
        return -top, top, np.where(amax > 0, amax / top, 1.0), np.zeros((n, blocks))
    vmin, vmax = np.minimum(padded.min(2), 0), np.maximum(padded.max(2), 0)
    scale = np.where(vmax > vmin, (vmax - vmin) / 15, 1.0)
    return 0, 15, scale, np.clip(np.round(-vmin / scale), 0, 15)


def _dq(codes: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    return (codes - zp) * scale


def _codes(values: np.ndarray, scale: np.ndarray, zp: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The nearest codes (for binary, the sign: zero counts as +)."""
    if lo == -1 and hi == 1:
        return np.where(values < 0, -1.0, 1.0)
    return np.clip(np.round(values / scale) + zp, lo, hi)


def _refit(rows: np.ndarray, codes: np.ndarray, gram: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per row, the scale a minimising ||(w - a q) x||^2 over the inputs: a = w H q / q H q."""
    hq = codes @ gram
    num, den = np.einsum("ij,ij->i", rows, hq), np.einsum("ij,ij->i", codes, hq)
    return np.where(den > 0, num / np.where(den > 0, den, 1), scale[:, 0])[:, None]
