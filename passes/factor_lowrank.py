"""factor-lowrank: Conv, Gemm and MatMul layers factored through a lower rank, fit on data.

A Gemm/MatMul [out x fan_in] becomes two of its kind through rank K (K x fan_in, then out x K). A
k x k Conv from I to O channels becomes, by default (`conv_split="kx1-1xk"`), a k x 1 conv to K
channels then a 1 x k conv to O carrying the bias (Jaderberg et al. 2014's vertical/horizontal
scheme; break-even O I kh kw / (I kh sw + O kw)); with `conv_split="kxk-1x1"`, the same k x k conv
(strides, pads, dilations kept) to K channels followed by a 1x1 conv (MACs per output position
from O x I k^2 to K (I k^2 + O)). A rank at or above break-even saves nothing: such layers are
left as they are, with a note. The factors minimise the layer's output error on the
calibration data (the SVD of the weights whitened by the inputs' second moments,
`onnxcompress.factor`); recovery then refits each pair onto the original model's output of the
layer (both factors at once where the pair is a plain product, `recovery.refit_pair`), and the
head on soft targets (the distillation engine).

The k x 1 / 1 x k factors are the truncated SVD of the weights laid out as [(column, out), (in,
row)], whitened by the second moments of the input's k x 1 columns; recovery refits the 1 x k conv
on data (the pair's intermediate mixes columns: no closed-form joint fit). Convs with a side of 1
(and auto_pad ones) are split k x k + 1 x 1.

Rank per layer: `ranks={layer: K}` names it; else `energy=` keeps that share of the whitened
spectrum; else `macs=` (default 0.5) is the model's MACs to reach: each layer is factored alone at
each distinct rank that 25 to 87.5% of its MACs taken away give, scored by the KL divergence of
the outputs from the original's, and structured pruning's allocation (`onnxcompress.sensitivity`,
shared; its exact search) spends the cuts where their summed cost is least
(`allocation="uniform"`: every layer at `macs` of its own MACs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress import factor as F, graph as G, weights as W
from onnxcompress.layers import out_rows
from onnxcompress.pass_api import Context

__all__ = ["FactorLowRank"]


@dataclass
class FactorLowRank(F.Factoring):
    """Factor Conv, Gemm and MatMul layers through a lower rank, fit to their outputs on data."""

    name = "factor-lowrank"
    handles = frozenset({"Conv", "Gemm", "MatMul"})
    size_word = "rank"
    energy: float | None = None       # or: the smallest rank keeping this share of the whitened energy
    ranks: dict[str, int] = field(default_factory=dict)   # or per layer (node name or output tensor)
    conv_split: Literal["kx1-1xk", "kxk-1x1"] = "kx1-1xk"  # how a k x k conv is split (the first: faster
                                      # at the same MACs in onnxruntime: ResNet 0.64x vs 0.80x at half the MACs)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.conv_split not in ("kxk-1x1", "kx1-1xk"):
            raise ValueError(f"conv_split must be 'kxk-1x1' or 'kx1-1xk', got {self.conv_split!r}")

    def _spatial(self, node: gs.Node) -> bool:
        """Whether the layer is split k x 1 then 1 x k."""
        if self.conv_split != "kx1-1xk" or node.op != "Conv" or node.attrs.get("auto_pad", "NOTSET") != "NOTSET":
            return False
        shape = W.layer_weight(node).value.shape
        return len(shape) == 4 and shape[2] > 1 and shape[3] > 1

    def _allocates(self) -> bool:
        return not self.ranks and self.energy is None and super()._allocates()

    def _eligible(self, node: gs.Node) -> str | None:
        why = F.eligible(node)
        if why is None and F.layer_cost(node)[0] < 2:
            why = "a single output"
        return why

    def _sizes(self) -> dict[str, int]:
        return self.ranks

    def _breakeven(self, node: gs.Node) -> float:
        out, fan, _ = F.layer_cost(node)
        if self._spatial(node):
            _, i, kh, kw = W.layer_weight(node).value.shape
            stride_w = list(node.attrs.get("strides", [1, 1]))[1]   # the k x 1 conv runs at every column
            return out * fan / (i * kh * stride_w + out * kw)
        return out * fan / (fan + out)

    def _option_size(self, node: gs.Node, gram: np.ndarray | None) -> int | None:
        if self.energy is None:
            return None
        s2 = self._decomposition(node, gram, {}).s ** 2
        return int(np.searchsorted(np.cumsum(s2) / s2.sum(), self.energy - 1e-12) + 1)

    def _decomposition(self, node: gs.Node, gram: np.ndarray | None, cache: dict) -> F.WhitenedSVD:
        """The layer's whitened SVD, as its split lays the weights out (cached by layer id)."""
        lid = G.layer_id(node)
        if lid not in cache:
            w = W.layer_weight(node).value
            if self._spatial(node):           # [(column, out), (in, row)], whitened by the k x 1 columns
                o, i, kh, kw = w.shape
                columns = None if gram is None else _column_moments(gram, i, kh, kw)
                cache[lid] = F.whitened_svd(w.astype(np.float64).transpose(3, 0, 1, 2).reshape(kw * o, i * kh), columns)
            else:
                cache[lid] = F.whitened_svd(out_rows(node, w), gram)
        return cache[lid]

    def _split(self, graph: gs.Graph, ctx: Context, node: gs.Node, gram: np.ndarray | None, rank: int,
               cache: dict) -> str:
        if self._spatial(node):
            return self._split_spatial(graph, ctx, node, gram, rank, cache)
        a, b, energy = self._decomposition(node, gram, cache).take(rank)
        F.split(graph, ctx, node, *F.lowrank_layout(node, a, b), "_lowrank")
        return f"{G.display_name(node)} rank {rank} ({energy:.1%} energy)"

    def _split_spatial(self, graph: gs.Graph, ctx: Context, node: gs.Node, gram: np.ndarray | None, rank: int,
                       cache: dict) -> str:
        """k x 1 to `rank` channels, then 1 x k: the SVD of the weights as [(column, out), (in, row)],
        whitened on the (in, row) side by the second moments of the input's k x 1 columns (the
        patches' moments averaged over the kernel's columns; cross-column terms are left out)."""
        o, i, kh, kw = W.layer_weight(node).value.shape
        horizontal, vertical, energy = self._decomposition(node, gram, cache).take(rank)   # [(column, out), K], [K, (in, row)]
        (sh, sw), (dh, dw) = node.attrs.get("strides", [1, 1]), node.attrs.get("dilations", [1, 1])
        top, left, bottom, right = node.attrs.get("pads", [0, 0, 0, 0])
        F.split(graph, ctx, node, vertical.reshape(-1, i, kh, 1),
                {"kernel_shape": [kh, 1], "strides": [sh, 1], "pads": [top, 0, bottom, 0], "dilations": [dh, 1]},
                horizontal.reshape(kw, o, -1).transpose(1, 2, 0)[:, :, None, :], "_lowrank")
        node.attrs.update(kernel_shape=[1, kw], strides=[1, sw], pads=[0, left, 0, right], dilations=[1, dw])
        return f"{G.display_name(node)} rank {rank} as {kh}x1 + 1x{kw} ({energy:.1%} energy)"


def _column_moments(gram: np.ndarray, i: int, kh: int, kw: int) -> np.ndarray:
    """[x, 1]^T [x, 1] of a conv's k x 1 input columns (in, row), from its k x k patches' (in, row,
    column; channel-major as im2col lays them out): the diagonal blocks averaged over the columns."""
    rows = (np.arange(i)[:, None] * kh * kw + np.arange(kh)[None, :] * kw).reshape(-1)
    out = np.zeros((i * kh + 1, i * kh + 1))
    for x in range(kw):
        idx = np.r_[rows + x, len(gram) - 1]
        out += gram[np.ix_(idx, idx)]
    out /= kw
    return out
