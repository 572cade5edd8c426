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

    def weights(self, graph: gs.Graph) -> tuple[dict[str, list[gs.Node]], dict[str, np.ndarray], list[str]]:
        """The distinct constant float weights of the ops this pass handles (initializers, Constant
        nodes or folds of them): the nodes using each, their values, and notes on those skipped."""
        users: dict[str, list[gs.Node]] = {}
        values: dict[str, np.ndarray] = {}
        notes = []
        for node in graph.nodes:
            if node.op not in self.handles or node.name in self.exclude or len(node.inputs) < 2:
                continue
            w = node.inputs[1]
            value = G.constant_value(w)
            if value is not None and value.dtype.kind == "f":
                users.setdefault(w.name, []).append(node)
                values[w.name] = value
            else:
                src = G.producer(w)
                notes.append(f"{node.op} '{node.name}': weight is not a float constant"
                             f"{f' (made by {src.op})' if src else ''}; left as is")
        return users, values, notes

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        users, values, notes = self.weights(graph)
        if not values:
            return PassResult(graph, False, {"sparsity": 0.0}, notes + ["no prunable weights found"])
        names = list(values)
        if self.scope == "global":
            mags = np.concatenate([np.abs(values[n]).ravel() for n in names])
            keep = magnitude_mask(mags, self.sparsity)
            offsets = np.cumsum([0] + [values[n].size for n in names])
            masks = [keep[a:b].reshape(values[n].shape) for n, a, b in zip(names, offsets, offsets[1:])]
        else:
            masks = [magnitude_mask(np.abs(values[n]), self.sparsity) for n in names]
        total = zeros = 0
        for name, mask in zip(names, masks):
            pruned = np.where(mask, values[name], 0).astype(values[name].dtype)
            _store(graph, users[name], name, pruned)
            total += pruned.size
            zeros += int(pruned.size - np.count_nonzero(pruned))
        stats = {"tensors": len(names), "weights": total, "zeros": zeros, "weight_sparsity": zeros / total}
        return PassResult(graph, True, stats, notes)


def _store(graph: gs.Graph, nodes: list[gs.Node], name: str, value: np.ndarray) -> None:
    """Give every node that reads weight `name` the pruned value (one shared initializer)."""
    tensor = nodes[0].inputs[1]
    if isinstance(tensor, gs.Constant):
        tensor.values = value
        return
    const = gs.Constant(G.unique_name(graph, f"{name}_pruned"), value)  # it was a Constant node or a fold
    for node in nodes:
        node.inputs[1] = const
