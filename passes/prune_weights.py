"""prune-weights: unstructured magnitude pruning of the weights of every layer in the weight table
(Conv, ConvTranspose, Gemm, MatMul, embeddings, MatMulNBits), whatever their storage.

The zeros make the file compress well (sparse storage), but a dense runtime still multiplies
them: expect no speedup. The report shows both the gzip size and the measured latency.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress import graph as G, weights as W
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
    handles = frozenset(W.LAYERS)
    sparsity: float = 0.5
    scope: Literal["layer", "global"] = "global"
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")

    def weights(self, graph: gs.Graph) -> tuple[dict[tuple, list[tuple[gs.Node, W.Stored]]], list[str]]:
        """The distinct weights of the layers this pass handles, whatever their storage (layers
        sharing one weight are listed together), and notes on the layers it cannot reach."""
        users: dict[tuple, list[tuple[gs.Node, W.Stored]]] = {}
        notes = []
        for node in graph.nodes:
            if node.op not in self.handles or self.exclude and {node.name, G.layer_id(node)} & set(self.exclude):
                continue
            s = W.layer_weight(node)
            if s is None or (node.op == "Gather" and not W.is_layer(node)):
                if node.op != "Gather":
                    src = G.producer(node.inputs[W.LAYERS[node.op].weight]) if len(node.inputs) > 1 else None
                    notes.append(f"{node.op} '{G.display_name(node)}': weight is not a constant"
                                 f"{f' (made by {src.op})' if src else ''}; left as is")
                continue
            users.setdefault(s.sources, []).append((node, s))
        return users, notes

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        users, notes = self.weights(graph)
        if not users:
            return PassResult(graph, False, {"sparsity": 0.0}, notes + ["no prunable weights found"])
        names = list(users)
        values = {n: users[n][0][1].value for n in names}
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
            for node, s in users[name]:   # in the weight's own storage: codes and scales are kept
                s = W.write(graph, node, W.LAYERS[node.op].weight, s, pruned, refit=False, suffix="_pruned",
                            in_place=True)
            total += s.value.size
            zeros += int(s.value.size - np.count_nonzero(s.value))
        stats = {"tensors": len(names), "weights": total, "zeros": zeros, "weight_sparsity": zeros / total}
        return PassResult(graph, True, stats, notes)

