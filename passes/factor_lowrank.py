"""factor-lowrank: Conv, Gemm and MatMul layers factored through a lower rank, fit on data.

A Gemm/MatMul [out x fan_in] becomes two of its kind through rank K (K x fan_in, then out x K); a
k x k Conv from I to O channels becomes the same k x k conv (strides, pads, dilations kept) to K
channels followed by a 1x1 conv to O carrying the bias. MACs per output position go from
O x I k^2 to K (I k^2 + O), so a rank at or above O I k^2 / (I k^2 + O) saves nothing: such
layers are left as they are, with a note. The factors minimise the layer's output error on the
calibration data (the SVD of the weights whitened by the inputs' second moments,
`onnxcompress.factor`); recovery then refits each second factor by least squares onto the
original model's output of the layer, and the head on soft targets (the distillation engine).

Rank per layer: `ranks={layer: K}` names it; else `energy=` keeps that share of the whitened
spectrum; else `macs=` (default 0.5) is the model's MACs to reach: each layer is factored alone at
25, 50 and 75% of its MACs taken away and scored against the original, and structured pruning's
greedy allocation (`onnxcompress.sensitivity`, shared) spends the cuts where they cost least
(`allocation="uniform"`: every layer at `macs` of its own MACs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress import factor as F, graph as G, weights as W
from onnxcompress.layers import out_rows
from onnxcompress.pass_api import Context, Pass, PassResult
from onnxcompress.recovery import RecoverySettings, recover, sequential
from onnxcompress.sensitivity import allocate, sensitivity

__all__ = ["FactorLowRank"]

RATIOS = (0.25, 0.5, 0.75)      # shares of a layer's MACs the sensitivity analysis takes away


@dataclass
class FactorLowRank(Pass):
    """Factor Conv, Gemm and MatMul layers through a lower rank, fit to their outputs on data."""

    name = "factor-lowrank"
    handles = frozenset({"Conv", "Gemm", "MatMul"})
    macs: float = 0.5                 # each factored layer keeps at most this share of its MACs
    energy: float | None = None       # or: the smallest rank keeping this share of the whitened energy
    ranks: dict[str, int] = field(default_factory=dict)   # or per layer (node name or output tensor)
    exclude: tuple[str, ...] = ()
    allocation: Literal["sensitivity", "uniform"] = "sensitivity"   # macs= as the model's share (ranks by
                                      # measured sensitivity) or each layer's own share
    data_aware: bool = True           # whiten by the inputs' second moments (needs calibration data)
    recover: bool = True              # refit the second factors and the head on the original's outputs

    def __post_init__(self) -> None:
        if not 0.0 < self.macs < 1.0:
            raise ValueError(f"macs must be in (0, 1), got {self.macs}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        notes: list[str] = []
        layers = {}
        for node in list(graph.nodes):
            if node.op not in self.handles or {node.name, G.layer_id(node)} & set(self.exclude):
                continue
            why = F.eligible(node)
            if why is None and node.op in ("Gemm", "MatMul") and out_rows(node, W.layer_weight(node).value).shape[0] < 2:
                why = "a single output"
            if why is not None:
                if W.layer_weight(node) is not None:
                    notes.append(f"{node.op} '{G.display_name(node)}': {why}; left as is")
                continue
            layers[G.layer_id(node)] = node
        data = ctx.require_calib(self.name) if (self.data_aware or self.recover or self._allocates) and layers else None
        grams: dict[str, np.ndarray | None] = {k: None for k in layers}
        if data is not None and self.data_aware:
            def keep(node: gs.Node, g: list[np.ndarray] | None) -> None:
                grams[G.layer_id(node)] = g[0] if g else None
            sequential(graph, ctx, data, {id(n): keep for n in layers.values()})
        ranks: dict[str, int] = {}
        for lid, node in layers.items():
            rank, why = self._rank(node, grams[lid])
            if why:
                notes.append(f"{node.op} '{G.display_name(node)}': {why}; left as is")
            else:
                ranks[lid] = rank
        stats: dict = {}
        if self._allocates and ranks:
            ranks = self._allocate(graph, ctx, data, {k: layers[k] for k in ranks}, grams, stats, notes)
        before, after, factored = 0, 0, []
        for lid, rank in ranks.items():
            out, fan, _ = F.layer_cost(layers[lid])
            energy = _factor(graph, ctx, layers[lid], grams[lid], rank)
            before, after = before + out * fan, after + rank * (fan + out)
            factored.append(f"{G.display_name(layers[lid])} rank {rank} ({energy:.1%} energy)")
        stats.update(layers_factored=len(factored), factored_macs_ratio=after / before if before else 1.0)
        if factored:
            notes.append("factored: " + ", ".join(factored))
            if self.recover:
                result = recover(graph, ctx, data, RecoverySettings(temperature=ctx.temperature, alpha=ctx.alpha))
                stats.update(result.stats)
                notes += result.notes
        return PassResult(graph, bool(factored), stats, notes)

    @property
    def _allocates(self) -> bool:
        return not self.ranks and self.energy is None and self.allocation == "sensitivity"

    def _rank(self, node: gs.Node, gram: np.ndarray | None) -> tuple[int, str]:
        """The layer's rank (at `macs` of its MACs, by name, or by energy), or why it is not factored."""
        out, fan, _ = F.layer_cost(node)
        breakeven = out * fan / (fan + out)              # rank at which the two factors cost as much
        named = self.ranks.get(node.name, self.ranks.get(G.layer_id(node)))
        if self.ranks and named is None:
            return 0, "not named in ranks"
        if named is not None:
            rank = int(named)
        elif self.energy is not None:
            s2 = F.spectrum(out_rows(node, W.layer_weight(node).value), gram) ** 2
            rank = int(np.searchsorted(np.cumsum(s2) / s2.sum(), self.energy - 1e-12) + 1)
        else:
            rank = int(np.floor(self.macs * breakeven))
        if rank < 1:
            return 0, f"{self.macs:g} of its MACs leaves no rank (break-even {breakeven:.1f})"
        if rank >= breakeven:
            return 0, f"rank {rank} is at or above break-even ({breakeven:.1f}): factoring would not reduce MACs"
        return rank, ""

    def _allocate(self, graph: gs.Graph, ctx: Context, data, layers: dict[str, gs.Node], grams: dict,
                  stats: dict, notes: list[str]) -> dict[str, int]:
        """Per-layer ranks for `macs` of the model's MACs with the least accuracy lost: each layer
        factored alone at 25/50/75% of its MACs removed and scored, then the greedy allocation of
        structured pruning's sensitivity analysis (`onnxcompress.sensitivity`)."""
        model = G.to_model(G.tidy(graph.copy()), like=ctx.original)

        def rank_at(lid: str, ratio: float) -> int:
            out, fan, _ = F.layer_cost(layers[lid])
            return max(1, int(np.floor((1.0 - ratio) * out * fan / (fan + out))))

        def factored(m, ratios: dict[str, float]):
            g, scratch = G.to_graph(m), ctx.fork()
            by_id = {G.layer_id(n): n for n in g.nodes}
            for lid, r in ratios.items():
                _factor(g, scratch, by_id[lid], grams[lid], rank_at(lid, r))
            return G.to_model(G.tidy(g), like=m)

        units = {lid: F.layer_cost(n)[0] for lid, n in layers.items()}
        sens = sensitivity(model, factored, data, data, RATIOS, providers=ctx.providers, units=units)
        chosen, measured = allocate(model, factored, sens, data, self.macs, providers=ctx.providers)
        stats.update(allocated_macs_ratio=measured["macs"] / sens.base_macs, target_met=bool(measured["target_met"]))
        if not measured["target_met"]:
            notes.append(f"macs={self.macs:g}: factoring every eligible layer as far as measured reaches "
                         f"{measured['macs'] / sens.base_macs:.2f} of the model's MACs")
        return {lid: rank_at(lid, r) for lid, r in chosen.items()}


def _factor(graph: gs.Graph, ctx: Context, node: gs.Node, gram: np.ndarray | None, rank: int) -> float:
    a, b, energy = F.whitened_factors(out_rows(node, W.layer_weight(node).value), gram, rank)
    F.split(graph, ctx, node, *F.lowrank_layout(node, a, b), "_lowrank")
    return energy
