"""prune-channels from one line: round_to="auto", MAC targets allocated inside the pass by the
sensitivity analysis (the `sensitivity` command's code), and parallel sweeps equal to serial ones."""
import ast
import re

import numpy as np
import pytest

from conftest import MODELS, apply_pass, scripted_sessions
from onnxcompress import Context, Dataset, OptionError, default_registry
from onnxcompress.cli import main
from onnxcompress.metrics import total_macs
from onnxcompress.passes import PruneChannels
from onnxcompress.runtime import channel_multiple
from onnxcompress.sensitivity import pass_pruner, sensitivity

SHAPES = {"input": [1, 1, 28, 28]}


def conv_widths(model):
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    return {n.name: inits[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv"}


def test_round_to_auto_resolves_to_the_kernels_multiple_and_kept_counts_are_multiples(resnet, calib):
    multiple, why = channel_multiple()
    assert multiple >= 1 and isinstance(multiple, int) and why
    assert channel_multiple(["CUDAExecutionProvider"])[0] == 8
    ctx = Context(calib=calib.take(64), original=resnet, teachers=[resnet])
    pruned, result = apply_pass(PruneChannels(ratio=0.5, recover=False), resnet, ctx)
    assert result.stats["round_to"] == multiple
    assert f"channel counts in multiples of {multiple} (round_to='auto'" in result.notes[0]
    before, after = conv_widths(resnet), conv_widths(pruned)
    changed = [n for n in before if after[n] != before[n]]
    assert changed and all(after[n] % multiple == 0 for n in changed)


def test_a_mac_target_is_met_inside_the_pass(resnet, calib, monkeypatch):
    import onnxcompress.passes.prune_channels as P
    monkeypatch.setattr(P, "uniform", lambda *a, **k: None)     # the allocation alone (the rival's grid is coarser)
    ctx = Context(calib=calib.take(100), original=resnet, teachers=[resnet])
    pruned, result = apply_pass(PruneChannels(macs=0.6, round_to=8, sensitivity_recover=False, jobs=1), resnet, ctx)
    ratio = total_macs(pruned, SHAPES) / total_macs(resnet, SHAPES)
    assert result.stats["planned_target_met"] and ratio <= 0.6 and "planned_pick" not in result.stats
    # within one rounding step: undoing the allocation's last cut of 8 channels would miss the target,
    # so the result is not far below it (a 64-channel group at 8 channels less costs < 0.1 of the MACs)
    assert ratio > 0.45
    assert result.stats["planned_macs_ratio"] == pytest.approx(ratio)


def test_in_pass_allocation_equals_the_sensitivity_command(resnet, calib, tmp_path, capsys):
    data = calib.take(100)
    path = tmp_path / "calib.npz"
    np.savez(path, input=data.feeds["input"], labels=data.labels)
    code = main(["sensitivity", str(MODELS / "resnet.onnx"), "--calib", str(path), "--target-macs", "0.6",
                 "--round-to", "8", "--criterion", "l1", "--jobs", "2"])
    out = capsys.readouterr().out
    assert code == 0
    printed = ast.literal_eval(re.search(r"pipeline: prune-channels\(ratios=(\{.*?\})", out).group(1))
    ctx = Context(calib=data, original=resnet, teachers=[resnet])
    _, result = apply_pass(PruneChannels(macs=0.6, round_to=8, criterion="l1", sensitivity_recover=False), resnet, ctx)
    note = next(n for n in result.notes if n.startswith("macs=0.6"))
    allocated = dict((k, float(v)) for k, v in re.findall(r"(\S+) ([0-9.]+)(?:,|$)", note.split("allocated: ")[1]))
    assert allocated == printed and printed


def test_parallel_and_serial_sweeps_agree(resnet, calib):
    ctx = Context(calib=calib.take(100), original=resnet, teachers=[resnet])
    prune = pass_pruner(default_registry(), ctx, "l1", 8, recover=True)
    runs = [sensitivity(resnet, prune, calib.take(100), calib.take(100), ratios=(0.5,), jobs=j) for j in (1, 2)]
    assert runs[0].score == runs[1].score and runs[0].macs == runs[1].macs
    assert len(runs[0].groups) == 9


@pytest.mark.parametrize("options, message", [
    ({"round_to": 0}, "round_to must be 'auto' or an integer of at least 1, got 0"),
    ({"round_to": "fast"}, "round_to"),
    ({"macs": 1.5}, r"macs must be in \(0, 1\), got 1.5"),
    ({"macs": 0.5, "latency": 0.5}, "give one target: macs or latency"),
    ({"macs": 0.5, "ratios": {"a": 0.5}}, "a target .macs/latency. allocates the ratios: do not name ratios too"),
])
def test_bad_targets_are_refused(options, message):
    with pytest.raises(OptionError, match=message):
        default_registry().create("prune-channels", options)


def test_a_target_needs_calibration_data(resnet):
    from onnxcompress import graph as G

    with pytest.raises(OptionError, match=r"pass 'prune-channels' needs calibration data \(--calib\)"):
        PruneChannels(macs=0.5, recover=False, criterion="l1").run(G.to_graph(resnet), Context(original=resnet))


def test_dataset_split():
    d = Dataset({"x": np.arange(10)[:, None]}, np.arange(10))
    a, b = d.split(7)
    assert len(a) == 7 and len(b) == 3 and b.labels.tolist() == [7, 8, 9]


def test_dataset_folds_hold_out_each_sample_once():
    d = Dataset({"x": np.arange(10)[:, None]}, np.arange(10))
    folds = d.folds(3)
    assert [f[1].labels.tolist() for f in folds] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [f[0].labels.tolist() for f in folds] == [[3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 6, 7, 8, 9], [0, 1, 2, 3, 4, 5]]
    assert all((f[0].feeds["x"][:, 0] == f[0].labels).all() for f in folds)    # inputs and labels stay paired
    assert folds[-1][1].labels.tolist() == d.split(6)[1].labels.tolist()


def test_held_out_scores_are_the_means_over_folds(resnet, calib, monkeypatch):
    """Each cut is recovered on two thirds and scored on the other third, every third in turn: a
    cut that changes nothing (scripted) scores the original's accuracy on all 120 samples, KL 0."""
    import onnxcompress.passes.prune_channels as P
    from onnxcompress.sensitivity import Scorer
    fitted = []
    monkeypatch.setattr(P.PruneChannels, "_cut", lambda self, model, ctx, data, *a: fitted.append(len(data)) or model)
    data = calib.take(120)
    scores, held = PruneChannels(macs=0.5)._held_out_scores(resnet, Context(original=resnet), data,
                                                            {"a": ({}, 1), "b": ({}, 3)}, "l1", 8)
    assert fitted == [80] * 6 and held == 120
    assert scores["a"] == scores["b"] == pytest.approx((Scorer(resnet, data, ["CPUExecutionProvider"])(resnet), 0.0))


def test_a_target_chooses_the_steps_on_held_out_samples_by_kl_first(resnet, calib, monkeypatch):
    """With no criterion named and steps="auto", the allocated cut is made with ThiNet (no criterion
    is chosen on the folds) in 1 and 3 steps; 3 steps hold 0.3 points less accuracy but a lower KL
    from the original (scripted scores): KL ranks first, so the pass cuts in 3."""
    import onnxcompress.passes.prune_channels as P
    monkeypatch.setattr(P, "plan", lambda *a, **k: ({"/stem/stem.0/Conv": 0.5}, {"macs_ratio": 0.9, "target_met": True}, [], None))
    monkeypatch.setattr(P, "uniform", lambda *a, **k: None)
    scripted = {("allocated", 1): (97.3, -3.5), ("allocated", 3): (97.0, -2.0)}
    asked = []
    monkeypatch.setattr(P.PruneChannels, "_held_out_scores", lambda self, model, ctx, data, cuts, criterion, round_to: (
        asked.append(sorted(cuts)) or {k: scripted[k] for k in cuts}, 64))
    ctx = Context(calib=calib.take(64), original=resnet, teachers=[resnet])
    pruned, result = apply_pass(PruneChannels(macs=0.9, recover=False, round_to=8), resnet, ctx)
    assert asked == [[("allocated", 1), ("allocated", 3)]]
    assert result.stats["steps"] == 3 and "planned_pick" not in result.stats
    assert any(n.startswith("3 step(s) chosen by accuracy and -100 x KL from the original (ranked by KL, then accuracy)")
               and n.endswith("1 97.30, -3.50, 3 97.00, -2.00") for n in result.notes)
    assert "channels ranked by thinet (the default with calibration data)" in result.notes
    assert conv_widths(pruned)["/stem/stem.0/Conv"] == conv_widths(resnet)["/stem/stem.0/Conv"] // 2


def test_sensitivity_command_refuses_bad_round_to_and_jobs(capsys):
    base = ["sensitivity", str(MODELS / "resnet.onnx"), "--calib", str(MODELS / "mnist_calib.npz")]
    with pytest.raises(SystemExit) as e:
        main(base + ["--round-to", "0"])
    assert e.value.code == 2
    assert "argument --round-to: expected 'auto' or a positive integer, got '0'" in capsys.readouterr().err
    assert main(base + ["--jobs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "onnxcompress: error: --jobs must be at least 1, got 0"


def test_a_latency_target_met_by_one_timing_is_confirmed_before_the_allocation_stops(monkeypatch):
    """The first timing under the target is timed again in CONFIRM_ROUNDS one-round timings, the
    median of those and the first taken; when that is slower than the target, the allocation goes
    on cutting (timings scripted)."""
    from onnxcompress import sensitivity as S
    sens = S.Sensitivity(100.0, 1000, (0.25, 0.5, 0.75), ["a", "b"], {"a": 8, "b": 8},
                         score={"a": [99.0, 98.0, 97.0], "b": [99.5, 99.0, 98.0]},
                         macs={"a": [800, 600, 400], "b": [900, 800, 700]},
                         latency={"a": [8.0, 6.0, 4.0], "b": [9.0, 8.0, 7.0]}, base_latency=10.0)
    n = S.CONFIRM_ROUNDS
    # the original; the 1st cut and its confirmation (one fast reading, the rest slow); the 2nd cut, ...
    timings = iter([1.0, 0.45, 0.40] + [0.55] * (n - 1) + [0.40, 0.62] + [0.42] * (n - 1))
    calls = []

    def fake_measure(model, prune, ratios, shapes, by, latency, data, providers, base, rounds=3):
        calls.append((dict(ratios), rounds))
        value = next(timings) * base
        return {"macs": 0, "latency_ms": value, "value": value, "rounds": rounds}

    monkeypatch.setattr(S, "_measure", fake_measure)
    ratios, measured = S.allocate(None, lambda m, r: m, sens, Dataset({"x": np.zeros((2, 1))}), 0.5, by="latency")
    assert [r for _, r in calls] == [3, 3] + [1] * n + [3] + [1] * n
    assert calls[2 + n][0] != calls[1][0]                    # not confirmed: one more cut
    # the median of 0.40, a burst's 0.62 and six times 0.42
    assert measured["target_met"] and measured["value"] == pytest.approx(0.42 * 10.0)


def test_a_first_timing_over_a_latency_target_by_less_than_confirm_near_is_timed_again(monkeypatch):
    """A timing within CONFIRM_NEAR above the target is confirmed too (the median of the readings:
    under the target, so the cut is taken, its burst outvoted); one further above is rejected at
    once (timings scripted)."""
    from onnxcompress import sensitivity as S
    calls = []

    def fake_measure(model, prune, ratios, shapes, by, latency, data, providers, base, rounds=3):
        calls.append(rounds)
        value = {3: first, 1: 0.48}[rounds] * base
        return {"macs": 0, "latency_ms": value, "value": value, "rounds": rounds}

    monkeypatch.setattr(S, "_measure", fake_measure)
    first = 0.5 * (1 + S.CONFIRM_NEAR) - 0.001
    measured = S._timed(0.5, None, lambda m, r: m, {"a": 0.5}, None, "latency", None, None, None, 1.0)
    assert calls == [3] + [1] * S.CONFIRM_ROUNDS
    assert measured["value"] == pytest.approx(0.48) and measured["rounds"] == 3 + S.CONFIRM_ROUNDS
    calls.clear()
    first = 0.5 * (1 + S.CONFIRM_NEAR) + 0.001
    assert S._timed(0.5, None, lambda m, r: m, {"a": 0.5}, None, "latency", None, None, None, 1.0)["value"] == first
    assert calls == [3]


def test_the_exact_search_finds_two_shallow_cuts_where_the_greedy_finishes_with_a_deep_one(monkeypatch):
    """Per-unit trial ratios; the greedy takes a's cheap first cut, then the one move that reaches
    the target alone (b's deep cut, 5 points); the knapsack adds b's and c's shallow cuts (2.6)."""
    from onnxcompress import sensitivity as S
    own = {"a": (0.3, 0.45), "b": (0.1, 0.2), "c": (0.1,)}
    sens = S.Sensitivity(100.0, 1000, (0.1, 0.2, 0.3, 0.45), list(own), {g: 8 for g in own},
                         score={"a": [99.9, 90.0], "b": [99.5, 95.0], "c": [98.0]},
                         macs={g: [1000 - round(r * 1000) for r in rs] for g, rs in own.items()}, unit_ratios=own)

    def fake_measure(model, prune, ratios, shapes, by, latency, data, providers, base, rounds=3):
        value = 1000 - sum(round(r * 1000) for r in ratios.values())
        return {"macs": value, "value": value}

    monkeypatch.setattr(S, "_measure", fake_measure)
    data = Dataset({"x": np.zeros((2, 1))})
    greedy, _ = S.allocate(None, lambda m, r: m, sens, data, 0.5)
    exact, measured = S.allocate(None, lambda m, r: m, sens, data, 0.5, search="exact")
    assert greedy == {"a": 0.3, "b": 0.2}
    assert exact == {"a": 0.3, "b": 0.1, "c": 0.1} and measured["target_met"]


def test_the_kl_score_is_zero_for_the_original_and_grows_with_the_change():
    from onnxcompress.sensitivity import _divergence
    logits = np.random.default_rng(0).normal(size=(50, 10))
    assert _divergence(logits, logits) == pytest.approx(0.0, abs=1e-12)
    assert 0 < _divergence(logits, logits + 0.1 * np.eye(10)[np.arange(50) % 10]) < _divergence(logits, 0.5 * logits)


def test_a_latency_target_halves_the_auto_multiple_and_offers_the_small_groups(resnet, calib, monkeypatch):
    """Every candidate of a latency target is timed, so round_to="auto" gives it half the kernels'
    multiple: ResNet's 16-channel groups, whole at a multiple of 16, become candidates (the
    allocation is scripted here; no timing)."""
    import onnxcompress.passes.prune_channels as P
    multiple = channel_multiple()[0]
    seen = {}

    def fake_plan(model, prune, data, target, by, units=None, **kw):
        seen.update(units=dict(units), by=by)
        return {"/stem/stem.0/Conv": 0.5}, {"macs_ratio": 0.9, "target_met": False}, [], None

    monkeypatch.setattr(P, "plan", fake_plan)
    monkeypatch.setattr(P, "uniform", lambda *a, **k: None)
    monkeypatch.setattr(P, "progressive", lambda *a, **k: None)
    ctx = Context(calib=calib.take(64), original=resnet, teachers=[resnet])
    pruned, result = apply_pass(PruneChannels(latency=0.5, recover=False), resnet, ctx)
    assert result.stats["round_to"] == (multiple // 2 if multiple > 1 else 1) and seen["by"] == "latency"
    if multiple > 1:
        assert "halved for a latency target: each width is timed" in result.notes[0]
    if multiple == 16:
        assert "/stem/stem.0/Conv" in seen["units"]
        assert conv_widths(pruned)["/stem/stem.0/Conv"] == 8


def test_latency_trials_are_timed_against_the_original_run_by_run(monkeypatch):
    """A unit's trial latency is the original's times the trial's paired ratio to the original
    (`paired_latency_ratio`, scripted), so a machine that slows down between trials moves neither."""
    from onnxcompress import sensitivity as S
    ratios = iter([0.8, 0.6])
    monkeypatch.setattr(S, "mean_latency_ms", lambda *a, **k: 10.0)
    monkeypatch.setattr(S, "paired_latency_ratio", lambda model, reference, *a, rounds=3: next(ratios))
    monkeypatch.setattr(S, "Scorer", lambda *a, **k: type("Score", (), {"metric": "accuracy",
                                                                       "__call__": lambda self, m: 1.0})())
    monkeypatch.setattr(S, "total_macs", lambda *a, **k: 1)
    import onnx
    sens = S.sensitivity(onnx.ModelProto(), lambda m, r: m, Dataset({"x": np.zeros((2, 1))}), None, ratios=(0.5,),
                         latency=object(), units={"a": 8, "b": 8}, jobs=1)
    assert sens.base_latency == 10.0 and sens.latency == {"a": [8.0], "b": [6.0]}


def test_paired_timing_runs_the_two_models_in_turn(monkeypatch):
    """One run of each in turn, which goes first alternating; the ratio of the medians (a scripted
    clock: the reference takes 2 units a run, the model 1)."""
    from onnxcompress import metrics as M
    order = scripted_sessions(monkeypatch, {"ref": 2.0, "model": 1.0})
    cfg = M.LatencyConfig(batch_sizes=(1,), runs=4, warmup=1)
    assert M.paired_latency_ratio(None, None, cfg, Dataset({"x": np.zeros((2, 1))}), rounds=2) == 0.5
    assert order == ["ref", "model"] + ["ref", "model", "model", "ref"] * 4


def test_the_uniform_candidate_is_the_smallest_shared_ratio_that_meets_the_target(monkeypatch):
    """Scripted MACs, not monotone in the ratio (rounding): the first grid ratio under the target
    is the candidate, every unit at it; a target no shared ratio meets gives None."""
    from onnxcompress import sensitivity as S
    macs = {0.05: 950, 0.1: 900, 0.15: 850, 0.2: 800, 0.25: 760, 0.3: 720, 0.35: 690, 0.4: 480, 0.45: 520}
    seen = []

    def fake_measure(model, prune, ratios, shapes, by, latency, data, providers, base, rounds=3):
        seen.append(ratios)
        value = macs.get(next(iter(ratios.values())), 400)
        return {"macs": value, "value": value}

    monkeypatch.setattr(S, "_measure", fake_measure)
    monkeypatch.setattr(S, "total_macs", lambda *a, **k: 1000)
    data = Dataset({"x": np.zeros((2, 1))})
    ratios, measured = S.uniform(None, lambda m, r: m, ["a", "b"], data, 0.5)
    assert ratios == {"a": 0.4, "b": 0.4} and measured["value"] == 480 and len(seen) == 8
    assert S.uniform(None, lambda m, r: m, ["a", "b"], data, 0.3) is None


def test_a_target_takes_the_uniform_cut_when_it_scores_better_and_ties_go_by_kl(resnet, calib, monkeypatch):
    """The allocation (scripted: the stem at 75%) and every unit at 25% both meet the target;
    held-out accuracy ties, KL favours the uniform cut, which the pass then makes and names."""
    import onnxcompress.passes.prune_channels as P
    monkeypatch.setattr(P, "plan", lambda *a, **k: ({"/stem/stem.0/Conv": 0.75}, {"macs_ratio": 0.9, "target_met": True}, [], None))
    monkeypatch.setattr(P, "uniform", lambda model, structure, units, *a, **k: ({u: 0.25 for u in units}, {"macs": 1.0, "value": 1.0}))
    monkeypatch.setattr(P.PruneChannels, "_held_out_scores", lambda self, *a, **k: (
        {("allocated", 1): (97.9, -3.7), ("uniform", 1): (97.9, -2.2)}, 64))
    ctx = Context(calib=calib.take(64), original=resnet, teachers=[resnet])
    pruned, result = apply_pass(PruneChannels(macs=0.9, recover=False, criterion="l1", steps=1), resnet, ctx)
    widths, before = conv_widths(pruned), conv_widths(resnet)
    changed = [n for n in widths if widths[n] != before[n]]
    assert len(changed) >= 2 and "/stem/stem.0/Conv" not in changed, (before, widths)   # the allocation cut the stem only
    assert any("allocated 97.90, -3.70, uniform 97.90, -2.20; uniform used" in n for n in result.notes)
    assert result.stats["planned_uniform_ratio"] == 0.25
    assert sum(widths.values()) < sum(before.values())


def test_the_progressive_search_scores_each_step_on_the_cut_so_far(monkeypatch):
    """Alone, a deep cut of "a" looks free and "b" dear; scored on top of the cut so far (scripted
    joint scores: a second step of "a" compounds), the search takes a's first step, then b's, and
    stops once the model as measured meets the target. MACs scripted; a target out of reach: None."""
    from onnxcompress import sensitivity as S
    sens = S.Sensitivity(base_score=100.0, base_macs=1000, ratios=(0.5,), groups=["a", "b"], channels={"a": 8, "b": 8},
                         score={"a": [99.0], "b": [95.0]}, macs={"a": [600], "b": [600]})
    joint = {(): 100.0, (("a", 0.25),): 99.8, (("b", 0.25),): 98.0, (("a", 0.5),): 90.0,
             (("a", 0.25), ("b", 0.25)): 99.0, (("a", 0.5), ("b", 0.25)): 89.0, (("a", 0.25), ("b", 0.5)): 97.0}
    scored = []

    def score(ratios):
        scored.append(dict(ratios))
        return joint[tuple(sorted(ratios.items()))]

    def fake_measure(model, prune, ratios, shapes, by, latency, data, providers, base, rounds=3):
        return {"macs": 1000 - 400 * sum(ratios.values()), "value": 1000 - 400 * sum(ratios.values())}

    monkeypatch.setattr(S, "_measure", fake_measure)
    data = Dataset({"x": np.zeros((2, 1))})
    levels = {"a": [0.25, 0.5], "b": [0.25, 0.5]}
    ratios, measured = S.progressive(None, sens, None, score, levels, data, 0.8, by="macs", jobs=1)
    assert ratios == {"a": 0.25, "b": 0.25} and measured["value"] == 800
    assert scored[1:3] == [{"a": 0.25}, {"b": 0.25}]       # alone, a's step looked cheaper: tried first
    assert S.progressive(None, sens, None, score, {"a": [0.25], "b": [0.25]}, data, 0.5, by="macs", jobs=1) is None


def test_the_progressive_search_finishes_with_the_smallest_of_near_ties(monkeypatch):
    """Each proposal is measured on top of the cut so far: "c" goes first (alone it looks cheapest);
    then two steps reach the target as measured, "a" scoring 0.2 better than "b" but saving twice
    as much (MACs scripted, target 930 of 1000). Within `tie` of each other the smaller one is
    taken; with no tie, the better-scored."""
    from onnxcompress import sensitivity as S
    sens = S.Sensitivity(base_score=100.0, base_macs=1000, ratios=(0.5,), groups=["a", "b", "c"],
                         channels={"a": 8, "b": 8, "c": 8}, score={"a": [98.0], "b": [98.0], "c": [99.0]},
                         macs={"a": [800], "b": [800], "c": [800]})
    joint = {(): 100.0, (("a", 0.25),): 98.0, (("b", 0.25),): 98.0, (("c", 0.25),): 99.0,
             (("a", 0.25), ("c", 0.25)): 98.6, (("b", 0.25), ("c", 0.25)): 98.4, (("c", 0.5),): 90.0}
    saves = {"a": 240, "b": 160, "c": 160}
    measured = lambda ratios: 1000 - sum(saves[u] * r for u, r in ratios.items())
    monkeypatch.setattr(S, "_measure", lambda model, prune, ratios, *a, **k: {"macs": measured(ratios),
                                                                             "value": measured(ratios)})
    data = Dataset({"x": np.zeros((2, 1))})
    levels = {"a": [0.25], "b": [0.25], "c": [0.25, 0.5]}
    run = lambda tie: S.progressive(None, sens, None, lambda r: joint[tuple(sorted(r.items()))], levels, data, 0.93,
                                    by="macs", jobs=1, tie=tie)
    assert run(tie=0.3) == ({"c": 0.25, "b": 0.25}, {"macs": 920, "value": 920})
    assert run(tie=0.0) == ({"c": 0.25, "a": 0.25}, {"macs": 900, "value": 900})


def test_the_progressive_search_steps_back_from_an_overshoot(monkeypatch):
    """"a" goes first (it loses next to nothing), then b's first step; b's second reaches the
    target of 800 MACs at 600: an overshoot, since b's two steps alone (700) meet it too. The
    search undoes a's step; undoing b's would miss the target (MACs scripted)."""
    from onnxcompress import sensitivity as S
    sens = S.Sensitivity(base_score=100.0, base_macs=1000, ratios=(0.5,), groups=["a", "b"], channels={"a": 8, "b": 8},
                         score={"a": [99.0], "b": [99.0]}, macs={"a": [800], "b": [700]})
    joint = {(): 100.0, (("a", 0.25),): 99.9, (("b", 0.25),): 99.5, (("a", 0.25), ("b", 0.25)): 99.4,
             (("a", 0.25), ("b", 0.5)): 99.0, (("b", 0.5),): 99.2}
    saves = {("a", 0.25): 100, ("b", 0.25): 80, ("b", 0.5): 300}
    measured = lambda ratios: 1000 - sum(saves[k] for k in ratios.items())
    monkeypatch.setattr(S, "_measure", lambda model, prune, ratios, *a, **k: {"macs": measured(ratios),
                                                                             "value": measured(ratios)})
    ratios, result = S.progressive(None, sens, None, lambda r: joint[tuple(sorted(r.items()))],
                                   {"a": [0.25], "b": [0.25, 0.5]}, Dataset({"x": np.zeros((2, 1))}), 0.8,
                                   by="macs", jobs=1)
    assert ratios == {"b": 0.5} and result["value"] == 700


def test_a_progressive_step_read_just_over_a_latency_target_is_timed_again(monkeypatch):
    """a's step reads 0.55 of the original in its first timings (a burst: within CONFIRM_NEAR of
    0.5), 0.48 in the seven after them: confirmed, it meets the target and the search stops there,
    where it would have taken b's step on top (timings scripted)."""
    from onnxcompress import sensitivity as S
    sens = S.Sensitivity(base_score=100.0, base_macs=1000, ratios=(0.5,), groups=["a", "b"], channels={"a": 8, "b": 8},
                         score={"a": [99.0], "b": [95.0]}, macs={"a": [600], "b": [600]},
                         latency={"a": [5.0], "b": [7.0]}, base_latency=10.0)
    joint = {(): 100.0, (("a", 0.5),): 99.0, (("b", 0.5),): 95.0, (("a", 0.5), ("b", 0.5)): 94.0}
    first = S.PROPOSAL_TIMINGS
    readings = {(("a", 0.5),): iter([0.55] * first + [0.48] * S.CONFIRM_ROUNDS), (("b", 0.5),): iter([0.7] * 20),
                (("a", 0.5), ("b", 0.5)): iter([0.3] * 20)}

    def fake_measure(model, prune, ratios, shapes, by, latency, data, providers, base, rounds=3):
        value = next(readings[tuple(sorted(ratios.items()))]) * base
        return {"macs": 0, "latency_ms": value, "value": value, "rounds": rounds}

    monkeypatch.setattr(S, "_measure", fake_measure)
    ratios, measured = S.progressive(None, sens, lambda m, r: m, lambda r: joint[tuple(sorted(r.items()))],
                                     {"a": [0.5], "b": [0.5]}, Dataset({"x": np.zeros((2, 1))}), 0.5, jobs=1)
    assert ratios == {"a": 0.5} and measured["value"] == pytest.approx(0.48)
    assert measured["rounds"] == first + S.CONFIRM_ROUNDS


def test_a_unit_steps_through_each_channel_count_it_can_keep():
    from onnxcompress.passes.prune_channels import _levels
    assert _levels(16, 8, 1) == [0.375]           # 16 -> 8 channels at a multiple of 8
    assert _levels(64, 8, 1) == [0.125, 0.25, 0.375, 0.5, 0.625, 0.75]
    assert _levels(64, 16, 1) == [0.25, 0.375, 0.75]     # 48, 32, 16


def test_a_latency_target_takes_the_progressive_cut_when_it_scores_best(resnet, calib, monkeypatch):
    """Scripted allocation, uniform and progressive candidates (no timing): the progressive one
    scores best on held-out samples, so the pass makes its cut and names the pick; the search is
    told that one held-out sample's worth of score is a tie."""
    import onnxcompress.passes.prune_channels as P
    monkeypatch.setattr(P, "plan", lambda *a, **k: ({"/stem/stem.0/Conv": 0.5}, {"macs_ratio": 0.9, "target_met": True}, [],
                                                    S_stub))
    monkeypatch.setattr(P, "uniform", lambda model, structure, units, *a, **k: ({u: 0.25 for u in units},
                                                                                {"macs": 1.0, "value": 0.5}))
    chosen, ties = {"/blocks/blocks.5/a/a.0/Conv": 0.5}, []
    monkeypatch.setattr(P, "progressive", lambda *a, tie, **k: ties.append(tie) or (chosen, {"macs": 2.0, "value": 0.45}))
    monkeypatch.setattr(P.PruneChannels, "_held_out_scores", lambda self, *a, **k: (
        {("allocated", 1): (96.1, -3.9), ("uniform", 1): (96.7, -3.6), ("progressive", 1): (97.6, -2.2)},
        64))
    ctx = Context(calib=calib.take(120), original=resnet, teachers=[resnet])
    pruned, result = apply_pass(PruneChannels(latency=0.5, recover=False, criterion="l1", steps=1), resnet, ctx)
    widths, before = conv_widths(pruned), conv_widths(resnet)
    assert [n for n in widths if widths[n] != before[n]] == ["/blocks/blocks.5/a/a.0/Conv"]
    assert any("allocated 96.10, -3.90, uniform 96.70, -3.60, progressive 97.60, -2.20; progressive used" in n
               for n in result.notes)
    assert result.stats["planned_pick"] == "progressive" and result.stats["planned_latency_ratio"] == 0.45
    assert "latency=0.5: the cut taken timed at 0.45 of the original's time on this machine" in " ".join(result.notes)
    assert ties == [pytest.approx(100 / 40)]       # 120 samples: 80 to recover on, 40 held out


S_stub = type("Sens", (), {"base_latency": 1.0})()
