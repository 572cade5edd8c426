"""early-exit: one exit head mid-network, so that confident inputs stop there and onnxruntime
really skips the rest.

The exit reads a cut tensor (the only thing the rest of the network needs from the part before
it): GlobalAveragePool -> Flatten -> Gemm, distilled from the model's own logits on soft targets.
An `If` on the head's confidence returns the head's logits, or runs the rest of the network in its
else-branch. Confidence is the largest softmax probability, and a batch exits only when every
sample in it is confident (an If takes one condition per run): at batch 1 each input decides
alone; in a larger batch one doubtful sample sends the whole batch through the full model.

The head is fit on the first two thirds of the calibration data; on the last third, thresholds are
swept and the one saving the most expected MACs is kept whose drop (accuracy with labels, else
top-1 agreement, at batch 1) plus `margin` standard errors stays within the budget: the margin
guards against picking a threshold that only looked cheap on a few hundred samples. The threshold
is a graph input "exit_threshold" with that value as its initializer, so a deployer can override
it per call; the optional output "exit_index" says which part answered.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress import exits as X, graph as G
from onnxcompress.errors import OptionError
from onnxcompress.metrics import macs_breakdown, static_shapes
from onnxcompress.pass_api import Context, Pass, PassResult
from onnxcompress.solvers import fit_soft_head, soft_targets

THRESHOLD_INPUT, INDEX_OUTPUT = "exit_threshold", "exit_index"


@dataclass
class Site:
    """Where the exit goes, and what it costs at batch 1."""
    cut: X.Cut
    output: gs.Variable
    model: onnx.ModelProto   # the graph as it was, exported
    exit_macs: int           # the first part
    full_macs: int


@dataclass
class EarlyExit(Pass):
    """Add one exit head mid-network: confident inputs skip the rest (an If that onnxruntime skips)."""

    name = "early-exit"
    handles = frozenset({"Conv"})           # the exit reads a conv stage's [N, C, H, W] activation
    at: str | None = None                   # the tensor after which the exit goes; None: about half the MACs
    threshold: float | None = None          # None: the cheapest within max_drop on held-out calibration data
    max_drop: float | None = None           # points; None: the run's --max-drop, else 1
    margin: float = 1.0                     # standard errors of the held-out drop added before the budget test
    temperature: float = 4.0                # of the soft targets the head is fit to
    exit_output: bool = True                # an extra int64 [1] output "exit_index": 0 exit, 1 full model

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError("threshold must be in [0, 1]")
        if self.max_drop is not None and self.max_drop < 0:
            raise ValueError("max_drop must not be negative")
        if self.margin < 0:
            raise ValueError("margin must not be negative")

    def required_opset(self) -> int:
        return 13   # Softmax over one axis, GreaterOrEqual

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        try:
            site = self._site(graph, ctx)
        except X.CannotBranch as e:
            return PassResult(graph, False, {}, [f"left as is: {e}"])
        data = ctx.require_calib(self.name)
        if len(data) < 3:
            return PassResult(graph, False, {}, ["left as is: needs at least 3 calibration samples"])
        H, logits = X.pooled_features(site.model, data, site.cut.tensor.name, site.output.name, ctx.providers,
                                      ctx.batch_size)
        n_fit = len(data) - len(data) // 3      # fit on the first two thirds, calibrate on the rest
        weight, bias = fit_soft_head(H[:n_fit], soft_targets([logits[:n_fit]], self.temperature), self.temperature)
        head = H[n_fit:] @ weight.T + bias
        labels = None if data.labels is None else data.labels[n_fit:]
        chosen, rows, stats = self._calibrate(site, head, logits[n_fit:], labels, weight.size, ctx)
        metric = "accuracy" if labels is not None else "top-1 agreement"
        notes = [X.sweep_table(rows, metric, None if chosen is None else chosen.threshold)]
        if chosen is None:
            return PassResult(graph, False, stats, [f"left as is: no threshold keeps {metric} within "
                                                    f"{stats['max_drop']} points ({self.margin:g} standard "
                                                    "errors included) and saves MACs", *notes])
        self._insert(graph, site, weight, bias, chosen.threshold)
        ctx.state.branch_probs[site.output.name] = chosen.exit_share
        stats.update(threshold=chosen.threshold, exit_share=chosen.exit_share, expected_macs_ratio=chosen.macs_ratio,
                     holdout_drop=chosen.drop, holdout_drop_error=chosen.error, rest_nodes=len(site.cut.rest))
        summary = (f"exit after '{site.cut.tensor.name}' ({stats['cut_macs_share']:.0%} of the MACs), threshold "
                   f"{chosen.threshold:g}: {chosen.exit_share:.0%} of held-out samples exit at batch 1, expected MACs "
                   f"{chosen.macs_ratio:.2f}x, {metric} drop {chosen.drop:.2f} +- {chosen.error:.2f} points; a batch "
                   "exits only when every sample in it is confident")
        return PassResult(graph, True, stats, [summary, *notes])

    def _site(self, graph: gs.Graph, ctx: Context) -> Site:
        """Where the exit goes; raises CannotBranch naming why the model cannot take one."""
        taken = {THRESHOLD_INPUT, *([INDEX_OUTPUT] if self.exit_output else [])} & set(graph.tensors())
        if taken:
            raise X.CannotBranch(f"the graph already has a tensor named {', '.join(sorted(taken))} "
                                 "(one exit per model)")
        if len(graph.outputs) != 1:
            raise X.CannotBranch(f"the model has {len(graph.outputs)} outputs; an exit needs a "
                                 "single-output classifier")
        model = G.to_model(G.tidy(graph.copy()), like=ctx.original)
        shapes = static_shapes(model)
        out = graph.outputs[0]
        shape = shapes.get(out.name) or []
        if len(shape) != 2 or shape[1] < 2 or out.dtype is None or np.dtype(out.dtype).kind != "f":
            raise X.CannotBranch(f"the output '{out.name}' is not [N, classes] float logits (shape {shape})")
        macs = {d.output: d.macs or 0 for d in macs_breakdown(model)}
        if self.at is None:
            cut, _ = X.auto_cut(graph, shapes, macs)
        elif self.at not in graph.tensors():
            raise OptionError(f"{self.name}: at='{self.at}' names no tensor of the graph")
        else:
            cut = X.cut_at(graph, self.at)
            if len(shapes.get(self.at) or ()) != 4:
                raise X.CannotBranch(f"'{self.at}' is not a 4-D activation [N, C, H, W] "
                                     f"(shape {shapes.get(self.at)})")
        first = sum(macs.get(G.layer_id(n), 0) for n in cut.first)
        return Site(cut, out, model, first, sum(macs.values()))

    def _calibrate(self, site: Site, head: np.ndarray, full: np.ndarray, labels: np.ndarray | None, head_macs: int,
                   ctx: Context) -> tuple[X.SweepRow | None, list[X.SweepRow], dict]:
        """The sweep over thresholds on the held-out samples, the chosen row, and the stats."""
        budget = self.max_drop if self.max_drop is not None else ctx.max_drop if ctx.max_drop is not None else 1.0
        grid = sorted({*X.THRESHOLDS, *([self.threshold] if self.threshold is not None else [])})
        rows = X.sweep(head, full, labels, site.exit_macs + head_macs, site.full_macs, head_macs, grid)
        given = [r for r in rows if r.threshold == self.threshold]
        chosen = X.choose(rows, budget, self.margin) if self.threshold is None else given[0]
        stats = {"exit_after": site.cut.tensor.name, "cut_macs_share": site.exit_macs / max(site.full_macs, 1),
                 "max_drop": budget, "holdout_samples": len(head),
                 "head_agreement": float(np.mean(head.argmax(1) == full.argmax(1)) * 100),
                 "sweep": [dataclasses.asdict(r) for r in rows]}
        return chosen, rows, stats

    def _insert(self, graph: gs.Graph, site: Site, weight: np.ndarray, bias: np.ndarray, threshold: float) -> gs.Node:
        """The head and the If at the cut; the rest of the graph moves into the If's else-branch."""
        out, dtype = site.output, np.dtype(site.output.dtype)
        inner = X.detach_output(graph, out)
        logits = X.add_head(graph, site.cut.tensor, weight, bias, dtype)
        limit = X.add_override(graph, THRESHOLD_INPUT, np.array(threshold, dtype))
        then_values, else_values, outputs = [logits], [inner], [out]
        if self.exit_output:
            index = gs.Variable(INDEX_OUTPUT, np.int64, [1])
            graph.outputs.append(index)
            then_values.append(G.make_constant(G.unique_name(graph, "exit_index_head"), np.array([0], np.int64)))
            else_values.append(G.make_constant(G.unique_name(graph, "exit_index_full"), np.array([1], np.int64)))
            outputs.append(index)
        return X.branch(graph, X.confident(graph, logits, limit), then_values, site.cut.rest, else_values, outputs)
