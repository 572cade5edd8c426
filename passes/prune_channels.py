"""prune-channels: structured pruning. Whole channels (and every channel coupled to them) are
removed, so tensors, files and latency really shrink; accuracy is recovered between steps by the
shared distillation engine (a least-squares refit of the changed layers, then the head).

How much each group loses: `ratio` for all, `ratios` by name, or a target (`macs=0.5`, or
`latency=0.5` measured in onnxruntime) for which the sensitivity analysis (`onnxcompress.sensitivity`,
the `sensitivity` command's code) allocates per-group ratios with the least accuracy lost. Kept
channel counts are multiples of what the execution provider's kernels want (`round_to="auto"`).

A group that is a residual branch's inner width (`channels.branch_end`) can also go whole, at
ratio 1: the branch is replaced by its mean output on the calibration data and the layers after
the sum are refit. A target weighs that against narrowing: on ResNet, whose 16-channel first stage
cannot narrow at a multiple of 16, removing a branch there is the one cut that makes it faster."""
from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress import graph as G
from onnxcompress.channels import RULES, Analysis, Group, analyze, apply_removal, branch_end, remove_branches
from onnxcompress.errors import OptionError
from onnxcompress.importance import CRITERIA, DATA_CRITERIA, RANK_ONLY, group_scores
from onnxcompress.metrics import total_macs
from onnxcompress.pass_api import ChannelMap, Context, Pass, PassResult
from onnxcompress.recovery import RecoverySettings, recover, student_activations
from onnxcompress.runtime import channel_multiple
from onnxcompress.sensitivity import RATIOS, Scorer, check_target, plan, progressive, trial_ratios, uniform

__all__ = ["PruneChannels", "kept_count"]

Criterion = Literal["l1", "l2", "bn-scale", "mean-act", "apoz", "thinet", "lasso"]
assert set(CRITERIA) == set(Criterion.__args__)  # noqa: S101 - the two lists must agree
HELD_OUT_MIN = 96     # calibration samples below which recovered trials are scored on what they fit
TARGET_STEPS = (1, 3)                # numbers of cuts tried on a target's cut, with steps="auto"
HELD_OUT_FOLDS = 3   # those choices are scored on each third of the calibration data in turn, recovered on the rest


def kept_count(channels: int, ratio: float, round_to: int = 1, min_channels: int = 1) -> int:
    """Channels a group keeps when `ratio` of them go: rounded to a multiple of `round_to`, at least
    `min_channels` (and never more than it has)."""
    keep = channels * (1.0 - ratio)
    if round_to > 1:
        keep = max(round_to, round(keep / round_to) * round_to)
    return int(min(channels, max(min_channels, round(keep))))


@dataclass
class PruneChannels(Pass):
    """Remove the least important channels of every prunable channel group, in steps, recovering between."""

    name = "prune-channels"
    handles = frozenset(RULES)
    ratio: float = 0.3                       # share of each group's channels removed (scope="layer")
    macs: float | None = None                # or a target: this share of the MACs, ratios by sensitivity
    latency: float | None = None             # or this share of the latency (onnxruntime, batch 1 and 32)
    criterion: Criterion | None = None       # default: with calibration data "thinet" (scope="global": "mean-act"), else "l1"
    steps: int | Literal["auto"] = "auto"    # reach the ratios in this many cuts ("auto": 1; with a target, the
                                             # better of TARGET_STEPS on held-out samples)
    recover: bool = True                     # least-squares refit + head refit after each cut
    shifts: int = 2                          # ... fit on each calibration image and this many shifted copies
    seed: int = 0                            # the recovery's sampled positions, held-out samples and shifts
    round_to: int | Literal["auto"] = "auto"  # kept channel counts are multiples of this ("auto": the kernels')
    min_channels: int = 1
    exclude: tuple[str, ...] = ()            # node or group names whose groups stay whole
    scope: Literal["layer", "global"] = "layer"
    ratios: dict[str, float] = field(default_factory=dict)   # per-group ratios (from `sensitivity`); 1: a
                                                             # residual branch removed whole
    samples: int | None = None               # calibration samples for data criteria and recovery
    sensitivity_recover: bool = True         # with a target: measure each trial after recovery (slower, better)
    jobs: int | None = None                  # with a target: parallel trials (default: one per core)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        for r in self.ratios.values():
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"ratios must be in [0, 1] (1: a residual branch removed whole), got {r}")
        if self.round_to != "auto" and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise ValueError(f"round_to must be 'auto' or an integer of at least 1, got {self.round_to!r}")
        if self.steps != "auto" and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be 'auto' or an integer of at least 1, got {self.steps!r}")
        if self.min_channels < 1:
            raise ValueError("min_channels must be at least 1")
        if not isinstance(self.shifts, int) or self.shifts < 0:
            raise ValueError(f"shifts must be a whole number of at least 0, got {self.shifts!r}")
        check_target(self.macs, self.latency)
        if (self.macs is not None or self.latency is not None) and self.ratios:
            raise ValueError("a target (macs/latency) allocates the ratios: do not name ratios too")
        if self.scope == "global" and self.criterion in RANK_ONLY:
            raise ValueError(f"criterion '{self.criterion}' ranks channels within a group only: use scope='layer'")

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        needs_data = self.recover or self.criterion in DATA_CRITERIA or self.macs or self.latency
        data = ctx.require_calib(self.name) if needs_data else ctx.calib
        if data is not None and self.samples:
            data = data.take(self.samples)
        criterion = self.criterion_for(data)
        round_to, why = (self.round_to, "") if self.round_to != "auto" else channel_multiple(ctx.providers)
        if self.round_to == "auto" and self.latency is not None and round_to > 1:
            # a latency target times every candidate width, so a finer multiple costs no blind
            # guess, and ResNet's 16-channel groups, which a multiple of 16 leaves whole, get a cut
            round_to, why = round_to // 2, f"{why}, halved for a latency target: each width is timed"
        stats: dict[str, float] = {"round_to": round_to}
        notes = [f"channel counts in multiples of {round_to} (round_to='auto': {why})"] if why else []
        ratios, default, steps = self.ratios, self.ratio, self._steps
        if self.macs is not None or self.latency is not None:
            (ratios, steps), default = self._allocate(graph, ctx, data, round_to, criterion, stats, notes), 0.0
        shapes = None if data is None else data.feed_shapes()
        analyze_now = lambda: analyze(graph, G.to_model(G.tidy(graph.copy()), like=ctx.original), shapes)
        an = analyze_now()
        notes += _frozen_notes(an, self.exclude)
        whole = self._whole(an, ratios, default, data)
        prunable = self._prunable(an)
        narrowed = [g for g in prunable if g.id not in whole]
        targets = {g.id: kept_count(len(g.units), _ratio(g, an, ratios, default), round_to, self.min_channels)
                   for g in narrowed}
        start = {g.id: len(g.units) for g in narrowed}
        notes += _whole_notes(an, narrowed, targets, ratios, default, round_to, self.min_channels)
        stats.update({"groups": len(an.groups), "groups_prunable": len(prunable),
                      "channels_before": sum(len(g.units) for g in prunable)})
        if self.criterion is None and not any(n.startswith("criterion ") for n in notes):
            notes.append(f"channels ranked by {criterion} (the default {'without' if criterion == 'l1' else 'with'} "
                         "calibration data)")
        removed_total = 0
        stats["steps"] = steps
        if whole:   # first: the narrowing's ranking and refits then see the model without them
            removed_total += self._remove_branches(graph, ctx, data, an, whole, stats, notes)
        for step in range(1, steps + 1):
            if step > 1 or whole:
                an = analyze_now()
            goal = {n: c - round((c - targets[n]) * step / steps) for n, c in start.items()}
            removed = self._choose(graph, an, goal, ctx, data, criterion, round_to)
            removed_total += len(removed)
            _update_channel_maps(ctx, an, removed)
            apply_removal(graph, an, removed)
            G.tidy(graph)
            gc.collect()    # the cut constants sit in graphsurgeon's reference cycles, whole weights read from disk included
            if self.recover and (removed or (whole and step == 1)):
                result = recover(graph, ctx, data, RecoverySettings(temperature=ctx.temperature, alpha=ctx.alpha,
                                                                    shifts=self.shifts, seed=self.seed))
                stats.update({f"step{step}_{k}": v for k, v in result.stats.items() if k.startswith("head_agreement")})
                notes += [n for n in result.notes if n not in notes]
        stats["channels_after"] = stats["channels_before"] - removed_total
        return PassResult(graph, removed_total > 0, stats, notes)

    def _whole(self, an: Analysis, ratios: dict[str, float], default: float, data) -> dict[str, str]:
        """Groups at ratio 1 ({group id: the tensor their branch adds}); an error where one is not a
        residual branch's inner width or there is no data for its mean."""
        whole = {}
        for g in self._prunable(an):
            if _ratio(g, an, ratios, default) < 1.0:
                continue
            end = branch_end(an, g)
            if end is None:
                raise OptionError(f"{self.name}: group '{g.name}' cannot be removed whole (ratio 1): it is not the "
                                  "inner width of a residual branch (one layer reads it, and that layer's output "
                                  "reaches an Add with the shortcut)")
            if data is None:
                raise OptionError(f"{self.name}: removing group '{g.name}' whole needs calibration data (--calib): "
                                  "the branch is replaced by its mean output")
            whole[g.id] = end
        return whole

    def _remove_branches(self, graph: gs.Graph, ctx: Context, data, an: Analysis, whole: dict[str, str],
                         stats: dict, notes: list[str]) -> int:
        """Each branch replaced by its mean on the calibration data (per channel); the layers that
        read the sums are refit by the recovery that follows. Returns the channels removed."""
        acts = student_activations(graph, ctx, data, list(whole.values()))
        means = {}
        for end in whole.values():
            a, axis = acts[end], an.axis.get(end, 1)
            means[end] = a.mean(axis=tuple(i for i in range(a.ndim) if i != axis), keepdims=True).astype(a.dtype)
        ctx.state.refit.update(remove_branches(graph, means))
        groups = [g for g in an.groups if g.id in whole]
        notes.append("residual branches removed (ratio 1; each replaced by its mean output, the layers after its sum "
                     "refit): "
                     + ", ".join(f"'{g.name}' ({len(g.units)} channels)" for g in groups))
        stats["branches_removed"] = len(groups)
        return sum(len(g.units) for g in groups)

    def _prunable(self, an: Analysis) -> list[Group]:
        return [g for g in an.groups if not g.frozen and not _excluded(g, an, self.exclude)]

    def _allocate(self, graph: gs.Graph, ctx: Context, data, round_to: int, criterion: str, stats: dict,
                  notes: list[str]) -> tuple[dict[str, float], int]:
        """Per-group ratios for the target: each group pruned alone (this pass, one shot) at 25/50/75%
        and scored against the original on the calibration data, then the greedy allocation. Trials
        that recover are fit on the first two thirds and scored on the rest (scored on what they were
        fit to, every trial looks harmless). Rivals that meet the target too (`uniform`, and for a
        latency target `progressive`) compete in `_select`. Returns the ratios and the number of steps."""
        model = G.to_model(G.tidy(graph.copy()), like=ctx.original)
        fit, held = _fit_and_held(data) if self.sensitivity_recover else (data, data)
        trial_ctx = dataclasses.replace(ctx, calib=fit)
        # the per-group trials only rank the groups: recovered without shifted copies, at a third of the cost
        one_shot = dataclasses.replace(self, macs=None, latency=None, ratio=0.0, steps=1, round_to=round_to,
                                       criterion=criterion, shifts=0)

        def pruner(recover: bool):
            def prune(m, ratios: dict[str, float]):
                g = G.to_graph(m)
                dataclasses.replace(one_shot, ratios=dict(ratios), recover=recover).run(g, trial_ctx.fork())
                return G.to_model(G.tidy(g), like=m)
            return prune

        shapes = data.feed_shapes()
        an = analyze(G.to_graph(model), model, shapes)
        narrows = lambda g: kept_count(len(g.units), max(RATIOS), round_to, self.min_channels) < len(g.units)
        prunable = self._prunable(an)
        every = trial_ratios(an, prunable)
        # groups a cut can change; a branch that cannot narrow (ResNet's 16 channels at a multiple
        # of 16) is tried whole only
        trials = {g.name: every[g.name] if narrows(g) else every[g.name][len(RATIOS):] for g in prunable}
        trials = {name: rs for name, rs in trials.items() if rs}
        units = {g.name: len(g.units) for g in prunable if g.name in trials}
        by, target = ("latency", self.latency) if self.latency is not None else ("macs", self.macs)
        chosen, more_stats, more_notes, sens = plan(model, pruner(self.sensitivity_recover), fit, target, by,
                                                    structure=pruner(False), units=units,
                                                    ratios=trials if any(r != RATIOS for r in trials.values()) else RATIOS,
                                                    recovered=self.sensitivity_recover, evaluation=held,
                                                    providers=ctx.providers, jobs=self.jobs)
        stats.update({f"planned_{k}": v for k, v in more_stats.items()})
        notes += more_notes
        # per-unit trials do not add up where cuts compound: on ResNet latency=0.5 the allocation lost
        # 2.0 points for 2.17x where every group at 40% (multiples of 8) lost 0.8 for 2.07x; so rivals
        rivals = {}
        other = uniform(model, pruner(False), units, fit, target, by, ctx.providers)
        if other is not None:
            rivals["uniform"] = other
        if by == "latency" and self.sensitivity_recover:
            # latency savings add up worst of all (a layer between two cut groups loses both ways):
            # on MobileNet latency=0.5 the progressive search lost 0.4-1.3 points (runs differ with
            # the timings that steer it) where every group at 50% lost 2.0
            levels = {u: _levels(n, round_to, self.min_channels) + [r for r in trials[u] if r == 1.0]
                      for u, n in units.items()}
            # steps that score within one held-out sample of the best are alike: the smallest is taken
            found = progressive(model, sens, pruner(False), self._joint(model, ctx, data, round_to, criterion), levels,
                                fit, target, by, ctx.providers, self.jobs, tie=100.0 / len(held))
            if found is not None:
                rivals["progressive"] = found
        candidates = ({"allocated": chosen} if more_stats["target_met"] or not rivals else {}) \
            | {k: v[0] for k, v in rivals.items()}
        pick, steps = self._select(model, ctx, data, candidates, criterion, round_to, notes, by, target)
        if pick != "allocated":
            chosen, measured = rivals[pick]
            stats.update(planned_target_met=True, planned_macs_ratio=measured["macs"] / total_macs(model, shapes))
            if pick == "uniform":
                stats["planned_uniform_ratio"] = next(iter(chosen.values()))
            if by == "latency":
                stats["planned_latency_ratio"] = measured["value"]
        if rivals:
            stats["planned_pick"] = pick
        if by == "latency" and "planned_latency_ratio" in stats:
            notes.append(f"latency={target:g}: the cut taken timed at {stats['planned_latency_ratio']:.2f} of the "
                         "original's time on this machine (one thread, the two run by run in turn); a ratio measured "
                         "here, which moves with the hardware and its load: time the output where it will run")
        return chosen, steps

    def _select(self, model, ctx: Context, data, candidates: dict[str, dict[str, float]], criterion: str, round_to: int,
                notes: list[str], by: str, target: float) -> tuple[str, int]:
        """The cut to make (a name in `candidates`) and its number of steps, chosen one after the
        other by `_held_out_scores`: the candidates in one cut with `criterion`;
        then, with steps="auto", each of TARGET_STEPS (on MobileNet's latency=0.5 cut, 3 steps kept
        98.0% of the test digits where one kept 97.0%; on other cuts one step did better).

        Ranked by the held-out KL divergence from the original first, accuracy second: on fifteen
        cuts of the three MNIST models, the folds' KL ordered the cuts as the test digits' accuracy
        did, where their accuracy (a third of 1,000 digits: one digit is 0.3 points) put a uniform
        cut second of five on MobileNet that was fourth on the test digits. The criterion is not
        chosen on the folds: they preferred l1 on four of five ResNet cuts where ThiNet kept more test
        digits on all four (by 0.2-2.9 points), recovered on two thirds of the digits where ThiNet
        ranks on fewer samples than the final cut has. Ties go to the first."""
        steps = self._steps
        scored: dict[tuple[str, int], tuple[float, ...]] = {}

        def best(options: list[tuple[str, int]]) -> tuple[str, int]:
            if len(options) == 1:
                return options[0]
            todo = {o: (candidates[o[0]], o[1]) for o in options if o not in scored}
            if todo:
                scored.update(self._held_out_scores(model, ctx, data, todo, criterion, round_to)[0])
            return max(options, key=lambda o: (scored[o][1], scored[o][0]))

        said = lambda o: ", ".join(f"{v:.2f}" for v in scored[o])
        on = "accuracy and -100 x KL from the original (ranked by KL, then accuracy) " + (
            f"on {len(data)} calibration samples in {HELD_OUT_FOLDS} folds, each scored after recovery on the others"
            if len(data) >= HELD_OUT_MIN else f"on the {len(data)} calibration samples recovered on")
        pick = best([(k, steps) for k in candidates])
        if len(candidates) > 1:
            what = {"uniform": lambda r: f"every unit at {next(iter(r.values())):g}",
                    "progressive": lambda r: "the progressive search's " + ", ".join(f"{k} {v:g}" for k, v in r.items())}
            notes.append(f"{by}={target:g} also met by " + "; ".join(f"{k} ({what[k](candidates[k])})" for k in candidates
                                                                    if k != "allocated")
                         + f": {on}: " + ", ".join(f"{k[0]} {said(k)}" for k in scored) + f"; {pick[0]} used")
        if self.steps == "auto" and candidates[pick[0]]:
            options = [(pick[0], s) for s in TARGET_STEPS]
            pick = best(options)
            notes.append(f"{pick[1]} step(s) chosen by {on}: " + ", ".join(f"{o[1]} {said(o)}" for o in options))
        return pick

    @property
    def _steps(self) -> int:
        """The number of cuts where nothing is chosen on held-out samples."""
        return 1 if self.steps == "auto" else self.steps

    def _cut(self, model, ctx: Context, data, ratios: dict[str, float], criterion: str, round_to: int, steps: int):
        """The model cut at `ratios` with `criterion` in `steps` and recovered on `data`."""
        g = G.to_graph(model)
        dataclasses.replace(self, macs=None, latency=None, ratio=0.0, ratios=dict(ratios), round_to=round_to,
                            criterion=criterion, steps=steps).run(g, dataclasses.replace(ctx, calib=data).fork())
        return G.to_model(G.tidy(g), like=model)

    def _joint(self, model, ctx: Context, data, round_to: int, criterion: str):
        """The progressive search's score of a cut: recovered on two thirds of the calibration data,
        accuracy (or agreement) plus -100 x KL from the original on the rest."""
        fit, held = _fit_and_held(data)
        scorers = _accuracy_and_kl(model, held, ctx.providers)
        return lambda ratios: sum(sc(self._cut(model, ctx, fit, ratios, criterion, round_to, self._steps)) for sc in scorers)

    def _held_out_scores(self, model, ctx: Context, data, cuts: dict, criterion: str, round_to: int) -> tuple[dict, int]:
        """Each cut ({key: (ratios, steps)}, channels ranked by `criterion`) made and recovered on two
        thirds of the calibration data, accuracy (or agreement) and -100 x KL from the original on the other third;
        every third held out in turn (HELD_OUT_FOLDS), the means. A single third of MNIST's 1,000
        digits is 334: one digit is 0.3 points, and the thirds of one cut differed by 1.8 points.
        Returns ({key: (accuracy, -100 x KL)}, samples held out)."""
        folds = _folds(data)
        per_fold = {key: [] for key in cuts}
        for fit, held in folds:
            scorers = _accuracy_and_kl(model, held, ctx.providers)
            for key, (ratios, steps) in cuts.items():
                pruned = self._cut(model, ctx, fit, ratios, criterion, round_to, steps)
                per_fold[key].append(tuple(sc(pruned) for sc in scorers))
        return {k: tuple(float(x) for x in np.mean(v, axis=0)) for k, v in per_fold.items()}, sum(len(h) for _, h in folds)

    def criterion_for(self, data) -> str:
        """With data to rank by (recovery needs it anyway), ThiNet (mean activation where scores
        must compare across groups): on PP-OCRv4 rec they keep 79-83% and 70% exact match where
        l1 keeps 52% (fp32: 77%)."""
        if self.criterion is not None:
            return self.criterion
        if data is None:
            return "l1"
        return "thinet" if self.scope == "layer" else "mean-act"

    def _choose(self, graph: gs.Graph, an: Analysis, goal: dict[str, int], ctx: Context, data, criterion: str,
                round_to: int) -> set[int]:
        """The units to remove this step: per group, the lowest-scored down to its goal; with
        scope="global", the lowest normalized scores across groups decide how many each loses."""
        groups = [g for g in self._prunable(an) if g.id in goal and len(g.units) > goal[g.id]]
        if not groups:
            return set()
        try:
            scores = group_scores(graph, an, groups, criterion, ctx, data)
        except ValueError as e:
            raise OptionError(f"{self.name}: {e}") from None
        counts = {g.id: len(g.units) - goal[g.id] for g in groups}
        if self.scope == "global":
            counts = self._global_counts(groups, scores, counts, round_to)
        removed: set[int] = set()
        for g in groups:
            order = np.argsort(scores[g.id], kind="stable")
            removed.update(g.units[i] for i in order[:counts[g.id]])
        score_of = {u: sc for g in groups for u, sc in zip(g.units, scores[g.id])}
        return _keep_every_tensor_alive(an, groups, removed, score_of)

    def _global_counts(self, groups: list[Group], scores: dict[str, np.ndarray], counts: dict[str, int],
                       round_to: int) -> dict[str, int]:
        """Spend the same total removal on the globally least important units (scores / group mean)."""
        total = sum(counts.values())
        pool = sorted((s / (scores[g.id].mean() or 1.0), g.id) for g in groups for s in scores[g.id])
        limit = {g.id: len(g.units) - kept_count(len(g.units), 0.999, round_to, self.min_channels) for g in groups}
        out = {g.id: 0 for g in groups}
        for _, name in pool:
            if total == 0:
                break
            if out[name] < limit[name]:
                out[name] += 1
                total -= 1
        if round_to > 1:
            sizes = {g.id: len(g.units) for g in groups}
            out = {n: sizes[n] - kept_count(sizes[n], c / sizes[n], round_to, self.min_channels) for n, c in out.items()}
        return out


def _levels(channels: int, round_to: int, min_channels: int, step: float = 0.125) -> list[float]:
    """A unit's steps for the progressive search: the first ratio on a grid of `step`, up to the
    deepest trial ratio, for each channel count it can keep."""
    out, seen = [], {channels}
    for r in np.arange(step, max(RATIOS) + 1e-9, step):
        k = kept_count(channels, float(r), round_to, min_channels)
        if k not in seen:
            seen.add(k)
            out.append(round(float(r), 4))
    return out


def _accuracy_and_kl(model, held, providers) -> list[Scorer]:
    """What a target's candidate cuts are scored by on held-out samples: accuracy (or agreement)
    and -100 x KL from the original."""
    return [Scorer(model, held, providers, score=k) for k in ("accuracy", "kl")]


def _fit_and_held(data):
    """Two thirds to fit recovery on, a third to score on (all of it for both when small)."""
    return data.split(len(data) * 2 // 3) if len(data) >= HELD_OUT_MIN else (data, data)


def _folds(data):
    """`_fit_and_held` for every third in turn (HELD_OUT_FOLDS pairs; the last is its split)."""
    return data.folds(HELD_OUT_FOLDS) if len(data) >= HELD_OUT_MIN else [(data, data)]


def _ratio(group: Group, an: Analysis, ratios: dict[str, float], default: float) -> float:
    """The group's ratio: from `ratios` under any of its names, else `default`."""
    names = group.names(an)
    return next((r for key, r in ratios.items() if key in names), default)


def _keep_every_tensor_alive(an: Analysis, groups: list[Group], removed: set[int], score_of: dict[int, float]) -> set[int]:
    """A unit may span only part of a tensor (a grouped conv fed by a Concat, say): never remove
    every channel of a tensor; give back its best-scored unit instead."""
    removed = set(removed)
    for g in groups:
        for t in g.tensors:
            roots = set(an.uf.roots(an.ids[t]).tolist())
            if roots and roots <= removed:
                removed.discard(max(roots, key=lambda r: score_of.get(r, 0.0)))
    return removed


def _excluded(group: Group, an: Analysis, exclude: tuple[str, ...]) -> bool:
    return bool(set(exclude) & group.names(an, consumers=True))


def _frozen_notes(an: Analysis, exclude: tuple[str, ...]) -> list[str]:
    notes = []
    for g in an.groups:
        if g.producers and g.frozen:
            notes.append(f"group '{g.name}' ({len(g.units)} channels) left as is: {g.frozen}")
        elif g.producers and _excluded(g, an, exclude):
            notes.append(f"group '{g.name}' ({len(g.units)} channels) left as is: excluded")
    return notes


def _whole_notes(an: Analysis, groups: list[Group], targets: dict[str, int], ratios: dict[str, float], default: float,
                 round_to: int, min_channels: int) -> list[str]:
    """A note for each prunable group that its ratio leaves whole (too few channels to lose one at
    the multiple `round_to`), and one when no group can be pruned at all."""
    if not any(g.producers for g in an.groups):
        return ["no channel group to prune: no layer here has output channels this pass can remove"]
    notes = []
    for g in groups:
        n, ratio = len(g.units), _ratio(g, an, ratios, default)
        if g.producers and ratio > 0 and targets[g.id] >= n:
            notes.append(f"group '{g.name}' ({n} channels) left whole: ratio {ratio:g} keeps all {n} in multiples "
                         f"of {round_to}" + (f", at least {min_channels}" if min_channels > 1 else ""))
    return notes


def _update_channel_maps(ctx: Context, an: Analysis, removed: set[int]) -> None:
    """Record, per tensor, which of the original's channels remain (recovery maps teacher targets)."""
    for name, ids in an.ids.items():
        keep = an.keep(name, removed)
        if keep is None or keep.all():
            continue
        current = ctx.state.channel_maps.get(name) or ChannelMap.identity(len(ids))
        ctx.state.channel_maps[name] = current.then(keep)

