"""Model metrics: parameters, size, MACs from inferred shapes, latency, fidelity and accuracy."""
from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from . import graph as G, io
from .data import Dataset
from .errors import InputError
from .runtime import DEFAULT_PROVIDERS, fixed_batch, make_session
from .weights import storage_summary

log = logging.getLogger(__name__)

__all__ = [
    "count_params", "size_bytes", "gzip_bytes", "static_shapes", "NodeMacs", "macs_breakdown", "node_macs",
    "total_macs", "latency_ms", "interleaved_latency_ms", "fidelity", "accuracy", "LatencyConfig", "sparsity", "ctc_greedy", "map_iou",
    "budget_metric",
]

# Integer tensors of these types hold shapes and indices, not weights.
_SHAPE_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}


def _storage_names(model: onnx.ModelProto) -> set[str]:
    """Integer tensors that hold weights rather than shapes: codes read by DequantizeLinear (and
    their zero points), codebook indices (read by Gather/GatherElements, usually through a Cast),
    and MatMulNBits's packed blocks."""
    names: set[str] = set()
    nodes = [n for g in _graphs(model.graph) for n in g.node]
    casts = {n.output[0]: n.input[0] for n in nodes if n.op_type == "Cast"}
    for n in nodes:
        if n.op_type in ("DequantizeLinear", "QuantizeLinear"):
            names.update(n.input[i] for i in (0, 2) if len(n.input) > i)
        elif n.op_type in ("Gather", "GatherElements") and len(n.input) > 1:
            names.update({n.input[1], casts.get(n.input[1], "")})
        elif n.op_type == "MatMulNBits":
            names.update(n.input[1:4])
    return names


def _weight_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers and Constant values of the graph and of every If/Loop/Scan body."""
    tensors = []
    for g in _graphs(model.graph):
        tensors += list(g.initializer)
        tensors += [a.t for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    storage = _storage_names(model)
    return [t for t in tensors if t.data_type not in _SHAPE_TYPES or t.name in storage]


def count_params(model: onnx.ModelProto) -> int:
    """Number of stored parameter elements: initializers and Constant nodes, quantized codes and
    codebook indices included, int32/int64 tensors that hold shapes excluded."""
    return int(sum(int(np.prod(t.dims)) for t in _weight_tensors(model)))


def sparsity(model: onnx.ModelProto) -> float:
    """Fraction of exactly-zero weights among the layers' decoded weights (a quantized weight is
    zero when its code is the zero point, not when the code is 0)."""
    return storage_summary(G.to_graph(model)).sparsity


def size_bytes(model: onnx.ModelProto) -> int:
    """Size of the serialized model with all weights inline."""
    return io.model_size(model)


# Above the protobuf limit, zlib (about 30 MB/s) would take over a minute per measurement: the
# weights' compressed size is estimated from 1 MiB in every GZIP_STRIDE bytes of each tensor.
GZIP_STRIDE = 16 << 20


def gzip_bytes(model: onnx.ModelProto) -> int:
    """Size after generic compression (zlib level 6): what sparse or clustered weights save in storage.
    A model too large for one protobuf is compressed piece by piece: the structure whole, each
    weight from samples (1 MiB in every 16 MiB, scaled to the tensor's size)."""
    rest = onnx.ModelProto()
    io.copy_fields(model, rest, skip=frozenset({"graph"}))
    io.copy_fields(model.graph, rest.graph, skip=frozenset({"initializer"}))
    if not io.needs_file(model):   # one stream, a tensor at a time: no serialized copy of the whole model
        stream = zlib.compressobj(6)
        size = sum(len(stream.compress(t.SerializeToString())) for t in model.graph.initializer)
        return size + len(stream.compress(rest.SerializeToString())) + len(stream.flush())
    size = 0.0
    for t in model.graph.initializer:
        data = io.tensor_bytes(t)
        pieces = [data[i:i + (1 << 20)] for i in range(0, len(data), GZIP_STRIDE)]
        sampled = sum(len(p) for p in pieces)
        size += sum(len(zlib.compress(p, 6)) for p in pieces) * len(data) / max(sampled, 1)
    return int(size) + len(zlib.compress(rest.SerializeToString(), 6))


# Shape inference reads only the dims and type of a weight, so the shape-only copy of a model too
# large for one protobuf keeps every tensor's name, type and dims but replaces the data of those
# over these sizes by an external-data placeholder that is never read. Integer tensors are the
# shapes, indices and trip counts inference reads as values: they keep their data unless huge.
_STUB_BYTES = 1024
_STUB_INT_BYTES = 1 << 20
_STUB_LOCATION = "onnxcompress-shape-only-copy"
# Rounds of Loop-state shape seeding (see _infer_with_loop_states); each state is seeded and
# rejected at most once, so this only bounds pathological models.
_MAX_SEED_ROUNDS = 8


def _stub(t: onnx.TensorProto) -> onnx.TensorProto:
    """The tensor itself when small, else its name, type and dims with the data left out."""
    limit = _STUB_INT_BYTES if t.data_type in _SHAPE_TYPES else _STUB_BYTES
    if t.data_location == onnx.TensorProto.EXTERNAL or io.tensor_nbytes(t) <= limit:
        return t
    out = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, data_location=onnx.TensorProto.EXTERNAL)
    out.external_data.add(key="location", value=_STUB_LOCATION)
    return out


def _shape_only_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference that never holds a second copy of the large weights (their data is
    left out, their dims kept), so models over protobuf's 2 GiB limit fit in one message and memory
    grows by the graph's structure only. Sparse initializers and model-local functions are copied whole."""
    return io.map_tensors(model, _stub)


def _pin_inputs(m: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None) -> None:
    """Give every graph input static dims: the given ones, else 1 for each symbolic dim."""
    inits = {i.name for i in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        given = (input_shapes or {}).get(inp.name)
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if given is not None and i < len(given):
                d.dim_value = int(given[i])
            elif not d.HasField("dim_value"):
                d.dim_value = 1


def _subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph in it, outermost first."""
    yield graph
    for node in graph.node:
        for _, g in _subgraphs(node):
            yield from _graphs(g)


def _dims(vi: onnx.ValueInfoProto) -> list[int] | None:
    if not (vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")):
        return None
    return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]


def _all_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Shapes of the tensors of the graph and of every subgraph. ONNX forbids a subgraph to reuse a
    name of an enclosing scope, so one flat map serves every scope (outer names win regardless)."""
    shapes: dict[str, list[int]] = {}
    for g in _graphs(model.graph):
        own = {vi.name: _dims(vi) for vi in list(g.input) + list(g.value_info) + list(g.output)}
        own = {k: v for k, v in own.items() if v is not None}
        own.update((t.name, list(t.dims)) for t in g.initializer)
        for k, v in own.items():
            shapes.setdefault(k, v)
    return shapes


def _loops(graph: onnx.GraphProto, path: tuple = ()) -> Iterator[tuple[tuple, onnx.NodeProto]]:
    """Every Loop node with its path (node index, then attribute name and node index per level)."""
    for i, node in enumerate(graph.node):
        if node.op_type == "Loop" and node.domain in ("", "ai.onnx"):
            yield path + (i,), node
        for name, g in _subgraphs(node):
            yield from _loops(g, path + (i, name))


def _node_at(graph: onnx.GraphProto, path: tuple) -> onnx.NodeProto:
    node = graph.node[path[0]]
    for k in range(1, len(path), 2):
        node = dict(_subgraphs(node))[path[k]].node[path[k + 1]]
    return node


def _seed_states(m: onnx.ModelProto, inferred: onnx.ModelProto, seeded: dict, rejected: set) -> bool:
    """One round of Loop-state seeding on `m`, judged from `inferred`; True if `m` changed."""
    shapes, changed = _all_shapes(inferred), False
    for path, loop in _loops(inferred.graph):
        body, target = dict(_subgraphs(loop))["body"], dict(_subgraphs(_node_at(m.graph, path)))["body"]
        for k, (outer, body_in, body_out) in enumerate(zip(loop.input[2:], target.input[2:], body.output[1:])):
            key = (path, k)
            if key in seeded and _dims(body_out) != seeded[key]:  # not a fixed point: the shape varies
                rejected.add(key)
                del seeded[key]
                body_in.type.tensor_type.ClearField("shape")
                changed = True
            elif (key not in seeded and key not in rejected and body_in.type.HasField("tensor_type")
                  and _dims(body_in) is None and _known(shapes.get(outer))):
                seeded[key] = shapes[outer]
                body_in.type.tensor_type.shape.SetInParent()
                for d in shapes[outer]:
                    body_in.type.tensor_type.shape.dim.add(dim_value=d)
                changed = True
    return changed


def _infer_with_loop_states(m: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference, and shapes for loop-carried states. ONNX drops their shapes inside Loop bodies
    (a state may change shape from one iteration to the next); where the body declares none, the
    state gets its initial value's shape and keeps it only if the body returns that same shape: a
    fixed point, so every iteration sees it. `m` (a private copy) is edited."""
    seeded: dict[tuple, list[int]] = {}
    rejected: set[tuple] = set()
    inferred = onnx.shape_inference.infer_shapes(m)
    for _ in range(_MAX_SEED_ROUNDS):
        if not _seed_states(m, inferred, seeded, rejected):
            break
        inferred = onnx.shape_inference.infer_shapes(m)
    return inferred


def _inferred(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None) -> onnx.ModelProto:
    """A copy of the model with inferred value_info in every graph, graph inputs pinned. The copy
    leaves out the weights' data (see _shape_only_copy): inference reads only their dims, and a
    full copy (serialized twice more by inference) tripled the model in memory."""
    m = _shape_only_copy(model)
    _pin_inputs(m, input_shapes)
    if input_shapes:   # sizes the model leaves symbolic, given: recorded shapes ([?, 8, ?, ?]) would win over them
        _forget_shapes(m.graph)
    return _infer_with_loop_states(m)


def _forget_shapes(graph: onnx.GraphProto) -> None:
    """Drop the recorded value_info of a graph and of every body inside it."""
    del graph.value_info[:]
    for node in graph.node:
        for _, body in _subgraphs(node):
            _forget_shapes(body)


def static_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[int]]:
    """Infer every tensor's shape, in the graph and inside If/Loop/Scan bodies, with the graph inputs
    pinned (symbolic dims become 1 unless given). Unknown dims are -1. Works above 2 GiB."""
    return _all_shapes(_inferred(model, input_shapes))


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
    if node.op_type == "MatMulNBits":   # onnxruntime's packed low-bit MatMul: K from its attributes
        return int(np.prod(out) * _attr(node, "K", 0)) if _known(out) else None
    return 0


@dataclass(frozen=True)
class NodeMacs:
    """MACs of one node at batch 1. For a node with bodies (If, Loop, Scan), `branches` holds the MACs
    of one run of each body by attribute name ("then_branch", "else_branch", "body"), `bodies` the
    per-node detail inside them, and `macs` the node's own count: the costlier branch of an If (or
    the expected cost when given its probability), body x `trips` for Loop and Scan. Nodes whose
    shapes are unknown have `macs` None and count 0 in a body, as in `total_macs`."""
    name: str  # the node's name, or its first output when unnamed (names are optional and may repeat)
    op: str
    macs: int | None
    branches: dict[str, int] = field(default_factory=dict)
    output: str = ""  # the first output tensor: the node's id (branch_probs keys)
    trips: int | None = 1  # runs of the body; None when unknown, and `macs` then counts one iteration
    bodies: dict[str, tuple[NodeMacs, ...]] = field(default_factory=dict)


def _int_scalars(model: onnx.ModelProto) -> dict[str, int]:
    """Integer scalars held by initializers and Constant nodes in any graph: Loop trip counts."""
    tensors = []
    for g in _graphs(model.graph):
        tensors += [(t.name, t) for t in g.initializer]
        for n in g.node:
            if n.op_type == "Constant" and n.output:
                tensors += [(n.output[0], a.t) for a in n.attribute if a.name == "value"]
                tensors += [(n.output[0], a.i) for a in n.attribute if a.name == "value_int"]
    result = {}
    for name, t in tensors:
        if isinstance(t, int):
            result[name] = t
        elif (t.data_type in _SHAPE_TYPES and int(np.prod(t.dims)) == 1
              and t.data_location != onnx.TensorProto.EXTERNAL):
            result[name] = int(numpy_helper.to_array(t).reshape(-1)[0])
    return result


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


@dataclass
class _MacsWalk:
    """Counts MACs node by node, into If/Loop/Scan bodies, from one inferred model."""
    shapes: Mapping[str, list[int]]
    consts: Mapping[str, int]
    probs: Mapping[str, float]
    opset: int
    seen_ifs: set[str] = field(default_factory=set)

    def graph(self, g: onnx.GraphProto) -> list[NodeMacs]:
        return [self.node(n) for n in g.node]

    def node(self, n: onnx.NodeProto) -> NodeMacs:
        out = n.output[0] if n.output else ""
        name = n.name or out
        bodies = {k: tuple(self.graph(g)) for k, g in _subgraphs(n)}
        if not bodies:
            return NodeMacs(name, n.op_type, _node_macs(n, self.shapes), output=out)
        branches = {k: sum(d.macs or 0 for d in v) for k, v in bodies.items()}
        if n.op_type == "If":
            return NodeMacs(name, n.op_type, self._if_macs(out, branches), branches, out, 1, bodies)
        trips = self._trips(n)
        return NodeMacs(name, n.op_type, sum(branches.values()) * (trips or 1), branches, out, trips, bodies)

    def _if_macs(self, out: str, branches: Mapping[str, int]) -> int:
        self.seen_ifs.add(out)
        p = self.probs.get(out)
        if p is None:
            return max(branches.values())
        return int(round(p * branches["then_branch"] + (1 - p) * branches["else_branch"]))

    def _trips(self, n: onnx.NodeProto) -> int | None:
        """How many times the body runs: a constant Loop count M (an upper bound, as the condition may
        stop it earlier), or a Scan input's length along its scan axis; None when unknown."""
        if n.op_type == "Loop" and n.input and n.input[0]:
            return self.consts.get(n.input[0])
        if n.op_type != "Scan":
            return None
        k = _attr(n, "num_scan_inputs", 0)
        axes = _attr(n, "scan_input_axes", [0] * k) if self.opset >= 9 else [1] * k
        for name, axis in zip(n.input[len(n.input) - k:], axes):
            s = self.shapes.get(name)
            if s and -len(s) <= axis < len(s) and s[axis] >= 0:
                batch = s[0] if self.opset < 9 else 1  # Scan-8 runs the body per batch item and step
                return s[axis] * batch if batch >= 0 else None
        return None


def _check_probs(branch_probs: Mapping[str, float] | None) -> dict[str, float]:
    probs = dict(branch_probs or {})
    bad = {k: p for k, p in probs.items() if not 0.0 <= float(p) <= 1.0}
    if bad:
        raise InputError(f"branch probabilities must lie in [0, 1]: {bad}")
    return probs


def if_outputs(model: onnx.ModelProto) -> set[str]:
    """The first output of every If node, in bodies too: the names `branch_probs` may use."""
    return {n.output[0] for g in _graphs(model.graph) for n in g.node if n.op_type == "If" and n.output}


def macs_breakdown(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None,
                   branch_probs: Mapping[str, float] | None = None) -> list[NodeMacs]:
    """A NodeMacs for every top-level node at batch 1, with the detail of If/Loop/Scan bodies (nested
    ones too). `branch_probs` maps an If's first output to the probability that its then_branch runs;
    an If without one counts its costlier branch. Works above 2 GiB."""
    probs = _check_probs(branch_probs)
    inferred = _inferred(model, input_shapes)
    walk = _MacsWalk(_all_shapes(inferred), _int_scalars(inferred), probs, G.default_opset(model))
    result = walk.graph(inferred.graph)
    unknown = sorted(set(probs) - walk.seen_ifs)
    if unknown:
        raise InputError(f"branch probabilities name no If node output: {', '.join(unknown)}")
    return result


def node_macs(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[tuple[str, str, int | None]]:
    """(node name, op type, MACs) for every top-level node, at batch 1; an If counts its costlier
    branch and a Loop or Scan its body times its trip count (see macs_breakdown for the detail)."""
    return [(d.name, d.op, d.macs) for d in macs_breakdown(model, input_shapes)]


def total_macs(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None,
               branch_probs: Mapping[str, float] | None = None) -> int:
    """MACs of one run at batch 1, counting into If/Loop/Scan bodies. Each If counts its costlier
    branch (worst case) unless `branch_probs` gives the probability p that its then_branch runs
    (keyed by the If's first output tensor): then p*then + (1-p)*else, rounded. A Loop counts its
    body times the constant trip count M (an upper bound: the condition may stop it earlier), or once
    when M is not a constant; a Scan counts its body times the scan length. Nodes whose shapes
    cannot be inferred count 0."""
    return int(sum(d.macs or 0 for d in macs_breakdown(model, input_shapes, branch_probs)))


MIN_RUNS = 3      # timed runs per batch size however slow a run is (the median of fewer is one sample)


@dataclass(frozen=True)
class LatencyConfig:
    """How latency is measured: median over `runs` after `warmup`, for each batch size."""
    batch_sizes: tuple[int, ...] = (1,)
    runs: int = 30
    warmup: int = 5
    threads: int | None = None
    enabled: bool = True
    clock: str = "wall"      # "thread": the calling thread's CPU time, for one-thread sessions (onnxruntime
                             # runs those in the caller): other processes on a shared machine barely move it
    budget_s: float | None = None   # per batch size, stop once this much time is spent (at least
                             # MIN_RUNS runs; warmup within a quarter of it): a page-sized model
                             # takes a second a run, and an allocation times dozens of candidates


def _latency_feed(session, data: Dataset | None, batch: int) -> dict[str, np.ndarray]:
    if data is not None:
        return data.example(batch)
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
        budget = float("inf") if cfg.budget_s is None else cfg.budget_s
        start = time.perf_counter()
        for _ in range(cfg.warmup):
            session.run(None, feed)
            if time.perf_counter() - start > budget / 4:
                break
        clock = time.thread_time if cfg.clock == "thread" and cfg.threads == 1 else time.perf_counter
        times, start = [], time.perf_counter()
        for _ in range(cfg.runs):
            t0 = clock()
            session.run(None, feed)
            times.append(clock() - t0)
            if len(times) >= MIN_RUNS and time.perf_counter() - start > budget:
                break
        result[batch] = float(np.median(times) * 1e3)
    return result


def mean_latency_ms(model: onnx.ModelProto, cfg: LatencyConfig, data: Dataset | None = None,
                    providers: Sequence[str] = DEFAULT_PROVIDERS) -> float:
    """`latency_ms` averaged over the configured batch sizes."""
    return float(np.mean(list(latency_ms(model, cfg, data, providers).values())))


def interleaved_latency_ms(models: Sequence[onnx.ModelProto], cfg: LatencyConfig, data: Dataset | None = None,
                           providers: Sequence[str] = DEFAULT_PROVIDERS, rounds: int = 1) -> list[dict[int, float]]:
    """`latency_ms` of each model, the sessions run in turn, one run each, the order rotating by one
    each turn (so every model runs first, and after every other, as often): per batch size, up to
    `rounds` x `cfg.runs` turns within `rounds` x `cfg.budget_s`; the medians. A shared machine's
    speed moves by a third within seconds, so models timed one after the other by whole
    measurements differ by the moment each got: one MobileNet cut read 0.31-0.59 of the original
    over eight tries that way, 0.44-0.49 run by run; in one benchmark run, two identical models
    read 0.97x and 1.37x of the original."""
    sessions = [make_session(m, providers, cfg.threads) for m in models]
    fixed = fixed_batch(sessions[0])
    clock = time.thread_time if cfg.clock == "thread" and cfg.threads == 1 else time.perf_counter
    budget = float("inf") if cfg.budget_s is None else cfg.budget_s * rounds
    out: list[dict[int, float]] = [{} for _ in sessions]
    n = len(sessions)
    for batch in [b for b in cfg.batch_sizes if not fixed or b == fixed] or [fixed]:
        feed = _latency_feed(sessions[0], data, batch)
        start = time.perf_counter()
        for _ in range(cfg.warmup):
            for session in sessions:
                session.run(None, feed)
            if time.perf_counter() - start > budget / 4:
                break
        times: list[list[float]] = [[] for _ in sessions]
        start = time.perf_counter()
        for i in range(cfg.runs * rounds):
            for k in (*range(i % n, n), *range(i % n)):
                t0 = clock()
                sessions[k].run(None, feed)
                times[k].append(clock() - t0)
            if len(times[0]) >= MIN_RUNS and time.perf_counter() - start > budget:
                break
        for per_batch, ts in zip(out, times):
            per_batch[batch] = float(np.median(ts) * 1e3)
    return out


def paired_latency_ratio(model: onnx.ModelProto, reference: onnx.ModelProto, cfg: LatencyConfig,
                         data: Dataset | None = None, providers: Sequence[str] = DEFAULT_PROVIDERS,
                         rounds: int = 3) -> float:
    """Latency of `model` over `reference`'s, timed together by `interleaved_latency_ms` (the two
    in turn, which goes first alternating): the ratio of the medians, summed over the batch sizes
    (as `mean_latency_ms` averages them)."""
    ref, own = interleaved_latency_ms([reference, model], cfg, data, providers, rounds)
    return sum(own.values()) / sum(ref.values())


def ctc_greedy(steps: np.ndarray, blank: int = 0) -> tuple[int, ...]:
    """Greedy CTC decoding of one sequence [time, classes]: argmax per step, repeats merged, blanks dropped."""
    best = steps.argmax(-1)
    keep = np.r_[True, best[1:] != best[:-1]] & (best != blank)
    return tuple(int(c) for c in best[keep])


def map_iou(reference: np.ndarray, output: np.ndarray) -> float:
    """IoU (percent) of two dense maps thresholded alike: at 0.3 for probability maps (values in
    [0, 1], as text detectors threshold them), else at 0. Two empty maps agree fully."""
    t = 0.3 if reference.min() >= 0 and reference.max() <= 1 else 0.0
    a, b = reference > t, output > t
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union * 100) if union else 100.0


def fidelity(reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: cosine similarity, max absolute error, max error relative to the reference's
    largest magnitude, and what a user sees, in percent: top-1 agreement for [N, classes] outputs;
    for sequences [N, time, classes], per-position top-1 agreement and whole-sequence agreement
    after greedy CTC decoding (blank 0); for dense maps [N, C, H, W], the IoU of thresholded maps."""
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
        elif ref.ndim == 3 and ref.shape[-1] > 1 and ref.size:
            entry["position_agreement"] = float(np.mean(ref.argmax(-1) == out.argmax(-1)) * 100)
            entry["sequence_agreement"] = float(np.mean([ctc_greedy(r) == ctc_greedy(o) for r, o in zip(ref, out)]) * 100)
        elif ref.ndim == 4 and ref.size and ref.dtype.kind == "f":
            entry["map_iou"] = map_iou(ref, out)
        result[name] = entry
    return result


# What the budget protects for an output, most specific first (fidelity keys).
_USER_METRICS = ("top1_agreement", "sequence_agreement", "map_iou")


def budget_metric(accuracy_: float | None, fid: Mapping[str, Mapping[str, float]]) -> tuple[str, float]:
    """(name, value) of what a budget protects: accuracy when labels are given, else the first
    output's agreement as a user sees it (top-1, decoded sequence, map IoU), else cosine x 100."""
    if accuracy_ is not None:
        return "accuracy", accuracy_
    first = next(iter(fid.values()))
    for key in _USER_METRICS:
        if key in first:
            return key, first[key]
    return "cosine x 100", first["cosine"] * 100


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    pred = logits.reshape(len(logits), -1).argmax(1)
    return float(np.mean(pred == labels.reshape(-1)) * 100)
