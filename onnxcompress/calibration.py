"""Activation ranges for quantization: what a tensor's values look like on calibration data, and
the [lo, hi] range its 8-bit codes should cover.

A tensor is summarised once (`Summary`: exact min and max, and a uniform random sample of its
values, at most SAMPLE of them), then each method reads the summary:

- "minmax": the observed range (nothing clipped; one outlier stretches every step);
- "percentile": the range without the top and bottom (100 - p)% of the values;
- "mse": the range, among shrunken candidates of the observed one, whose quantize-dequantize
  round trip has the smallest mean squared error on the sample (clipping traded against resolution);
- "entropy": the range whose 128-bin quantized histogram loses least information (KL divergence
  against the 2048-bin histogram of the sample; TensorRT's method);
- "auto": "mse" among the ranges that clip no more than the percentile range (rare large
  activations often carry the signal: on PP-OCRv4 rec, unconstrained MSE ranges cost 7 points of
  lines decoded as fp32 against the 99.99th percentile).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Summary", "Summarizer", "summarize", "summarize_activations", "activation_range", "uint8_params",
           "METHODS"]

SAMPLE = 200_000
METHODS = ("auto", "minmax", "percentile", "mse", "entropy")


@dataclass(frozen=True)
class Summary:
    lo: float
    hi: float
    sample: np.ndarray


class Summarizer:
    """A tensor's Summary built batch by batch, knowing how many values there will be in all: the
    same min, max and sample (the same random draws, batch after batch) as `summarize` of the whole,
    without holding it."""

    def __init__(self, total: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.share = min(1.0, SAMPLE / max(total, 1))
        self.lo, self.hi, self.parts = np.inf, -np.inf, []

    def add(self, batch) -> None:
        b = np.asarray(batch, np.float32).ravel()
        if b.size:
            self.lo, self.hi = min(self.lo, float(b.min())), max(self.hi, float(b.max()))
        self.parts.append(b if self.share >= 1 else b[self.rng.random(b.size) < self.share])

    def summary(self) -> Summary:
        seen = np.isfinite(self.lo)
        return Summary(self.lo if seen else 0.0, self.hi if seen else 0.0,
                       np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32))


def summarize(batches, seed: int = 0) -> Summary:
    """Min, max and a random sample of at most SAMPLE values of a tensor given batch by batch."""
    batches = [np.asarray(b, np.float32).ravel() for b in batches]
    s = Summarizer(sum(b.size for b in batches), seed)
    for b in batches:
        s.add(b)
    return s.summary()


BATCH_BYTES = 64 * 2 ** 20    # activations one batch of a range capture may hand back at once


def summarize_activations(model, data, names, providers, batch_size: int = 64) -> dict[str, Summary]:
    """The Summary of each tensor `names` of `model` over the dataset, from one streamed pass: only
    the samples are kept, never the activations (a 25M-parameter Transformer's 512 calibration
    samples held 4 GiB of them). Batches are cut so that the tensors one batch returns stay near
    BATCH_BYTES (onnxruntime holds them all at once: that Transformer's batches of 64 peaked at
    3.9 GB of RSS)."""
    from .runtime import capture_session, fixed_batch, iter_outputs

    session = capture_session(model, list(names), providers)
    rows = 1 if data.per_feed else fixed_batch(session)   # per feed: one feed a batch, as it is
    if rows is None:              # measure one sample's tensors, then size the batches by them
        probe = session.run(list(names), next(data.take(1).batches(1)))
        per_sample = max(sum(a.nbytes for a in probe), 1)
        rows = batch_size = int(np.clip(BATCH_BYTES // per_sample, 1, batch_size))
    taken: dict[str, Summarizer] = {}
    for i, out in enumerate(iter_outputs(session, data, batch_size, list(names), desc="ranges")):
        n = min(rows, len(data) - i * rows)                 # samples in this batch
        for name in names:
            if name not in taken:                           # every batch holds n samples' worth of values
                taken[name] = Summarizer(out[name].size // max(n, 1) * len(data))
            taken[name].add(out[name])
    return {name: s.summary() for name, s in taken.items()}


def uint8_params(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of asymmetric uint8 codes covering [lo, hi] (widened to hold 0 exactly)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 if hi > lo else 1.0
    return float(np.float32(scale)), int(np.clip(np.round(-lo / scale), 0, 255))


def _mse(x: np.ndarray, lo: float, hi: float) -> float:
    scale, zp = uint8_params(lo, hi)
    q = np.clip(np.round(x / scale) + zp, 0, 255)
    return float(np.mean(((q - zp) * scale - x) ** 2))


def _percentile(s: Summary, p: float) -> tuple[float, float]:
    if not s.sample.size:
        return s.lo, s.hi
    lo, hi = np.percentile(s.sample, [100 - p, p])
    return (float(lo) if s.lo < 0 else s.lo), float(hi)


def _entropy(s: Summary, bins: int = 2048, levels: int = 128) -> tuple[float, float]:
    """TensorRT's KL calibration on |x|: the threshold whose `levels`-bin requantized histogram
    diverges least from the `bins`-bin one (mass beyond the threshold folded into its last bin)."""
    a = np.abs(s.sample)
    top = float(a.max()) if a.size else 0.0
    if top == 0.0:
        return s.lo, s.hi
    hist, edges = np.histogram(a, bins=bins, range=(0, top))
    best, best_t = np.inf, top
    for i in range(levels, bins + 1, 16):
        ref = hist[:i].astype(np.float64).copy()
        ref[-1] += hist[i:].sum()
        chunks = np.array_split(hist[:i].astype(np.float64), levels)
        q = np.concatenate([np.where(c > 0, c.sum() / max(np.count_nonzero(c), 1), 0.0) for c in chunks])
        p, qn = ref / ref.sum(), q / max(q.sum(), 1e-300)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(qn[mask], 1e-12))))
        if kl < best:
            best, best_t = kl, float(edges[i])
    return max(s.lo, -best_t), min(s.hi, best_t)


def activation_range(s: Summary, method: str = "auto", percentile: float = 99.99) -> tuple[float, float]:
    """[lo, hi] for a tensor's uint8 codes by `method` (see the module's docstring)."""
    if method == "minmax" or s.hi <= s.lo:
        return s.lo, s.hi
    if method == "percentile":
        return _percentile(s, percentile)
    if method == "entropy":
        return _entropy(s)
    x = s.sample.astype(np.float64)
    shrink = np.geomspace(0.02, 1.0, 48)
    candidates = [(s.lo * f, s.hi * f) for f in shrink]
    candidates += [(s.lo * f, s.hi) for f in shrink[::3]] + [(s.lo, s.hi * f) for f in shrink[::3]]
    if method == "auto":     # never clip more than the 99.99th percentile: rare large values carry signal
        lo, hi = _percentile(s, percentile)
        candidates = [(a, b) for a, b in candidates if a <= lo and b >= hi] + [(lo, hi), _percentile(s, 99.999)]
    return min(candidates, key=lambda r: _mse(x, *r))
