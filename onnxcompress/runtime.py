"""onnxruntime sessions: execution providers, batched runs, activation capture and teacher caches."""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from . import io
from .data import Dataset
from .errors import InputError
from .progress import progress

log = logging.getLogger(__name__)

__all__ = ["check_providers", "make_session", "run_model", "fixed_batch", "capture"]

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider"}


def check_providers(providers: Sequence[str] | None) -> tuple[str, ...]:
    """Expand aliases (cpu, cuda) and reject providers this onnxruntime build does not have."""
    if not providers:
        return DEFAULT_PROVIDERS
    available = ort.get_available_providers()
    out = []
    for p in providers:
        full = PROVIDER_ALIASES.get(p.lower(), p)
        if full not in available:
            raise InputError(f"execution provider '{p}' is not available here (available: {', '.join(available)})")
        out.append(full)
    return tuple(out)


def make_session(model: onnx.ModelProto, providers: Sequence[str] = DEFAULT_PROVIDERS,
                 threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if model.ByteSize() <= io.EXTERNAL_DATA_THRESHOLD:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=list(providers))
    with io.scratch_dir() as d:  # too large for one protobuf: go through a file with external data
        path = io.save_model(model, d / "model.onnx", external_data=True)
        return ort.InferenceSession(str(path), opts, providers=list(providers))


def fixed_batch(session: ort.InferenceSession) -> int | None:
    """The batch size a model insists on (a fixed first dimension), or None if the batch is dynamic."""
    dims = [i.shape[0] for i in session.get_inputs() if i.shape]
    fixed = [d for d in dims if isinstance(d, int)]
    return fixed[0] if fixed else None


def run_model(session: ort.InferenceSession, data: Dataset, batch_size: int = 64,
              outputs: Sequence[str] | None = None, desc: str = "") -> dict[str, np.ndarray]:
    """Run the whole dataset through a session in batches; outputs are concatenated along axis 0."""
    names = list(outputs) if outputs else [o.name for o in session.get_outputs()]
    batch_size = fixed_batch(session) or batch_size
    n_batches = -(-len(data) // batch_size)
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in progress(data.batches(batch_size), total=n_batches, desc=desc):
        for name, value in zip(names, session.run(names, feed)):
            chunks[name].append(value)
    return {n: np.concatenate(v) if v and v[0].ndim else np.asarray(v) for n, v in chunks.items()}


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of the model that also returns the intermediate tensors `names`."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    for name in names:
        if name in existing:
            continue
        vi = onnx.ValueInfoProto(name=name)
        if name in types:
            vi.type.CopyFrom(types[name])
        else:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        m.graph.output.append(vi)
    return m


def capture(model: onnx.ModelProto, data: Dataset, names: Sequence[str],
            providers: Sequence[str] = DEFAULT_PROVIDERS, batch_size: int = 64,
            max_samples: int | None = None) -> dict[str, np.ndarray]:
    """Intermediate activations `names` for (up to `max_samples` of) the dataset, via extra graph outputs."""
    if max_samples is not None:
        data = data.take(max_samples)
    session = make_session(_with_outputs(model, names), providers)
    return run_model(session, data, batch_size, outputs=names, desc="capture")
