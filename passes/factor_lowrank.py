"""factor-lowrank: Conv, Gemm and MatMul layers factored through a lower rank, fit on data.

A Gemm/MatMul [out x fan_in] becomes two of its kind through rank K (K x fan_in, then out x K); a
k x k Conv from I to O channels becomes the same k x k conv (strides, pads, dilations kept) to K
channels followed by a 1x1 conv to O carrying the bias. MACs per output position go from
O x I k^2 to K (I k^2 + O), so a rank at or above O I k^2 / (I k^2 + O) saves nothing: such
layers are left as they are, with a note. The factors minimise the layer's output error on the
calibration data (the SVD of the weights whitened by the inputs' second moments,
`onnxcompress.factor`); recovery then refits each second factor by least squares onto the
original model's output of the layer, and the head on soft targets (the distillation engine).

Rank per layer: `ranks={layer: K}` names it; else `energy=` keeps that share of the whitened
spectrum; else `macs=` (default 0.5) is the model's MACs to reach: each layer is factored alone at
25, 50 and 75% of its MACs taken away and scored against the original, and structured pruning's
greedy allocation (`onnxcompress.sensitivity`, shared) spends the cuts where they cost least
(`allocation="uniform"`: every layer at `macs` of its own MACs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")

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
        return out * fan / (fan + out)

    def _option_size(self, node: gs.Node, gram: np.ndarray | None) -> int | None:
        if self.energy is None:
            return None
        s2 = F.whitened_svd(out_rows(node, W.layer_weight(node).value), gram).s ** 2
        return int(np.searchsorted(np.cumsum(s2) / s2.sum(), self.energy - 1e-12) + 1)

    def _split(self, graph: gs.Graph, ctx: Context, node: gs.Node, gram: np.ndarray | None, rank: int,
               cache: dict) -> str:
        name, lid = G.display_name(node), G.layer_id(node)
        if lid not in cache:
            cache[lid] = F.whitened_svd(out_rows(node, W.layer_weight(node).value), gram)
        a, b, energy = cache[lid].take(rank)
        F.split(graph, ctx, node, *F.lowrank_layout(node, a, b), "_lowrank")
        return f"{name} rank {rank} ({energy:.1%} energy)"
