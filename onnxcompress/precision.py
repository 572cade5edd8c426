"""Mixed precision: which layers to keep at higher precision so that a quantized model stays within
an accuracy budget.

The search follows the automatic mixed precision of AIMET in its simplest greedy form. Every layer
is scored by how much of the fully quantized model's output error goes away when that layer alone
is kept at higher precision (one model per layer, measured for real on the evaluation samples), or
by an estimate the caller gives (cheap: no model per layer); then the fewest of the costliest layers are kept back, found by doubling and bisecting over that
order, until the user-facing metric (top-1 agreement, decoded sequences, map IoU; see
`metrics.budget_metric`) against the float model is within the budget.

Int8 is not faster everywhere: onnxruntime's CPU depthwise int8 kernels ran 3-6x slower than its
float ones on PP-OCR's angle classifier, while the MNIST MobileNet is faster with its depthwise
convs in int8 (their ReLU6 chains stay in integer codes). `faster_in_float` decides by timing
the model both ways, one kind of layer at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx

from .data import Dataset
from .metrics import LatencyConfig, budget_metric, fidelity, paired_latency_ratio
from .progress import progress
from .runtime import make_session, run_model

__all__ = ["Scorer", "Search", "faster_in_float", "search"]


class Scorer:
    """Scores a model against the float model's outputs on the same samples: (metric in points,
    100 = the float model's own; output error, the mean over outputs of ||y - y_float||^2 / ||y_float||^2)."""

    def __init__(self, reference: onnx.ModelProto, data: Dataset, providers: Sequence[str], batch_size: int):
        self.data, self.providers, self.batch_size = data, tuple(providers), batch_size
        self.reference = run_model(make_session(reference, self.providers), data, batch_size)
        self.metric = budget_metric(None, fidelity(self.reference, self.reference))[0]
        self.calls = 0

    @property
    def resolution(self) -> float:
        """The smallest drop an agreement metric can show: one sample of the data, in points (0 for
        continuous metrics such as a map's IoU)."""
        return 100.0 / len(self.data) if "agreement" in self.metric else 0.0

    def __call__(self, model: onnx.ModelProto) -> tuple[float, float]:
        self.calls += 1
        out = run_model(make_session(model, self.providers), self.data, self.batch_size)
        value = budget_metric(None, fidelity(self.reference, out))[1]
        err = np.mean([np.sum((out[k].astype(np.float64) - r) ** 2) / max(np.sum(r.astype(np.float64) ** 2), 1e-30)
                       for k, r in self.reference.items()])
        return float(value), float(err)


@dataclass
class Search:
    kept: list[str]          # the layers kept at higher precision, costliest first
    score: float             # the metric of the chosen model (100 = the float model)
    quantized_score: float   # the metric with every layer quantized
    met: bool
    evaluations: int


def search(candidates: Sequence[str], build: Callable[[set[str]], onnx.ModelProto], score: Scorer,
           budget: float, estimate: dict[str, float] | None = None, measure: int | None = None) -> Search:
    """The fewest candidates (layer ids) to keep at higher precision, costliest first, for a drop
    of at most `budget` points; `build(kept)` makes the model with those layers kept back. The
    cost of each candidate is measured (one model each), or taken from `estimate`, or measured for
    the `measure` costliest by the estimate only (the rest follow in the estimate's order)."""
    first = score.calls
    full, full_err = score(build(set()))
    if 100.0 - full <= budget + 1e-9:
        return Search([], full, full, True, score.calls - first)
    by_estimate = sorted(candidates, key=lambda c: -estimate[c]) if estimate else list(candidates)
    measured = by_estimate if estimate is None else by_estimate[:measure or 0]
    gain = {c: full_err - score(build({c}))[1] for c in progress(measured, total=len(measured), desc="precision")}
    order = sorted(measured, key=lambda c: -gain[c]) + [c for c in by_estimate if c not in gain]
    scores: dict[int, float] = {0: full}

    def at(k: int) -> float:
        if k not in scores:
            scores[k] = score(build(set(order[:k])))[0]
        return scores[k]

    lo, hi = 0, 1                  # at(lo) misses the budget; find the first hi that meets it
    while hi < len(order) and 100.0 - at(hi) > budget + 1e-9:
        lo, hi = hi, min(2 * hi, len(order))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if 100.0 - at(mid) <= budget + 1e-9 else (mid, hi)
    value = at(hi) if hi < len(order) else 100.0
    return Search(order[:hi], value, full, 100.0 - value <= budget + 1e-9, score.calls - first)


FASTER = 0.97       # a kind of layer goes back to float when the model then takes at most this share of the time


def faster_in_float(kinds: dict[str, set[str]], build: Callable[[set[str]], onnx.ModelProto], kept: set[str],
                    timing: LatencyConfig, data: Dataset | None, providers: Sequence[str],
                    ratio: Callable[[onnx.ModelProto, onnx.ModelProto], float] | None = None,
                    score: Callable[[onnx.ModelProto], float] | None = None) -> tuple[set[str], list[str]]:
    """The kinds of layers (depthwise convs, the first layer, ...) that the model runs faster with
    in float. Starting from the model that keeps `kept` in float, each kind in turn is kept back
    too and the two models are timed in alternating rounds (`ratio(candidate, current)`, by default
    `metrics.paired_latency_ratio` at the run's batch sizes on one thread); a kind stays in float
    when the model then takes at most FASTER of the time, measured twice (thread CPU time, which a
    busy machine barely moves; a single wall-clock reading under load once made a slower stem look
    twice as fast). Returns the layers kept in float and a line per kind tried. With `score` (higher is better), a faster kind is kept in float only if
    the score does not fall: more layers in float is not always more accurate (PP-OCRv4 rec with
    its depthwise convs in float matched 74% of fp32's lines instead of 86%)."""
    cfg = LatencyConfig(batch_sizes=timing.batch_sizes, runs=timing.runs, warmup=timing.warmup, threads=1, clock="thread")
    ratio = ratio or (lambda model, ref: paired_latency_ratio(model, ref, cfg, data, providers))
    kept = set(kept)
    current = build(kept)
    current_score: float | None = None        # scored only once some kind is faster
    lines = []
    for kind, layers in kinds.items():
        layers = layers - kept
        if not layers:
            continue
        candidate = build(kept | layers)
        r = ratio(candidate, current)
        if r <= FASTER:                     # confirmed by a second measurement before it counts
            r = max(r, ratio(candidate, current))
        faster = r <= FASTER
        line = f"{kind} ({len(layers)}) in float: {r:.2f}x the time"
        if faster and score:
            current_score = score(current) if current_score is None else current_score
            candidate_score = score(candidate)
        if faster and score and candidate_score < current_score:
            line += f", but less accurate ({candidate_score:.1f} against {current_score:.1f})"
        elif faster:
            line += " (kept in float)"
            kept |= layers
            current = candidate
            current_score = candidate_score if score else None
        lines.append(line)
    return kept, lines
