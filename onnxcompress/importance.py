"""Channel importance: one score per unit of a channel group (higher = more important).

Criteria:
- `l1`, `l2`: norms of the weights a unit owns, aggregated over the group: the producers' output
  rows and the consumers' input columns, each layer's norms divided by their mean first.
- `bn-scale`: |gamma| of the BatchNormalizations in the group (network slimming); l1 without any.
- `mean-act`, `apoz`: from calibration data, the mean |activation| of the unit's channels, or one
  minus the average percentage of zeros (after the group's activations).
- `thinet`, `lasso`: reconstruction-based (ThiNet; He et al. 2017): how much the next layers'
  outputs change without the unit. `thinet` removes greedily the units whose joint contribution
  to the consumers' outputs is smallest; `lasso` ranks units by when they enter the LASSO (LARS)
  path of the consumers' output on the units' contributions. Both rank units within a group only.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx_graphsurgeon as gs

from . import graph as G, weights as W
from .channels import Analysis, Group
from .data import Dataset
from .layers import conv_geometry, conv_output_hw, out_rows
from .pass_api import Context
from .runtime import Stepper, capture_session, graph_fixed_batch, iter_outputs
from .solvers import im2col

__all__ = ["CRITERIA", "RANK_ONLY", "group_scores", "input_norms"]

CRITERIA = ("l1", "l2", "bn-scale", "mean-act", "apoz", "thinet", "lasso")
RANK_ONLY = frozenset({"thinet", "lasso"})   # scores comparable inside one group only
Z_CHUNK = 4_000_000     # values of Z (float64) computed at a time by the reconstruction criteria
DATA_CRITERIA = frozenset({"mean-act", "apoz", "thinet", "lasso"})
ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "PRelu", "Elu",
                         "Selu", "Gelu", "Mish", "Tanh"})


def _nodes(graph: gs.Graph) -> dict[str, gs.Node]:
    return {G.layer_id(n): n for n in graph.nodes if n.outputs}


def _add(scores: np.ndarray, an: Analysis, group: Group, tensor: str, values: np.ndarray) -> None:
    """Add a layer's per-channel values (divided by their mean) to the units those channels belong to."""
    index = {r: i for i, r in enumerate(group.units)}
    mean = float(np.mean(values)) or 1.0
    for root, v in zip(an.uf.roots(an.ids[tensor]).tolist(), values):
        if root in index:
            scores[index[root]] += v / mean


def _norm(a: np.ndarray, axis, p: int) -> np.ndarray:
    a = np.abs(a.astype(np.float64))
    return a.sum(axis=axis) if p == 1 else np.sqrt((a * a).sum(axis=axis))


def _consumer_columns(node: gs.Node) -> np.ndarray | None:
    """A consumer's weights as [fan_out, in_features, k] (None for grouped convs)."""
    w = W.layer_weight(node).value
    if node.op == "Conv":
        if int(node.attrs.get("group", 1)) != 1:
            return None
        return w.reshape(w.shape[0], w.shape[1], -1)
    if node.op == "ConvTranspose":
        return None if int(node.attrs.get("group", 1)) != 1 else np.moveaxis(w.reshape(w.shape[0], w.shape[1], -1), 1, 0)
    return out_rows(node, w)[:, :, None]


def norm_scores(graph: gs.Graph, an: Analysis, group: Group, p: int) -> np.ndarray:
    nodes, scores = _nodes(graph), np.zeros(len(group.units))
    for name in group.producers:
        node = nodes[name]
        _add(scores, an, group, node.outputs[0].name, _norm(out_rows(node, W.layer_weight(node).value), 1, p))
    for name in group.consumers:
        cols = _consumer_columns(nodes[name])
        if cols is not None:
            _add(scores, an, group, nodes[name].inputs[0].name, _norm(cols, (0, 2), p))
    return scores


def bn_scores(graph: gs.Graph, an: Analysis, group: Group) -> np.ndarray:
    scores = np.zeros(len(group.units))
    bns = [n for n in graph.nodes if n.op == "BatchNormalization" and n.outputs[0].name in group.tensors]
    for bn in bns:
        _add(scores, an, group, bn.outputs[0].name, np.abs(W.value_of(bn.inputs[1]).astype(np.float64)))
    return scores if bns else norm_scores(graph, an, group, 1)


def _activation_tensors(graph: gs.Graph, group: Group) -> list[str]:
    acts = [n.outputs[0].name for n in graph.nodes if n.op in ACTIVATIONS and n.outputs[0].name in group.tensors]
    return acts or [n.outputs[0].name for n in graph.nodes if n.outputs and G.layer_id(n) in group.producers]


def activation_scores(graph: gs.Graph, an: Analysis, groups: list[Group], ctx: Context, data: Dataset,
                      criterion: str) -> dict[str, np.ndarray]:
    """mean |a| or 1 - APoZ per unit, from one streamed run over the calibration data."""
    wanted = {g.id: _activation_tensors(graph, g) for g in groups}
    names = sorted({t for ts in wanted.values() for t in ts})
    model = G.to_model(G.tidy(graph.copy()), like=ctx.original)
    sums = {t: 0.0 for t in names}
    count = 0
    for out in iter_outputs(capture_session(model, names, ctx.providers), data, ctx.batch_size, names):
        count += len(next(iter(out.values())))
        for t, a in out.items():
            axis = an.axis[t]
            red = tuple(i for i in range(a.ndim) if i != axis)
            per = np.abs(a).mean(axis=red) if criterion == "mean-act" else (a != 0).mean(axis=red)
            sums[t] = sums[t] + per * len(a)
    result = {}
    for g in groups:
        scores = np.zeros(len(g.units))
        for t in wanted[g.id]:
            _add(scores, an, g, t, sums[t] / max(count, 1) + 1e-12)
        result[g.id] = scores
    return result


def input_norms(graph: gs.Graph, ctx: Context, data: Dataset, nodes: list[gs.Node]) -> dict[str, np.ndarray]:
    """The L2 norm, over the calibration data, of each input feature of every node's first input
    (per channel for Conv, the last axis otherwise), from one streamed run: what Wanda weighs
    weights by."""
    names = sorted({n.inputs[0].name for n in nodes})
    axis = {n.inputs[0].name: 1 if n.op in ("Conv", "ConvTranspose") else -1 for n in nodes}
    sums: dict[str, np.ndarray] = {}
    inner = [t for t in names if t not in data.feeds]
    model = G.to_model(G.tidy(graph.copy()), like=ctx.original)
    batch_size = graph_fixed_batch(graph) or ctx.batch_size     # the batches a fixed-batch model takes
    runs = iter_outputs(capture_session(model, inner, ctx.providers), data, batch_size, inner) if inner else None
    for batch in data.batches(batch_size):
        acts = {**{t: batch[t] for t in names if t in batch}, **(next(runs) if runs is not None else {})}
        for t, a in acts.items():
            moved = np.moveaxis(a.astype(np.float64), axis[t], -1)
            sums[t] = sums.get(t, 0.0) + (moved.reshape(-1, moved.shape[-1]) ** 2).sum(0)
    return {t: np.sqrt(v) for t, v in sums.items()}


# -- reconstruction-based -----------------------------------------------------------------------

def _contributions(node: gs.Node, an: Analysis, group: Group, batches: Iterator[np.ndarray],
                   budget: int, rng: np.random.Generator) -> Iterator[np.ndarray] | None:
    """Z, each unit's contribution to the consumer's output on sampled rows, in chunks of rows
    [units, rows, outputs] (float64): a wide group's whole Z (2048 units x 512 outputs x 32 rows)
    would take 270 MB, and normalizing and transposing it as many again."""
    cols = _consumer_columns(node)
    if cols is None:
        return None
    x_name = node.inputs[0].name
    roots = an.uf.roots(an.ids[x_name])
    feats = [np.flatnonzero(roots == r) for r in group.units]
    fan_out = cols.shape[0]
    rows_wanted = int(np.clip(budget // max(len(group.units) * fan_out, 1), 32, 2048))
    parts, have = [], 0
    for x in batches:
        if node.op == "Conv":
            geo = conv_geometry(node, W.layer_weight(node).value)
            if geo is None:
                return None
            h, w = conv_output_hw(x.shape[2], x.shape[3], geo)
            per = max(1, min(h * w, rows_wanted // max(len(x), 1) + 1))
            pos = rng.random((len(x), h * w)).argsort(1)[:, :per]
            a = im2col(x, geo["kernel"], geo["strides"], geo["pads"], geo["dilations"], pos)
            a = a.reshape(-1, x.shape[1], int(np.prod(geo["kernel"])))
        else:
            a = x.reshape(-1, x.shape[-1])[:, :, None]
        parts.append(a.astype(np.float64))
        have += len(a)
        if have >= rows_wanted:
            break
    a = np.concatenate(parts)[:rows_wanted]                     # [R, F, k]
    return _contribution_chunks(a, cols, feats, max(1, Z_CHUNK // max(len(feats) * fan_out, 1)))


def _contribution_chunks(a: np.ndarray, cols: np.ndarray, feats: list[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """Z for `rows` rows of `a` [R, F, k] at a time: [units, rows, outputs], a unit's features `feats[u]`."""
    k = max(a.shape[2], cols.shape[2])      # a kernel axis of 1 broadcasts (a transposed conv's taps)
    for start in range(0, len(a), rows):
        part = a[start:start + rows]
        z = np.zeros((len(feats), len(part), len(cols)))
        for u, f in enumerate(feats):
            if f.size:
                x, c = np.broadcast_to(part[:, f, :], (len(part), f.size, k)), np.broadcast_to(cols[:, f, :], (len(cols), f.size, k))
                z[u] = x.reshape(len(part), -1) @ c.reshape(len(cols), -1).T
        yield z


def _normalized_gram(chunks: Iterator[np.ndarray]) -> np.ndarray:
    """The units' U x U Gram sum_r,o z[u,r,o] z[v,r,o] (through BLAS), of Z divided by the RMS of
    its sum over units (so that every consumer weighs alike), accumulated chunk by chunk."""
    gram, squares, count = 0.0, 0.0, 0
    for z in chunks:
        zu = z.reshape(len(z), -1)
        gram = gram + zu @ zu.T
        squares += float((z.sum(0) ** 2).sum())
        count += zu.shape[1]
    return gram / max(np.sqrt(squares / max(count, 1)), 1e-12) ** 2


def _normalized(chunks: Iterator[np.ndarray]) -> np.ndarray:
    """Z [units, rows, outputs] whole, divided by the RMS of its sum over units."""
    z = np.concatenate(list(chunks), axis=1)
    return z / max(np.sqrt((z.sum(0) ** 2).mean()), 1e-12)


def reconstruction_scores(graph: gs.Graph, an: Analysis, groups: list[Group], ctx: Context, data: Dataset,
                          criterion: str, budget: int = 4_000_000, seed: int = 0) -> dict[str, np.ndarray]:
    """Per group, the units ranked by what the consumers' outputs lose without them. The
    consumers' inputs come from one streamed forward pass (`runtime.Stepper`), in graph order; a
    group is ranked at its last consumer, its parts (a Gram matrix each) dropped there."""
    nodes = _nodes(graph)
    rng = np.random.default_rng(seed)
    by_input: dict[str, list[tuple[Group, gs.Node]]] = {}
    for g in groups:
        for name in g.consumers:
            by_input.setdefault(nodes[name].inputs[0].name, []).append((g, nodes[name]))
    stepper = Stepper(graph, ctx.original, data, ctx.providers, ctx.batch_size)
    position = {t.name: i for i, n in enumerate(stepper.order) for t in n.outputs}
    order = sorted(by_input, key=lambda t: position.get(t, -1))
    last = {g.id: x_name for x_name in order for g, _ in by_input[x_name]}     # each group's last consumer input
    parts: dict[str, list[np.ndarray]] = {g.id: [] for g in groups}   # thinet: U x U Gram; lasso: Z
    ranked: dict[str, np.ndarray] = {}
    for x_name in order:
        batches = stepper.fetch(x_name)
        for g, node in by_input[x_name]:
            chunks = _contributions(node, an, g, iter(batches), budget, rng)
            if chunks is not None:
                parts[g.id].append(_normalized_gram(chunks) if criterion == "thinet" else _normalized(chunks))
        for g in {g.id: g for g, _ in by_input[x_name]}.values():
            if last[g.id] == x_name:    # ranked at its last consumer: a Transformer FFN's Gram is 34 MB
                ranked[g.id] = _rank(graph, an, g, parts.pop(g.id), criterion)
    return {g.id: ranked[g.id] if g.id in ranked else _rank(graph, an, g, parts[g.id], criterion) for g in groups}


def _rank(graph: gs.Graph, an: Analysis, group: Group, parts: list[np.ndarray], criterion: str) -> np.ndarray:
    """A group's unit scores from its consumers' parts, by L1 norm where no consumer gave any."""
    if not parts:
        return norm_scores(graph, an, group, 1)
    return _thinet_rank(sum(parts)) if criterion == "thinet" else _lasso_rank(parts)


def _thinet_rank(M: np.ndarray) -> np.ndarray:
    """Greedy (ThiNet): repeatedly remove the unit that adds least to ||sum of removed contributions||^2,
    from M, the units' contributions' Gram matrix [units, units] summed over consumers."""
    n = len(M)
    removed: list[int] = []
    acc = np.zeros(n)  # sum over removed s of M[s, u]
    scores = np.zeros(n)
    for step in range(n):
        cost = np.diag(M) + 2 * acc
        cost[removed] = np.inf
        u = int(np.argmin(cost))
        removed.append(u)
        acc += M[u]
        scores[u] = step
    return scores


def _lasso_rank(zs: list[np.ndarray]) -> np.ndarray:
    """LASSO (He et al.): units that enter the LARS path first matter most for the consumers' output."""
    from sklearn.linear_model import lars_path

    X = np.concatenate([z.reshape(len(z), -1).T for z in zs])   # [(R*O), U]
    y = X.sum(1)
    _, active, _ = lars_path(X, y, method="lasso", max_iter=4 * X.shape[1])
    n = X.shape[1]
    scores = np.zeros(n)
    for rank, u in enumerate(active):
        scores[u] = n - rank
    return scores


def group_scores(graph: gs.Graph, an: Analysis, groups: list[Group], criterion: str, ctx: Context,
                 data: Dataset | None) -> dict[str, np.ndarray]:
    """Scores per unit (in `group.units` order) for each group (keyed by group id), by `criterion`."""
    if criterion in ("l1", "l2"):
        return {g.id: norm_scores(graph, an, g, 1 if criterion == "l1" else 2) for g in groups}
    if criterion == "bn-scale":
        return {g.id: bn_scores(graph, an, g) for g in groups}
    if data is None:
        raise ValueError(f"criterion '{criterion}' needs calibration data")
    if criterion in ("mean-act", "apoz"):
        return activation_scores(graph, an, groups, ctx, data, criterion)
    return reconstruction_scores(graph, an, groups, ctx, data, criterion)
