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

import itertools
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import constraints as C, graph as G, weights as W
from .constraints import Constraint
from .correspondence import match_tensors
from .data import SHIFT, Dataset, shifted_copies
from .errors import OptionError
from .layers import conv_geometry, conv_output_hw, tiling_geometry, from_out_rows, gemm_rows, group_slices, out_rows
from .metrics import static_shapes
from .pass_api import Context
from .runtime import Stepper, StepError, capture, capture_session, fixed_batch, iter_outputs, make_session, run_model
from .solvers import NormalEquations, fit_soft_head, solve_depthwise_pair, solve_free, solve_reduced_rank, im2col, tile_rows, soft_targets, softmax, sparsegpt

log = logging.getLogger(__name__)

__all__ = ["Fit", "Skipped", "Head", "HeadFit", "teacher_logits", "reference_model", "paired_batches", "student_activations", "changed_layers",
           "refit_layer", "refit_pair", "joint_pair", "refit_batchnorm", "sequential", "prune_sequential", "find_head", "refit_head", "recover", "RecoverySettings",
           "RecoveryResult", "RECOVERABLE_OPS"]

# Layers the least-squares refit knows how to sample (im2col for Conv, tiles for a ConvTranspose
# with stride = kernel, rows for Gemm/MatMul).
RECOVERABLE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass(frozen=True)
class Fit:
    """A refit's mean squared error on held-out rows, before and after (kept only if lower)."""
    before: float
    after: float


@dataclass(frozen=True)
class Skipped:
    """A layer recovery left as it was, and why."""
    reason: str


# -- data the solvers need ----------------------------------------------------------------------

def _rows(a: np.ndarray) -> np.ndarray:
    """One row per sample, or per time step of a sequence [batch, time, features]."""
    return a.reshape(-1, a.shape[-1]) if a.ndim == 3 else a.reshape(len(a), -1)


def _logits_of(outputs: np.ndarray) -> np.ndarray:
    """Teacher outputs as rows of logits, one per sample (one per time step of a sequence output
    [batch, time, classes]); probabilities (non-negative rows summing to 1) are turned into logs."""
    out = _rows(outputs).astype(np.float64)
    if np.all(out >= 0) and np.allclose(out.sum(1), 1.0, atol=1e-3):
        return np.log(np.clip(out, 1e-12, None))
    return out


def teacher_logits(ctx: Context, data: Dataset) -> list[np.ndarray]:
    """The first output of every teacher on `data`, computed once per run."""
    key = ("teacher-logits", data.fingerprint())
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
    if x_name in data.feeds:  # a graph input: no student run needed (batched as the reference runs them)
        batch_size = fixed_batch(ref_session) or ctx.batch_size
        for batch, ref in zip(data.batches(batch_size), iter_outputs(ref_session, data, batch_size, [y_name])):
            yield batch[x_name], ref[y_name]
        return
    stu_session = capture_session(student, [x_name], ctx.providers)
    for stu, ref in zip(iter_outputs(stu_session, data, ctx.batch_size, [x_name]),
                        iter_outputs(ref_session, data, ctx.batch_size, [y_name])):
        yield stu[x_name], ref[y_name]


def student_activations(graph: gs.Graph, ctx: Context, data: Dataset, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Tensors of the graph as it is now (the student, with earlier refits applied)."""
    fed = {n: data.rows(n) for n in names if n in data.feeds}  # graph inputs need no run
    rest = [n for n in names if n not in fed]
    if rest:
        model = G.to_model(G.tidy(graph.copy()), like=ctx.original)
        fed.update(capture(model, data, rest, ctx.providers, ctx.batch_size))
    return fed


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    return {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}


def changed_layers(graph: gs.Graph, ctx: Context, reference: onnx.ModelProto,
                   mapping: dict[str, str] | None = None) -> list[gs.Node]:
    """Weighted layers (front to back) whose output differs from the reference's matching tensor
    (by name, or through `mapping`: student tensor -> teacher tensor)."""
    ref_graph = G.to_graph(reference)
    ref_by_output = {n.outputs[0].name: n for n in ref_graph.nodes if n.outputs}
    mapping = mapping or {}
    changed = []
    for node in graph.toposort().nodes:
        if not _recoverable(node):
            continue
        ref = ref_by_output.get(mapping.get(node.outputs[0].name, node.outputs[0].name))
        if G.layer_id(node) in ctx.state.constraints or G.layer_id(node) in ctx.state.refit or ref is None or ref.op != node.op or not _same_params(node, ref):
            changed.append(node)
    return changed


def _recoverable(node: gs.Node) -> bool:
    return node.op in RECOVERABLE_OPS and W.layer_weight(node) is not None


def _same_params(a: gs.Node, b: gs.Node) -> bool:
    if len(a.inputs) != len(b.inputs) or a.attrs != b.attrs:
        return False
    for ta, tb in zip(a.inputs[1:], b.inputs[1:]):
        va, vb = W.value_of(ta), W.value_of(tb)
        if (va is None) != (vb is None) or (va is not None and (va.shape != vb.shape or not np.array_equal(va, vb))):
            return False
    return True


# -- layer-wise reconstruction ------------------------------------------------------------------

HOLDOUT = 0.2  # share of calibration rows (or samples, for the head) kept aside to check a refit generalizes
MIN_HELD_OUT = 32  # fewer held-out rows than this cannot tell a real gain from luck: no refit
MIN_HELD_OUT_SAMPLES = 5  # ... nor fewer held-out samples (rows of one image are alike)


def holdout_by_rows(n_samples: int) -> bool:
    """Too few calibration samples to hold whole ones out: hold out rows (positions) instead."""
    return n_samples * HOLDOUT < MIN_HELD_OUT_SAMPLES


def _held_out_draws(rng: np.random.Generator, group: int = 1):
    """take(n): which of the next n samples are held out, batch after batch. HOLDOUT of them, in
    whole groups of `group` adjacent samples (a calibration sample and its shifted copies, which
    would flatter a fit they were split across); group=1 draws one number a sample."""
    left = np.zeros(0, bool)

    def take(n: int) -> np.ndarray:
        nonlocal left
        if len(left) < n:
            left = np.concatenate([left, np.repeat(rng.random(-(-(n - len(left)) // group)) < HOLDOUT, group)])
        out, left = left[:n], left[n:]
        return out
    return take


def _layer_equations(node: gs.Node, w: np.ndarray, batches: Iterable[tuple[np.ndarray, np.ndarray | None]], n_total: int,
                     max_rows: int, rng: np.random.Generator,
                     one_group: bool = False, group: int = 1) -> tuple[list[NormalEquations], list[NormalEquations]] | None:
    """Normal equations per group (one for Gemm/MatMul, or with `one_group`: all a conv's input
    patches against all the targets), streamed over (student input, target) batches: (fit,
    held-out) pairs, HOLDOUT of the rows going to the held-out ones (kept as rows while fewer
    than a Gram matrix would take: they only score candidates, then join the fit). Targets None:
    the inputs' Gram matrices only.

    At most `max_rows` rows in all: conv layers sample output positions per image, Gemm/MatMul rows.
    Samples are held out in groups of `group` (`_held_out_draws`), counted as groups."""
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return None
    geo = conv_geometry(node, w) if node.op == "Conv" else tiling_geometry(node, w) if node.op == "ConvTranspose" else None
    if node.op in ("Conv", "ConvTranspose") and geo is None:
        return None
    eqs: list[NormalEquations] | None = None
    held: list[NormalEquations] | None = None
    held_samples = 0
    by_rows = holdout_by_rows(n_total // group)
    draw = _held_out_draws(rng, group)

    def add(ne: NormalEquations, out: NormalEquations, xs: np.ndarray, ys: np.ndarray, aside: np.ndarray) -> None:
        ne.add(xs[~aside], ys[~aside])
        out.add(xs[aside], ys[aside])

    def aside_rows(per_sample: np.ndarray, repeat: int) -> np.ndarray:
        rows = np.repeat(per_sample, repeat)
        return rng.random(len(rows)) < HOLDOUT if by_rows else rows

    for x, y in batches:
        # Whole samples are held out (rows of one image are alike: holding out rows would flatter the
        # fit); with too few samples for that, rows (positions) are.
        aside_samples = draw(len(x))
        held_samples += len(x) if by_rows else int(aside_samples.sum())
        if geo is None:
            xs = x.reshape(-1, x.shape[-1])
            ys = np.zeros((len(xs), 0), x.dtype) if y is None else y.reshape(-1, y.shape[-1])
            aside = aside_rows(aside_samples, len(xs) // len(x))
            keep = int(np.ceil(max_rows * len(x) / n_total))
            if len(xs) > keep:
                pick = rng.choice(len(xs), keep, replace=False)
                xs, ys, aside = xs[pick], ys[pick], aside[pick]
            eqs = eqs or [NormalEquations(xs.shape[1], ys.shape[1])]
            held = held or [NormalEquations(xs.shape[1], ys.shape[1], lazy=True)]
            add(eqs[0], held[0], xs, ys, aside)
            continue
        n, cin = x.shape[:2]
        tiles = node.op == "ConvTranspose"
        hw = x.shape[2] * x.shape[3] * int(np.prod(geo["kernel"])) if tiles else \
            int(np.prod(conv_output_hw(x.shape[2], x.shape[3], geo)))
        m = 0 if y is None else y.shape[1]
        g = 1 if one_group else geo["group"]
        per_image = int(min(hw, max(1, max_rows // n_total)))
        positions = rng.random((n, hw)).argsort(1)[:, :per_image]
        ys = np.zeros((n * per_image, 0), x.dtype) if y is None else \
            np.take_along_axis(y.reshape(n, m, hw), positions[:, None, :], 2).transpose(0, 2, 1).reshape(-1, m)
        rows = tile_rows(x, geo["kernel"], positions) if tiles else \
            im2col(x, geo["kernel"], geo["strides"], geo["pads"], geo["dilations"], positions)
        aside = aside_rows(aside_samples, per_image)
        cin_g, m_g, k = cin // g, m // g, rows.shape[1] // cin
        eqs = eqs or [NormalEquations(cin_g * k, m_g) for _ in range(g)]
        held = held or [NormalEquations(cin_g * k, m_g, lazy=True) for _ in range(g)]
        for gi, (ne, out) in enumerate(zip(eqs, held)):
            add(ne, out, rows[:, gi * cin_g * k:(gi + 1) * cin_g * k], ys[:, gi * m_g:(gi + 1) * m_g], aside)
    return None if eqs is None else (eqs, held, held_samples // group)


MIN_OBS_COLUMNS = 16   # rows with fewer weights than this keep their magnitude mask in prune_sequential


def sequential(graph: gs.Graph, ctx: Context, data: Dataset,
               visit: dict[int, Callable[[gs.Node, list[np.ndarray] | None], None]],
               max_rows: int = 20000, seed: int = 0, reference: gs.Graph | None = None,
               min_columns: int = MIN_OBS_COLUMNS) -> int:
    """Visit layers front to back on the model as changed so far, in one streamed forward pass:
    `visit[id(node)](node, grams)` gets the Gram matrix of the layer's inputs with a column of
    ones appended ([x, 1]^T [x, 1]: the last row holds the inputs' sums and the row count; one per
    group of a grouped conv; sampled rows, as in refits) and rewrites the layer itself, so that
    later layers see its new outputs; grams is None where the layout is not supported or a row
    holds `min_columns` inputs or fewer (a depthwise conv's 9 taps: too few for GPTQ's or
    SparseGPT's second-order update to pay; a caller that uses the moments otherwise, such as
    factoring's whitening, passes 0).

    With a `reference` graph (the float model, same tensor names), each visited layer is first
    refit (`refit_layer`, held-out check included) from its inputs in the graph as changed so far
    onto the reference's output of the same tensor, so that its weights also compensate what the
    changes upstream did to its inputs. Returns how many layers that refit changed."""
    stepper = Stepper(graph, ctx.original, data, ctx.providers, ctx.batch_size)
    names = [n.outputs[0].name for n in stepper.order if id(n) in visit and n.op in RECOVERABLE_OPS]
    teacher = None if reference is None else Stepper(reference, ctx.original, data, ctx.providers, ctx.batch_size, keep=names)
    rng = np.random.default_rng(seed)
    refit = 0
    for node in list(stepper.order):
        if id(node) not in visit:
            continue
        grams = None
        if node.op in RECOVERABLE_OPS:
            xs = stepper.fetch(node.inputs[0].name)
            if teacher is not None and node.outputs[0].name in teacher.produced_at:
                fit = refit_layer(graph, node, zip(xs, teacher.fetch(node.outputs[0].name)), len(data), max_rows=max_rows,
                                  seed=seed)
                refit += isinstance(fit, Fit) and fit.after < fit.before
            grams = _input_grams(node, xs, len(data), max_rows, rng, min_columns)
        visit[id(node)](node, grams)
    return refit


def _input_grams(node: gs.Node, xs: list[np.ndarray], n_total: int, max_rows: int,
                 rng: np.random.Generator, min_columns: int = MIN_OBS_COLUMNS) -> list[np.ndarray] | None:
    """`sequential`'s Gram matrices of a layer's inputs (fit and held-out rows together), or None.
    Only the Gram matrices outlive this call: the rest of the equations (as large) goes before the
    layer is visited."""
    split = _layer_equations(node, W.layer_weight(node).value, ((x, None) for x in xs), n_total, max_rows, rng)
    if split is None or split[0][0].n_in <= min_columns:
        return None
    return [ne.absorb(out).G for ne, out in zip(*split[:2])]


def mean_shift(rows: np.ndarray, new: np.ndarray, groups: list[tuple[slice, np.ndarray]]) -> np.ndarray:
    """Per output row, how much replacing `rows` by `new` moves the layer's mean output: (W - Q)
    times the inputs' mean, read from each group's Gram matrix of `sequential` (its last row holds
    the inputs' sums and the row count). Bias correction adds it to the bias."""
    return np.concatenate([(rows - new)[part] @ (gram[-1, :-1] / gram[-1, -1]) for part, gram in groups])


def prune_sequential(graph: gs.Graph, ctx: Context, data: Dataset, layers: list[tuple[gs.Node, np.ndarray]],
                     max_rows: int = 20000, seed: int = 0) -> dict[int, np.ndarray]:
    """SparseGPT front to back: each (layer, keep-mask) loses as many weights as its mask drops
    (per group), chosen and compensated by `sparsegpt` on the Gram matrix of the layer's inputs in
    the model as pruned so far. Returns the pruned weight per layer (by node id), in the weight's
    layout, for the caller to write; layers `sequential` gives no Gram get their mask as it is."""
    wanted = {id(node): keep for node, keep in layers}
    pruned: dict[int, np.ndarray] = {}

    def prune(node: gs.Node, grams: list[np.ndarray] | None) -> None:
        keep, s = wanted[id(node)], W.layer_weight(node)
        w = s.value
        if grams is None:
            pruned[id(node)] = np.where(keep, w, 0).astype(w.dtype)
        else:
            rows, drop = out_rows(node, w), ~out_rows(node, keep)
            new = np.concatenate([sparsegpt(rows[part], gram, int(drop[part].sum()))
                                  for part, gram in zip(group_slices(len(rows), len(grams)), grams)])
            pruned[id(node)] = from_out_rows(node, new, w.shape).astype(w.dtype)
        W.write(graph, node, W.LAYERS[node.op].weight, s, pruned[id(node)], refit=False, suffix="_pruned", in_place=True)

    sequential(graph, ctx, data, {k: prune for k in wanted}, max_rows, seed)
    return pruned


def _current(node: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    """The layer's effective [out, fan_in] rows and bias vector (float64), whatever their storage."""
    w = W.layer_weight(node).value
    n_out = out_rows(node, w).shape[0]
    bias = W.layer_bias(node)
    bias = None if bias is None else bias.value
    if node.op == "Gemm":
        eff = gemm_rows(node, w, bias, n_out)
        if eff is not None:
            return eff
    rows = out_rows(node, w).astype(np.float64)
    return rows, (np.zeros(n_out) if bias is None else bias.astype(np.float64).reshape(-1))


def refit_layer(graph: gs.Graph, node: gs.Node, batches: Iterable[tuple[np.ndarray, np.ndarray]], n_total: int,
                constraint: Constraint | None = None, ridge: float = 1e-3, max_rows: int = 20000,
                seed: int = 0, group: int = 1) -> Fit | Skipped:
    """Refit one layer so that layer(x) ~ y over the (x, y) batches, under `constraint` (default:
    what its storage implies), written back in its own storage. The fit is checked on held-out
    rows (HOLDOUT of them), with the storage's rounding included, and kept (refit on all rows)
    only if it lowers their error: a refit with more weights than calibration rows would
    otherwise just memorize them."""
    s = W.layer_weight(node)
    if s is None:
        return Skipped("weights are not constants")
    bias = node.op != "MatMul"
    split = _layer_equations(node, s.value, batches, n_total, max_rows, np.random.default_rng(seed), group=group)
    if split is None:
        return Skipped("layout not supported by the refit")
    eqs, held, held_samples = split
    rows, b = _current(node)
    if held[0].rows < MIN_HELD_OUT or held_samples < MIN_HELD_OUT_SAMPLES:
        return Skipped(f"{held_samples} held-out calibration samples ({held[0].rows} rows) are too few to "
                       f"check a refit (at least {MIN_HELD_OUT_SAMPLES} samples and {MIN_HELD_OUT} rows needed)")
    constraint = constraint or C.infer(node)
    before = _held_error(held, rows, b)
    best = None
    for r in constraint.ridges(ridge):
        new_rows, new_b = constraint.solve_all(eqs, rows, b, r, bias)
        err = _held_error(held, constraint.encoded(node, new_rows), new_b)
        if best is None or err < best[0]:
            best = (err, r)
    n_out = rows.shape[0]
    if best[0] >= before:
        return Fit(before / n_out, before / n_out)
    new_rows, new_b = constraint.solve_all([ne.absorb(out) for ne, out in zip(eqs, held)], rows, b, best[1], bias)
    _write(graph, node, constraint, new_rows, new_b if bias else None)
    return Fit(before / n_out, best[0] / n_out)


def joint_pair(second: gs.Node, first: gs.Node) -> str | None:
    """How a factored pair can be refit together (`refit_pair`), if it can: "lowrank" for a plain
    product of the two weights (a group-1 layer then a 1x1 conv without geometry, or two
    Gemm/MatMul), "depthwise" for a depthwise conv then such a 1x1 conv; both weights dense."""
    if first.op != second.op or any(W.layer_weight(n) is None or W.layer_weight(n).kind != "dense"
                                     or not isinstance(C.infer(n), C.Free) for n in (first, second)):
        return None
    if first.op != "Conv":
        plain = first.op == "MatMul" or not (first.attrs.get("transA", 0) or second.attrs.get("transA", 0))
        return "lowrank" if plain else None
    w1, w2 = W.layer_weight(first).value, W.layer_weight(second).value
    geometry = [v for k in ("strides", "dilations") for v in second.attrs.get(k, ())]
    if not all(v == 1 for v in [*w2.shape[2:], *geometry]) or any(second.attrs.get("pads", ())) \
            or int(second.attrs.get("group", 1)) != 1:
        return None
    group = int(first.attrs.get("group", 1))
    return "lowrank" if group == 1 else "depthwise" if w1.shape[1] == 1 and len(w1) % group == 0 else None


def refit_pair(graph: gs.Graph, second: gs.Node, first: gs.Node, batches: Iterable[tuple[np.ndarray, np.ndarray]],
               n_total: int, ridge: float = 1e-3, max_rows: int = 20000, seed: int = 0, group: int = 1) -> Fit | Skipped:
    """Refit a factored pair (see `joint_pair`) together, from the student's input of `first` onto
    the target of `second`'s output: a low-rank pair by the best map of its rank (reduced-rank
    regression, `solvers.solve_reduced_rank`), a depthwise pair by alternating least squares
    (`solvers.solve_depthwise_pair`). Checked on held-out rows like `refit_layer`, kept only if it
    lowers their error. Refitting only the second factor keeps the first as it was chosen on the
    original's inputs; the joint fit moves it to where the student's inputs need it."""
    kind = joint_pair(second, first)
    split = _layer_equations(first, W.layer_weight(first).value, batches, n_total, max_rows,
                             np.random.default_rng(seed), one_group=True, group=group)
    if split is None:
        return Skipped("layout not supported by the refit")
    (eqs, held, held_samples), n_out = split, W.layer_weight(second).value.shape[0]
    if held[0].rows < MIN_HELD_OUT or held_samples < MIN_HELD_OUT_SAMPLES:
        return Skipped(f"{held_samples} held-out calibration samples ({held[0].rows} rows) are too few to check a refit")
    (a, b), (rows1, _) = _current(second), _current(first)
    bias = second.op != "MatMul"

    def composed(first_rows: np.ndarray, second_rows: np.ndarray) -> np.ndarray:   # the pair as one layer
        if kind == "lowrank":
            return second_rows @ first_rows
        taps = first_rows.shape[1]
        blocks = second_rows.reshape(n_out, -1, len(first_rows) // (eqs[0].n_in // taps))   # [out, I, m]
        return np.einsum("oim,imt->oit", blocks, first_rows.reshape(blocks.shape[1], -1, taps)).reshape(n_out, -1)

    def solve(ne: NormalEquations, r: float, joint: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not joint:             # the second factor alone, from the first's outputs
            return (rows1, *solve_depthwise_pair(ne, rows1, a, r, bias, iters=0)[1:]) if kind == "depthwise" \
                else (rows1, *solve_free(ne.through(rows1.T), r, bias))
        if kind == "lowrank":     # shrunk towards the pair as it is: few rows cannot pull it far
            new_a, new_first, new_b = solve_reduced_rank(ne, len(rows1), r, bias, prior=a @ rows1)
            return new_first, new_a, new_b
        return solve_depthwise_pair(ne, rows1, a, r, bias)

    # Both factors, or the second alone, whichever the held-out rows prefer: with few rows (PP-OCR
    # rec's MatMuls on 32 lines) the joint fit's many weights can fit noise the held-out rows miss.
    before = _held_error(held, composed(rows1, a), b)
    best = None
    for joint in (False, True):
        for r in (ridge, ridge * 10, ridge * 100, ridge * 1000):   # strong ones keep a pair near where it was
            new_first, new_a, new_b = solve(eqs[0], r, joint)
            err = _held_error(held, composed(new_first, new_a), new_b)
            if best is None or err < best[0]:
                best = (err, r, joint)
    if best[0] >= before:
        return Fit(before / n_out, before / n_out)
    new_first, new_a, new_b = solve(eqs[0].absorb(held[0]), best[1], best[2])
    _write(graph, first, C.Free(), new_first, None)
    _write(graph, second, C.Free(), new_a, new_b if bias else None)
    return Fit(before / n_out, best[0] / n_out)


def _held_error(held: list[NormalEquations], rows: np.ndarray, b: np.ndarray) -> float:
    m_g = rows.shape[0] // len(held)
    return float(sum(out.residual(rows[gi * m_g:(gi + 1) * m_g], b[gi * m_g:(gi + 1) * m_g]).sum()
                     for gi, out in enumerate(held)))


def _write(graph: gs.Graph, node: gs.Node, constraint: Constraint, rows: np.ndarray, bias: np.ndarray | None) -> None:
    """Write refit rows (effective: a Gemm's alpha and beta become 1) and bias in their storage."""
    if node.op == "Gemm":
        node.attrs.update(alpha=1.0, beta=1.0)
    constraint.write(graph, node, rows)
    if bias is not None:
        W.write_bias(graph, node, bias)


def refit_batchnorm(graph: gs.Graph, node: gs.Node, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                    seed: int = 0, n_total: int | None = None, group: int = 1) -> Fit | Skipped:
    """Re-estimate an inference BatchNormalization from the student's inputs: per channel, the
    affine map a * x + d that best matches the reference's output (1-D least squares), written back
    as new scale and bias over the node's own mean and variance. Checked on held-out samples like
    `refit_layer`, kept (refit on all samples) only if it lowers their error."""
    params = [W.value_of(t) for t in node.inputs[1:5]]
    if any(p is None for p in params) or len(node.outputs) != 1:
        return Skipped("parameters are not constants")
    scale, beta, mean, var = (p.astype(np.float64) for p in params)
    std = np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    a0, d0 = scale / std, beta - scale * mean / std       # the current map: y = a0 * x + d0
    rng = np.random.default_rng(seed)
    fit, held = np.zeros((6, len(scale))), np.zeros((6, len(scale)))   # n, Sx, Sy, Sxx, Sxy, Syy per channel
    held_samples, by_rows = 0, n_total is not None and holdout_by_rows(n_total // group)
    draw = _held_out_draws(rng, group)
    for x, y in batches:    # whole samples (in groups) held out, or positions when samples are few
        aside = rng.random((len(x),) + x.shape[2:]) < HOLDOUT if by_rows else draw(len(x))
        held_samples += len(x) if by_rows else int(aside.sum())
        fit += _affine_sums(x, y, len(scale), ~aside)
        held += _affine_sums(x, y, len(scale), aside)
    held_samples //= group
    if held_samples < MIN_HELD_OUT_SAMPLES:
        return Skipped(f"{held_samples} held-out calibration samples are too few to check a refit "
                       f"(at least {MIN_HELD_OUT_SAMPLES} needed)")
    a, d = _affine_fit(fit, a0, d0)
    result = Fit(_affine_err(held, a0, d0), min(_affine_err(held, a0, d0), _affine_err(held, a, d)))
    if _affine_err(held, a, d) < _affine_err(held, a0, d0):
        a, d = _affine_fit(fit + held, a0, d0)
        for i, value in ((1, a * std), (2, d + a * mean)):   # in each parameter's own storage
            W.write(graph, node, i, W.stored(node.inputs[i]), value)
    return result


def _affine_sums(x: np.ndarray, y: np.ndarray, c: int, mask: np.ndarray) -> np.ndarray:
    """Per-channel sums over the samples (or positions) where `mask` is set."""
    xc = np.moveaxis(x, 1, -1)[mask].reshape(-1, c).T.astype(np.float64)
    yc = np.moveaxis(y, 1, -1)[mask].reshape(-1, c).T.astype(np.float64)
    return np.stack([np.full(c, xc.shape[1]), xc.sum(1), yc.sum(1), (xc * xc).sum(1), (xc * yc).sum(1), (yc * yc).sum(1)])


def _affine_fit(sums: np.ndarray, a0: np.ndarray, d0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel least squares y ~ a x + d; channels without spread keep (a0, d0)."""
    n, sx, sy, sxx, sxy, _ = sums
    det = n * sxx - sx * sx
    ok = det > 1e-12 * np.maximum(n * sxx, 1e-30)
    a = np.where(ok, (n * sxy - sx * sy) / np.where(ok, det, 1), a0)
    d = np.where(ok, (sy - a * sx) / np.maximum(n, 1), d0)
    return a, d


def _affine_err(sums: np.ndarray, a: np.ndarray, d: np.ndarray) -> float:
    n, sx, sy, sxx, sxy, syy = sums
    return float(np.sum(syy - 2 * a * sxy - 2 * d * sy + a * a * sxx + 2 * a * d * sx + n * d * d) / max(n.sum(), 1))


# -- head ---------------------------------------------------------------------------------------

@dataclass
class Head:
    """The layer that produces the first graph output's logits: a Gemm, or a MatMul with constant
    weights and an optional Add of a constant bias, possibly followed by Softmax/LogSoftmax over the
    classes and per-tensor QuantizeLinear/DequantizeLinear pairs."""
    node: gs.Node
    add: gs.Node | None = None          # MatMul + Add: where the bias lives
    add_index: int = 1

    @property
    def features(self) -> str:
        return self.node.inputs[0].name


_AFTER_HEAD = ("Softmax", "LogSoftmax", "QuantizeLinear", "DequantizeLinear", "Identity")


def find_head(graph: gs.Graph) -> Head | None:
    """The head of the first graph output, if it has one a refit can handle."""
    node = G.producer(graph.outputs[0])
    while node is not None and node.op in _AFTER_HEAD and _last_axis_only(node):
        node = G.producer(node.inputs[0])
    add = None
    if node is not None and node.op == "Add":
        add, node = node, next((G.producer(t) for t in node.inputs if W.value_of(t) is None), None)
    if node is None or W.layer_weight(node) is None or node.op not in ("Gemm", "MatMul"):
        return None
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or add is not None):
        return None
    if add is None:
        return Head(node)
    index = next((i for i, t in enumerate(add.inputs) if W.value_of(t) is not None), None)
    bias = W.value_of(add.inputs[index]) if index is not None else None
    n_out = out_rows(node, W.layer_weight(node).value).shape[0]
    if bias is None or bias.size != n_out:
        return None
    return Head(node, add, index)


def _last_axis_only(node: gs.Node) -> bool:
    """A softmax over the last (class) axis, or a per-tensor Q/DQ: the head's logits pass through."""
    if node.op in ("Softmax", "LogSoftmax"):
        return int(node.attrs.get("axis", -1)) == -1 or node.outputs[0].shape is not None and \
            int(node.attrs.get("axis", -1)) == len(node.outputs[0].shape) - 1
    if node.op in ("QuantizeLinear", "DequantizeLinear"):
        scale = W.value_of(node.inputs[1])
        return scale is not None and scale.size == 1
    return True


@dataclass(frozen=True)
class HeadFit:
    """Top-1 agreement with the teachers on held-out samples, before and after the head refit."""
    agreement_before: float
    agreement_after: float


def refit_head(graph: gs.Graph, head: Head, features: np.ndarray, targets: np.ndarray, temperature: float,
               alpha: float = 0.0, labels: np.ndarray | None = None, constraint: Constraint | None = None,
               seed: int = 0, group: int = 1) -> HeadFit | Skipped:
    """Refit the classifier head on soft targets (warm start from its weights), one row per sample,
    or per time step of a sequence. The fit is checked on held-out rows (HOLDOUT of them, in whole
    groups of `group` adjacent rows: a sample and its shifted copies), with the storage's rounding
    included: kept, refit on all rows, only if it lowers their soft cross-entropy without lowering
    their top-1 agreement."""
    rows, b = _current(head.node)
    if head.add is not None:
        b = b + W.value_of(head.add.inputs[head.add_index]).astype(np.float64).reshape(-1)
    constraint = constraint or C.infer(head.node)
    if isinstance(constraint, (C.SharedCodebook, C.ChannelScales)):
        return Skipped(f"a head with {type(constraint).__name__} weights is refit layer-wise only")
    H = _rows(features).astype(np.float64)
    if len(H) != len(targets):
        return Skipped(f"{len(H)} feature rows for {len(targets)} target rows")
    labels = labels if labels is not None and len(labels) == len(H) else None
    alpha = alpha if labels is not None else 0.0   # no per-row labels (a sequence): soft targets only
    aside = _held_out_draws(np.random.default_rng(seed), group)(len(H))
    need = max(MIN_HELD_OUT, int(np.ceil(2 * (H.shape[1] + 1) / (1 - HOLDOUT) * HOLDOUT)))
    if len(H) // group < 2 * (H.shape[1] + 1) or aside.sum() // group < MIN_HELD_OUT:  # it would memorize, or luck would decide
        return Skipped(f"{len(H) // group} calibration samples are too few to refit a head of {H.shape[1]} "
                       f"features (at least {max(2 * (H.shape[1] + 1), int(need / HOLDOUT))} needed)")
    mask = constraint.head_mask(rows.shape)
    has_bias = head.node.op == "Gemm" or head.add is not None
    fit = lambda idx, W0, b0: fit_soft_head(H[idx], targets[idx], temperature, alpha,
                                            None if labels is None else labels[idx], W0=W0, b0=b0, mask=mask,
                                            fit_bias=has_bias)
    Wn, bn = fit(~aside, rows, b)
    Wq = constraint.encoded(head.node, Wn)
    held_ce = lambda W_, b_: -float(np.sum(targets[aside] * np.log(softmax(H[aside] @ W_.T + b_, temperature) + 1e-300)))
    agree = lambda W_, b_: float(np.mean((H[aside] @ W_.T + b_).argmax(1) == targets[aside].argmax(1)) * 100)
    if held_ce(Wq, bn) < held_ce(rows, b) and agree(Wq, bn) >= agree(rows, b):
        result = HeadFit(agree(rows, b), agree(Wq, bn))
        Wn, bn = fit(slice(None), Wn, bn)
        _write_head(graph, head, constraint, Wn, bn)
        return result
    return HeadFit(agree(rows, b), agree(rows, b))


def _write_head(graph: gs.Graph, head: Head, constraint: Constraint, rows: np.ndarray, b: np.ndarray) -> None:
    """A head's new weights, and its bias where it lives (the Gemm, or the Add after a MatMul)."""
    if head.add is None:
        _write(graph, head.node, constraint, rows, b if head.node.op == "Gemm" else None)
        return
    _write(graph, head.node, constraint, rows, None)
    old = W.stored(head.add.inputs[head.add_index])
    W.write(graph, head.add, head.add_index, old, b.reshape(old.value.shape))


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
    shifts: int = 0                # shifted copies of each calibration image fit on too (`data.shifted_copies`)


@dataclass
class RecoveryResult:
    modified: bool
    stats: dict[str, float]
    notes: list[str]


def recover(graph: gs.Graph, ctx: Context, data: Dataset, settings: RecoverySettings) -> RecoveryResult:
    """Front to back: refit changed weighted layers and the BatchNormalizations after them on the
    teacher's features, then the head on soft targets. Channels an earlier pass removed are mapped
    through `ctx.state.channel_maps`, so a pruned layer is fit to the teacher's kept channels.

    With `settings.shifts`, every fit sees each calibration image and that many copies moved by up
    to SHIFT pixels, the teachers' outputs on them as targets (no labels needed): more of what the
    teacher does for the same calibration set. A sample and its copies are held out together."""
    if settings.alpha > 0 and data.labels is None:
        raise OptionError("distillation with alpha > 0 needs labels in the calibration data")
    group, notes = 1, []
    if settings.shifts:   # made once per run for each data, seed and count (searches recover many times)
        key = ("shifted-copies", data.fingerprint(), settings.shifts, settings.seed)
        if key not in ctx.cache:
            ctx.cache[key] = shifted_copies(data, settings.shifts, settings.seed)
        more = ctx.cache[key]
        if more is None:
            notes.append("no image input to shift (a float input of rank 4, larger than "
                         f"{2 * SHIFT + 1} pixels a side): recovered on the calibration data as is")
        else:
            data, group = more, settings.shifts + 1
    head = find_head(graph) if settings.head else None
    # the teachers' outputs first: a whole-model session costs least before the walk holds activations
    # (25M Transformer prune-channels: 822 MB of RSS while they ran after it)
    probs = ensemble_targets(ctx, data, settings.temperature) if head is not None else None
    reference = reference_model(ctx, graph)
    mapping = match_tensors(G.to_model(G.tidy(graph.copy()), like=ctx.original), reference)
    walk = _Walk(graph, ctx, data, reference, static_shapes(reference), settings, mapping, group=group, notes=notes)
    targets = {id(n) for n in changed_layers(graph, ctx, reference, mapping)} if settings.layers == "changed" else None
    walk.start(targets)
    dirty = False  # once a layer changed, everything after it sees different inputs
    for node in list(graph.toposort().nodes):
        if _recoverable(node) and (targets is None or id(node) in targets):
            dirty = True
            walk.layer(node)
        elif node.op == "BatchNormalization" and dirty and settings.bn:
            walk.batchnorm(node)
    stats = _summary(walk.fits, "layer") | _summary(walk.bn_fits, "bn")
    if settings.head and head is None:
        walk.notes.append("the first output is not made by a Gemm or a MatMul (+ Add) with constant weights "
                          "(optionally followed by Softmax): head refit skipped")
    if head is not None:
        feats = walk.student_tensor(head.features)
        rows_per_group = group * (len(_rows(feats)) // len(data)) if group > 1 else 1
        result = refit_head(graph, head, feats, probs, settings.temperature, settings.alpha, data.labels,
                            _constraint(ctx, head.node), settings.seed, rows_per_group)
        if isinstance(result, Skipped):
            walk.notes.append(f"head '{G.display_name(head.node)}' left as is: {result.reason}")
        else:
            stats.update(head_agreement_before=result.agreement_before, head_agreement_after=result.agreement_after)
    return RecoveryResult(bool(walk.fits or walk.bn_fits or "head_agreement_after" in stats), stats, walk.notes)


@dataclass
class _Walk:
    graph: gs.Graph
    ctx: Context
    data: Dataset
    reference: onnx.ModelProto
    shapes: dict[str, list[int]]
    settings: RecoverySettings
    mapping: dict[str, str] = field(default_factory=dict)   # student tensor -> the teacher's (by structure)
    group: int = 1         # adjacent samples held out together (a calibration image and its shifted copies)
    fits: list[Fit] = field(default_factory=list)
    bn_fits: list[Fit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    student: Stepper | None = None     # activations streamed front to back (None: prefix runs per layer)
    teacher: Stepper | None = None

    def start(self, targets: set[int] | None) -> None:
        """Stream the student's and the reference's activations: one forward pass each in all."""
        ctx, bs = self.ctx, self.ctx.batch_size
        nodes = list(self.graph.toposort().nodes)
        layers = [i for i, n in enumerate(nodes) if _recoverable(n) and (targets is None or id(n) in targets)]
        # the teacher holds the tensors refits will ask for: targeted layers, and BatchNorms after the first
        first, chosen = (layers[0] if layers else len(nodes)), set(layers)
        wanted = {self.mapping.get(n.outputs[0].name) for i, n in enumerate(nodes)
                  if i in chosen or (n.op == "BatchNormalization" and i > first)}
        self.student = Stepper(self.graph, ctx.original, self.data, ctx.providers, bs)
        self.teacher = Stepper(G.to_graph(self.reference), self.reference, self.data, ctx.providers, bs,
                               keep=wanted - {None})

    def student_tensor(self, name: str) -> np.ndarray:
        if self.student is not None:
            try:
                return np.concatenate(self.student.fetch(name))
            except StepError as e:
                log.debug("streaming capture stopped: %s", e)
                self.student = None
        return student_activations(self.graph, self.ctx, self.data, [name])[name]

    def _pairs(self, x_name: str, t_name: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(student input, teacher output) batches, streamed when the steppers can, else by prefix runs."""
        if self.student is not None and self.teacher is not None:
            try:
                return iter(list(zip(self.student.fetch(x_name), self.teacher.fetch(t_name))))
            except StepError as e:
                log.debug("streaming capture stopped: %s", e)
                self.student = self.teacher = None
        return paired_batches(self.graph, self.ctx, self.reference, self.data, x_name, t_name)

    def _targets(self, node: gs.Node, axis: int, n_out: int,
                 x_name: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]] | None:
        """(student input, teacher output) batches for a node (the input: `x_name`, default the
        node's own), mapped to its kept channels; None
        (with a note) when the teacher has no matching tensor. The teacher's channel count comes
        from shape inference, or from its first batch where inference cannot tell (dynamic shapes)."""
        y_name = node.outputs[0].name
        t_name = self.mapping.get(y_name)
        if t_name is None and G.layer_id(node) in self.ctx.state.pairs.values():
            if not any(self._first_of_pair(n) is node for n in node.outputs[0].outputs):   # else refit with its second
                self.notes.append(f"{node.op} '{G.display_name(node)}': first of a factored pair, fixed; the second "
                                  "is refit onto the teacher's output of the pair")
            return None
        if t_name is None:
            self.notes.append(f"{node.op} '{G.display_name(node)}': the teacher has no tensor named '{y_name}' nor "
                              "one computed the same way; left as is")
            return None
        batches = self._pairs(x_name or node.inputs[0].name, t_name)
        shape = self.shapes.get(t_name)
        if shape is None or len(shape) <= axis % max(len(shape), 1) or shape[axis] <= 0:
            first = next(batches, None)
            if first is None:
                return None
            shape, batches = list(first[1].shape), itertools.chain([first], batches)
        channels = shape[axis]
        keep = None if channels == n_out else self.ctx.target_channels(y_name, channels, n_out)
        if channels != n_out and keep is None:
            self.notes.append(f"{node.op} '{G.display_name(node)}': {n_out} outputs vs {channels} in the teacher; "
                              "left as is")
            return None
        if keep is None:
            return batches
        return ((x, np.take(y, keep, axis=axis)) for x, y in batches)

    def layer(self, node: gs.Node) -> None:
        n_out = out_rows(node, W.layer_weight(node).value).shape[0]
        first = self._first_of_pair(node)
        batches = self._targets(node, 1 if node.op in ("Conv", "ConvTranspose") else -1, n_out,
                                None if first is None else first.inputs[0].name)
        if batches is None:
            return
        s = self.settings
        if first is not None:
            result = refit_pair(self.graph, node, first, batches, len(self.data), s.ridge, s.max_rows, s.seed,
                                self.group)
        else:
            result = refit_layer(self.graph, node, batches, len(self.data), _constraint(self.ctx, node), s.ridge,
                                 s.max_rows, s.seed, self.group)
        self._record(node, result, self.fits)

    def _first_of_pair(self, node: gs.Node) -> gs.Node | None:
        """The first factor of the pair `node` ends, when the two can be refit together."""
        lid = self.ctx.state.pairs.get(G.layer_id(node))
        first = next((n for n in self.graph.nodes if G.layer_id(n) == lid), None) if lid else None
        ok = first is not None and node.inputs[0] is first.outputs[0] and len(first.outputs[0].outputs) == 1
        return first if ok and joint_pair(node, first) and _constraint(self.ctx, node) is None else None

    def batchnorm(self, node: gs.Node) -> None:
        scale = W.value_of(node.inputs[1])
        batches = None if scale is None else self._targets(node, 1, len(scale))
        if batches is None:
            return
        result = refit_batchnorm(self.graph, node, batches, self.settings.seed, len(self.data), self.group)
        self._record(node, result, self.bn_fits)

    def _record(self, node: gs.Node, result: Fit | Skipped, fits: list[Fit]) -> None:
        if isinstance(result, Skipped):
            self.notes.append(f"{node.op} '{G.display_name(node)}' left as is: {result.reason}")
        else:
            fits.append(result)


def _summary(fits: list[Fit], prefix: str) -> dict[str, float]:
    if not fits:
        return {f"{prefix}s_refit": 0}
    return {f"{prefix}s_refit": len(fits),
            f"{prefix}_mse_before": float(np.mean([f.before for f in fits])),
            f"{prefix}_mse_after": float(np.mean([f.after for f in fits]))}


def _constraint(ctx: Context, node: gs.Node) -> Constraint | None:
    """The constraint a pass recorded for this layer in the run state, if any (and if it still
    fits the layer: a later pass may have cut it)."""
    c = ctx.state.constraints.get(G.layer_id(node))
    return c if c is not None and c.fits(out_rows(node, W.layer_weight(node).value).shape) else None
