"""Factoring one layer into two cheaper ones, fit to the layer's outputs on data.

A layer y = W x (W: [out, fan_in] rows, x: its unfolded inputs) is replaced by y = A (B x). The
factors minimise the error on the layer's real inputs, not on the weights: with H the inputs'
second-moment matrix, ||(W - AB) x||^2 summed over the data is ||(W - AB) H^(1/2)||_F^2, so the
best rank-K pair comes from the SVD of W H^(1/2) (Eckart-Young in the whitened space; Zhang et
al. 2015 fit VGG-16's layers this way). Without data H is the identity: the plain truncated SVD.

`split` rewrites the graph: the layer's node becomes the second factor (keeping its output tensor,
its bias and so its identity: recovery refits it onto the teacher's output) and a new node in
front computes the first. `ctx.state.pairs` records the pair.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_graphsurgeon as gs

from . import graph as G, weights as W
from .layers import out_rows
from .pass_api import Context, Pass, PassResult
from .recovery import RecoverySettings, recover, sequential
from .runtime import channel_multiple
from .sensitivity import check_target, plan
from .storage import add_node, constant

__all__ = ["Factoring", "WhitenedSVD", "whitened_svd", "split", "lowrank_layout", "layer_cost", "eligible"]

CONV_GEOMETRY = ("strides", "pads", "dilations", "auto_pad", "kernel_shape")   # what moves to the first factor

GEMM_OPTIONAL_C = 11   # the first opset where Gemm's bias input C may be left out

RIDGE = 1e-6        # relative to the mean eigenvalue: keeps H^(-1/2) finite for dead inputs


def _sqrt_and_inverse(gram: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """H^(1/2) and H^(-1/2) of the inputs' second moments (the identity without data)."""
    if gram is None:
        return np.eye(n), np.eye(n)
    h = gram[:-1, :-1] / max(gram[-1, -1], 1.0)        # the last row/column holds sums and the row count
    vals, vecs = np.linalg.eigh((h + h.T) / 2)
    vals = np.maximum(vals, 0) + RIDGE * max(float(vals.mean()), 1e-30)
    return (vecs * np.sqrt(vals)) @ vecs.T, (vecs / np.sqrt(vals)) @ vecs.T


@dataclass
class WhitenedSVD:
    """The SVD of a layer's rows whitened by its inputs' second moments, to cut at any rank."""
    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    inv_root: np.ndarray

    def take(self, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
        """A [out, rank], B [rank, fan_in] with A B closest to the rows on the inputs, and the
        share of the whitened energy kept."""
        k = min(rank, len(self.s))
        half = np.sqrt(self.s[:k])
        energy = float(np.sum(self.s[:k] ** 2) / max(np.sum(self.s ** 2), 1e-30))
        return self.u[:, :k] * half, (half[:, None] * self.vt[:k]) @ self.inv_root, energy


def whitened_svd(rows: np.ndarray, gram: np.ndarray | None) -> WhitenedSVD:
    """For `gram` = [x, 1]^T [x, 1] as `recovery.sequential` gives it (None: no data)."""
    root, inv_root = _sqrt_and_inverse(gram, rows.shape[1])
    u, s, vt = np.linalg.svd(rows.astype(np.float64) @ root, full_matrices=False)
    return WhitenedSVD(u, s, vt, inv_root)


def eligible(node: gs.Node) -> str | None:
    """Why the layer cannot be factored (None: it can): a Conv with group 1, a Gemm without
    transA/alpha/beta, a MatMul whose second input is a constant [fan_in, out] matrix."""
    s = W.layer_weight(node)
    if node.op not in ("Conv", "Gemm", "MatMul") or s is None:
        return "not a Conv, Gemm or MatMul with a constant weight"
    if node.op == "MatMul" and s.value.ndim != 2:
        return "its weight is not a 2-D matrix"
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0
                              or node.attrs.get("beta", 1.0) != 1.0):
        return "transA, alpha or beta set"
    if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
        return "a grouped or depthwise conv"
    if node.op == "Conv" and s.value.ndim != 4:
        return "not a 2-D conv"
    return None


def layer_cost(node: gs.Node) -> tuple[int, int, int]:
    """(out, fan_in, taps): the layer's MACs per output position are out x fan_in (fan_in counts
    the kernel's taps for a Conv: in_channels x kh x kw); taps = kh x kw (1 otherwise)."""
    w = W.layer_weight(node).value
    rows = out_rows(node, w)
    taps = int(np.prod(w.shape[2:])) if node.op == "Conv" else 1
    return rows.shape[0], rows.shape[1], taps


def lowrank_layout(node: gs.Node, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, dict, np.ndarray]:
    """(first weight, first attrs, second weight) for rows ~ a @ b in the node's op: a Conv becomes
    the same k x k conv to `rank` channels then a 1x1 conv; a Gemm or MatMul two of its kind."""
    w = W.layer_weight(node).value
    if node.op == "Conv":
        attrs = {k: v for k, v in node.attrs.items() if k in CONV_GEOMETRY}
        return b.reshape(len(b), *w.shape[1:]), attrs, a.reshape(*a.shape, 1, 1)
    if node.op == "Gemm":
        return b, {"transB": 1}, (a if node.attrs.get("transB", 0) else a.T)
    return b.T, {}, a.T                                   # MatMul: x @ [fan_in, out]


def split(graph: gs.Graph, ctx: Context, node: gs.Node, first_weight: np.ndarray, first_attrs: dict,
          second_weight: np.ndarray, suffix: str) -> gs.Node:
    """Put a new layer computing `first_weight` (in the node's op and layout, with `first_attrs`)
    in front of `node`, which keeps its output and bias and gets `second_weight` (a 1x1 conv's, or
    a Gemm/MatMul's in the node's own layout). Returns the new node."""
    dtype = W.layer_weight(node).value.dtype
    base = G.stem(G.layer_id(node)) + suffix
    weight = constant(graph, base + "_w", first_weight.astype(dtype))
    inputs = [node.inputs[0], weight]
    if node.op == "Gemm" and int(graph.opset or 0) < GEMM_OPTIONAL_C:    # C was required before opset 11
        inputs.append(constant(graph, base + "_b", np.zeros(len(first_weight), dtype)))
    hidden = add_node(graph, node.op, inputs, first_attrs, base, dtype)
    first = graph.nodes[-1]
    spec = W.LAYERS[node.op]
    node.inputs[0] = hidden
    node.inputs[spec.weight] = constant(graph, G.stem(G.layer_id(node)) + "_w" + suffix + "2", second_weight.astype(dtype))
    if node.op == "Conv":
        node.attrs = {k: v for k, v in node.attrs.items() if k not in CONV_GEOMETRY}
    ctx.state.pairs[G.layer_id(node)] = G.layer_id(first)
    return first


@dataclass
class Factoring(Pass):
    """What factor-lowrank and factor-depthwise share: find the eligible layers, gather their
    inputs' second moments, choose each layer's size (rank or channel multiplier: named, or for a
    MAC target, allocated by measured sensitivity), split, recover. Subclasses say how big a layer
    can be (`_size`, `_size_at`) and how to split it (`_split`)."""

    macs: float | None = None         # the model's MACs to reach (or each layer's, allocation="uniform")
    latency: float | None = None      # or the model's latency to reach (onnxruntime, measured per trial)
    allocation: Literal["sensitivity", "uniform"] = "sensitivity"
    exclude: tuple[str, ...] = ()
    round_to: int | Literal["auto"] = 8   # sizes it chooses (not named ones) in multiples of this where
                                      # below break-even: onnxruntime's blocked convs want channel
                                      # multiples ("auto": the kernels' own, as prune-channels; 8 measured best here)
    data_aware: bool = True           # fit on the layers' inputs (needs calibration data)
    recover: bool = True              # refit the second factors and the head on the original's outputs

    # With neither macs nor latency given: what the pass aims at. factor-depthwise aims at latency,
    # since its factors are smaller but not always faster (ResNet at half the MACs: 1.44x / 1.65x of
    # fp32's time by MACs, 0.51x / 0.56x by latency).
    default_target: ClassVar[tuple[str, float]] = ("macs", 0.5)

    def __post_init__(self) -> None:
        check_target(self.macs, self.latency)
        if self.round_to != "auto" and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise ValueError(f"round_to must be 'auto' or an integer of at least 1, got {self.round_to!r}")

    # -- what a subclass provides -------------------------------------------------------------
    def _eligible(self, node: gs.Node) -> str | None:
        raise NotImplementedError

    size_word: ClassVar[str] = "size"      # "rank", "multiplier"
    # The allocation's trials: each layer at the distinct sizes these shares of its MACs taken away
    # give (sizes in multiples of round_to collapse: MobileNet's 64-to-128 1x1 conv had ranks
    # 32/24/8 at 25/50/75%, not 16; 87.5%: rank 8 of a 1x1 conv from 64 channels), and how they
    # are scored (`sensitivity.Scorer`).
    trial_ratios: ClassVar[tuple[float, ...]] = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
    trial_score: ClassVar[str] = "kl"
    trial_search: ClassVar[str] = "exact"   # a layer's MACs saved add up exactly: the knapsack's prediction holds

    def target(self) -> tuple[str, float]:
        """("macs" or "latency", the share of the original's to reach): the option given, else the default."""
        if self.latency is not None:
            return "latency", self.latency
        return ("macs", self.macs) if self.macs is not None else self.default_target

    def _sizes(self) -> dict[str, int]:
        """Sizes the user named per layer (node name or output tensor)."""
        return {}

    def _breakeven(self, node: gs.Node) -> float:
        """The size at which the factors cost as many MACs as the layer."""
        raise NotImplementedError

    def _option_size(self, node: gs.Node, gram: np.ndarray | None) -> int | None:
        """A size some other option asks for (energy=), or None."""
        return None

    def _size(self, node: gs.Node, gram: np.ndarray | None) -> tuple[int, str]:
        """The layer's size from the options (named, another option, or `macs` of its own MACs),
        or why it is not factored."""
        breakeven, sizes = self._breakeven(node), self._sizes()
        named = sizes.get(node.name, sizes.get(G.layer_id(node)))
        if sizes and named is None:
            return 0, f"not named in {self.size_word}s"
        size = int(named) if named is not None else self._option_size(node, gram)
        size = self._size_at(node, 1.0 - self.target()[1]) if size is None else size
        if size < 1:
            return 0, f"{self.size_word} {size} is below 1"
        if size >= breakeven:
            return 0, (f"{self.size_word} {size} is at or above break-even ({breakeven:.1f}): "
                       "factoring would not reduce MACs")
        return size, ""

    def _size_at(self, node: gs.Node, ratio: float) -> int:
        """The size that takes about `ratio` of the layer's MACs away: the nearest multiple of
        `round_to` below break-even (VGG at half the MACs: ranks 16/24/24/48 ran 0.59x of fp32 at
        batch 32, the unrounded 14/26/28/52 0.65x), else the exact size."""
        breakeven = self._breakeven(node)
        exact = max(1, int(np.floor((1.0 - ratio) * breakeven + 1e-9)))
        r = getattr(self, "_multiple", self.round_to if self.round_to != "auto" else 1)
        for size in (max(r, int(round(exact / r)) * r), int(exact // r) * r):
            if 1 <= size < breakeven:
                return size
        return exact

    def _trial_ratios(self, node: gs.Node) -> tuple[float, ...]:
        """The layer's allocation trials: one per distinct size `trial_ratios` give, as the exact
        share of its MACs that size takes away (smallest first)."""
        breakeven = self._breakeven(node)
        sizes = sorted({self._size_at(node, r) for r in self.trial_ratios}, reverse=True)
        ratios = tuple(r for r, s in ((1.0 - s / breakeven, s) for s in sizes) if self._size_at(node, r) == s)
        return ratios or tuple(self.trial_ratios)

    def _split(self, graph: gs.Graph, ctx: Context, node: gs.Node, gram: np.ndarray | None, size: int,
               cache: dict) -> str:
        """Factor the layer (`cache`: what it computed for the layer before, by layer id, for the
        allocation's trials at other sizes); returns a few words for the report."""
        raise NotImplementedError

    def _allocates(self) -> bool:
        return self.allocation == "sensitivity"

    # -- the driver ---------------------------------------------------------------------------
    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        notes: list[str] = []
        self._cache: dict = {}                # per-layer decompositions, reused across sizes
        self._multiple = self.round_to if self.round_to != "auto" else channel_multiple(ctx.providers)[0]
        layers: dict[str, gs.Node] = {}
        for node in list(graph.nodes):
            if node.op not in self.handles or {node.name, G.layer_id(node)} & set(self.exclude):
                continue
            why = self._eligible(node)
            if why is not None:
                if W.layer_weight(node) is not None:
                    notes.append(f"{node.op} '{G.display_name(node)}': {why}; left as is")
                continue
            layers[G.layer_id(node)] = node
        allocates = self._allocates() and bool(layers)
        if self.allocation == "uniform" and self.target()[0] == "latency" and layers and not self._sizes():
            notes.append(f"allocation='uniform' takes each layer to {self.target()[1]} of its MACs: "
                         "a latency target is measured only by the sensitivity allocation")
        data = ctx.require_calib(self.name) if (self.data_aware or self.recover or allocates) and layers else None
        grams: dict[str, np.ndarray | None] = {k: None for k in layers}
        if data is not None and self.data_aware:
            def keep(node: gs.Node, g: list[np.ndarray] | None) -> None:
                grams[G.layer_id(node)] = g[0] if g else None
            named = self._sizes()                 # with sizes named, only those layers need their moments
            sequential(graph, ctx, data, {id(n): keep for lid, n in layers.items()
                                          if not named or n.name in named or lid in named},
                       min_columns=0)     # whitening pays for any fan-in (a first conv's 9 taps too)
        sizes: dict[str, int] = {}
        for lid, node in layers.items():
            size, why = self._size(node, grams[lid])
            if why:
                notes.append(f"{node.op} '{G.display_name(node)}': {why}; left as is")
            else:
                sizes[lid] = size
        stats: dict = {}
        if allocates and sizes:
            sizes = self._allocate(graph, ctx, data, {k: layers[k] for k in sizes}, grams, stats, notes)
        stored = {lid: W.layer_weight(layers[lid]).kind for lid in sizes}
        done = [self._split(graph, ctx, layers[lid], grams[lid], size, self._cache) for lid, size in sizes.items()]
        stats["layers_factored"] = len(done)
        if any(kind != "dense" for kind in stored.values()):
            notes.append(f"{sum(k != 'dense' for k in stored.values())} factored layers had {'/'.join(sorted(set(stored.values()) - {'dense'}))} "
                         "weights; their factors are float (quantize or cluster after factoring)")
        if done:
            notes.append("factored: " + ", ".join(done))
            if self.recover:
                result = recover(graph, ctx, data, RecoverySettings(temperature=ctx.temperature, alpha=ctx.alpha))
                stats.update(result.stats)
                notes += result.notes
        return PassResult(graph, bool(done), stats, notes)

    def _allocate(self, graph: gs.Graph, ctx: Context, data, layers: dict[str, gs.Node], grams: dict,
                  stats: dict, notes: list[str]) -> dict[str, int]:
        """Sizes for `macs` of the model's MACs with the least accuracy lost: each layer factored
        alone at each size `trial_ratios` give (`_trial_ratios`), scored by how far the outputs
        move from the original's (`trial_score`: KL, finer than top-1 on a few hundred samples),
        then structured pruning's allocation (`onnxcompress.sensitivity`) with its exact search:
        the combination whose summed losses are least for the MACs saved (MobileNet at 0.5x:
        97.6% where the greedy's last move, one deep cut, gave 97.1%)."""
        model = G.to_model(G.tidy(graph.copy()), like=ctx.original)

        def factored(m, ratios: dict[str, float]):
            g, scratch = G.to_graph(m), ctx.fork()
            by_id = {G.layer_id(n): n for n in g.nodes}
            for lid, r in ratios.items():
                self._split(g, scratch, by_id[lid], grams[lid], self._size_at(layers[lid], r), self._cache)
            return G.to_model(G.tidy(g), like=m)

        units = {lid: layer_cost(n)[0] for lid, n in layers.items()}
        trials = {lid: self._trial_ratios(n) for lid, n in layers.items()}
        by, target = self.target()
        chosen, more_stats, more_notes, _ = plan(model, factored, data, target, by, units=units, providers=ctx.providers,
                                                 ratios=trials, score=self.trial_score, search=self.trial_search)
        stats.update(more_stats)
        notes += more_notes[1:]      # the first lists ratios by layer id; the report lists the sizes
        return {lid: self._size_at(layers[lid], r) for lid, r in chosen.items()}
