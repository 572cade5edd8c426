"""Distillation-based recovery shared by every pass: layer-wise reconstruction and head refitting.

The teacher for layer-wise reconstruction is the original model (the only one that shares the
student's internals, matched by tensor name); output-level soft targets come from the teacher
ensemble (`Context.teachers`, by default the original). Each weighted layer is refit, front to back,
by constrained ridge least squares from the *student's own* inputs (so earlier errors are
compensated) onto the original's outputs of the same tensor; then the classifier head is refit on
softened teacher probabilities. Constraints keep compression intact: zeros stay zero, dropped
input channels stay dropped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import graph as G
from .data import Dataset
from .errors import OptionError
from .layers import conv_geometry, from_out_rows, gemm_rows, out_rows
from .metrics import static_shapes
from .pass_api import Context
from .runtime import capture, capture_session, iter_outputs, make_session, run_model
from .solvers import NormalEquations, fit_soft_head, im2col, soft_targets, solve_columns, solve_free, solve_support

log = logging.getLogger(__name__)

__all__ = ["Constraint", "teacher_logits", "reference_model", "paired_batches", "student_activations", "changed_layers",
           "refit_layer", "refit_batchnorm", "find_head", "refit_head", "recover", "RecoverySettings",
           "RecoveryResult", "RECOVERABLE_OPS"]

RECOVERABLE_OPS = frozenset({"Conv", "Gemm", "MatMul"})


@dataclass
class Constraint:
    """What a refit may change. `support`: free entries of the [out, fan_in] rows (others stay 0);
    `columns`: kept input columns of the rows (others stay 0); neither: every weight is free."""
    support: np.ndarray | None = None
    columns: np.ndarray | None = None

    @staticmethod
    def infer(rows: np.ndarray) -> "Constraint":
        """Keep the zeros a layer already has (so a pruned layer stays pruned)."""
        return Constraint(support=rows != 0) if np.any(rows == 0) else Constraint()


# -- data the solvers need ----------------------------------------------------------------------

def _logits_of(outputs: np.ndarray) -> np.ndarray:
    """Teacher outputs as logits: probabilities (non-negative rows summing to 1) are turned into logs."""
    out = outputs.reshape(len(outputs), -1).astype(np.float64)
    if np.all(out >= 0) and np.allclose(out.sum(1), 1.0, atol=1e-3):
        return np.log(np.clip(out, 1e-12, None))
    return out


def teacher_logits(ctx: Context, data: Dataset) -> list[np.ndarray]:
    """The first output of every teacher on `data`, computed once per run."""
    key = ("teacher-logits", len(data))
    if key not in ctx.cache:
        logits = []
        for teacher in ctx.teachers:
            out = run_model(make_session(teacher, ctx.providers), data, ctx.batch_size, desc="teacher")
            logits.append(_logits_of(next(iter(out.values()))))
        ctx.cache[key] = logits
    return ctx.cache[key]


def reference_model(ctx: Context, graph: gs.Graph) -> onnx.ModelProto:
    """The model layer-wise targets come from: the teacher sharing the most tensor names with the
    student (a clean copy of a damaged model, say), else the original model of the run."""
    names = {t.name for n in graph.nodes for t in n.outputs}
    best, best_shared = ctx.original, 0
    for teacher in ctx.teachers:
        shared = len(names & _tensor_names(teacher))
        if shared > best_shared:
            best, best_shared = teacher, shared
    return best


def paired_batches(graph: gs.Graph, ctx: Context, reference: onnx.ModelProto, data: Dataset, x_name: str,
                   y_name: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(student's tensor x_name, reference's tensor y_name) batch by batch: memory stays bounded."""
    student = G.to_model(G.tidy(graph.copy()), like=ctx.original)
    ref_session = capture_session(reference, [y_name], ctx.providers)
    if x_name in data.feeds:  # a graph input: no student run needed
        for batch, ref in zip(data.batches(ctx.batch_size), iter_outputs(ref_session, data, ctx.batch_size, [y_name])):
            yield batch[x_name], ref[y_name]
        return
    stu_session = capture_session(student, [x_name], ctx.providers)
    for stu, ref in zip(iter_outputs(stu_session, data, ctx.batch_size, [x_name]),
                        iter_outputs(ref_session, data, ctx.batch_size, [y_name])):
        yield stu[x_name], ref[y_name]


def student_activations(graph: gs.Graph, ctx: Context, data: Dataset, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Tensors of the graph as it is now (the student, with earlier refits applied)."""
    fed = {n: data.feeds[n] for n in names if n in data.feeds}  # graph inputs need no run
    rest = [n for n in names if n not in fed]
    if rest:
        model = G.to_model(G.tidy(graph.copy()), like=ctx.original)
        fed.update(capture(model, data, rest, ctx.providers, ctx.batch_size))
    return fed


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    return {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}


def changed_layers(graph: gs.Graph, ctx: Context, reference: onnx.ModelProto) -> list[gs.Node]:
    """Weighted layers (front to back) whose output differs from the reference's tensor of the same name."""
    ref_graph = G.to_graph(reference)
    ref_by_output = {n.outputs[0].name: n for n in ref_graph.nodes if n.outputs}
    changed = []
    for node in graph.toposort().nodes:
        if node.op not in RECOVERABLE_OPS or G.weight_of(node) is None:
            continue
        ref = ref_by_output.get(node.outputs[0].name)
        if node.name in ctx.marks or ref is None or ref.op != node.op or not _same_params(node, ref):
            changed.append(node)
    return changed


def _same_params(a: gs.Node, b: gs.Node) -> bool:
    if len(a.inputs) != len(b.inputs) or a.attrs != b.attrs:
        return False
    for ta, tb in zip(a.inputs[1:], b.inputs[1:]):
        va, vb = G.constant_value(ta), G.constant_value(tb)
        if (va is None) != (vb is None) or (va is not None and (va.shape != vb.shape or not np.array_equal(va, vb))):
            return False
    return True


# -- layer-wise reconstruction ------------------------------------------------------------------

def _layer_equations(node: gs.Node, w: np.ndarray, batches: Iterable[tuple[np.ndarray, np.ndarray]], n_total: int,
                     max_rows: int, rng: np.random.Generator) -> list[NormalEquations] | None:
    """Normal equations per group (one for Gemm/MatMul), streamed over (student input, target) batches.

    At most `max_rows` rows in all: conv layers sample output positions per image, Gemm/MatMul rows."""
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return None
    geo = conv_geometry(node, w) if node.op == "Conv" else None
    if node.op == "Conv" and geo is None:
        return None
    eqs: list[NormalEquations] | None = None
    for x, y in batches:
        if geo is None:
            xs, ys = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            keep = int(np.ceil(max_rows * len(x) / n_total))
            if len(xs) > keep:
                pick = rng.choice(len(xs), keep, replace=False)
                xs, ys = xs[pick], ys[pick]
            eqs = eqs or [NormalEquations(xs.shape[1], ys.shape[1])]
            eqs[0].add(xs, ys)
            continue
        n, cin = x.shape[:2]
        m, hw = y.shape[1], y.shape[2] * y.shape[3]
        g = geo["group"]
        per_image = int(min(hw, max(1, max_rows // n_total)))
        positions = rng.random((n, hw)).argsort(1)[:, :per_image]
        ys = np.take_along_axis(y.reshape(n, m, hw), positions[:, None, :], 2).transpose(0, 2, 1).reshape(-1, m)
        rows = im2col(x, geo["kernel"], geo["strides"], geo["pads"], geo["dilations"], positions)
        cin_g, m_g, k = cin // g, m // g, rows.shape[1] // cin
        eqs = eqs or [NormalEquations(cin_g * k, m_g) for _ in range(g)]
        for gi, ne in enumerate(eqs):
            ne.add(rows[:, gi * cin_g * k:(gi + 1) * cin_g * k], ys[:, gi * m_g:(gi + 1) * m_g])
    return eqs


def _current(node: gs.Node, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The layer's effective [out, fan_in] rows and bias vector."""
    n_out = out_rows(node, w).shape[0]
    bias = G.weight_of(node, 2) if len(node.inputs) > 2 else None
    if node.op == "Gemm":
        eff = gemm_rows(node, w, bias, n_out)
        if eff is not None:
            return eff
    rows = out_rows(node, w).astype(np.float64)
    return rows, (np.zeros(n_out) if bias is None else bias.astype(np.float64).reshape(-1))


def _solve_group(ne: NormalEquations, constraint: Constraint, sl: slice, ridge: float, bias: bool):
    if constraint.support is not None:
        return solve_support(ne, constraint.support[sl], ridge, bias)
    if constraint.columns is not None:
        return solve_columns(ne, constraint.columns, ridge, bias)
    return solve_free(ne, ridge, bias)


def refit_layer(graph: gs.Graph, node: gs.Node, batches: Iterable[tuple[np.ndarray, np.ndarray]], n_total: int,
                constraint: Constraint | None = None, ridge: float = 1e-3, max_rows: int = 20000,
                seed: int = 0) -> dict[str, Any] | None:
    """Refit one layer so that layer(x) ~ y over the (x, y) batches; keep the result only if it
    lowers the error. Returns {"before": mse, "after": mse} (mean over outputs), or None when the
    layer's layout is not supported."""
    w = G.weight_of(node)
    bias = node.op != "MatMul"
    if w is None:
        return None
    eqs = _layer_equations(node, w, batches, n_total, max_rows, np.random.default_rng(seed))
    if eqs is None:
        return None
    rows, b = _current(node, w)
    constraint = constraint or Constraint.infer(rows)
    m_g = rows.shape[0] // len(eqs)
    new_rows, new_b = rows.copy(), b.copy()
    before = after = 0.0
    for gi, ne in enumerate(eqs):
        sl = slice(gi * m_g, (gi + 1) * m_g)
        W, bb = _solve_group(ne, constraint, sl, ridge, bias)
        before += ne.residual(rows[sl], b[sl]).sum()
        after += ne.residual(W, bb).sum()
        new_rows[sl], new_b[sl] = W, bb
    n_out = rows.shape[0]
    stats = {"before": before / n_out, "after": min(before, after) / n_out}
    if after >= before:
        return stats
    _write(graph, node, w, new_rows, new_b if bias else None)
    return stats


def _write(graph: gs.Graph, node: gs.Node, w: np.ndarray, rows: np.ndarray, bias: np.ndarray | None) -> None:
    if node.op == "Gemm":
        node.attrs.update(alpha=1.0, beta=1.0, transB=1)
        new_w = rows
    else:
        new_w = from_out_rows(node, rows, tuple(w.shape))
    G.set_constant(graph, node, 1, new_w.astype(w.dtype), "_refit")
    if bias is not None:
        G.set_constant(graph, node, 2, bias.astype(w.dtype), "_refit")


def refit_batchnorm(graph: gs.Graph, node: gs.Node, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, float] | None:
    """Re-estimate an inference BatchNormalization from the student's inputs: per channel, the
    affine map a * x + d that best matches the reference's output (1-D least squares), written back
    as new scale and bias over the node's own mean and variance. Kept only if it lowers the error."""
    params = [G.constant_value(t) for t in node.inputs[1:5]]
    if any(p is None for p in params) or len(node.outputs) != 1:
        return None
    scale, beta, mean, var = (p.astype(np.float64) for p in params)
    eps = float(node.attrs.get("epsilon", 1e-5))
    std = np.sqrt(var + eps)
    a0, d0 = scale / std, beta - scale * mean / std       # the current map: y = a0 * x + d0
    sums = np.zeros((5, len(scale)))                       # n, Sx, Sy, Sxx, Sxy per channel
    y_sq = np.zeros(len(scale))
    for x, y in batches:
        xc = np.moveaxis(x, 1, 0).reshape(len(scale), -1).astype(np.float64)
        yc = np.moveaxis(y, 1, 0).reshape(len(scale), -1).astype(np.float64)
        sums += [np.full(len(scale), xc.shape[1]), xc.sum(1), yc.sum(1), (xc * xc).sum(1), (xc * yc).sum(1)]
        y_sq += (yc * yc).sum(1)
    n, sx, sy, sxx, sxy = sums
    det = n * sxx - sx * sx
    ok = det > 1e-12 * np.maximum(n * sxx, 1e-30)
    a = np.where(ok, (n * sxy - sx * sy) / np.where(ok, det, 1), a0)
    d = np.where(ok, (sy - a * sx) / np.maximum(n, 1), d0)
    err = lambda a_, d_: float(np.sum(y_sq - 2 * a_ * sxy - 2 * d_ * sy + a_ * a_ * sxx + 2 * a_ * d_ * sx + n * d_ * d_) / n.sum())
    stats = {"before": err(a0, d0), "after": min(err(a0, d0), err(a, d))}
    if err(a, d) < err(a0, d0):
        dtype = G.constant_value(node.inputs[1]).dtype
        G.set_constant(graph, node, 1, (a * std).astype(dtype), "_refit")
        G.set_constant(graph, node, 2, (d + a * mean).astype(dtype), "_refit")
    return stats


# -- head ---------------------------------------------------------------------------------------

def find_head(graph: gs.Graph) -> gs.Node | None:
    """The Gemm that produces the first graph output directly, if any."""
    node = G.producer(graph.outputs[0])
    if node is not None and node.op == "Gemm" and G.weight_of(node) is not None and not node.attrs.get("transA", 0):
        return node
    return None


def refit_head(graph: gs.Graph, head: gs.Node, features: np.ndarray, targets: np.ndarray, temperature: float,
               alpha: float = 0.0, labels: np.ndarray | None = None, constraint: Constraint | None = None) -> dict[str, float]:
    """Refit the classifier head on soft targets (warm start from its weights); returns agreements before/after."""
    w = G.weight_of(head)
    rows, b = _current(head, w)
    constraint = constraint or Constraint.infer(rows)
    mask = constraint.support
    if constraint.columns is not None:
        mask = np.zeros(rows.shape, dtype=bool)
        mask[:, constraint.columns] = True
    H = features.reshape(len(features), -1)
    W, bb = fit_soft_head(H, targets, temperature, alpha, labels, W0=rows, b0=b, mask=mask)
    agree = lambda W_, b_: float(np.mean((H @ W_.T + b_).argmax(1) == targets.argmax(1)) * 100)
    stats = {"agreement_before": agree(rows, b), "agreement_after": agree(W, bb)}
    if stats["agreement_after"] >= stats["agreement_before"]:
        _write(graph, head, w, W, bb)
    return stats


def ensemble_targets(ctx: Context, data: Dataset, temperature: float) -> np.ndarray:
    return soft_targets(teacher_logits(ctx, data), temperature)


# -- the whole recovery walk -------------------------------------------------------------------

@dataclass(frozen=True)
class RecoverySettings:
    temperature: float = 4.0
    alpha: float = 0.0
    layers: str = "changed"        # "changed": layers that differ from the teacher; "all"
    head: bool = True
    bn: bool = True
    ridge: float = 1e-3
    max_rows: int = 20000
    seed: int = 0


@dataclass
class RecoveryResult:
    modified: bool
    stats: dict[str, float]
    notes: list[str]


def recover(graph: gs.Graph, ctx: Context, data: Dataset, settings: RecoverySettings) -> RecoveryResult:
    """Front to back: refit changed weighted layers and the BatchNormalizations after them on the
    teacher's features, then the head on soft targets. Channels an earlier pass removed are mapped
    through `ctx.channel_maps`, so a pruned layer is fit to the teacher's kept channels."""
    if settings.alpha > 0 and data.labels is None:
        raise OptionError("distillation with alpha > 0 needs labels in the calibration data")
    reference = reference_model(ctx, graph)
    walk = _Walk(graph, ctx, data, reference, static_shapes(reference), settings)
    targets = {id(n) for n in changed_layers(graph, ctx, reference)} if settings.layers == "changed" else None
    dirty = False  # once a layer changed, everything after it sees different inputs
    for node in list(graph.toposort().nodes):
        if node.op in RECOVERABLE_OPS and G.weight_of(node) is not None and (targets is None or id(node) in targets):
            dirty = True
            walk.layer(node)
        elif node.op == "BatchNormalization" and dirty and settings.bn:
            walk.batchnorm(node)
    stats = _summary(walk.fits, "layer") | _summary(walk.bn_fits, "bn")
    head = find_head(graph) if settings.head else None
    if settings.head and head is None:
        walk.notes.append("no Gemm produces the first output directly: head refit skipped")
    if head is not None:
        probs = ensemble_targets(ctx, data, settings.temperature)
        feats = student_activations(graph, ctx, data, [head.inputs[0].name])[head.inputs[0].name]
        result = refit_head(graph, head, feats, probs, settings.temperature, settings.alpha, data.labels,
                            _constraint(ctx, head))
        stats.update({f"head_{k}": v for k, v in result.items()})
    return RecoveryResult(bool(walk.fits or walk.bn_fits or head is not None), stats, walk.notes)


@dataclass
class _Walk:
    graph: gs.Graph
    ctx: Context
    data: Dataset
    reference: onnx.ModelProto
    shapes: dict[str, list[int]]
    settings: RecoverySettings
    fits: list[dict] = field(default_factory=list)
    bn_fits: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def _targets(self, node: gs.Node, axis: int, n_out: int) -> Iterator[tuple[np.ndarray, np.ndarray]] | None:
        """(student input, teacher output) batches for a node, mapped to its kept channels; None
        (with a note) when the teacher has no matching tensor."""
        y_name = node.outputs[0].name
        shape = self.shapes.get(y_name)
        if shape is None:
            self.notes.append(f"{node.op} '{node.name}': the teacher has no tensor '{y_name}' to match; left as is")
            return None
        channels = shape[axis]
        keep = self.ctx.channel_maps.get(y_name)
        if channels > 0 and channels != n_out and (keep is None or len(keep) != n_out):
            self.notes.append(f"{node.op} '{node.name}': {n_out} outputs vs {channels} in the teacher; left as is")
            return None
        batches = paired_batches(self.graph, self.ctx, self.reference, self.data, node.inputs[0].name, y_name)
        if channels == n_out or keep is None:
            return batches
        return ((x, np.take(y, keep, axis=axis)) for x, y in batches)

    def layer(self, node: gs.Node) -> None:
        n_out = out_rows(node, G.weight_of(node)).shape[0]
        batches = self._targets(node, 1 if node.op == "Conv" else -1, n_out)
        if batches is None:
            return
        s = self.settings
        result = refit_layer(self.graph, node, batches, len(self.data), _constraint(self.ctx, node), s.ridge,
                             s.max_rows, s.seed)
        if result is None:
            self.notes.append(f"{node.op} '{node.name}': layout not supported by the refit; left as is")
        else:
            self.fits.append(result)

    def batchnorm(self, node: gs.Node) -> None:
        scale = G.constant_value(node.inputs[1])
        batches = None if scale is None else self._targets(node, 1, len(scale))
        if batches is None:
            return
        result = refit_batchnorm(self.graph, node, batches)
        if result is None:
            self.notes.append(f"BatchNormalization '{node.name}': parameters are not constants; left as is")
        else:
            self.bn_fits.append(result)


def _summary(fits: list[dict], prefix: str) -> dict[str, float]:
    if not fits:
        return {f"{prefix}s_refit": 0}
    return {f"{prefix}s_refit": len(fits),
            f"{prefix}_mse_before": float(np.mean([f["before"] for f in fits])),
            f"{prefix}_mse_after": float(np.mean([f["after"] for f in fits]))}


def _constraint(ctx: Context, node: gs.Node) -> Constraint | None:
    mark = ctx.marks.get(node.name)
    return mark if isinstance(mark, Constraint) else None
