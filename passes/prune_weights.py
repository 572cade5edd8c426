"""prune-weights: unstructured magnitude pruning of Conv/ConvTranspose/Gemm/MatMul weights.

The zeros make the file compress well (sparse storage), but a dense runtime still multiplies
them: expect no speedup. The report shows both the gzip size and the measured latency.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress import graph as G
from onnxcompress.layers import WEIGHTED_OPS
from onnxcompress.pass_api import Context, Pass, PassResult

__all__ = ["PruneWeights", "magnitude_mask"]


def magnitude_mask(magnitudes: np.ndarray, sparsity: float) -> np.ndarray:
    """Boolean keep-mask zeroing exactly round(sparsity * size) of the smallest magnitudes."""
    flat = magnitudes.ravel()
    k = int(round(sparsity * flat.size))
    keep = np.ones(flat.size, dtype=bool)
    if k > 0:
        keep[np.argpartition(flat, k - 1)[:k]] = False
    return keep.reshape(magnitudes.shape)


@dataclass
class PruneWeights(Pass):
    """Zero the smallest-magnitude weights (per layer or globally); smaller when compressed, not faster."""

    name = "prune-weights"
    handles = WEIGHTED_OPS
    sparsity: float = 0.5
    scope: Literal["layer", "global"] = "global"
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")

    def weights(self, graph: gs.Graph) -> tuple[list[gs.Constant], list[str]]:
        """The distinct constant weights of the ops this pass handles, and notes on those skipped."""
        found: dict[str, gs.Constant] = {}
        notes = []
        for node in graph.nodes:
            if node.op not in self.handles or node.name in self.exclude or len(node.inputs) < 2:
                continue
            w = node.inputs[1]
            if isinstance(w, gs.Constant) and w.values.dtype.kind == "f":
                found.setdefault(w.name, w)
            else:
                src = G.producer(w)
                notes.append(f"{node.op} '{node.name}': weight is not a float initializer"
                             f"{f' (made by {src.op})' if src else ''}; left as is")
        return list(found.values()), notes

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        weights, notes = self.weights(graph)
        if not weights:
            return PassResult(graph, False, {"sparsity": 0.0}, notes + ["no prunable weights found"])
        if self.scope == "global":
            mags = np.concatenate([np.abs(w.values).ravel() for w in weights])
            keep = magnitude_mask(mags, self.sparsity)
            offsets = np.cumsum([0] + [w.values.size for w in weights])
            masks = [keep[a:b].reshape(w.values.shape) for w, a, b in zip(weights, offsets, offsets[1:])]
        else:
            masks = [magnitude_mask(np.abs(w.values), self.sparsity) for w in weights]
        total = zeros = 0
        for w, mask in zip(weights, masks):
            w.values = np.where(mask, w.values, 0).astype(w.values.dtype)
            total += w.values.size
            zeros += int(w.values.size - np.count_nonzero(w.values))
        stats = {"tensors": len(weights), "weights": total, "zeros": zeros, "weight_sparsity": zeros / total}
        return PassResult(graph, True, stats, notes)
