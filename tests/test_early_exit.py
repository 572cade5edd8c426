"""early-exit: an exit head mid-network; the rest runs in an If's else-branch only when the head is unsure."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import MODELS, apply_pass, run
from onnxcompress import Context, Dataset, OptionError, default_registry, exits as X
from onnxcompress.metrics import total_macs
from onnxcompress.passes import EarlyExit
from onnxcompress.runtime import capture
from onnxcompress.validate import validate_model

CUT = "/blocks/blocks.2/Relu_1_output_0"     # ResNet after its third block: half the MACs


def at(threshold: float) -> np.ndarray:
    return np.array(threshold, np.float32)


def softmax_max(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).max(1)


@pytest.fixture(scope="module")
def exited(resnet, calib):
    """(model with an exit at CUT, globally pooled, PassResult, Context) for the ResNet, calibrated on 300 digits."""
    ctx = Context(calib=calib, original=resnet)
    new, result = apply_pass(EarlyExit(at=CUT, grid=1), resnet, ctx)
    return new, result, ctx


@pytest.fixture(scope="module")
def chosen(resnet, calib):
    """(model, PassResult, Context): one exit, its place, pooling and threshold all chosen by the pass."""
    ctx = Context(calib=calib, original=resnet)
    new, result = apply_pass(EarlyExit(exits=1), resnet, ctx)
    return new, result, ctx


@pytest.fixture(scope="module")
def digits(mnist_test):
    return mnist_test["input"][:32]


def test_inputs_and_outputs_keep_names_types_and_shapes(resnet, exited):
    new, result, _ = exited
    assert result.modified and result.stats["exit_after"] == CUT
    session = ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [(i.name, i.shape) for i in session.get_overridable_initializers()] == [("exit_threshold", [])]
    assert [i.name for i in new.graph.input] == ["input", "exit_threshold"]
    assert new.graph.output[0] == resnet.graph.output[0]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("logits", ["batch", 10]), ("exit_index", [1])]
    validate_model(new)   # checker, strict shape inference, onnxruntime


def test_threshold_above_one_runs_the_full_model(resnet, exited, digits):
    new = exited[0]
    for x in (digits, digits[:1]):
        logits, index = run(new, {"input": x, "exit_threshold": at(1.01)})
        assert np.abs(logits - run(resnet, {"input": x})[0]).max() <= 1e-5 and index.tolist() == [1]


def test_threshold_zero_returns_the_heads_logits(resnet, exited, digits):
    new = exited[0]
    logits, index = run(new, {"input": digits, "exit_threshold": at(0.0)})
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in new.graph.initializer}
    pooled = capture(resnet, Dataset({"input": digits}), [CUT])[CUT].mean(axis=(2, 3))
    expected = pooled @ weights["exit_head.weight"].T + weights["exit_head.bias"]
    assert index.tolist() == [0] and np.abs(logits - expected).max() <= 1e-4


def test_a_batch_exits_only_when_every_sample_is_confident(resnet, exited, digits):
    new = exited[0]
    head = run(new, {"input": digits, "exit_threshold": at(0.0)})[0]
    conf = np.sort(softmax_max(head))
    i = 8 + int(np.argmax(np.diff(conf[8:24])))          # the widest gap mid-way: about half are confident
    threshold = at((conf[i] + conf[i + 1]) / 2)
    sure = softmax_max(head) > threshold
    logits, index = run(new, {"input": digits[sure], "exit_threshold": threshold})
    assert index.tolist() == [0] and np.abs(logits - head[sure]).max() <= 1e-5
    mixed = np.concatenate([digits[sure], digits[~sure][:1]])
    logits, index = run(new, {"input": mixed, "exit_threshold": threshold})
    assert index.tolist() == [1] and np.abs(logits - run(resnet, {"input": mixed})[0]).max() <= 1e-5


def test_the_else_branch_holds_the_rest_of_the_network(resnet, exited):
    new, result, _ = exited
    (branch,) = [n for n in new.graph.node if n.op_type == "If"]
    bodies = {a.name: a.g for a in branch.attribute}
    original = {n.output[0] for n in resnet.graph.node}
    first = [n for n in new.graph.node if n.output[0] in original and n.op_type != "If"]
    rest = [n for n in bodies["else_branch"].node if n.output[0] in original or n.output[0] == "logits_full"]
    assert len(rest) == result.stats["rest_nodes"] == 27 and len(first) + len(rest) == len(resnet.graph.node)
    convs = lambda nodes: sum(n.op_type == "Conv" for n in nodes)
    assert convs(first) == 8 and convs(rest) == convs(resnet.graph.node) - 8 == 7
    assert [n.op_type for n in bodies["then_branch"].node] == ["Identity", "Identity"]


def test_calibrated_threshold_meets_the_budget_on_the_cross_fitted_digits(resnet, exited, calib):
    new, result, ctx = exited
    stats = result.stats
    assert stats["holdout_drop"] + 3 * stats["holdout_drop_error"] <= 1.0    # margin: three standard errors
    assert 0 < stats["exit_share"] and stats["expected_macs_ratio"] < 0.8 and stats["holdout_samples"] == 300
    # every calibration digit was judged by a head fit without it; the sweep's chosen row is what the stats say
    row = next(r for r in stats["sweep"] if r["threshold"] == stats["threshold"])
    assert (row["drop"], row["exit_share"]) == (stats["holdout_drop"], stats["exit_share"])
    x, labels = calib.feeds["input"], calib.labels
    outs = [run(new, {"input": x[i:i + 1]}) for i in range(len(x))]
    exited_share = np.mean([index[0] == 0 for _, index in outs])
    accuracy = np.mean([logits.argmax() == y for (logits, _), y in zip(outs, labels)]) * 100
    full = np.mean(run(resnet, {"input": x})[0].argmax(1) == labels) * 100
    # the deployed head is fit on all 300 digits: on them it keeps the budget and exits at least as often
    assert full - accuracy <= 1.0 and exited_share >= stats["exit_share"] - 0.02
    # the report's MACs: the exit's share of runs skips the rest
    assert ctx.state.branch_probs == {"logits": stats["exit_share"]}
    expected = total_macs(new, branch_probs=ctx.state.branch_probs) / total_macs(resnet)
    assert expected == pytest.approx(stats["expected_macs_ratio"], abs=1e-3)
    assert "threshold sweep" in result.notes[1] and "<-" in result.notes[1]


@pytest.mark.parametrize("shape, grid, window", [
    ((1, 8, 7, 7), 2, (3, 3)), ((1, 8, 14, 14), 3, (4, 4)), ((1, 8, 28, 14), 4, (7, 3)),
    ((1, 8, 7, 7), 4, None), ((1, 8, "h", 7), 2, None), ((1, 8, 1, 1), 2, None),
])
def test_grid_windows_give_exactly_grid_cells(shape, grid, window):
    assert X.grid_window(shape, grid) == window


def test_a_grid_pooled_head_is_averagepool_then_gemm(resnet, calib, digits):
    new, result = apply_pass(EarlyExit(at=CUT, grid=2, threshold=0.9), resnet, Context(calib=calib))
    assert result.stats["grid"] == 2 and [n.attribute[0].ints for n in new.graph.node if n.op_type == "AveragePool"] \
        == [[7, 7]]                                   # 14 x 14 -> 2 x 2 cells
    logits, index = run(new, {"input": digits, "exit_threshold": at(0.0)})
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in new.graph.initializer}
    pooled = X.grid_pool(capture(resnet, Dataset({"input": digits}), [CUT])[CUT], 2)
    assert pooled.shape == (32, 32 * 4) and weights["exit_head.weight"].shape == (10, 128)
    expected = pooled @ weights["exit_head.weight"].T + weights["exit_head.bias"]
    assert index.tolist() == [0] and np.abs(logits - expected).max() <= 1e-4


def test_the_chosen_exit_is_the_cheapest_candidate_within_the_budget(resnet, chosen, exited):
    new, result, _ = chosen
    stats = result.stats
    candidates = stats["candidates"]
    assert len(candidates) > 4 and len({c["tensor"] for c in candidates}) > 2
    assert {c["grid"] for c in candidates} == {1, 2, 3, 4}
    assert stats["holdout_drop"] + 2 * stats["holdout_drop_error"] <= 1.0
    # cheaper than the fixed half-way cut with a global-average head
    assert stats["expected_macs_ratio"] < exited[1].stats["expected_macs_ratio"]
    assert (stats["exit_after"], stats["grid"]) in {(c["tensor"], c["grid"]) for c in candidates}
    assert "exit candidates" in result.notes[2] and "<-" in result.notes[2]
    validate_model(new)
    assert run(new, {"input": np.zeros((1, 1, 28, 28), np.float32), "exit_threshold": at(1.01)})[1].tolist() == [1]


def test_the_report_judges_an_exit_model_one_input_at_a_time(resnet, calib, mnist_test):
    from onnxcompress import LatencyConfig, PassManager
    test = Dataset({"input": mnist_test["input"][:200]}, mnist_test["labels"][:200])
    result = PassManager([EarlyExit(at=CUT, grid=1, threshold=0.5)], calib=calib, eval_data=test,
                         latency=LatencyConfig(enabled=False)).run(resnet)
    step = result.report.steps[-1]
    outs = [run(result.model, {"input": test.feeds["input"][i:i + 1]}) for i in range(200)]
    assert np.mean([index[0] == 0 for _, index in outs]) > 0.5            # most digits take the exit
    batch1 = np.mean([logits.argmax() == y for (logits, _), y in zip(outs, test.labels)]) * 100
    batched = np.mean(run(result.model, {"input": test.feeds["input"]})[0].argmax(1) == test.labels) * 100
    assert step.accuracy == pytest.approx(batch1) and batch1 != batched   # batches of 200 never exit


def test_vgg_with_a_given_threshold_and_no_index_output(calib):
    vgg = onnx.load(str(MODELS / "vgg.onnx"))
    new, result = apply_pass(EarlyExit(at="/features/features.9/Relu_output_0", threshold=0.95, exit_output=False),
                             vgg, Context(calib=calib))
    assert result.stats["threshold"] == 0.95 and result.stats["exit_after"] == "/features/features.9/Relu_output_0"
    assert [o.name for o in new.graph.output] == ["logits"]
    x = calib.feeds["input"][:8]
    assert np.abs(run(new, {"input": x, "exit_threshold": at(1.01)})[0] - run(vgg, {"input": x})[0]).max() <= 1e-5
    assert run(new, {"input": x[:1], "exit_threshold": at(0.95)})[0].shape == (1, 10)


def test_two_outputs_are_refused(resnet):
    model = onnx.ModelProto()
    model.CopyFrom(resnet)
    model.graph.output.append(onnx.helper.make_tensor_value_info(CUT, onnx.TensorProto.FLOAT, ["batch", 32, 14, 14]))
    _, result = apply_pass(EarlyExit(), model)
    assert not result.modified and result.notes == ["left as is: the model has 2 outputs; an exit needs a "
                                                    "single-output classifier"]


@pytest.mark.parametrize("name, reason", [
    ("/blocks/blocks.2/a/a.0/Conv_output_0", "also read '/blocks/blocks.1/Relu_1_output_0' from before it"),
    ("/Flatten_output_0", "is not a 4-D activation"),
])
def test_a_named_tensor_that_is_not_a_cut_is_refused(resnet, name, reason):
    _, result = apply_pass(EarlyExit(at=name), resnet)
    assert not result.modified and reason in result.notes[0]


def test_an_exit_is_added_once(exited):
    _, result = apply_pass(EarlyExit(), exited[0])
    assert not result.modified and "early-exit runs once per model" in result.notes[0]


@pytest.mark.parametrize("options, message", [
    ({"threshold": 1.5}, "threshold must be in [0, 1]"),
    ({"temperature": 0}, "temperature must be positive"),
    ({"margin": -1}, "margin must not be negative"),
    ({"at": 3}, "option 'at' must be list of str"),
    ({"exits": 4}, "exits must be between 1 and 3"),
    ({"grid": 0}, "grid must be between 1 and 8"),
    ({"max_candidates": 0}, "max_candidates must be at least 1"),
])
def test_bad_options(options, message):
    with pytest.raises(OptionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        default_registry().create("early-exit", options)


def test_unknown_tensor_and_missing_data_are_input_errors(resnet):
    with pytest.raises(OptionError, match="names no tensor"):
        apply_pass(EarlyExit(at="nope"), resnet)
    with pytest.raises(OptionError, match="needs calibration data"):
        apply_pass(EarlyExit(), resnet)


def test_sweep_and_choice_on_numbers():
    head = np.log(np.array([[0.97, 0.03], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45]]))
    full = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    rows = X.sweep(head, full, None, exit_macs=40, full_macs=100, head_macs=2, thresholds=(0.5, 0.7, 0.9))
    assert [(r.exit_share, r.score) for r in rows] == [(1.0, 75.0), (0.5, 100.0), (0.25, 100.0)]
    assert rows[1].macs_ratio == pytest.approx((0.5 * 40 + 0.5 * 102) / 100)
    assert X.choose(rows, max_drop=0).threshold == 0.7 and X.choose(rows, max_drop=25).threshold == 0.5
    assert rows[0].error == pytest.approx(25.0)   # differences [0, 1, 0, 0]: s.d. 0.5 over sqrt(4) samples
    assert X.choose(rows, max_drop=25, margin=1).threshold == 0.7
    labels = np.array([0, 0, 1, 0])             # with labels: accuracy, and the full model is 75% right
    assert [r.drop for r in X.sweep(head, full, labels, 40, 100, 2, (0.5,))] == [-25.0]


def test_the_cli_plots_the_threshold_sweep_or_says_why_not(tmp_path, capsys, monkeypatch):
    """--plot writes the early-exit sweep as a PNG; a pipeline without a sweep writes nothing and
    says so; without matplotlib the run stops at once with a one-line error (exit 2)."""
    import sys
    from onnxcompress.cli import main
    args = lambda passes, plot: ["compress", str(MODELS / "resnet.onnx"), "-o", str(tmp_path / "o.onnx"), "--passes",
                                 passes, "--calib", str(MODELS / "mnist_calib.npz"), "--no-latency", "--max-drop",
                                 "none", "--plot", str(plot)]
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # as if not installed
    assert main(args("early-exit", tmp_path / "a.png")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--plot needs matplotlib (pip install onnxcompress[plot])" in err
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "a.png").exists()
    monkeypatch.delitem(sys.modules, "matplotlib")
    pytest.importorskip("matplotlib")
    assert main(args("fold-bn", tmp_path / "b.png")) == 0
    assert "no pass measured a sweep; nothing plotted" in capsys.readouterr().out and not (tmp_path / "b.png").exists()
    assert main(args("early-exit(max_candidates=1, grid=1)", tmp_path / "c.png")) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_threshold_input_survives_a_later_pass(exited, digits):
    """A pass after early-exit reloads the graph: the 0-d `exit_threshold` listed as an input stays
    an overridable input (old exporters' weights listed as inputs are still imported as constants)."""
    from onnxcompress.passes import FoldBatchNorm
    model, _, ctx = exited
    folded, _ = apply_pass(FoldBatchNorm(), model, ctx)
    assert [i.name for i in folded.graph.input] == [i.name for i in model.graph.input]
    sess = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_overridable_initializers()] == ["exit_threshold"]
    full = sess.run(None, {"input": digits[:1], "exit_threshold": at(1.01)})
    assert int(full[-1][0]) == 1                             # the override still runs the rest


def test_weights_listed_as_inputs_still_become_constants():
    from onnxcompress import graph as G
    model = onnx.load(str(MODELS / "corpus" / "init_as_inputs.onnx"))
    assert [t.name for t in G.to_graph(model).inputs] == ["x"]


# -- several exits ----------------------------------------------------------------------------------

EARLY = "/blocks/blocks.0/Relu_1_output_0"   # ResNet after its first block: 18% of the MACs


@pytest.fixture(scope="module")
def chained(resnet, calib):
    """(model with exits at EARLY and CUT, globally pooled, thresholds chosen jointly, PassResult, Context)."""
    ctx = Context(calib=calib, original=resnet)
    new, result = apply_pass(EarlyExit(at=[CUT, EARLY], grid=1), resnet, ctx)
    return new, result, ctx


def test_two_exits_nest_their_ifs(resnet, chained):
    new, result, _ = chained
    assert [e["tensor"] for e in result.stats["exits"]] == [EARLY, CUT]      # graph order, whatever the order named
    sess = ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_overridable_initializers()] == ["exit_threshold_1", "exit_threshold_2"]
    assert [o.name for o in new.graph.output] == ["logits", "exit_index"]
    outer = next(n for n in new.graph.node if n.op_type == "If")
    bodies = {a.name: a.g for a in outer.attribute}
    inner = next(n for n in bodies["else_branch"].node if n.op_type == "If")
    inner_bodies = {a.name: a.g for a in inner.attribute}
    convs = lambda nodes: sum(n.op_type == "Conv" for n in nodes)
    # the stem and first block before the outer If, the next two blocks in its else-branch, the rest (as
    # with one exit at CUT) in the inner else-branch
    assert (convs(new.graph.node), convs(bodies["else_branch"].node), convs(inner_bodies["else_branch"].node)) \
        == (3, 5, convs(resnet.graph.node) - 8)


def test_each_exit_answers_as_its_thresholds_say(resnet, chained, calib, digits):
    new, _, _ = chained
    graphs = [new.graph]
    for g in graphs:     # the deeper head's weights live in the outer If's else-branch
        graphs += [a.g for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    weights = {t.name: onnx.numpy_helper.to_array(t) for g in graphs for t in g.initializer}
    acts = capture(resnet, Dataset({"input": digits}), [EARLY, CUT])
    head = lambda cut, j: acts[cut].mean(axis=(2, 3)) @ weights[f"exit_head_{j}.weight"].T \
        + weights[f"exit_head_{j}.bias"]
    feeds = lambda t1, t2: {"input": digits, "exit_threshold_1": at(t1), "exit_threshold_2": at(t2)}
    logits, index = run(new, feeds(0.0, 0.0))
    close = lambda a, b: np.abs(a - b).max() <= 1e-4 * np.abs(b).max()   # float32 sums in another order
    assert index.tolist() == [0] and close(logits, head(EARLY, 1))
    logits, index = run(new, feeds(1.01, 0.0))
    assert index.tolist() == [1] and close(logits, head(CUT, 2))
    logits, index = run(new, feeds(1.01, 1.01))
    assert index.tolist() == [2] and np.abs(logits - run(resnet, {"input": digits})[0]).max() <= 1e-5


def test_a_chain_reports_the_odds_of_each_if_and_its_expected_macs(resnet, chained, calib):
    from onnxcompress import LatencyConfig, PassManager
    _, result, ctx = chained
    stats = result.stats
    shares = [e["exit_share"] for e in stats["exits"]]
    assert stats["holdout_drop"] + 3 * stats["holdout_drop_error"] <= 1.0 and stats["exit_share"] == sum(shares)
    # the inner If runs only when the outer one did not exit: its odds are conditional
    assert sorted(ctx.state.branch_probs.values()) == sorted([shares[0], shares[1] / (1 - shares[0])])
    report = PassManager([EarlyExit(at=[EARLY, CUT], grid=1)], calib=calib, max_drop=None,
                         latency=LatencyConfig(enabled=False)).run(resnet).report
    assert report.steps[-1].macs / report.steps[0].macs == pytest.approx(stats["expected_macs_ratio"], abs=1e-3)


def test_by_default_up_to_two_exits_are_chosen_in_graph_order(resnet, calib):
    new, result = apply_pass(EarlyExit(), resnet, Context(calib=calib, original=resnet))
    exits = result.stats["exits"]
    shares = {c["tensor"]: c["macs_share"] for c in result.stats["candidates"]}
    assert 1 <= len(exits) <= 2 and [shares[e["tensor"]] for e in exits] == sorted(shares[e["tensor"]] for e in exits)
    assert result.stats["holdout_drop"] + 3 * result.stats["holdout_drop_error"] <= 1.0
    assert {i.name for i in new.graph.input} == {"input", *(e["threshold_input"] for e in exits)}
    validate_model(new)


def test_chain_sweep_on_numbers():
    """Two heads on four samples: a sample leaves at the first exit sure enough of itself."""
    sure, unsure = [9.0, 0.0], [0.1, 0.0]
    first = np.array([sure, unsure, unsure, sure])      # right on samples 0 and 3
    second = np.array([unsure, [0.0, 9.0], sure, sure])  # wrong on sample 1
    full = np.array([[1.0, 0.0]] * 4)                  # class 0 everywhere
    rows = X.chain_sweep([first, second], full, None, cut_macs=[10, 40], full_macs=100, head_macs=[1, 2],
                         settings=[(0.9, 0.9), (1.0, 0.9), (1.0, 1.0)])
    assert [r.exit_shares for r in rows] == [(0.5, 0.5), (0.0, 0.75), (0.0, 0.0)]
    assert [r.drop for r in rows] == [25.0, 25.0, 0.0]
    assert rows[0].macs_ratio == pytest.approx((2 * 11 + 2 * 43) / 4 / 100)
    assert rows[2].macs_ratio == pytest.approx(1.03)
    assert X.choose(rows, max_drop=30).thresholds == (0.9, 0.9) and X.choose(rows, max_drop=0) is None
    # when the rows decide, a drop no sample changed still carries one sample's standard error (100/n)
    vouched = X.chain_sweep([first, second], full, None, [10, 40], 100, [1, 2], [(1.0, 1.0)], vouch=True)
    assert (rows[2].error, vouched[0].error) == (0.0, 25.0)
