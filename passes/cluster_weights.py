"""cluster-weights: weight sharing, the second stage of Deep Compression (Han et al., 2016).

Each layer's weights become at most k shared values found by 1-D k-means, per tensor or per output
channel, stored with standard ops only: a float codebook initializer and an index tensor (uint8, or
uint4 / uint2 where the opset has them), decoded by Cast + Gather (GatherElements per channel).
Every input of the decode is a constant, so onnxruntime folds it into the dense weight when the
session is created: no runtime cost. Zeros (from pruning) are a centroid of their own and every
zero stays exactly zero.

With calibration data, each weight's centroid is chosen by data (`assign="gptq"`, the default then):
layers front to back on the model as clustered so far, the columns of a layer rounded one at a time
to their nearest centroid, each rounding error compensated on the columns not yet rounded through
the inverse Gram matrix of the layer's inputs (GPTQ's update). `recover=True` (or a `distill` pass
after this one) then refits the centroids with the index held fixed, and the head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress import constraints as C, graph as G, weights as W
from onnxcompress.layers import channel_spread, from_out_rows, group_slices, out_axis, out_rows
from onnxcompress.pass_api import Context, Pass, PassResult
from onnxcompress.recovery import RecoverySettings, recover, sequential
from onnxcompress.solvers import gptq, kmeans_1d, kmeans_rows, nearest

__all__ = ["ClusterWeights", "cluster_values"]

SPREAD = 2.0        # per="auto": per-channel codebooks when max / median channel range exceeds this
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
    per: Literal["tensor", "channel", "auto"] = "auto"   # auto: per channel where channel ranges differ
    init: Literal["linear", "density", "k-means++"] = "linear"
    min_size: int = 1024               # layers with fewer weights stay dense (their index would not pay)
    packed: bool = False               # 4- and 2-bit index types, raising the opset if it must
    exclude: tuple[str, ...] = ()
    assign: Literal["nearest", "gptq"] | None = None   # None: gptq with calibration data, else nearest
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
        data = ctx.require_calib(self.name) if self.recover or self.assign == "gptq" else ctx.calib
        assign = self.assign or ("gptq" if data is not None else "nearest")
        elem = self.index_type(int(graph.opset or 0))
        users, notes = W.distinct_weights(graph, self.handles, self.exclude)
        if assign == "nearest" and self.assign is None:
            notes.append("no calibration data: each weight takes its nearest centroid (assign='gptq' chooses by data)")
        chosen: dict[int, gs.Node] = {}
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
                chosen[id(node)] = node
        per_channel: list[bool] = []
        visit = lambda node, grams: per_channel.append(self._convert(graph, ctx, node, elem, grams if assign == "gptq" else None))
        if assign == "gptq" and chosen:
            sequential(graph, ctx, data, {k: visit for k in chosen})
        else:
            for node in chosen.values():
                visit(node, None)
        weights = sum(W.layer_weight(n).value.size for n in chosen.values())
        stats: dict[str, float] = {"layers_clustered": len(chosen), "per_channel_layers": sum(per_channel),
                                   "weights_clustered": weights, "k": self.clusters, "index_bits": W.INT_RANGES[elem][0]}
        clustered = len(chosen)
        if self.recover and clustered:
            result = recover(graph, ctx, data, RecoverySettings(temperature=ctx.temperature, alpha=ctx.alpha))
            stats.update({k: v for k, v in result.stats.items() if k != "bns_refit"})
            notes += result.notes
        return PassResult(graph, clustered > 0, stats, notes)

    def _per_channel(self, node: gs.Node, value: np.ndarray) -> bool:
        """per="auto": one codebook per output channel when the channels' ranges differ by more than
        SPREAD x (max over median of their max |w|), as in BatchNorm-folded convs: a shared codebook
        would leave the narrow channels one or two values (PP-OCRv4 rec: 0% of lines right per
        tensor at 4 bits, 74% per channel before any refit, 93% after distill)."""
        if self.per != "auto":
            return self.per == "channel"
        return channel_spread(node, value) > SPREAD

    def _convert(self, graph: gs.Graph, ctx: Context, node: gs.Node, elem: int, grams: list[np.ndarray] | None) -> bool:
        """Cluster one layer's weight (centroids by k-means, each weight's centroid by `_round` when
        grams are given) and store it as codebook + index, recording the shared-codebook constraint.
        True when it got one codebook per channel."""
        s = W.layer_weight(node)
        axis = out_axis(node) if self._per_channel(node, s.value) else None
        index, book = self._cluster(s.value, axis)
        if grams is not None:
            index = self._round(node, s.value, index, book, grams)
        storage = W.Codebook(index, book, elem_type=elem, axis=axis)
        W.convert(graph, node, W.LAYERS[node.op].weight, s, storage)
        ctx.state.constraints[G.layer_id(node)] = C.SharedCodebook(
            index=out_rows(node, storage.index), book=storage.codebook.astype(np.float64))
        return axis is not None

    def _round(self, node: gs.Node, value: np.ndarray, index: np.ndarray, book: np.ndarray,
               grams: list[np.ndarray]) -> np.ndarray:
        """Each weight's centroid chosen by GPTQ against the layer's input Gram matrix (per group):
        a zero stays zero, any other weight takes one of its codebook's nonzero centroids."""
        rows = out_rows(node, value).astype(np.float64)
        books = np.asarray(book, np.float64).reshape(-1, book.shape[-1])        # [1 or out, k]
        books = np.broadcast_to(books, (rows.shape[0], books.shape[1])) if books.shape[0] == 1 else books
        zero = rows == 0
        new = []
        for part, gram in zip(group_slices(len(rows), len(grams)), grams):
            bk, z = books[part], zero[part]

            def project(col: np.ndarray, j: int, bk=bk, z=z) -> np.ndarray:
                cost = np.abs(col[:, None] - bk)
                cost[bk == 0] = np.inf                                          # zero is only for zeros
                pick = bk[np.arange(len(col)), cost.argmin(1)]
                return np.where(z[:, j], 0.0, np.where(np.isfinite(cost.min(1)), pick, 0.0))
            new.append(gptq(rows[part], gram, project))
        new = np.concatenate(new)
        step = max(1, 2 ** 22 // (new.shape[1] * books.shape[1]))             # rows at a time: the costs stay small
        picked = np.concatenate([np.abs(new[i:i + step, :, None] - books[i:i + step, None, :]).argmin(2)
                                 for i in range(0, len(new), step)])            # exact: values are centroids
        return from_out_rows(node, picked, value.shape).astype(index.dtype)

    def _cluster(self, value: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(index in the weight's shape, codebook [k] or [C, k]); per-channel books are padded by
        repeating their last centroid so that they stack."""
        if axis is None:
            book, index = cluster_values(value, self.clusters, self.init, self.seed)
            return index.reshape(value.shape), book.astype(value.dtype)
        moved = np.moveaxis(value, axis, 0)
        if self.init != "k-means++":                 # all channels at once
            book, index = kmeans_rows(moved.reshape(moved.shape[0], -1), self.clusters, self.init)
            return np.moveaxis(index.reshape(moved.shape), 0, axis), book.astype(value.dtype)
        parts = [cluster_values(moved[c], self.clusters, self.init, self.seed) for c in range(moved.shape[0])]
        width = max(len(b) for b, _ in parts)
        book = np.stack([np.pad(b, (0, width - len(b)), mode="edge") for b, _ in parts])
        index = np.moveaxis(np.stack([i for _, i in parts]), 0, axis)
        return index, book.astype(value.dtype)
