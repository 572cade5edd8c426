"""Model metrics: parameters, size, MACs from inferred shapes, latency, fidelity and accuracy."""
from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .data import Dataset
from .runtime import DEFAULT_PROVIDERS, fixed_batch, make_session

log = logging.getLogger(__name__)

__all__ = [
    "count_params", "size_bytes", "gzip_bytes", "node_macs", "total_macs", "latency_ms",
    "fidelity", "accuracy", "LatencyConfig", "sparsity",
]

# Integer tensors of these types hold shapes and indices, not weights.
_SHAPE_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}


def _weight_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return [t for t in tensors if t.data_type not in _SHAPE_TYPES]


def count_params(model: onnx.ModelProto) -> int:
    """Number of weight elements (initializers and Constant nodes, excluding int32/int64 shape tensors)."""
    return int(sum(int(np.prod(t.dims)) for t in _weight_tensors(model)))


def sparsity(model: onnx.ModelProto) -> float:
    """Fraction of exact zeros among the weight elements."""
    total = zeros = 0
    for t in _weight_tensors(model):
        a = numpy_helper.to_array(t)
        total += a.size
        zeros += int(a.size - np.count_nonzero(a))
    return zeros / total if total else 0.0


def size_bytes(model: onnx.ModelProto) -> int:
    """Size of the serialized model with all weights inline."""
    return model.ByteSize()


def gzip_bytes(model: onnx.ModelProto) -> int:
    """Size after generic compression (zlib level 6): what sparse or clustered weights save in storage."""
    return len(zlib.compress(model.SerializeToString(), 6))


def static_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[int]]:
    """Infer every tensor's shape with the graph inputs pinned (symbolic dims become 1 unless given)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name for i in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        given = (input_shapes or {}).get(inp.name)
        for i, d in enumerate(dims):
            if given is not None and i < len(given):
                d.dim_value = int(given[i])
            elif not d.HasField("dim_value"):
                d.dim_value = 1
    m = onnx.shape_inference.infer_shapes(m)
    shapes: dict[str, list[int]] = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
            shapes[vi.name] = dims
    for t in m.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def _known(shape: Sequence[int] | None) -> bool:
    return shape is not None and all(d >= 0 for d in shape)


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, list[int]]) -> int | None:
    """Multiply-accumulates of one node at batch 1, or None if a needed shape is unknown."""
    ins = [shapes.get(i) for i in node.input]
    out = shapes.get(node.output[0]) if node.output else None
    if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and not (_known(out) and len(ins) > 1 and _known(ins[0]) and _known(ins[1])):
        return None
    if node.op_type == "Conv":
        w = ins[1]  # [M, C/group, k...]
        return int(np.prod(out) * np.prod(w[1:]))
    if node.op_type == "ConvTranspose":
        w = ins[1]  # [C, M/group, k...]: every input element scatters into M/group * k outputs
        return int(np.prod(ins[0]) * np.prod(w[1:]))
    if node.op_type == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        k = ins[0][0] if trans_a else ins[0][1]
        return int(np.prod(out) * k)
    if node.op_type == "MatMul":
        return int(np.prod(out) * ins[0][-1])
    return 0


def node_macs(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[tuple[str, str, int | None]]:
    """(node name, op type, MACs) for every top-level node, at batch 1."""
    shapes = static_shapes(model, input_shapes)
    return [(n.name or n.output[0], n.op_type, _node_macs(n, shapes)) for n in model.graph.node]


def total_macs(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> int:
    return int(sum(m for _, _, m in node_macs(model, input_shapes) if m))


@dataclass(frozen=True)
class LatencyConfig:
    """How latency is measured: median over `runs` after `warmup`, for each batch size."""
    batch_sizes: tuple[int, ...] = (1,)
    runs: int = 30
    warmup: int = 5
    threads: int | None = None
    enabled: bool = True


def _latency_feed(session, data: Dataset | None, batch: int) -> dict[str, np.ndarray]:
    if data is not None:
        idx = np.arange(batch) % len(data)
        return {k: v[idx] for k, v in data.feeds.items()}
    rng = np.random.default_rng(0)
    feed = {}
    for i in session.get_inputs():
        shape = [batch if j == 0 else (d if isinstance(d, int) else 1) for j, d in enumerate(i.shape)]
        dtype = np.float32 if "float" in i.type else np.int64
        feed[i.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def latency_ms(model: onnx.ModelProto, cfg: LatencyConfig = LatencyConfig(), data: Dataset | None = None,
               providers: Sequence[str] = DEFAULT_PROVIDERS) -> dict[int, float]:
    """Median wall time of one `session.run` in milliseconds, per batch size."""
    session = make_session(model, providers, cfg.threads)
    fixed = fixed_batch(session)
    result = {}
    for batch in cfg.batch_sizes:
        if fixed and batch != fixed:
            continue
        feed = _latency_feed(session, data, batch)
        for _ in range(cfg.warmup):
            session.run(None, feed)
        times = []
        for _ in range(cfg.runs):
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t0)
        result[batch] = float(np.median(times) * 1e3)
    return result


def fidelity(reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: cosine similarity, max absolute error, max error relative to the reference's
    largest magnitude, and (for [N, classes] outputs) top-1 agreement in percent."""
    result = {}
    for name, ref in reference.items():
        out = outputs[name]
        a, b = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
        denom = np.linalg.norm(a) * np.linalg.norm(b)
        err = float(np.max(np.abs(a - b))) if a.size else 0.0
        entry = {
            "cosine": float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b)),
            "max_abs": err,
            "max_rel": err / max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-12),
        }
        if ref.ndim == 2 and ref.shape[1] > 1:
            entry["top1_agreement"] = float(np.mean(ref.argmax(1) == out.argmax(1)) * 100)
        result[name] = entry
    return result


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    pred = logits.reshape(len(logits), -1).argmax(1)
    return float(np.mean(pred == labels.reshape(-1)) * 100)
