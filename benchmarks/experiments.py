"""Helpers for recovery experiments (used by the tests and the benchmark suite; not installed)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["add_weight_noise", "ensemble_accuracy", "zero_counts", "digit_strips", "clustered", "int32_bias_scales"]


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
    from onnxcompress.solvers import soft_targets

    return float(np.mean(soft_targets(logits, 1.0).argmax(1) == labels) * 100)


def digit_strips(digits: np.ndarray, shape: tuple[int, int, int], n: int, seed: int = 0) -> np.ndarray:
    """Text-like images [n, C, H, W] made of real handwritten digits: rows of 28x28 digits pasted
    at random heights on a white page, scaled to [-1, 1] as PP-OCR expects. `digits` are
    [N, 28, 28] grey images in [0, 1] (ink = 1)."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    out = np.ones((n, h, w), np.float32)
    for i in range(n):
        for top in range(rng.integers(0, max(1, h - 28 + 1)) % max(1, h - 27), h - 27, 40):
            x = int(rng.integers(0, 12))
            while x + 28 <= w:
                d = digits[rng.integers(len(digits))]
                out[i, top:top + 28, x:x + 28] = np.minimum(out[i, top:top + 28, x:x + 28], 1.0 - d)
                x += 28 + int(rng.integers(0, 6))
    return np.repeat(((out - 0.5) / 0.5)[:, None], c, axis=1)


def zero_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Exact zeros in each Conv/Gemm/MatMul weight initializer, keyed by the consuming node's name."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: int((inits[n.input[1]] == 0).sum()) for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits}


def clustered(model: onnx.ModelProto, k: int = 16) -> onnx.ModelProto:
    """Every Conv/Gemm weight as a per-tensor codebook of k k-means centroids (uint8 index)."""
    from sklearn.cluster import KMeans

    from onnxcompress import graph as G, weights as W

    graph = G.to_graph(model)
    for node in [n for n in graph.nodes if n.op in ("Conv", "Gemm")]:
        s = W.layer_weight(node)
        km = KMeans(k, n_init=1, random_state=0).fit(s.value.reshape(-1, 1))
        W.convert(graph, node, 1, s, W.as_codebook(s.value, km.cluster_centers_.ravel().astype(np.float32)))
    return G.to_model(G.tidy(graph), like=model)


def int32_bias_scales(model: onnx.ModelProto, rtol: float = 1e-6) -> tuple[int, int]:
    """(layers whose int32 bias scale is input scale x weight scale per output channel, layers with
    a 32-bit quantized bias behind a quantized input and weight): what onnxruntime's integer kernels
    assume when they read the bias codes directly."""
    from onnxcompress import graph as G, weights as W
    from onnxcompress.layers import out_rows

    ok = total = 0
    for node in G.iter_nodes(G.to_graph(model)):
        if not W.is_layer(node):
            continue
        w, b, x = W.layer_weight(node), W.layer_bias(node), G.producer(node.inputs[0])
        if (b is None or w is None or x is None or x.op != "DequantizeLinear"
                or not isinstance(b.storage, W.Quantized) or b.storage.bits < 32
                or not isinstance(w.storage, W.Quantized)):
            continue
        sx = W.value_of(x.inputs[1])
        if sx is None or sx.size != 1:
            continue
        total += 1
        want = float(sx.reshape(-1)[0]) * out_rows(node, w.storage.scale.astype(np.float64))[:, 0]
        have = np.broadcast_to(b.storage.scale.astype(np.float64).reshape(-1), want.shape)
        ok += bool(np.allclose(have, want, rtol=rtol, atol=0))
    return ok, total
