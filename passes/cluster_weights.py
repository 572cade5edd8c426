"""cluster-weights: weight sharing, the second stage of Deep Compression (Han et al., 2016).

Each layer's weights become at most k shared values found by 1-D k-means, per tensor or per output
channel, stored with standard ops only: a float codebook initializer and an index tensor (uint8, or
uint4 / uint2 where the opset has them), decoded by Cast + Gather (GatherElements per channel).
Every input of the decode is a constant, so onnxruntime folds it into the dense weight when the
session is created: no runtime cost. Zeros (from pruning) are a centroid of their own and every
zero stays exactly zero. `recover=True` (or a `distill` pass after this one) refits the centroids on
calibration data with the index held fixed, then the head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress import constraints as C, graph as G, weights as W
from onnxcompress.layers import out_axis, out_rows
from onnxcompress.pass_api import Context, Pass, PassResult
from onnxcompress.recovery import RecoverySettings, recover
from onnxcompress.solvers import kmeans_1d, nearest

__all__ = ["ClusterWeights", "cluster_values"]

PACKED_OPSET = 21   # the first opset with 4-bit integer tensors (Cast from uint4 included)
TWO_BIT_OPSET = 25


def cluster_values(v: np.ndarray, k: int, init: str = "linear", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(sorted codebook of at most k values, index per value). Exact zeros get a centroid of their
    own (0.0) that no other value is assigned to, so a pruned tensor keeps its zeros exactly."""
    zero = v == 0
    if not zero.any() or zero.all():
        book = kmeans_1d(v, k, init, seed)
        return book, nearest(v, book)
    nonzero_book = kmeans_1d(v[~zero], k - 1, init, seed)
    book = np.unique(np.append(nonzero_book, 0.0))
    where = np.searchsorted(book, nonzero_book)        # nonzero centroid i -> its slot in `book`
    return book, np.where(zero, np.searchsorted(book, 0.0), where[nearest(v, nonzero_book)])


@dataclass
class ClusterWeights(Pass):
    """Share weights: k-means codebook + index per layer (or per output channel), decoded by Gather."""

    name = "cluster-weights"
    handles = frozenset(W.LAYERS) - {"MatMulNBits"}
    bits: int = 4                      # k = 2 ** bits shared values (zero counts as one when present)
    k: int | None = None               # overrides `bits`
    per: Literal["tensor", "channel"] = "tensor"
    init: Literal["linear", "density", "k-means++"] = "linear"
    min_size: int = 1024               # layers with fewer weights stay dense (their index would not pay)
    packed: bool = False               # 4- and 2-bit index types, raising the opset if it must
    exclude: tuple[str, ...] = ()
    recover: bool = False              # refit the centroids (index fixed) and the head on calibration data
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")
        if self.k is not None and not 2 <= self.k <= 256:
            raise ValueError(f"k must be in 2..256, got {self.k}")
        if self.min_size < 0:
            raise ValueError("min_size must be >= 0")

    @property
    def clusters(self) -> int:
        return self.k or 2 ** self.bits

    def required_opset(self) -> int:
        if not self.packed or self.clusters > 16:
            return 0
        return TWO_BIT_OPSET if self.clusters <= 4 and hasattr(onnx.TensorProto, "UINT2") else PACKED_OPSET

    def index_type(self, opset: int) -> int:
        """The smallest unsigned index type the opset allows for k codes."""
        if self.clusters <= 4 and opset >= TWO_BIT_OPSET and hasattr(onnx.TensorProto, "UINT2"):
            return onnx.TensorProto.UINT2
        if self.clusters <= 16 and opset >= PACKED_OPSET:
            return onnx.TensorProto.UINT4
        return onnx.TensorProto.UINT8

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        data = ctx.require_calib(self.name) if self.recover else None
        elem = self.index_type(int(graph.opset or 0))
        users, notes = W.distinct_weights(graph, self.handles, self.exclude)
        clustered, weights = 0, 0
        for pairs in users.values():
            node, s = pairs[0]
            label = f"{node.op} '{G.display_name(node)}'"
            if len(pairs) > 1:
                notes.append(f"{label}: weight shared by {len(pairs)} layers; left as is")
            elif s.value.size < self.min_size:
                notes.append(f"{label}: {s.value.size} weights (< min_size {self.min_size}); left dense")
            elif s.kind != "dense" or not np.issubdtype(s.value.dtype, np.floating):
                notes.append(f"{label}: weight stored as {s.kind}; left as is")
            else:
                axis = out_axis(node) if self.per == "channel" else None
                storage = W.Codebook(*self._cluster(s.value, axis), elem_type=elem, axis=axis)
                W.convert(graph, node, W.LAYERS[node.op].weight, s, storage)
                ctx.state.constraints[G.layer_id(node)] = C.SharedCodebook(
                    index=out_rows(node, storage.index), book=storage.codebook.astype(np.float64))
                clustered += 1
                weights += s.value.size
        stats: dict[str, float] = {"layers_clustered": clustered, "weights_clustered": weights, "k": self.clusters,
                                   "index_bits": W.INT_RANGES[elem][0]}
        if self.recover and clustered:
            result = recover(graph, ctx, data, RecoverySettings(temperature=ctx.temperature, alpha=ctx.alpha))
            stats.update({k: v for k, v in result.stats.items() if k != "bns_refit"})
            notes += result.notes
        return PassResult(graph, clustered > 0, stats, notes)

    def _cluster(self, value: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(index in the weight's shape, codebook [k] or [C, k]); per-channel books are padded by
        repeating their last centroid so that they stack."""
        if axis is None:
            book, index = cluster_values(value, self.clusters, self.init, self.seed)
            return index.reshape(value.shape), book.astype(value.dtype)
        moved = np.moveaxis(value, axis, 0)
        parts = [cluster_values(moved[c], self.clusters, self.init, self.seed) for c in range(moved.shape[0])]
        width = max(len(b) for b, _ in parts)
        book = np.stack([np.pad(b, (0, width - len(b)), mode="edge") for b, _ in parts])
        index = np.moveaxis(np.stack([i for _, i in parts]), 0, axis)
        return index, book.astype(value.dtype)
