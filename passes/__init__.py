"""The built-in passes, one module each. `BUILTIN` is the explicit list the default registry uses."""
from __future__ import annotations

from .cluster_weights import ClusterWeights
from .distill import Distill
from .early_exit import EarlyExit
from .factor_depthwise import FactorDepthwise
from .factor_lowrank import FactorLowRank
from .fold_bn import FoldBatchNorm
from .prune_channels import PruneChannels
from .prune_weights import PruneWeights
from .quantize import Quantize
from .quantize_weights import QuantizeWeights
from .width_knob import WidthKnob

BUILTIN = (ClusterWeights, Distill, EarlyExit, FactorDepthwise, FactorLowRank, FoldBatchNorm, PruneChannels, PruneWeights, Quantize, QuantizeWeights, WidthKnob)

__all__ = ["BUILTIN", "ClusterWeights", "Distill", "EarlyExit", "FactorDepthwise", "FactorLowRank", "FoldBatchNorm", "PruneChannels", "PruneWeights", "Quantize", "QuantizeWeights", "WidthKnob"]
