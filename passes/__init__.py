"""The built-in passes, one module each. `BUILTIN` is the explicit list the default registry uses."""
from __future__ import annotations

from .distill import Distill
from .fold_bn import FoldBatchNorm
from .prune_weights import PruneWeights

BUILTIN = (Distill, FoldBatchNorm, PruneWeights)

__all__ = ["BUILTIN", "Distill", "FoldBatchNorm", "PruneWeights"]
