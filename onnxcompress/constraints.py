"""What a recovery refit may change in a layer, so that recovery never undoes compression.

Each constraint solves a layer's least-squares refit (from its normal equations, one set per group
of a grouped conv) and writes the result back in the layer's own storage through the weight view:
- `Free`: every weight (written re-encoded in the layer's storage: codes are re-rounded);
- `FixedSupport`: zeros stay exactly zero (unstructured pruning);
- `KeptColumns`: only the kept input columns carry weight;
- `SharedCodebook`: the index tensor is fixed, the k tied values are solved (clustering);
- `Reclustered`: a clustered layer refit freely, re-assigned to its centroids, centroids re-solved;
- `ChannelScales`: integer or binary codes are fixed, one scale per output channel is solved.
`infer` picks the constraint that keeps what a layer's storage already says.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from . import weights as W
from .layers import from_out_rows, out_axis, out_rows
from .solvers import (NormalEquations, solve_codebook_groups, solve_codebook_rows, solve_columns, solve_free,
                      solve_scales, solve_support)

__all__ = ["Constraint", "Free", "FixedSupport", "KeptColumns", "SharedCodebook", "Reclustered", "ChannelScales", "infer",
           "QUANTIZED_SUPPORT"]

# Zeros of a quantized layer are kept only when they are this share of its weights: below, they are
# rounding (small weights), not pruning.
QUANTIZED_SUPPORT = 0.1


@dataclass
class Constraint:
    """Base: a free refit. Subclasses change `solve` (per group) or `solve_all` (joint)."""
    joint: ClassVar[bool] = False          # one solve over every group (a codebook they share)
    grid: ClassVar[bool] = True            # try several ridge strengths (cheap solves only)

    def ridges(self, ridge: float) -> tuple[float, ...]:
        """Ridge strengths the held-out rows choose from."""
        return (ridge, ridge * 10, ridge * 100) if self.grid else (ridge,)

    def solve(self, ne: NormalEquations, rows: np.ndarray, b: np.ndarray, sl: slice, ridge: float,
              bias: bool) -> tuple[np.ndarray, np.ndarray]:
        """New (rows, bias) of one group: outputs `sl` of the layer; `rows`, `b` its current ones."""
        return solve_free(ne, ridge, bias)

    def solve_all(self, eqs: list[NormalEquations], rows: np.ndarray, b: np.ndarray, ridge: float,
                  bias: bool) -> tuple[np.ndarray, np.ndarray]:
        m_g = rows.shape[0] // len(eqs)
        new_rows, new_b = rows.astype(np.float64).copy(), b.astype(np.float64).copy()
        for gi, ne in enumerate(eqs):
            sl = slice(gi * m_g, (gi + 1) * m_g)
            new_rows[sl], new_b[sl] = self.solve(ne, rows[sl], b[sl], sl, ridge, bias)
        return new_rows, new_b

    def head_mask(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """Entries a gradient-based head refit may change (None: all)."""
        return None

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether the constraint still describes a layer whose rows have this shape."""
        return True

    def encoded(self, node: gs.Node, rows: np.ndarray) -> np.ndarray:
        """The rows the layer will really hold once written (its storage's rounding included)."""
        s = W.layer_weight(node)
        value = from_out_rows(node, rows, s.value.shape)
        return out_rows(node, s.storage.encode(value.astype(s.value.dtype), refit=True).decode()).astype(np.float64)

    def write(self, graph: gs.Graph, node: gs.Node, rows: np.ndarray) -> None:
        W.write_rows(graph, node, rows)


@dataclass
class Free(Constraint):
    pass


@dataclass
class FixedSupport(Constraint):
    """W[o, i] is free where `support[o, i]`, exactly zero elsewhere."""
    support: np.ndarray = None
    grid: ClassVar[bool] = False   # one solve per output row: too costly to repeat

    def solve(self, ne, rows, b, sl, ridge, bias):
        return solve_support(ne, self.support[sl], ridge, bias)

    def head_mask(self, shape):
        return self.support


@dataclass
class KeptColumns(Constraint):
    """Only the input columns `columns` (indices or a mask) carry weight."""
    columns: np.ndarray = None
    grid: ClassVar[bool] = False

    def solve(self, ne, rows, b, sl, ridge, bias):
        return solve_columns(ne, self.columns, ridge, bias)

    def head_mask(self, shape):
        mask = np.zeros(shape, dtype=bool)
        mask[:, self.columns] = True
        return mask


@dataclass
class SharedCodebook(Constraint):
    """Clustered weights: W[o, i] = book[index[o, i]] (one codebook) or book[o, index[o, i]] (one per
    output). The index is fixed; the centroids (and biases) are solved; zero centroids stay zero."""
    index: np.ndarray = None        # [out, fan_in] codes
    book: np.ndarray = None         # [k] or [out, k]
    grid: ClassVar[bool] = False

    @property
    def joint(self) -> bool:   # one codebook for the whole layer: solved over every group at once
        return self.book.ndim == 1

    def fits(self, shape):
        return self.index.shape == tuple(shape)

    def solve(self, ne, rows, b, sl, ridge, bias):
        book, new_b = solve_codebook_rows(ne, self.index[sl], self.book[sl], ridge, bias)
        return np.take_along_axis(book, self.index[sl], 1), new_b

    def solve_all(self, eqs, rows, b, ridge, bias):
        if not self.joint:
            return super().solve_all(eqs, rows, b, ridge, bias)
        m_g = rows.shape[0] // len(eqs)
        groups = [self.index[gi * m_g:(gi + 1) * m_g] for gi in range(len(eqs))]
        book, new_b = solve_codebook_groups(eqs, groups, len(self.book), ridge, bias, fixed=self.book == 0)
        return book[self.index], new_b

    def encoded(self, node, rows):
        return rows.astype(np.float64)   # the solve already returns tied values

    def write(self, graph, node, rows):
        """Centroids read back from the solved rows (tied by construction), index unchanged."""
        s = W.layer_weight(node)
        if not isinstance(s.storage, W.Codebook) or s.storage.axis not in (None, out_axis(node)):
            return W.write_rows(graph, node, rows)
        book = self.book.astype(np.float64).copy()
        if book.ndim == 1:
            book[self.index.ravel()] = rows.ravel()
        else:
            np.put_along_axis(book, self.index, rows, 1)
        index = from_out_rows(node, self.index, s.value.shape)
        W.set_codebook(graph, node, s, book.astype(s.storage.codebook.dtype), index.astype(np.int64))


@dataclass
class Reclustered(Constraint):
    """A clustered layer whose structure changed (pruned channels): the free refit is assigned to
    the nearest of its current centroids (one Lloyd step), then the centroids are solved by least
    squares for that index. Stays a codebook of at most k values, with every index free to move.
    Strong ridges are tried too: a weakly regularized refit spreads its weights too far for k values."""

    def ridges(self, ridge: float) -> tuple[float, ...]:
        return tuple(ridge * 10 ** i for i in range(6))

    def solve(self, ne, rows, b, sl, ridge, bias):   # shrunk towards the current (clustered) weights
        return solve_free(ne, ridge, bias, prior=rows)

    def solve_all(self, eqs, rows, b, ridge, bias):
        free_rows, _ = Constraint.solve_all(self, eqs, rows, b, ridge, bias)
        shared = self._shared(self.node, free_rows)
        return shared.solve_all(eqs, rows, b, ridge, bias)

    def _shared(self, node: gs.Node, rows: np.ndarray) -> "SharedCodebook":
        s = W.layer_weight(node)
        st = s.storage.encode(from_out_rows(node, rows, s.value.shape).astype(s.value.dtype), refit=True)
        return SharedCodebook(index=out_rows(node, st.index), book=st.codebook)

    def encoded(self, node, rows):
        return rows.astype(np.float64)

    def write(self, graph, node, rows):
        self._shared(node, rows).write(graph, node, rows)

    node: gs.Node = None


@dataclass
class ChannelScales(Constraint):
    """Fixed integer or binary codes B [out, fan_in]; one scale per output channel is solved."""
    codes: np.ndarray = None
    grid: ClassVar[bool] = False

    def solve(self, ne, rows, b, sl, ridge, bias):
        s, new_b = solve_scales(ne, self.codes[sl], bias)
        return s[:, None] * self.codes[sl], new_b


def infer(node: gs.Node) -> Constraint:
    """The constraint that keeps what the layer's storage says: a codebook's index and centroids,
    the zeros of a pruned layer (dense: any zero; quantized: when they are a real share)."""
    s = W.layer_weight(node)
    rows = out_rows(node, s.value)
    st = s.storage
    if isinstance(st, W.Codebook) and st.axis in (None, out_axis(node)):
        return Reclustered(node=node)
    zeros = float(np.mean(rows == 0)) if rows.size else 0.0
    if zeros > 0 and (st.kind == "dense" or zeros >= QUANTIZED_SUPPORT):
        return FixedSupport(support=rows != 0)
    return Free()

