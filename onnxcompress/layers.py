"""Weighted layers seen as linear maps: one row of weights per output channel.

Conv, ConvTranspose, Gemm and MatMul store their weights in different layouts; passes that scale,
prune or refit output channels work on a `[out_channels, fan_in]` matrix instead and convert back.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

__all__ = ["out_rows", "out_axis", "from_out_rows", "gemm_rows", "conv_geometry", "tiling_geometry", "conv_output_hw",
           "group_slices", "channel_spread"]

# Layouts whose rows are the transpose of the weight: [fan_in, out] (MatMul, MatMulNBits's logical
# weight, an embedding table [vocab, dim] whose "outputs" are its dim columns).
_TRANSPOSED = frozenset({"MatMul", "MatMulNBits", "Gather"})


def group_slices(n_rows: int, groups: int) -> list[slice]:
    """The rows [out, fan_in] of each group of a grouped conv (one slice for any other layer)."""
    size = n_rows // groups
    return [slice(g * size, (g + 1) * size) for g in range(groups)]


def channel_spread(node: gs.Node, w: np.ndarray) -> float:
    """How much a layer's output channels differ in range: max over median of the channels' max
    |w|, channels pruned away entirely not counted (1.0 for fewer than two channels)."""
    amax = np.abs(out_rows(node, w)).max(1)
    amax = amax[amax > 0]
    return float(amax.max() / np.median(amax)) if amax.size > 1 else 1.0


def out_rows(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """The weight as a [out_channels, fan_in] matrix (a copy for ConvTranspose, Gemm and MatMul)."""
    if node.op == "Conv":
        return w.reshape(w.shape[0], -1)
    if node.op == "ConvTranspose":  # [C_in, C_out/g, k...] -> [C_out, C_in/g * k]
        g = int(node.attrs.get("group", 1))
        cin, cout_g = w.shape[0], w.shape[1]
        k = int(np.prod(w.shape[2:], dtype=np.int64))
        return w.reshape(g, cin // g, cout_g, k).transpose(0, 2, 1, 3).reshape(g * cout_g, (cin // g) * k)
    if node.op == "Gemm":
        return w if node.attrs.get("transB", 0) else w.T
    if node.op in _TRANSPOSED:
        return w.T
    raise ValueError(f"no weight layout known for {node.op}")


def out_axis(node: gs.Node) -> int:
    """The axis of a layer's weight that holds its output channels."""
    if node.op in ("Conv",) or (node.op == "Gemm" and node.attrs.get("transB", 0)):
        return 0
    return 1


def from_out_rows(node: gs.Node, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `out_rows`, back to the layout of the node's weight input (of shape `shape`)."""
    if node.op == "Conv":
        return rows.reshape(shape)
    if node.op == "ConvTranspose":
        g = int(node.attrs.get("group", 1))
        cin, cout_g = shape[0], shape[1]
        k = int(np.prod(shape[2:], dtype=np.int64))
        return rows.reshape(g, cout_g, cin // g, k).transpose(0, 2, 1, 3).reshape(shape)
    if node.op == "Gemm":
        return rows if node.attrs.get("transB", 0) else rows.T
    if node.op in _TRANSPOSED:
        return rows.T
    raise ValueError(f"no weight layout known for {node.op}")


def gemm_rows(node: gs.Node, w: np.ndarray, bias: np.ndarray | None, n_out: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A Gemm's effective (alpha * B as rows, beta * C as a length-N vector), or None if C varies per row."""
    alpha = float(node.attrs.get("alpha", 1.0))
    beta = float(node.attrs.get("beta", 1.0))
    rows = alpha * out_rows(node, w).astype(np.float64)
    if bias is None:
        return rows, np.zeros(n_out)
    c = np.asarray(bias, dtype=np.float64)
    if c.ndim == 2 and c.shape[0] != 1:
        return None
    return rows, beta * np.broadcast_to(c.reshape(-1), (n_out,)).copy()


def conv_geometry(node: gs.Node, w: np.ndarray) -> dict | None:
    """Kernel, strides, pads, dilations and group of a 2-D Conv with explicit padding, else None."""
    if w.ndim != 4 or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    return dict(kernel=tuple(w.shape[2:]), strides=tuple(node.attrs.get("strides", [1, 1])),
                pads=tuple(node.attrs.get("pads", [0, 0, 0, 0])), dilations=tuple(node.attrs.get("dilations", [1, 1])),
                group=int(node.attrs.get("group", 1)))


def tiling_geometry(node: gs.Node, w: np.ndarray) -> dict | None:
    """A 2-D ConvTranspose whose stride equals its kernel, without padding or dilation (the
    upsampling heads of detectors): each input pixel paints its own kernel-sized output tile.
    Its kernel, strides and group, else None."""
    a = node.attrs
    kernel = tuple(w.shape[2:])
    if node.op != "ConvTranspose" or w.ndim != 4 or tuple(a.get("strides", [1, 1])) != kernel or \
            any(a.get("pads", [0] * 4)) or any(d != 1 for d in a.get("dilations", [1, 1])) or \
            any(a.get("output_padding", [0, 0])) or "output_shape" in a or a.get("auto_pad", "NOTSET") != "NOTSET":
        return None
    return dict(kernel=kernel, strides=kernel, group=int(a.get("group", 1)))


def conv_output_hw(h: int, w: int, geo: dict) -> tuple[int, int]:
    """Output height and width of a 2-D conv with geometry `geo` on an h x w input."""
    (kh, kw), (sh, sw), (dh, dw), p = geo["kernel"], geo["strides"], geo["dilations"], geo["pads"]
    return (h + p[0] + p[2] - dh * (kh - 1) - 1) // sh + 1, (w + p[1] + p[3] - dw * (kw - 1) - 1) // sw + 1
