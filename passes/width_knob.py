"""width-knob: one file that runs at several widths (shares of every channel group's channels kept),
chosen per call by an optional float input (`width`, default 1.0). Each narrower width is the model
`prune-channels(ratio=1 - width)` builds with the same options, pruned and recovered on its own;
the variants sit in a chain of `If`s (`exits.branch`), so onnxruntime runs only the chosen one.

Which width runs: the narrowest configured width at least the one fed; the widest when none is
(1.0 and above run the full model; below the narrowest width, the narrowest runs).

Why an If over separate variants and not one set of weights sliced at run time (each narrower
model a prefix of the wider one, the file barely bigger than the original): onnxruntime picks its
blocked (NCHWc) Conv kernels and pre-packs the weights when the session starts, for constant weights
only, and a weight Sliced by a run-time width is not constant (the prototype folds BatchNorm first,
so that is not the difference). Measured at batch 1 on one thread (500 digits, interleaved, median of 5
rounds; `benchmarks/width.py` has the prototype), latency over the original's at widths 1 / 0.75 /
0.5: ResNet, If chain 1.02 / 0.90 / 0.62x (the pruned models alone 0.85 / 0.57x), sliced weights
2.02 / 1.85 / 1.33x; VGG, If chain 1.06 / 0.76 / 0.38x (alone 0.77 / 0.34x), sliced 1.73 / 1.45 /
0.70x. The If chain's price is the file: every width's weights are stored (ResNet 2.0x, VGG 1.9x
the original; one sliced set 1.2x and 1.0x).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress import exits as X, graph as G
from onnxcompress.channels import RULES
from onnxcompress.importance import DATA_CRITERIA
from onnxcompress.metrics import total_macs
from onnxcompress.pass_api import Context, Pass, PassResult

from .prune_channels import Criterion, PruneChannels

__all__ = ["WidthKnob", "chosen_width"]


def chosen_width(widths: tuple[float, ...], asked: float) -> float:
    """The width that runs when `asked` is fed: the narrowest of `widths` at least `asked`, else the widest."""
    wide_enough = [w for w in widths if w >= asked]
    return min(wide_enough) if wide_enough else max(widths)


@dataclass
class WidthKnob(Pass):
    """One model at several widths, chosen per call by an optional input (an If over pruned variants)."""

    name = "width-knob"
    handles = frozenset(RULES)
    widths: tuple[float, ...] = (1.0, 0.75, 0.5)   # shares of each group's channels kept, one variant each
    input_name: str = "width"                       # the optional float scalar input (default 1.0)
    # passed to prune-channels for every width below 1 (see that pass)
    criterion: Criterion | None = None
    steps: int = 1
    recover: bool = True
    round_to: int | Literal["auto"] = "auto"
    min_channels: int = 1
    exclude: tuple[str, ...] = ()
    scope: Literal["layer", "global"] = "layer"
    samples: int | None = None

    def __post_init__(self) -> None:
        if len(self.widths) < 2:
            raise ValueError("widths needs at least two widths")
        bad = [w for w in self.widths if not 0.0 < w <= 1.0]
        if bad:
            raise ValueError(f"widths must be in (0, 1], got {bad[0]}")
        if len(set(self.widths)) != len(self.widths):
            raise ValueError(f"widths must be distinct, got {list(self.widths)}")
        if not self.input_name:
            raise ValueError("input_name must not be empty")
        self.pruner(min(self.widths))   # prune-channels checks its own options

    def pruner(self, width: float) -> PruneChannels:
        """The prune-channels pass that builds the variant of `width` (< 1)."""
        return PruneChannels(ratio=1.0 - width, criterion=self.criterion, steps=self.steps, recover=self.recover,
                             round_to=self.round_to, min_channels=self.min_channels, exclude=self.exclude,
                             scope=self.scope, samples=self.samples)

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        why = self._refusal(graph, ctx)
        if why:
            return PassResult(graph, False, {}, [f"left as is: {why}"])
        model = G.to_model(G.tidy(graph.copy()), like=ctx.original)
        pins = None if ctx.calib is None else ctx.calib.feed_shapes()
        full_macs = max(total_macs(model, pins), 1)
        variants, stats, notes = [], {"widths": sorted(self.widths, reverse=True)}, []
        for w in sorted(self.widths, reverse=True):
            if w == 1.0:
                variants.append((w, None))
                stats["macs_ratio_1"] = 1.0
                continue
            pruned = G.to_graph(model)
            result = self.pruner(w).run(pruned, dataclasses.replace(ctx, state=ctx.state.snapshot()))
            if not result.modified:
                return PassResult(graph, False, {}, [f"left as is: at width {w:g} prune-channels removes no channel",
                                                     *result.notes])
            G.tidy(pruned)
            stats[f"macs_ratio_{w:g}"] = total_macs(G.to_model(pruned, like=model), pins) / full_macs
            stats[f"channels_{w:g}"] = result.stats.get("channels_after")
            notes += [f"width {w:g}: {n}" for n in result.notes if not any(n in seen for seen in notes)]
            variants.append((w, pruned))
        self._assemble(graph, variants)
        macs = ", ".join(f"{w:g}: {stats[f'macs_ratio_{w:g}']:.2f}x" for w, _ in variants)
        summary = (f"widths {', '.join(f'{w:g}' for w, _ in variants)} in one If chain; the optional float input "
                   f"'{self.input_name}' (default 1) runs the narrowest width at least the one fed (the widest "
                   f"when none is); MACs {macs}. Passes after it leave the If bodies as they are (quantize "
                   "excepted: it quantizes their weights)")
        return PassResult(graph, True, stats, [summary, *notes])

    def _refusal(self, graph: gs.Graph, ctx: Context) -> str:
        """Why the graph cannot take a knob ('' when it can)."""
        if self.input_name in graph.tensors():
            return f"the graph already has a tensor named '{self.input_name}'"
        if ctx.calib is None and (self.recover or self.criterion in DATA_CRITERIA):
            return "needs calibration data (--calib) to prune and recover each width"
        if any(not o.inputs for o in graph.outputs):
            return "a graph output is not computed by a node"
        return ""

    def _assemble(self, graph: gs.Graph, variants: list[tuple[float, gs.Graph | None]]) -> None:
        """The If chain, widest first: If(width > next narrower) then this variant else the rest."""
        outputs = list(graph.outputs)
        original = list(graph.nodes)
        inner = [X.detach_output(graph, o) for o in outputs]
        width = X.add_override(graph, self.input_name, np.array(1.0, np.float32))
        bodies = []
        for w, pruned in variants:
            if pruned is None:
                bodies.append((original, inner))
            else:
                bodies.append(_adopt(graph, pruned, f"width_{w:g}/", [o.name for o in outputs]))
        nodes, values = bodies[-1]
        for i in range(len(variants) - 2, -1, -1):
            w, narrower = variants[i][0], variants[i + 1][0]
            outs = outputs if i == 0 else [gs.Variable(G.unique_name(graph, f"{o.name}_width_upto_{w:g}"), o.dtype,
                                                       o.shape) for o in outputs]
            cond = _wider_than(graph, width, narrower)
            node = X.branch(graph, cond, bodies[i][1], nodes, values, outs, then_nodes=bodies[i][0],
                            prefix=f"width_{w:g}")
            nodes, values = [node], outs


def _adopt(graph: gs.Graph, variant: gs.Graph, prefix: str, outputs: list[str]) -> tuple[list[gs.Node], list[gs.Tensor]]:
    """Move `variant`'s nodes into `graph`, reading `graph`'s inputs, every other tensor and node renamed
    with `prefix`; return the nodes and the variant's tensors for `outputs` (by name)."""
    outer = {t.name: t for t in graph.inputs}
    own_inputs = {id(t) for t in variant.inputs}
    values = {t.name: t for t in variant.outputs}
    for node in G.iter_nodes(variant):
        for i, t in enumerate(list(node.inputs)):
            if id(t) in own_inputs:
                node.inputs[i] = outer[t.name]
    renamed: set[int] = {id(t) for t in graph.inputs}
    for node in G.iter_nodes(variant):
        node.name = prefix + (node.name or G.layer_id(node))
        for t in [*node.inputs, *node.outputs]:
            if id(t) not in renamed:
                renamed.add(id(t))
                t.name = prefix + t.name
    nodes = list(variant.nodes)
    graph.nodes.extend(nodes)
    return nodes, [values[name] for name in outputs]


def _wider_than(graph: gs.Graph, width: gs.Tensor, limit: float) -> gs.Variable:
    """A bool scalar: the width fed is above `limit`."""
    out = gs.Variable(G.unique_name(graph, f"width_above_{limit:g}"), np.bool_, [])
    const = G.make_constant(G.unique_name(graph, f"width_limit_{limit:g}"), np.array(limit, np.float32))
    graph.nodes.append(gs.Node("Greater", G.unique_name(graph, f"width_Greater_{limit:g}"), inputs=[width, const],
                               outputs=[out]))
    return out
