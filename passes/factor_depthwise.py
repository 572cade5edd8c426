"""factor-depthwise: a standard k x k conv becomes a depthwise k x k conv then a pointwise 1x1 conv.

A conv from I to O channels (group 1, kernel > 1) holds O x I x k^2 weights; with channel
multiplier m (m depthwise filters per input channel, I m channels between the two) the pair holds
I m k^2 + O I m and costs m (k^2 + O) / (O k^2) of the conv's MACs: below break-even only while
m < O k^2 / (k^2 + O). Initial factors per input channel i: the O x k^2 slice of the weights that
reads channel i, whitened by the second moments of channel i's k x k patches (the identity
without data), keeps its m best singular directions: the depthwise filters and their pointwise
mixing (`onnxcompress.factor.whitened_svd`). Strides, pads and dilations go to the depthwise
conv; the pointwise one keeps the bias and the output tensor, and recovery refits it by least
squares from the student's depthwise outputs onto the original conv's outputs.

Multiplier per layer: `multipliers={layer: m}`, else a target allocated by measured sensitivity
(shared with factor-lowrank and structured pruning): `latency=` (default 0.5), the share of the
model's onnxruntime time to reach, each trial timed; or `macs=`, a MAC target. The default is a
latency target because onnxruntime's depthwise kernels are slow per MAC: at half the MACs ResNet
ran 1.44x / 1.65x of fp32's time (batch 1 / 32), at half the latency 0.51x / 0.56x with 0.50x MACs.
`allocation="uniform"` takes each layer to the target's share of its own MACs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress import factor as F, graph as G, weights as W
from onnxcompress.pass_api import Context

__all__ = ["FactorDepthwise"]


@dataclass
class FactorDepthwise(F.Factoring):
    """Replace standard k x k convs by depthwise + pointwise convs fit to their outputs on data."""

    name = "factor-depthwise"
    handles = frozenset({"Conv"})
    size_word = "multiplier"
    default_target = ("latency", 0.5)
    multipliers: dict[str, int] = field(default_factory=dict)   # per layer (node name or output tensor)

    def _allocates(self) -> bool:
        return not self.multipliers and super()._allocates()

    def _eligible(self, node: gs.Node) -> str | None:
        why = F.eligible(node) if node.op == "Conv" else "not a Conv"
        if why is None and F.layer_cost(node)[2] == 1:
            why = "a 1x1 conv (nothing to split)"
        return why

    def _sizes(self) -> dict[str, int]:
        return self.multipliers

    def _breakeven(self, node: gs.Node) -> float:
        out, _, taps = F.layer_cost(node)
        return out * taps / (taps + out)

    def _split(self, graph: gs.Graph, ctx: Context, node: gs.Node, gram: np.ndarray | None, m: int,
               cache: dict) -> str:
        name, lid = G.display_name(node), G.layer_id(node)
        w = W.layer_weight(node).value.astype(np.float64)          # [O, I, kh, kw]
        o, i, taps = w.shape[0], w.shape[1], int(np.prod(w.shape[2:]))
        if lid not in cache:                                        # one whitened SVD per input channel
            cols = [np.r_[c * taps:(c + 1) * taps, i * taps] for c in range(i)]   # its taps, and the sums row
            cache[lid] = [F.whitened_svd(w[:, c].reshape(o, taps), None if gram is None else gram[np.ix_(cols[c], cols[c])])
                          for c in range(i)]
        depth, point, kept = np.zeros((i * m, taps)), np.zeros((o, i * m)), []
        for c in range(i):
            a, b, energy = cache[lid][c].take(m)
            depth[c * m:c * m + b.shape[0]], point[:, c * m:c * m + a.shape[1]] = b, a
            kept.append(energy)
        attrs = {k: v for k, v in node.attrs.items() if k in F.CONV_GEOMETRY}
        F.split(graph, ctx, node, depth.reshape(i * m, 1, *w.shape[2:]), {**attrs, "group": i},
                point.reshape(o, i * m, 1, 1), "_depthwise")
        return f"{name} multiplier {m} ({np.mean(kept):.1%} energy)"
