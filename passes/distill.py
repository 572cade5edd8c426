"""distill: recover accuracy lost by compression, without backprop, by distilling from the teacher.

Front to back, every weighted layer that differs from the teacher (or that an earlier pass marked)
is refit by constrained least squares from the student's own inputs onto the teacher's output of
the same tensor; BatchNormalization nodes after a change are re-estimated the same way; then the
classifier head is refit on the teachers' temperature-softened probabilities. The work is done by
`onnxcompress.recovery.recover`, which every pass that recovers shares.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx_graphsurgeon as gs

from onnxcompress.pass_api import Context, Pass, PassResult
from onnxcompress.recovery import RECOVERABLE_OPS, RecoverySettings, recover


@dataclass
class Distill(Pass):
    """Refit changed layers by least squares on the teacher's features, then the head on soft targets."""

    name = "distill"
    handles = RECOVERABLE_OPS | {"BatchNormalization"}
    recovers = True
    temperature: float | None = None        # default: the run's --temperature (4)
    alpha: float | None = None              # weight of hard labels; default: the run's --alpha (0)
    layers: Literal["changed", "all"] = "changed"
    head: bool = True
    bn: bool = True                         # re-estimate BatchNormalization after changed layers
    ridge: float = 1e-3                     # relative to the mean input energy
    max_rows: int = 20000                   # sampled rows (conv positions) per layer
    samples: int | None = None              # calibration samples to use (default: all)
    seed: int = 0
    shifts: int = 0                         # shifted copies of each calibration image to fit on too

    def __post_init__(self) -> None:
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ValueError("alpha must be in [0, 1]")
        if self.max_rows < 1 or (self.samples is not None and self.samples < 1):
            raise ValueError("max_rows and samples must be positive")
        if not isinstance(self.shifts, int) or self.shifts < 0:
            raise ValueError(f"shifts must be a whole number of at least 0, got {self.shifts!r}")

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        data = ctx.require_calib(self.name)
        data = data.take(self.samples) if self.samples else data
        settings = RecoverySettings(temperature=self.temperature or ctx.temperature,
                                    alpha=ctx.alpha if self.alpha is None else self.alpha, layers=self.layers,
                                    head=self.head, bn=self.bn, ridge=self.ridge, max_rows=self.max_rows,
                                    seed=self.seed, shifts=self.shifts)
        result = recover(graph, ctx, data, settings)
        return PassResult(graph, result.modified, result.stats, result.notes)
