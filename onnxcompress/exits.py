"""Branching a classifier at run time: where a graph can be cut, an exit head on the cut tensor, and
an `If` whose else-branch holds the rest of the network, so that onnxruntime runs it only when the
branch is taken. Early exits use all of it; the width knob uses the branch (an If chain over width
variants).

A cut is a tensor that is the only thing the rest of the graph needs from the part before it: its
ancestors form the first part, every other node the rest, and no node of the rest reads any other
tensor the first part computed (constants excepted) or a graph input.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from . import graph as G
from .data import Dataset
from .runtime import DEFAULT_PROVIDERS, capture_session, iter_outputs
from .solvers import softmax

log = logging.getLogger(__name__)

__all__ = ["CannotBranch", "Cut", "cut_at", "cuts_between", "reads", "detach_output", "grid_window",
           "grid_pool", "add_head", "min_confidence", "confident", "add_override", "outer_value", "branch", "pooled_features",
           "SweepRow", "sweep", "ChainRow", "chain_sweep", "exit_odds", "choose", "sweep_table", "THRESHOLDS"]

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


class CannotBranch(ValueError):
    """Why a graph cannot be branched where asked (a pass turns it into a "left as is" note)."""


@dataclass
class Cut:
    tensor: gs.Variable
    first: list[gs.Node]     # the tensor's ancestors, in graph order
    rest: list[gs.Node]      # every other top-level node, in graph order


def reads(node: gs.Node) -> set[str]:
    """Names a node reads: its inputs and, for If/Loop/Scan, every name its bodies read."""
    names = {t.name for t in node.inputs if t.name}
    for sub in node.subgraphs():
        for inner in sub.nodes:
            names |= reads(inner)
    return names


def _ancestors(graph: gs.Graph, tensor: gs.Tensor) -> set[int]:
    """ids of the top-level nodes `tensor` depends on (through If/Loop/Scan bodies too)."""
    made_by = {t.name: n for n in graph.nodes for t in n.outputs}
    seen: set[int] = set()
    stack = [made_by[tensor.name]] if tensor.name in made_by else []
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            stack.extend(made_by[name] for name in reads(node) if name in made_by)
    return seen


def cut_at(graph: gs.Graph, name: str) -> Cut:
    """The cut after tensor `name`; raises CannotBranch saying why it is not one."""
    tensors = graph.tensors()
    tensor = tensors.get(name)
    if tensor is None or not tensor.inputs:
        raise CannotBranch(f"'{name}' is not computed by a node of the graph")
    first_ids = _ancestors(graph, tensor)
    first = [n for n in graph.nodes if id(n) in first_ids]
    rest = [n for n in graph.nodes if id(n) not in first_ids]
    produced = {t.name for n in first for t in n.outputs} | {t.name for t in graph.inputs}
    if {t.name for t in graph.outputs} & produced:
        raise CannotBranch(f"a graph output is computed before '{name}'")
    crossing = {r for n in rest for r in reads(n) if r in produced and r != name}
    crossing = sorted(r for r in crossing if G.constant_value(tensors.get(r)) is None)
    if crossing:
        shown = ", ".join(f"'{c}'" for c in crossing[:3])
        shown += f" and {len(crossing) - 3} more" if len(crossing) > 3 else ""
        raise CannotBranch(f"the layers after '{name}' also read {shown} from before it")
    if not any(name in reads(n) for n in rest):
        raise CannotBranch(f"nothing after '{name}' reads it")
    return Cut(tensor, first, rest)


def cuts_between(graph: gs.Graph, shapes: Mapping[str, Sequence[int]], macs: Mapping[str, int], low: float,
                 high: float) -> list[tuple[Cut, float]]:
    """Every cut on a 4-D activation whose first part holds between `low` and `high` of the MACs,
    with that share, in graph order; raises CannotBranch (naming the cuts there are) when none does."""
    total = max(sum(macs.values()), 1)
    found: list[tuple[Cut, float]] = []
    seen: list[str] = []
    for node in graph.nodes:
        for t in node.outputs:
            if len(shapes.get(t.name) or ()) != 4:
                continue
            try:
                cut = cut_at(graph, t.name)
            except CannotBranch:
                continue
            share = sum(macs.get(G.layer_id(n), 0) for n in cut.first) / total
            seen.append(f"'{t.name}' at {share:.0%}")
            if low <= share <= high:
                found.append((cut, share))
    if not found:
        shown = "; single-tensor cuts: " + ", ".join(seen[:6]) if seen else ""
        raise CannotBranch(f"no 4-D activation between {low:.0%} and {high:.0%} of the MACs is the only tensor "
                           f"the rest of the graph reads (name one with at=){shown}")
    log.debug("cuts between %.0f%% and %.0f%% of the MACs: %s", low * 100, high * 100, seen)
    return found


def detach_output(graph: gs.Graph, out: gs.Variable) -> gs.Variable:
    """Give the tensor `out`'s producer and readers a renamed copy of it, leaving `out` itself (a
    graph output, with its name, type and shape) free to be produced by another node."""
    inner = gs.Variable(G.unique_name(graph, f"{out.name}_full"), out.dtype, out.shape)
    for tensors in [r.inputs for r in list(out.outputs)] + [out.inputs[0].outputs]:
        for i, t in enumerate(list(tensors)):
            if t is out:
                tensors[i] = inner   # graphsurgeon's lists keep producers and readers in sync
    return inner


def _node(graph: gs.Graph, op: str, inputs: list[gs.Tensor], dtype, shape=None, **attrs) -> gs.Variable:
    out = gs.Variable(G.unique_name(graph, f"exit_{op.lower()}"), dtype, shape)
    graph.nodes.append(gs.Node(op, G.unique_name(graph, f"exit_{op}"), attrs, inputs, [out]))
    return out


def grid_window(shape: Sequence, grid: int) -> tuple[int, int] | None:
    """The AveragePool window that splits an [N, C, H, W] activation into grid x grid cells (the
    last rows and columns that do not fill a cell dropped), or None where H and W are not known or
    no window gives exactly `grid` cells a side."""
    if len(shape) != 4 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape[2:]):
        return None
    window = (int(shape[2]) // grid, int(shape[3]) // grid)
    if min(window) < 1 or shape[2] // window[0] != grid or shape[3] // window[1] != grid:
        return None
    return window


def grid_pool(a: np.ndarray, grid: int) -> np.ndarray:
    """[N, C, H, W] -> [N, C * grid * grid]: the mean of each cell of `grid_window` (channel-major,
    as AveragePool then Flatten lay it out); grid 1 is the global average."""
    if grid == 1:
        return a.mean(axis=(2, 3), dtype=np.float64)
    kh, kw = grid_window(a.shape, grid)
    n, c = a.shape[:2]
    cells = a[:, :, :kh * grid, :kw * grid].reshape(n, c, grid, kh, grid, kw)
    return cells.mean(axis=(3, 5), dtype=np.float64).reshape(n, -1)


def add_head(graph: gs.Graph, x: gs.Variable, weight: np.ndarray, bias: np.ndarray, dtype,
             window: tuple[int, int] | None = None, name: str = "exit_head") -> gs.Variable:
    """The pooled features of x -> Gemm (weight [classes, features]): the logits [N, classes].
    Pooling: GlobalAveragePool, or AveragePool over `window` cells (`grid_window`), then Flatten.
    The Gemm's weights are '{name}.weight' and '{name}.bias'."""
    pooled = (_node(graph, "GlobalAveragePool", [x], dtype) if window is None else
              _node(graph, "AveragePool", [x], dtype, kernel_shape=list(window), strides=list(window)))
    flat = _node(graph, "Flatten", [pooled], dtype)
    w = G.make_constant(G.unique_name(graph, f"{name}.weight"), weight.astype(dtype))
    b = G.make_constant(G.unique_name(graph, f"{name}.bias"), bias.astype(dtype))
    return _node(graph, "Gemm", [flat, w, b], dtype, None, transB=1)


def _reduce(graph: gs.Graph, op: str, x: gs.Variable, axes: list[int] | None) -> gs.Variable:
    """A Reduce* node without keepdims; axes as an attribute before opset 18, as an input from 18 on."""
    if axes is None:
        return _node(graph, op, [x], x.dtype, keepdims=0)
    if int(graph.opset or 0) >= 18:
        const = G.make_constant(G.unique_name(graph, "exit_axes"), np.array(axes, np.int64))
        return _node(graph, op, [x, const], x.dtype, keepdims=0)
    return _node(graph, op, [x], x.dtype, keepdims=0, axes=axes)


def min_confidence(graph: gs.Graph, logits: gs.Variable) -> gs.Variable:
    """A scalar: the lowest, over the batch, of each sample's largest softmax probability."""
    probs = _node(graph, "Softmax", [logits], logits.dtype, axis=1)
    return _reduce(graph, "ReduceMin", _reduce(graph, "ReduceMax", probs, [1]), None)


def confident(graph: gs.Graph, logits: gs.Variable, threshold: gs.Tensor) -> gs.Variable:
    """A bool scalar: every sample's largest softmax probability reaches `threshold`."""
    out = gs.Variable(G.unique_name(graph, "exit_taken"), np.bool_, [])
    node = gs.Node("GreaterOrEqual", G.unique_name(graph, "exit_GreaterOrEqual"),
                   inputs=[min_confidence(graph, logits), threshold], outputs=[out])
    graph.nodes.append(node)
    return out


def add_override(graph: gs.Graph, name: str, value: np.ndarray) -> gs.Constant:
    """A graph input with an initializer of the same name: `value` unless the caller feeds one."""
    if name in graph.tensors():
        raise CannotBranch(f"the graph already has a tensor named '{name}'")
    const = gs.Constant(name, np.asarray(value))
    graph.inputs.append(const)
    return const


def outer_value(graph: gs.Graph, override: gs.Constant) -> gs.Variable:
    """`override` (an `add_override` input) as a node's output, for a nested If's body to read: given
    an overridable initializer from an outer scope, onnxruntime's nested bodies see its stored
    value, not the one fed (1.32; an Identity's output is what was fed)."""
    return _node(graph, "Identity", [override], override.dtype, override.shape)


def _body_outputs(graph: gs.Graph, values: Sequence[gs.Tensor], like: Sequence[gs.Variable],
                  made_here: set[str], tag: str) -> tuple[list[gs.Node], list[gs.Variable]]:
    """A body's outputs for `values`: the tensor itself when the body computes it, else an Identity
    of it (new nodes returned). Named while `graph` still holds every node: names are global."""
    nodes, outs = [], []
    for value, out in zip(values, like):
        if value.name in made_here:
            outs.append(value)
            continue
        copy = gs.Variable(G.unique_name(graph, f"{out.name}_{tag}"), out.dtype, out.shape)
        nodes.append(gs.Node("Identity", G.unique_name(graph, f"exit_{tag}"), inputs=[value], outputs=[copy]))
        outs.append(copy)
    return nodes, outs


def branch(graph: gs.Graph, cond: gs.Tensor, then_values: Sequence[gs.Tensor], else_nodes: Sequence[gs.Node],
           else_values: Sequence[gs.Tensor], outputs: Sequence[gs.Variable], then_nodes: Sequence[gs.Node] = (),
           prefix: str = "exit") -> gs.Node:
    """An If on `cond` that produces the tensors `outputs` (which must have no producer): the
    then-branch moves `then_nodes` out of the graph and returns `then_values`, the else-branch
    moves `else_nodes` and returns `else_values`. Both bodies read what they need from the outer
    scope. The If and its bodies are named after `prefix`."""
    made_then = {t.name for n in then_nodes for t in n.outputs}
    made_else = {t.name for n in else_nodes for t in n.outputs}
    then_extra, then_outs = _body_outputs(graph, then_values, outputs, made_then, "then")
    else_extra, else_outs = _body_outputs(graph, else_values, outputs, made_else, "else")
    names = [G.unique_name(graph, f"{prefix}_{base}") for base in ("if", "then", "else")]
    moved = {id(n) for n in [*then_nodes, *else_nodes]}
    graph.nodes[:] = [n for n in graph.nodes if id(n) not in moved]
    then_g = gs.Graph(nodes=[*then_nodes, *then_extra], outputs=then_outs, name=names[1], opset=graph.opset)
    else_g = gs.Graph(nodes=[*else_nodes, *else_extra], outputs=else_outs, name=names[2], opset=graph.opset)
    node = gs.Node("If", names[0], {"then_branch": then_g, "else_branch": else_g}, [cond], list(outputs))
    graph.nodes.append(node)
    return node


def pooled_features(model, data: Dataset, grids: Mapping[str, Sequence[int]], output: str,
                    providers: Sequence[str] = DEFAULT_PROVIDERS,
                    batch_size: int = 64) -> tuple[dict[tuple[str, int], np.ndarray], np.ndarray]:
    """Per sample, for each 4-D tensor named in `grids` and each of its grids, the tensor pooled
    by `grid_pool` ({(tensor, grid): [N, features]}), and the model's output; one pass over the
    data, pooling batch by batch (the activations themselves are never all held)."""
    names = list(grids)
    session = capture_session(model, [*names, output], providers)
    pooled: dict[tuple[str, int], list[np.ndarray]] = {(t, k): [] for t in names for k in grids[t]}
    outs = []
    for batch in iter_outputs(session, data, batch_size, [*names, output], desc="exit features"):
        for t, k in pooled:
            pooled[t, k].append(grid_pool(batch[t], k))
        outs.append(batch[output])
    return {key: np.concatenate(v) for key, v in pooled.items()}, np.concatenate(outs)


# -- the threshold --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepRow:
    threshold: float
    exit_share: float    # samples the exit answers, at batch 1
    score: float         # accuracy (with labels) or agreement with the full model, percent
    drop: float          # points below the full model
    error: float         # the drop's standard error (per-sample paired differences; at least one sample's), points
    macs_ratio: float    # expected MACs at batch 1 over the original's

    @property
    def thresholds(self) -> tuple[float, ...]:   # as ChainRow's: one exit
        return (self.threshold,)

    @property
    def exit_shares(self) -> tuple[float, ...]:
        return (self.exit_share,)


def sweep(head_logits: np.ndarray, full_logits: np.ndarray, truth: np.ndarray | None, exit_macs: float,
          full_macs: float, head_macs: float, thresholds: Sequence[float] = THRESHOLDS,
          vouch: bool = False) -> list[SweepRow]:
    """What each threshold does at batch 1: a sample exits when its largest softmax probability from
    the head reaches the threshold. `exit_macs` counts the first part and the head; a sample that
    does not exit costs the full model and the head. Without labels the score is top-1 agreement.
    (`chain_sweep` with one exit.)"""
    rows = chain_sweep([head_logits], full_logits, truth, [exit_macs - head_macs], full_macs, [head_macs],
                       [(t,) for t in thresholds], vouch)
    return [SweepRow(r.thresholds[0], r.exit_shares[0], r.score, r.drop, r.error, r.macs_ratio) for r in rows]


@dataclass(frozen=True)
class ChainRow:
    """Thresholds for a chain of exits (one per exit, in graph order), judged at batch 1."""
    thresholds: tuple[float, ...]
    exit_shares: tuple[float, ...]   # the samples each exit answers (of all samples)
    score: float
    drop: float
    error: float
    macs_ratio: float

    @property
    def threshold(self) -> tuple[float, ...]:   # as SweepRow's, for `choose` and `sweep_table`
        return self.thresholds

    @property
    def exit_share(self) -> float:              # the samples leaving early, at any exit
        return sum(self.exit_shares)


def chain_sweep(heads: Sequence[np.ndarray], full_logits: np.ndarray, truth: np.ndarray | None,
                cut_macs: Sequence[float], full_macs: float, head_macs: Sequence[float],
                settings: Sequence[Sequence[float]] | None = None, vouch: bool = False) -> list[ChainRow]:
    """What each setting of thresholds does to a chain of exits at batch 1: a sample leaves at the
    first exit whose head's largest softmax probability reaches that exit's threshold. Leaving at
    exit j costs the network up to its cut (`cut_macs[j]`) and the heads 0..j; a sample that leaves
    at none costs the full model and every head. `settings`: threshold tuples to try; by default
    every combination of THRESHOLDS. Without labels the score is top-1 agreement. `vouch`: the
    rows decide (not just rank candidates), so a drop's standard error is at least one sample's."""
    if settings is None:
        settings = list(itertools.product(THRESHOLDS, repeat=len(heads)))
    confidence = [softmax(h).max(axis=1) for h in heads]
    full_pred = full_logits.argmax(1)
    truth = full_pred if truth is None else truth.reshape(-1)
    full_right = full_pred == truth
    head_right = [h.argmax(1) == truth for h in heads]
    spent = np.cumsum(head_macs)
    costs = [c + s for c, s in zip(cut_macs, spent)] + [full_macs + spent[-1]]
    # a drop measured without a single sample changing is not known to be 0: when the rows decide,
    # its standard error is taken as at least that of one lost sample (1/n), so a handful of samples
    # cannot vouch for a tight budget (PP-OCR cls: 96 crops, none changed, and the 128 test crops
    # lost one). With 3 standard errors that is the rule of three: no loss in n, at most 3/n at 95%.
    floor = 100 / len(truth) if vouch else 0.0
    rows = []
    for ts in settings:
        pending, right, shares = np.ones(len(truth), bool), full_right.copy(), []
        for conf, correct, t in zip(confidence, head_right, ts):
            out = pending & (conf >= t)
            right[out] = correct[out]
            pending &= ~out
            shares.append(float(out.mean()))
        diff = full_right.astype(np.float64) - right      # per sample: 1 lost, -1 won, 0 same
        error = max(float(diff.std(ddof=1) / np.sqrt(len(diff)) * 100) if len(diff) > 1 else 0.0, floor)
        macs = float(np.dot([*shares, 1 - sum(shares)], costs))
        rows.append(ChainRow(tuple(float(t) for t in ts), tuple(shares), float(right.mean() * 100),
                             float(diff.mean() * 100), error, macs / full_macs))
    return rows


def exit_odds(shares: Sequence[float]) -> list[float]:
    """Each nested exit If's odds of exiting given that it runs, from the share of all inputs each
    exit answers (the first If's odds are its share; the next one's are over what reaches it)."""
    odds, reached = [], 1.0
    for share in shares:
        odds.append(min(share / reached, 1.0) if reached > 0 else 0.0)
        reached -= share
    return odds


def choose(rows: Sequence, max_drop: float, margin: float = 0.0):
    """The row (SweepRow or ChainRow) that saves the most expected MACs (the higher thresholds on
    ties) with its drop plus `margin` standard errors within `max_drop`, or None when none saves any."""
    fits = [r for r in rows if r.drop + margin * r.error <= max_drop + 1e-9 and r.macs_ratio < 1]
    return min(fits, key=lambda r: (r.macs_ratio, -np.sum(r.threshold))) if fits else None


def sweep_table(rows: Sequence, metric: str, chosen) -> str:
    """A compact text table of a sweep (SweepRow or ChainRow; the chosen threshold marked)."""
    text = lambda t: "/".join(f"{v:g}" for v in np.atleast_1d(t))
    lines = [f"threshold sweep at batch 1 ({metric} on the held-out calibration samples):",
             "      threshold  exit%   drop  (s.e.)   MACs"]
    for r in rows:
        mark = " <-" if chosen is not None and r.threshold == chosen else ""
        lines.append(f"      {text(r.threshold):>9s}  {r.exit_share * 100:5.1f}  {r.drop:5.2f}  ({r.error:4.2f})  "
                     f"{r.macs_ratio:5.2f}x{mark}")
    return "\n".join(lines)
