"""Sensitivity analysis for structured pruning, and a per-group ratio allocation that meets a MAC
or latency target with the least accuracy loss.

Each prunable group is pruned alone at several ratios (one shot, no recovery) and measured. The
allocation is greedy: starting from nothing pruned, it repeatedly moves the group whose next ratio
costs the least accuracy per MAC (or millisecond) saved, until the pruned model, built and
measured for real, meets the target.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx

from . import graph as G
from .channels import analyze
from .data import Dataset
from .metrics import LatencyConfig, accuracy, fidelity, latency_ms, total_macs
from .pass_api import Context, Registry
from .progress import progress
from .runtime import DEFAULT_PROVIDERS, make_session, run_model

log = logging.getLogger(__name__)

__all__ = ["Sensitivity", "sensitivity", "allocate", "Prune", "pass_pruner"]

Prune = Callable[[onnx.ModelProto, dict[str, float]], onnx.ModelProto]


def pass_pruner(registry: Registry, ctx: Context, criterion: str = "l1", round_to: int = 1,
                recover: bool = False) -> Prune:
    """`prune(model, {group: ratio})` through the registry's "prune-channels" pass: one-shot pruning of
    the named groups only (what sensitivity and allocation measure), with or without recovery."""
    def prune(model: onnx.ModelProto, ratios: dict[str, float]) -> onnx.ModelProto:
        p = registry.create("prune-channels", {"ratio": 0.0, "ratios": dict(ratios), "criterion": criterion,
                                               "recover": recover, "round_to": round_to})
        graph = G.to_graph(model)
        p.run(graph, ctx.fork())  # each call starts afresh from the original
        return G.to_model(G.tidy(graph), like=model)
    return prune


@dataclass
class Sensitivity:
    base_score: float
    base_macs: int
    ratios: tuple[float, ...]
    groups: list[str]
    channels: dict[str, int]
    score: dict[str, list[float]] = field(default_factory=dict)      # group -> score at each ratio
    macs: dict[str, list[int]] = field(default_factory=dict)         # group -> MACs at each ratio
    latency: dict[str, list[float]] = field(default_factory=dict)    # group -> ms at each ratio (optional)
    base_latency: float | None = None
    metric: str = "accuracy"
    recovered: bool = False       # measured after recovery (or one shot without)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class _Scorer:
    """Accuracy (or top-1 agreement without labels) of a model on the evaluation data."""

    def __init__(self, model: onnx.ModelProto, data: Dataset, providers: Sequence[str]):
        self.data, self.providers = data, providers
        self.reference = self.outputs(model)
        self.metric = "accuracy" if data.labels is not None else "agreement"

    def outputs(self, model: onnx.ModelProto) -> dict[str, np.ndarray]:
        return run_model(make_session(model, self.providers), self.data)

    def __call__(self, model: onnx.ModelProto) -> float:
        out = self.outputs(model)
        if self.data.labels is not None:
            return accuracy(next(iter(out.values())), self.data.labels)
        first = next(iter(fidelity(self.reference, out).values()))
        return first.get("top1_agreement", first["cosine"] * 100)


def sensitivity(model: onnx.ModelProto, prune: Prune, calib: Dataset, evaluation: Dataset,
                ratios: Sequence[float] = (0.25, 0.5, 0.75), latency: LatencyConfig | None = None,
                providers: Sequence[str] = DEFAULT_PROVIDERS, recovered: bool = False,
                units: dict[str, int] | None = None) -> Sensitivity:
    """Score, MACs (and latency) of the model with each prunable group pruned alone at each ratio.

    `prune(model, {group: ratio})` returns the model pruned (`recovered` says whether it recovers).
    `units` ({name: size}) replaces the channel groups with other units a `prune` understands (the
    layers `factor-lowrank` factors, a ratio being the share of a layer's MACs taken away)."""
    shapes = {k: [1, *v.shape[1:]] for k, v in calib.feeds.items()}
    if units is None:
        an = analyze(G.to_graph(model), model, shapes)
        units = {g.name: len(g.units) for g in an.groups if not g.frozen}
    groups = list(units)
    scorer = _Scorer(model, evaluation, providers)
    result = Sensitivity(scorer(model), total_macs(model, shapes), tuple(ratios), groups, dict(units),
                         metric=scorer.metric, recovered=recovered)
    if latency is not None:
        result.base_latency = _latency(model, latency, evaluation, providers)
    for g in progress(groups, desc="sensitivity"):
        for r in ratios:
            pruned = prune(model, {g: r})
            result.score.setdefault(g, []).append(scorer(pruned))
            result.macs.setdefault(g, []).append(total_macs(pruned, shapes))
            if latency is not None:
                result.latency.setdefault(g, []).append(_latency(pruned, latency, evaluation, providers))
    return result


def _latency(model: onnx.ModelProto, cfg: LatencyConfig, data: Dataset, providers) -> float:
    return float(np.mean(list(latency_ms(model, cfg, data, providers).values())))


def allocate(model: onnx.ModelProto, prune: Prune, sens: Sensitivity, calib: Dataset, target: float,
             by: str = "macs", latency: LatencyConfig | None = None, providers: Sequence[str] = DEFAULT_PROVIDERS,
             max_rounds: int = 200) -> tuple[dict[str, float], dict]:
    """Per-group ratios meeting `target` (a fraction of the original's MACs, or latency when
    by="latency") with the least predicted accuracy loss. Returns the ratios and what the pruned
    model measured (MACs, latency, score without recovery)."""
    shapes = {k: [1, *v.shape[1:]] for k, v in calib.feeds.items()}
    cost = {g: [0.0] + [max(sens.base_score - s, 0.0) for s in sens.score[g]] for g in sens.groups}
    if by == "latency":
        gain = {g: [0.0] + [sens.base_latency - t for t in sens.latency[g]] for g in sens.groups}
        base = sens.base_latency
    else:
        gain = {g: [0] + [sens.base_macs - m for m in sens.macs[g]] for g in sens.groups}
        base = sens.base_macs
    level = {g: 0 for g in sens.groups}
    ratios: dict[str, float] = {}
    measured = _measure(model, prune, ratios, shapes, by, latency, calib, providers)
    for _ in range(max_rounds):
        if measured["value"] <= target * base:
            break
        best, best_rate = None, None
        for g in sens.groups:
            i = level[g]
            for j in range(i + 1, len(cost[g])):  # a jump: the next ratio may save nothing (round_to)
                saved = gain[g][j] - gain[g][i]
                if saved <= 0:
                    continue
                rate = (cost[g][j] - cost[g][i] + 1e-3) / saved
                if best_rate is None or rate < best_rate:
                    best, best_rate = (g, j), rate
        if best is None:
            break
        level[best[0]] = best[1]
        ratios[best[0]] = sens.ratios[best[1] - 1]
        measured = _measure(model, prune, ratios, shapes, by, latency, calib, providers)
    measured["target_met"] = measured["value"] <= target * base
    return ratios, measured


def _measure(model, prune: Prune, ratios, shapes, by, latency, data, providers) -> dict:
    pruned = prune(model, ratios) if ratios else model
    macs = total_macs(pruned, shapes)
    out = {"macs": macs}
    if by == "latency":
        out["latency_ms"] = _latency(pruned, latency or LatencyConfig(), data, providers)
        out["value"] = out["latency_ms"]
    else:
        out["value"] = macs
    return out
