"""early-exit: exit heads mid-network, so that confident inputs stop there and onnxruntime
really skips the rest.

An exit reads a cut tensor (the only thing the rest of the network needs from the part before
it): pooled over a grid of cells (1 x 1 is the global average; 2 x 2 to 4 x 4 keep where things
are, which a head early in the network needs: ResNet's head after its first block agrees with the
model on 73% of digits pooled 1 x 1, 97% pooled 4 x 4), flattened, and a Gemm distilled from the
model's own logits on soft targets. An `If` on the head's confidence returns the head's logits, or
runs the rest of the network in its else-branch; a second exit sits inside the first one's
else-branch, so the Ifs nest. Confidence is the largest softmax probability, and a batch exits
only when every sample in it is confident (an If takes one condition per run): at batch 1 each
input decides alone; in a larger batch one doubtful sample sends the whole batch on.

Where (unless `at` names the tensors) and how (unless `grid` is given): every cut holding between
10% and 75% of the MACs, with every grid its activation allows, gets a head fit on the first two
thirds of the calibration data and swept over thresholds on the last third. Then some are judged
on every calibration sample by cross-fitting (each fold predicted by a head fit on the other
folds): for one exit the cheapest few (FINALISTS), for several the best at each cut, whose chains
(up to `exits` long, in graph order) are swept over every combination of thresholds. The setting
with the least expected MACs is kept whose drop (accuracy with labels, else top-1 agreement, at
batch 1) plus `margin` standard errors stays within the budget; the heads deployed are fit on all
of the data. Many candidates judged on a few hundred samples make one of them look better than it
is: hence the second look on all the samples, a margin of three standard errors (about what a
one-sided 5% test corrected for some 30 candidates asks, Bonferroni: z = 2.9; with two, VGG's
threshold 0.85 said 0.10 +- 0.17 points and lost 0.6 on the test digits), and a standard error of
at least one sample's where no sample changed. Each threshold is a graph input ("exit_threshold",
or "exit_threshold_1", ... for several exits) with its value as the initializer, so a deployer can
override it per call; the optional output "exit_index" says which part answered.
"""
from __future__ import annotations

import dataclasses
import itertools
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
GRIDS = (1, 2, 3, 4)           # head pooling cells per side tried when `grid` is not given
CUT_SHARE = (0.10, 0.75)       # share of the MACs before the cuts tried when `at` is not given
CANDIDATE_ITERS, FINAL_ITERS = 60, 150   # L-BFGS iterations: the candidates' heads, then the finalists'
                                         # (warm-started from the candidate's head)
FINALISTS, FOLDS = 3, 3        # candidates judged again by cross-fitting on every calibration sample
MAX_EXITS = 3                  # chains are searched over every combination of thresholds: 13^k settings


@dataclass
class Site:
    """Where the exit goes, and what it costs at batch 1."""
    cut: X.Cut
    output: gs.Variable
    model: onnx.ModelProto   # the graph as it was, exported
    exit_macs: int           # the first part
    full_macs: int
    shapes: dict             # every tensor's shape as the model declares it (a grid needs a fixed height and width)


@dataclass
class Head:
    """One candidate exit: a site, its pooling grid, the fit head, and its threshold sweep."""
    site: Site
    grid: int
    weight: np.ndarray
    bias: np.ndarray
    agreement: float                 # held-out top-1 agreement of the head with the full model, percent
    rows: list[X.SweepRow]
    chosen: X.SweepRow | None
    predicted: np.ndarray | None = None   # every calibration sample's logits from a head fit without it


@dataclass
class EarlyExit(Pass):
    """Add exit heads mid-network: confident inputs skip the rest (nested Ifs that onnxruntime skips)."""

    name = "early-exit"
    handles = frozenset({"Conv"})           # the exit reads a conv stage's [N, C, H, W] activation
    at: tuple[str, ...] = ()                # the tensors after which exits go (one name or several); (): chosen
    exits: int = 2                          # when chosen: the most exits placed (each after another stage)
    grid: int | None = None                 # head pooling cells per side (1: global average); None: chosen
    max_candidates: int = 8                 # cuts tried when `at` is empty (evenly spread over those found)
    threshold: float | None = None          # None: the cheapest within max_drop on held-out calibration data
    max_drop: float | None = None           # points; None: the run's --max-drop, else 1
    margin: float = 3.0                     # standard errors of the held-out drop added before the budget test
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
        if self.grid is not None and not 1 <= self.grid <= 8:
            raise ValueError("grid must be between 1 and 8")
        if self.max_candidates < 1:
            raise ValueError("max_candidates must be at least 1")
        if not 1 <= self.exits <= MAX_EXITS:
            raise ValueError(f"exits must be between 1 and {MAX_EXITS}")
        self.at = (self.at,) if isinstance(self.at, str) else tuple(self.at)

    def required_opset(self) -> int:
        return 13   # Softmax over one axis, GreaterOrEqual

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        try:
            sites = self._sites(graph, ctx)
        except X.CannotBranch as e:
            return PassResult(graph, False, {}, [f"left as is: {e}"])
        data = ctx.require_calib(self.name)
        if len(data) < 3:
            return PassResult(graph, False, {}, ["left as is: needs at least 3 calibration samples"])
        shapes = sites[0].shapes
        grids = {s.cut.tensor.name: self._grids(shapes.get(s.cut.tensor.name) or ()) for s in sites}
        if not any(grids.values()):
            return PassResult(graph, False, {}, [f"left as is: grid={self.grid} does not fit the activation's "
                                                 "height and width"])
        features, logits = X.pooled_features(sites[0].model, data, grids, sites[0].output.name, ctx.providers,
                                             ctx.batch_size)
        n_fit = len(data) - len(data) // 3      # fit on the first two thirds, calibrate on the rest
        labels = None if data.labels is None else data.labels[n_fit:]
        budget = self.max_drop if self.max_drop is not None else ctx.max_drop if ctx.max_drop is not None else 1.0
        targets = soft_targets([logits[:n_fit]], self.temperature)
        fit = lambda site, k, iters: self._head(site, k, features[site.cut.tensor.name, k], n_fit, targets,
                                                logits[n_fit:], labels, budget, iters)
        heads = [fit(site, k, CANDIDATE_ITERS) for site in sites for k in grids[site.cut.tensor.name]]
        crossfit = lambda h: self._crossfit(h, features[h.site.cut.tensor.name, h.grid], logits, data.labels, budget)
        several = len(self.at) > 1 or (not self.at and self.exits > 1)
        chain, chosen, sweep = self._chain(heads, crossfit, logits, data.labels, budget) if several else \
            self._single(heads, crossfit)
        metric = "accuracy" if labels is not None else "top-1 agreement"
        first = chain[0]
        stats = {"exit_after": first.site.cut.tensor.name,
                 "cut_macs_share": first.site.exit_macs / max(first.site.full_macs, 1),
                 "grid": first.grid, "max_drop": budget, "holdout_samples": len(data),
                 "head_agreement": first.agreement, "sweep": [self._row(r) for r in sweep],
                 "candidates": [self._describe(h) for h in heads]}
        notes = [X.sweep_table(sweep, metric, None if chosen is None else chosen.threshold)]
        if len(heads) > 1:
            notes.append(self._candidates_table(heads, chain))
        if chosen is None:
            return PassResult(graph, False, stats, [f"left as is: no threshold keeps {metric} within {budget} points "
                                                    f"({self.margin:g} standard errors included) and saves MACs",
                                                    *notes])
        thresholds, shares = list(chosen.thresholds), list(chosen.exit_shares)
        ifs = self._insert(graph, chain, thresholds)
        for node, odds in zip(ifs, X.exit_odds(shares)):
            ctx.state.branch_probs[node.outputs[0].name] = odds
        stats.update(threshold=thresholds[0] if len(chain) == 1 else thresholds, exit_share=chosen.exit_share,
                     expected_macs_ratio=chosen.macs_ratio, holdout_drop=chosen.drop, holdout_drop_error=chosen.error,
                     rest_nodes=len(first.site.cut.rest),
                     exits=[{"tensor": h.site.cut.tensor.name, "grid": h.grid, "threshold": t, "exit_share": p,
                             "threshold_input": name} for h, t, p, name in
                            zip(chain, thresholds, shares, self._threshold_names(len(chain)))])
        where = "; ".join(f"after '{h.site.cut.tensor.name}' ({h.site.exit_macs / max(h.site.full_macs, 1):.0%} of "
                          f"the MACs, pooled {h.grid}x{h.grid}, threshold {t:g}, {p:.0%} leave)"
                          for h, t, p in zip(chain, thresholds, shares))
        summary = (f"{len(chain)} exit{'s' if len(chain) > 1 else ''} {where}: expected MACs {chosen.macs_ratio:.2f}x "
                   f"at batch 1, {metric} drop {chosen.drop:.2f} +- {chosen.error:.2f} points (each calibration "
                   "sample judged by heads fit without it); a batch exits only when every sample in it is confident")
        return PassResult(graph, True, stats, [summary, *notes])

    @staticmethod
    def _row(r: X.SweepRow | X.ChainRow) -> dict:
        """A sweep row for the report: a chain's thresholds as a list, its exit share the total."""
        return {**dataclasses.asdict(r), "threshold": r.threshold if isinstance(r, X.SweepRow) else list(r.threshold),
                "exit_share": r.exit_share}

    @staticmethod
    def _rank(h: Head) -> tuple:
        """Candidates' order: those whose sweep found a threshold, cheapest first, then by agreement."""
        return h.chosen is None, h.chosen.macs_ratio if h.chosen else 0, -h.agreement

    def _single(self, heads: list[Head], crossfit) -> tuple[list[Head], X.SweepRow | None, list[X.SweepRow]]:
        """One exit: the cheapest few candidates by their held-out third (FINALISTS) judged again on
        every calibration sample, each predicted by a head fit without it (FOLDS-fold cross-fitting):
        a third of the data picked the cheapest of many candidates on a few hundred samples, and a
        threshold whose drop rests on no lost sample at all is the one the next data breaks (VGG: 0.0
        on 333 held-out digits, 1.2 points on the test digits)."""
        finals = [crossfit(h) for h in sorted(heads, key=self._rank)[:FINALISTS]]
        fitting = [h for h in finals if h.chosen is not None]
        best = min(fitting, key=lambda h: (h.chosen.macs_ratio, h.weight.size)) if fitting else \
            max(finals, key=lambda h: h.agreement)
        return [best], best.chosen, best.rows

    def _chain(self, heads: list[Head], crossfit, logits: np.ndarray, labels: np.ndarray | None,
               budget: float) -> tuple[list[Head], X.ChainRow | None, list[X.ChainRow]]:
        """Several exits: the best candidate at each cut, cross-fit on every sample; then every
        chain of up to `exits` of them in graph order (every named one when `at` names several)
        under every combination of thresholds, and the cheapest within the budget. The rows
        returned are the chosen chain's cheapest for each drop (its Pareto front)."""
        best_at: dict[str, Head] = {}
        for h in sorted(heads, key=self._rank):
            best_at.setdefault(h.site.cut.tensor.name, h)
        finals = sorted((crossfit(h) for h in best_at.values()), key=lambda h: h.site.exit_macs)
        sizes = [len(finals)] if self.at else range(1, min(self.exits, len(finals)) + 1)
        found: tuple | None = None
        for chain in (c for k in sizes for c in itertools.combinations(finals, k)):
            settings = None if self.threshold is None else [(self.threshold,) * len(chain)]
            rows = X.chain_sweep([h.predicted for h in chain], logits, labels, [h.site.exit_macs for h in chain],
                                 chain[0].site.full_macs, [h.weight.size for h in chain], settings, vouch=True)
            row = rows[0] if self.threshold is not None and self.at else X.choose(rows, budget, self.margin)
            if row is not None and (found is None or row.macs_ratio < found[1].macs_ratio):
                found = list(chain), row, rows
        if found is None:
            return finals[:1], None, []
        chain, row, rows = found
        front, lowest = [], np.inf
        for r in sorted(rows, key=lambda r: (r.macs_ratio, r.drop)):
            if r.drop < lowest or r is row:
                front.append(r)
                lowest = min(lowest, r.drop)
        return chain, row, front

    def _grids(self, shape) -> list[int]:
        """The pooling grids to try on an activation of `shape`."""
        return [k for k in ((self.grid,) if self.grid else GRIDS) if k == 1 or X.grid_window(shape, k)]

    def _head(self, site: Site, grid: int, H: np.ndarray, n_fit: int, targets: np.ndarray, full: np.ndarray,
              labels: np.ndarray | None, budget: float, iters: int) -> Head:
        """Fit the head on the first n_fit samples' features H; sweep its thresholds on the rest."""
        weight, bias = fit_soft_head(H[:n_fit], targets, self.temperature, max_iter=iters)
        head = H[n_fit:] @ weight.T + bias
        rows, chosen = self._sweep(site, head, full, labels, weight.size, budget)
        agreement = float(np.mean(head.argmax(1) == full.argmax(1)) * 100)
        return Head(site, grid, weight, bias, agreement, rows, chosen)

    def _crossfit(self, h: Head, H: np.ndarray, logits: np.ndarray, labels: np.ndarray | None,
                  budget: float) -> Head:
        """Head `h`'s cut and grid judged on every sample: each fold predicted by a head fit on the
        other folds, the thresholds swept on all of them; the head kept is then fit on every sample."""
        n = len(H)
        folds = np.array_split(np.arange(n), min(FOLDS, n))
        predicted = np.empty_like(logits, dtype=np.float64)
        for held in folds:
            rest = np.setdiff1d(np.arange(n), held)
            weight, bias = fit_soft_head(H[rest], soft_targets([logits[rest]], self.temperature), self.temperature,
                                         W0=h.weight, b0=h.bias, max_iter=FINAL_ITERS)
            predicted[held] = H[held] @ weight.T + bias
        weight, bias = fit_soft_head(H, soft_targets([logits], self.temperature), self.temperature,
                                     W0=h.weight, b0=h.bias, max_iter=FINAL_ITERS)
        rows, chosen = self._sweep(h.site, predicted, logits, labels, weight.size, budget, vouch=True)
        agreement = float(np.mean(predicted.argmax(1) == logits.argmax(1)) * 100)
        return Head(h.site, h.grid, weight, bias, agreement, rows, chosen, predicted)

    def _sweep(self, site: Site, head: np.ndarray, full: np.ndarray, labels: np.ndarray | None, head_macs: int,
               budget: float, vouch: bool = False) -> tuple[list[X.SweepRow], X.SweepRow | None]:
        """The threshold sweep of a head's logits against the full model's, and the row chosen
        (`vouch`: the final judgement, on every sample, rather than a candidate's ranking)."""
        grid = sorted({*X.THRESHOLDS, *([self.threshold] if self.threshold is not None else [])})
        rows = X.sweep(head, full, labels, site.exit_macs + head_macs, site.full_macs, head_macs, grid, vouch)
        if self.threshold is None:
            return rows, X.choose(rows, budget, self.margin)
        given = [r for r in rows if r.threshold == self.threshold]
        # a given threshold: at a named tensor it is taken as it is; among candidates, one qualifies by
        # keeping the budget there
        return rows, given[0] if self.at else X.choose(given, budget, self.margin)

    @staticmethod
    def _describe(h: Head) -> dict:
        return {"tensor": h.site.cut.tensor.name, "macs_share": h.site.exit_macs / max(h.site.full_macs, 1),
                "grid": h.grid, "head_agreement": h.agreement,
                "threshold": None if h.chosen is None else h.chosen.threshold,
                "exit_share": None if h.chosen is None else h.chosen.exit_share,
                "expected_macs_ratio": None if h.chosen is None else h.chosen.macs_ratio}

    @staticmethod
    def _candidates_table(heads: list[Head], chain: list[Head]) -> str:
        mark = lambda h: any((h.site.cut.tensor.name, h.grid) == (c.site.cut.tensor.name, c.grid) for c in chain)
        lines = ["exit candidates (head fit on two thirds of the calibration data, judged on the rest):",
                 "      MACs before  grid  head agrees  threshold  exit%   MACs   tensor"]
        for h in heads:
            c = h.chosen
            cells = (f"{c.threshold:9.3f}  {c.exit_share * 100:5.1f}  {c.macs_ratio:5.2f}x" if c else
                     f"{'-':>9s}  {'-':>5s}  {'-':>6s}")
            lines.append(f"      {h.site.exit_macs / max(h.site.full_macs, 1):11.0%}  {h.grid:>2d}x{h.grid:<1d}  "
                         f"{h.agreement:10.1f}%  {cells}   {h.site.cut.tensor.name}{'  <-' if mark(h) else ''}")
        return "\n".join(lines)

    def _sites(self, graph: gs.Graph, ctx: Context) -> list[Site]:
        """Where an exit may go; raises CannotBranch naming why the model cannot take one."""
        ours = {*self._threshold_names(1), *self._threshold_names(MAX_EXITS), INDEX_OUTPUT}
        taken = ours & set(graph.tensors())
        if taken:
            raise X.CannotBranch(f"the graph already has a tensor named {', '.join(sorted(taken))} "
                                 "(early-exit runs once per model)")
        if len(graph.outputs) != 1:
            raise X.CannotBranch(f"the model has {len(graph.outputs)} outputs; an exit needs a "
                                 "single-output classifier")
        model = G.to_model(G.tidy(graph.copy()), like=ctx.original)
        # symbolic sizes (PP-OCR's angle classifier takes any height and width) pinned to the data's
        pins = None if ctx.calib is None else ctx.calib.feed_shapes()
        shapes = static_shapes(model, pins)
        out = graph.outputs[0]
        shape = shapes.get(out.name) or []
        if len(shape) != 2 or shape[1] < 2 or out.dtype is None or np.dtype(out.dtype).kind != "f":
            raise X.CannotBranch(f"the output '{out.name}' is not [N, classes] float logits (shape {shape})")
        macs = {d.output: d.macs or 0 for d in macs_breakdown(model, pins)}
        if not self.at:
            cuts = X.cuts_between(graph, shapes, macs, *CUT_SHARE)
            cuts = [c for i, c in enumerate(cuts) if i + 1 == len(cuts) or cuts[i + 1][1] != c[1]]
            picks = np.unique(np.linspace(0, len(cuts) - 1, min(self.max_candidates, len(cuts))).round().astype(int))
            cuts = [cuts[i][0] for i in picks]
        else:
            cuts = [self._named_cut(graph, name, shapes) for name in dict.fromkeys(self.at)]
        total = sum(macs.values())
        declared = static_shapes(model) if pins else shapes
        return [Site(cut, out, model, sum(macs.get(G.layer_id(n), 0) for n in cut.first), total, declared)
                for cut in cuts]

    def _named_cut(self, graph: gs.Graph, name: str, shapes: dict) -> X.Cut:
        if name not in graph.tensors():
            raise OptionError(f"{self.name}: at='{name}' names no tensor of the graph")
        cut = X.cut_at(graph, name)
        if len(shapes.get(name) or ()) != 4:
            raise X.CannotBranch(f"'{name}' is not a 4-D activation [N, C, H, W] (shape {shapes.get(name)})")
        return cut

    @staticmethod
    def _threshold_names(k: int) -> list[str]:
        """The threshold inputs of k exits: 'exit_threshold', or 'exit_threshold_1' ... in graph order."""
        return [THRESHOLD_INPUT] if k == 1 else [f"{THRESHOLD_INPUT}_{j + 1}" for j in range(k)]

    def _insert(self, graph: gs.Graph, chain: list[Head], thresholds: list[float]) -> list[gs.Node]:
        """Each exit's head and If at its cut, the deepest first: the rest of the graph (deeper exits
        included) moves into the If's else-branch, so the Ifs nest. Returns the Ifs in graph order."""
        out, dtype = chain[0].site.output, np.dtype(chain[0].site.output.dtype)
        index = gs.Variable(INDEX_OUTPUT, np.int64, [1]) if self.exit_output else None
        if index is not None:
            graph.outputs.append(index)
        limits = [X.add_override(graph, name, np.array(t, dtype))      # the inputs in graph order
                  for name, t in zip(self._threshold_names(len(chain)), thresholds)]
        # the deeper exits' thresholds are read inside the outer Ifs' bodies, through an Identity that
        # stays in the main graph (`outer_value`)
        limits[1:] = [X.outer_value(graph, limit) for limit in limits[1:]]
        keep = {id(t.inputs[0]) for t in limits[1:]}
        ifs = []
        for j, (head, limit) in reversed(list(enumerate(zip(chain, limits)))):
            cut = X.cut_at(graph, head.site.cut.tensor.name)    # the graph as the deeper exits left it
            rest = [n for n in cut.rest if id(n) not in keep]
            window = None if head.grid == 1 else X.grid_window(head.site.shapes[cut.tensor.name], head.grid)
            inner = X.detach_output(graph, out)
            logits = X.add_head(graph, cut.tensor, head.weight, head.bias, dtype, window,
                                "exit_head" if len(chain) == 1 else f"exit_head_{j + 1}")
            then_values, else_values, outputs = [logits], [inner], [out]
            if index is not None:   # exit j answers j; the full model len(chain)
                deeper = X.detach_output(graph, index) if ifs else \
                    G.make_constant(G.unique_name(graph, "exit_index_full"), np.array([len(chain)], np.int64))
                then_values.append(G.make_constant(G.unique_name(graph, "exit_index_head"), np.array([j], np.int64)))
                else_values.append(deeper)
                outputs.append(index)
            ifs.append(X.branch(graph, X.confident(graph, logits, limit), then_values, rest, else_values, outputs))
        return ifs[::-1]
