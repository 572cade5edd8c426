"""fold-bn: fold inference-mode BatchNormalization into the Conv/ConvTranspose/Gemm before it."""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxcompress.fold import fold_batchnorms
from onnxcompress.pass_api import Context, Pass, PassResult


@dataclass
class FoldBatchNorm(Pass):
    """Fold BatchNormalization into the preceding Conv, ConvTranspose or Gemm (exact up to rounding)."""

    name = "fold-bn"
    handles = frozenset({"BatchNormalization"})

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        folded, notes = fold_batchnorms(graph)
        return PassResult(graph, folded > 0, {"bn_folded": folded, "bn_left": len(notes)}, notes)
