"""onnxruntime sessions: execution providers, batched runs, activation capture and teacher caches."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from . import graph as G, io, resources
from .data import Dataset
from .errors import InputError
from .progress import progress

log = logging.getLogger(__name__)

__all__ = ["check_providers", "make_session", "session_from_file", "channel_multiple", "worker_threads", "run_model", "iter_outputs", "fixed_batch",
           "graph_fixed_batch", "capture",
           "capture_session", "Stepper", "StepError"]

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


# Channel multiples the kernels want: onnxruntime's CPU kernels (MLAS) pick their code by the CPU's
# instruction set, and its blocked convolutions work on as many float32 channels as one vector holds
# (16 for AVX-512, 8 for AVX/AVX2, 4 for SSE and ARM NEON); cuDNN's tensor-core kernels want
# multiples of 8. numpy reads the same CPUID bits (and whether the OS enables them) at import.
CPU_MULTIPLES = (("AVX512F", 16, "AVX-512"), ("AVX2", 8, "AVX2"), ("AVX", 8, "AVX"), ("ASIMD", 4, "NEON"),
                 ("NEON", 4, "NEON"), ("SSE2", 4, "SSE"))
CUDA_MULTIPLE = 8
_WORKER_THREADS: int | None = None     # set in parallel workers: their share of the cores


def channel_multiple(providers: Sequence[str] = DEFAULT_PROVIDERS) -> tuple[int, str]:
    """The channel multiple the first execution provider's kernels prefer, and why (for reports)."""
    if providers and providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return CUDA_MULTIPLE, "CUDA tensor-core kernels"
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    for flag, multiple, isa in CPU_MULTIPLES:
        if features.get(flag):
            return multiple, f"{isa} CPU kernels"
    return 1, "no vector instruction set detected"


def worker_threads(n: int) -> None:
    """In a worker process of a parallel sweep: every session and numpy's BLAS use `n` threads."""
    global _WORKER_THREADS
    _WORKER_THREADS = n
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency
    threadpool_limits(n)


SERIALIZED_LIMIT = 32 << 20   # bytes of weights below which a session is built from the serialized model


def make_session(model: onnx.ModelProto, providers: Sequence[str] = DEFAULT_PROVIDERS,
                 threads: int | None = None) -> ort.InferenceSession:
    """A session of the model. A large one is loaded from a scratch file with external data: from
    bytes, onnxruntime's Python session would keep the serialized model (a copy of every weight) as
    long as it lives, and serializing it whole is another; written tensor by tensor, neither
    exists. A small one (under SERIALIZED_LIMIT) is handed over serialized: its copy is small, and
    the file costs 4x the time (17 ms against 4 for the MNIST ResNet; the tests build thousands)."""
    if io.serializable_below(model, SERIALIZED_LIMIT):
        return ort.InferenceSession(model.SerializeToString(), _options(threads), providers=list(providers))
    with io.scratch_dir() as d:
        return session_from_file(io.save_model(model, d / "model.onnx", external_data=True), providers, threads)


def session_from_file(path: Path, providers: Sequence[str] = DEFAULT_PROVIDERS,
                      threads: int | None = None) -> ort.InferenceSession:
    """A session of the model file `path` (its weights are read at once: the file may go after).
    The heap's free pages go back to the OS first: building a session takes about twice its
    weights for a moment, on top of whatever earlier sessions left in the heap."""
    resources.release_free_memory()
    return ort.InferenceSession(str(path), _options(threads), providers=list(providers))


def _options(threads: int | None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 4       # errors reach the user through our own one-line message
    # no arena: capture sessions hand back many large activations, and the arena kept their peak
    # (25M CNN prune-channels: 0.96-0.98 -> 0.86-0.88 GB max RSS); latency unchanged (ResNet and
    # MobileNet at batch 1 and 32: 1.00-1.02x)
    opts.enable_cpu_mem_arena = False
    threads = threads or _WORKER_THREADS
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def fixed_batch(session: ort.InferenceSession) -> int | None:
    """The batch size a model insists on (a fixed first dimension), or None if the batch is dynamic."""
    dims = [i.shape[0] for i in session.get_inputs() if i.shape]
    fixed = [d for d in dims if isinstance(d, int)]
    return fixed[0] if fixed else None


def graph_fixed_batch(graph: gs.Graph) -> int | None:
    """The batch size a graph's inputs insist on (a fixed first dimension, as `fixed_batch` reads it
    from a session), or None if the batch is dynamic."""
    for t in graph.inputs:
        if isinstance(t, gs.Variable) and t.shape and isinstance(t.shape[0], int) and t.shape[0] > 0:
            return int(t.shape[0])
    return None


def iter_outputs(session: ort.InferenceSession, data: Dataset, batch_size: int = 64,
                 outputs: Sequence[str] | None = None, desc: str = "") -> Iterator[dict[str, np.ndarray]]:
    """Run the dataset through a session batch by batch, yielding each batch's outputs (bounded memory)."""
    names = list(outputs) if outputs else [o.name for o in session.get_outputs()]
    batch_size = fixed_batch(session) or batch_size
    n_batches = data.n_batches(batch_size)
    for feed in progress(data.batches(batch_size), total=n_batches, desc=desc):
        yield dict(zip(names, session.run(names, feed)))


def run_model(session: ort.InferenceSession, data: Dataset, batch_size: int = 64,
              outputs: Sequence[str] | None = None, desc: str = "") -> dict[str, np.ndarray]:
    """Run the whole dataset through a session in batches; outputs are concatenated along axis 0."""
    chunks: dict[str, list[np.ndarray]] = {}
    for out in iter_outputs(session, data, batch_size, outputs, desc):
        for name, value in out.items():
            chunks.setdefault(name, []).append(value)
    return {n: np.concatenate(v) if v and v[0].ndim else np.asarray(v) for n, v in chunks.items()}


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names a node's If/Loop/Scan bodies read (conservatively: every input they name)."""
    names: set[str] = set()
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in g.node:
                names.update(n.input)
                names |= _subgraph_inputs(n)
    return names


def _prefix(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of the model that returns exactly `names`, keeping only the nodes they depend on.
    Each kept weight is copied once, and shape inference reads a copy without their bytes (copying
    the whole model first, then the kept part, then shape inference's own copies had held four of
    a 25M-parameter model's 100 MB at once)."""
    needed, keep = set(names), set()
    nodes = list(model.graph.node)
    for i in reversed(range(len(nodes))):
        if needed.intersection(nodes[i].output):
            keep.add(i)
            needed.update(nodes[i].input)
            needed |= _subgraph_inputs(nodes[i])
    m = _shell(model, {"node", "initializer", "output"})
    m.graph.node.extend(nodes[i] for i in sorted(keep))
    m.graph.initializer.extend(t for t in model.graph.initializer if t.name in needed)
    types = _inferred_types(m)
    for name in names:
        vi = onnx.ValueInfoProto(name=name)
        if name in types:
            vi.type.CopyFrom(types[name])
        else:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        m.graph.output.append(vi)
    return m


def _shell(model: onnx.ModelProto, left_out: set[str]) -> onnx.ModelProto:
    """A copy of the model without the graph fields `left_out` (nothing of them is copied)."""
    m = onnx.ModelProto()
    io.copy_fields(model, m, skip=frozenset({"graph"}))
    io.copy_fields(model.graph, m.graph, skip=frozenset(left_out))
    return m


SHAPE_DATA_LIMIT = 1024   # elements: initializers this small keep their values for shape inference


def _inferred_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Every tensor's type as shape inference finds it, inferred on a copy whose large initializers
    keep their type and dims but not their bytes (only small ones, shapes and axes, are read as
    values)."""
    light = _shell(model, {"initializer"})
    for t in model.graph.initializer:
        small = int(np.prod(t.dims)) <= SHAPE_DATA_LIMIT and t.data_location != onnx.TensorProto.EXTERNAL
        light.graph.initializer.append(t if small else onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims))
    inferred = onnx.shape_inference.infer_shapes(light)
    return {v.name: v.type for v in list(inferred.graph.value_info) + list(inferred.graph.input)
            + list(inferred.graph.output)}


def capture_session(model: onnx.ModelProto, names: Sequence[str],
                    providers: Sequence[str] = DEFAULT_PROVIDERS) -> ort.InferenceSession:
    """A session that computes only the tensors `names` (the part of the model they depend on)."""
    return make_session(_prefix(model, names), providers)


def capture(model: onnx.ModelProto, data: Dataset, names: Sequence[str],
            providers: Sequence[str] = DEFAULT_PROVIDERS, batch_size: int = 64,
            max_samples: int | None = None) -> dict[str, np.ndarray]:
    """Intermediate activations `names` for (up to `max_samples` of) the dataset, via extra graph outputs."""
    if max_samples is not None:
        data = data.take(max_samples)
    return run_model(capture_session(model, names, providers), data, batch_size, outputs=names, desc="capture")


class StepError(RuntimeError):
    """A tensor a Stepper cannot give: dropped (its producer ran and no later node needed it), or
    in a segment onnxruntime does not run."""


class Stepper:
    """Runs a graph front to back over a dataset, in segments, batch by batch: `fetch(name)` runs
    just the nodes not run yet that `name` needs, and keeps only the activations later nodes (or
    `keep`) still read. Capturing every layer's input this way costs one forward pass in all,
    however deep the model, where a prefix run per layer costs depth x forward passes.

    The graph may change between fetches (a layer refit after its input was fetched): a segment is
    built from the graph as it is when it runs, so later activations see the new weights. Values
    are lists with one array per batch (shape tensors computed per batch stay consistent)."""

    def __init__(self, graph: gs.Graph, like: onnx.ModelProto, data: Dataset,
                 providers: Sequence[str] = DEFAULT_PROVIDERS, batch_size: int = 64, keep: Iterable[str] = ()):
        self.graph, self.like, self.providers = graph, like, providers
        self.order = list(graph.toposort().nodes)
        self.produced_at = {t.name: i for i, n in enumerate(self.order) for t in n.outputs}
        end = len(self.order)
        self.last_use: dict[str, int] = {t.name: end for t in graph.outputs}
        for i, node in enumerate(self.order):
            for name in _reads(node):
                self.last_use[name] = max(self.last_use.get(name, -1), i)
        self.env: dict[str, list[np.ndarray]] = {name: [] for name in data.feeds}
        self.n_batches = 0
        batch_size = graph_fixed_batch(graph) or batch_size     # a fixed batch (of 1) is fed as the model wants it
        for batch in data.batches(batch_size):
            self.n_batches += 1
            for name, value in batch.items():
                self.env[name].append(value)
        self.keep, self.pos, self.per_feed = set(keep), 0, data.per_feed

    def fetch(self, name: str) -> list[np.ndarray]:
        """The tensor `name` for every batch of the dataset."""
        if name in self.env:
            self.keep.discard(name)
            return self.env[name]
        p = self.produced_at.get(name)
        if p is None or p < self.pos:
            raise StepError(f"tensor '{name}' is no longer held")
        wanted = [name] + [t.name for n in self.order[self.pos:p + 1] for t in n.outputs
                           if t.name != name and (self.last_use.get(t.name, -1) > p or t.name in self.keep)]
        self.keep.discard(name)
        self._run(list(dict.fromkeys(wanted)))
        self.pos = p + 1
        for held in self._spent(p, {name}):
            del self.env[held]
        return self.env[name]

    def _spent(self, p: int, wanted: set[str]) -> list[str]:
        """Held tensors no node after position `p` reads (nor a caller keeps), except `wanted`."""
        return [n for n in self.env if n not in wanted and self.last_use.get(n, -1) <= p and n not in self.keep]

    def _run(self, wanted: list[str]) -> None:
        """Run the segment computing `wanted` (the first: the tensor fetched) batch by batch. Each
        batch of a feed read last here goes as soon as the batch has run: the outputs grow while
        the inputs shrink (a Transformer's FFN inputs and outputs for 256 sequences: 34 + 134 MB)."""
        tensors = self.graph.tensors()
        nodes: list[gs.Node] = []            # in dependency order (post-order of the walk back)
        seen: set[int] = set()
        feeds: dict[str, tuple[np.dtype, list]] = {}   # held tensors the segment reads
        stack: list[tuple[gs.Tensor | gs.Node, bool]] = [(tensors[n], False) for n in reversed(wanted)]
        while stack:
            item, done = stack.pop()
            if done:
                nodes.append(item)
                continue
            t = item
            if not t.name or isinstance(t, gs.Constant):
                continue   # an optional input left out, or a weight
            if t.name in self.env:
                first = self.env[t.name][0]
                dims = [None] * first.ndim if self.per_feed else [None, *first.shape[1:]][:first.ndim]
                feeds[t.name] = (first.dtype, dims)      # feeds may differ in any dim, batches in the first
            elif len(t.inputs) == 1:
                node = t.inputs[0]
                if id(node) in seen:
                    continue
                seen.add(id(node))
                stack.append((node, True))
                outer = [tensors[n] for n in _reads(node) - {i.name for i in node.inputs} if n in tensors]
                stack.extend((i, False) for i in reversed([*node.inputs, *outer]))
            else:
                raise StepError(f"tensor '{t.name}' is neither computed nor held")
        inputs = [tensors[n] for n in feeds]
        saved = [(t.dtype, t.shape) for t in inputs]   # typed for the segment's export, then restored
        for t, (dtype, shape) in zip(inputs, feeds.values()):
            t.dtype, t.shape = dtype, shape
        try:
            segment = gs.Graph(nodes=nodes, inputs=inputs, outputs=[tensors[n] for n in wanted],
                               opset=self.graph.opset, import_domains=self.graph.import_domains)
            model = G.to_model(segment, like=self.like)
        finally:
            for t, (dtype, shape) in zip(inputs, saved):
                t.dtype, t.shape = dtype, shape
        # feeds read last here leave env; their batches go one by one from a copy of the list (a
        # caller may still hold the list itself)
        spent = {n: list(self.env.pop(n)) for n in self._spent(self.produced_at[wanted[0]], set(wanted)) if n in feeds}
        source = {n: spent[n] if n in spent else self.env[n] for n in feeds}
        out = []
        resources.release_free_memory()   # what the last segment and refit freed (25M Transformer quantize: 1.0 -> 0.87 GB)
        try:
            session = make_session(model, self.providers)
            for b in range(self.n_batches):
                out.append(session.run(wanted, {n: source[n][b] for n in feeds}))
                for batches in spent.values():
                    batches[b] = None
        except Exception as e:   # onnxruntime refusing a segment: callers fall back to whole-model runs
            raise StepError(f"a segment ending at '{wanted[0]}' does not run: {e}") from e
        for i, name in enumerate(wanted):
            self.env[name] = [values[i] for values in out]


def _reads(node: gs.Node) -> set[str]:
    """Names a node reads: its inputs and, for If/Loop/Scan, every name its bodies read."""
    names = {t.name for t in node.inputs}
    for sub in node.subgraphs():
        for inner in sub.nodes:
            names |= _reads(inner)
    return names
