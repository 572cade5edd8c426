"""distill: recover accuracy lost by compression, without backprop, by distilling from the teacher.

Front to back, every weighted layer that differs from the teacher (or that an earlier pass marked)
is refit by constrained least squares from the student's own inputs onto the teacher's output of
the same tensor; BatchNormalization nodes after a change are re-estimated the same way; then the
classifier head is refit on the teachers' temperature-softened probabilities (`onnxcompress.recovery`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress import graph as G
from onnxcompress.errors import OptionError
from onnxcompress.layers import out_rows
from onnxcompress.metrics import static_shapes
from onnxcompress.pass_api import Context, Pass, PassResult
from onnxcompress.recovery import (RECOVERABLE_OPS, Constraint, changed_layers, ensemble_targets, find_head,
                                   paired_batches, reference_model, refit_batchnorm, refit_head, refit_layer,
                                   student_activations)


@dataclass
class Distill(Pass):
    """Refit changed layers by least squares on the teacher's features, then the head on soft targets."""

    name = "distill"
    handles = RECOVERABLE_OPS | {"BatchNormalization"}
    temperature: float | None = None        # default: the run's --temperature (4)
    alpha: float | None = None              # weight of hard labels; default: the run's --alpha (0)
    layers: Literal["changed", "all"] = "changed"
    head: bool = True
    bn: bool = True                         # re-estimate BatchNormalization after changed layers
    ridge: float = 1e-3                     # relative to the mean input energy
    max_rows: int = 20000                   # sampled rows (conv positions) per layer
    samples: int | None = None              # calibration samples to use (default: all)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ValueError("alpha must be in [0, 1]")
        if self.max_rows < 1 or (self.samples is not None and self.samples < 1):
            raise ValueError("max_rows and samples must be positive")

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        data = ctx.require_calib(self.name)
        data = data.take(self.samples) if self.samples else data
        temperature = self.temperature or ctx.temperature
        alpha = ctx.alpha if self.alpha is None else self.alpha
        if alpha > 0 and data.labels is None:
            raise OptionError(f"{self.name}: alpha > 0 needs labels in the calibration data")
        reference = reference_model(ctx, graph)
        shapes = static_shapes(reference)
        targets = {id(n) for n in changed_layers(graph, ctx, reference)} if self.layers == "changed" else None
        notes, fits, bn_fits = [], [], []
        dirty = False  # once a layer changed, everything after it sees different inputs
        for node in list(graph.toposort().nodes):
            if node.op in RECOVERABLE_OPS and G.weight_of(node) is not None and (targets is None or id(node) in targets):
                dirty = True
                note = self._refit(graph, node, ctx, data, reference, shapes, fits)
            elif node.op == "BatchNormalization" and dirty and self.bn:
                note = self._refit_bn(graph, node, ctx, data, reference, shapes, bn_fits)
            else:
                continue
            if note:
                notes.append(note)
        stats = _summary(fits, "layer") | _summary(bn_fits, "bn")
        head = find_head(graph) if self.head else None
        if self.head and head is None:
            notes.append("no Gemm produces the first output directly: head refit skipped")
        if head is not None:
            probs = ensemble_targets(ctx, data, temperature)
            feats = student_activations(graph, ctx, data, [head.inputs[0].name])[head.inputs[0].name]
            result = refit_head(graph, head, feats, probs, temperature, alpha, data.labels, _constraint(ctx, head))
            stats.update({f"head_{k}": v for k, v in result.items()})
        return PassResult(graph, bool(fits or bn_fits or head is not None), stats, notes)

    def _match(self, node: gs.Node, reference, shapes, axis: int, n_out: int) -> str | None:
        y_name = node.outputs[0].name
        if y_name not in shapes and y_name not in {o for n in reference.graph.node for o in n.output}:
            return f"{node.op} '{node.name}': the teacher has no tensor '{y_name}' to match; left as is"
        shape = shapes.get(y_name)
        channels = shape[axis] if shape else -1
        if channels > 0 and channels != n_out:
            return f"{node.op} '{node.name}': {n_out} outputs vs {channels} in the teacher; left as is"
        return None

    def _refit(self, graph, node, ctx, data, reference, shapes, fits) -> str | None:
        n_out = out_rows(node, G.weight_of(node)).shape[0]
        note = self._match(node, reference, shapes, 1 if node.op == "Conv" else -1, n_out)
        if note:
            return note
        batches = paired_batches(graph, ctx, reference, data, node.inputs[0].name, node.outputs[0].name)
        result = refit_layer(graph, node, batches, len(data), _constraint(ctx, node), self.ridge, self.max_rows,
                             self.seed)
        if result is None:
            return f"{node.op} '{node.name}': layout not supported by the refit; left as is"
        fits.append(result)
        return None

    def _refit_bn(self, graph, node, ctx, data, reference, shapes, fits) -> str | None:
        scale = G.constant_value(node.inputs[1])
        note = self._match(node, reference, shapes, 1, -1 if scale is None else len(scale))
        if note:
            return note
        batches = paired_batches(graph, ctx, reference, data, node.inputs[0].name, node.outputs[0].name)
        result = refit_batchnorm(graph, node, batches)
        if result is None:
            return f"BatchNormalization '{node.name}': parameters are not constants; left as is"
        fits.append(result)
        return None


def _summary(fits: list[dict], prefix: str) -> dict[str, float]:
    if not fits:
        return {f"{prefix}s_refit": 0}
    return {f"{prefix}s_refit": len(fits),
            f"{prefix}_mse_before": float(np.mean([f["before"] for f in fits])),
            f"{prefix}_mse_after": float(np.mean([f["after"] for f in fits]))}


def _constraint(ctx: Context, node: gs.Node) -> Constraint | None:
    mark = ctx.marks.get(node.name)
    return mark if isinstance(mark, Constraint) else None
