"""The built-in passes, one module each. `BUILTIN` is the explicit list the default registry uses."""
from __future__ import annotations

from .distill import Distill
from .fold_bn import FoldBatchNorm
from .prune_channels import PruneChannels
from .prune_weights import PruneWeights

BUILTIN = (Distill, FoldBatchNorm, PruneChannels, PruneWeights)

__all__ = ["BUILTIN", "Distill", "FoldBatchNorm", "PruneChannels", "PruneWeights"]
