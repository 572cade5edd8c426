"""Helpers for recovery experiments (used by the tests and the benchmark suite)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["add_weight_noise", "ensemble_accuracy"]


def add_weight_noise(model: onnx.ModelProto, scale: float, seed: int = 0) -> onnx.ModelProto:
    """A copy with Gaussian noise (scale x each tensor's std) added to every float weight of rank >= 2."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.ndim >= 2:
            noise = scale * a.std() * rng.standard_normal(a.shape)
            t.CopyFrom(numpy_helper.from_array((a + noise).astype(np.float32), t.name))
    return out


def ensemble_accuracy(logits: list[np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy (percent) of the average of the members' softmax probabilities."""
    from .solvers import soft_targets

    return float(np.mean(soft_targets(logits, 1.0).argmax(1) == labels) * 100)
