"""width-knob: one file, several widths chosen per call; each width is the separately pruned model."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from conftest import apply_pass, make_model, rand, run, tensor
from onnxcompress import Context, OptionError, PassManager, LatencyConfig, default_registry
from onnxcompress.metrics import macs_breakdown, total_macs
from onnxcompress.passes import PruneChannels, Quantize, WidthKnob
from onnxcompress.passes.width_knob import chosen_width
from onnxcompress.pipeline import parse_pipeline
from onnxcompress.validate import validate_model

FAST = {"recover": False, "criterion": "l1", "round_to": 1}    # no calibration data needed


def at(width: float) -> np.ndarray:
    return np.array(width, np.float32)


@pytest.fixture(scope="module")
def two_convs() -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(8) -> Relu -> Conv(4) -> y: one prunable group of 8 channels."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="c2", pads=[1, 1, 1, 1])]
    return make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 4, 8, 8])],
                      {"w1": rand(8, 3, 3, 3), "b1": rand(8, seed=1), "w2": rand(4, 8, 3, 3, seed=2), "b2": rand(4, seed=3)})


@pytest.fixture(scope="module")
def data(calib):
    return calib.take(200)


@pytest.fixture(scope="module")
def knob(resnet, data):
    """(the ResNet with the default knob, PassResult), pruned and recovered on 200 digits."""
    return apply_pass(WidthKnob(), resnet, Context(calib=data, original=resnet, teachers=[resnet]))


@pytest.fixture(scope="module")
def alone(resnet, data):
    """{width: prune-channels(ratio=1 - width) with the same (default) options, run alone}."""
    return {w: apply_pass(PruneChannels(ratio=1 - w), resnet, Context(calib=data, original=resnet, teachers=[resnet]))[0]
            for w in (0.75, 0.5)}


@pytest.fixture(scope="module")
def inputs(mnist_test):
    return [mnist_test["input"][:16], rand(3, 1, 28, 28, seed=7)]


def test_every_width_is_the_separately_pruned_model(knob, alone, inputs):
    new, result = knob
    assert result.modified and result.stats["widths"] == [1.0, 0.75, 0.5]
    for w, pruned in alone.items():
        for x in inputs:
            assert np.abs(run(new, {"input": x, "width": at(w)})[0] - run(pruned, {"input": x})[0]).max() <= 1e-5
    x = inputs[0]
    outs = [run(new, {"input": x, "width": at(w)})[0] for w in (1.0, 0.75, 0.5)]
    assert min(np.abs(a - b).max() for i, a in enumerate(outs) for b in outs[i + 1:]) > 1e-3   # three models


def test_by_default_the_knob_is_the_original(resnet, knob, inputs):
    for x in inputs:
        expected = run(resnet, {"input": x})[0]
        for feeds in ({}, {"width": at(1.0)}, {"width": at(3.0)}):
            assert np.abs(run(knob[0], {"input": x, **feeds})[0] - expected).max() <= 1e-5


@pytest.mark.parametrize("asked, width", [(1.0, 1.0), (0.9, 1.0), (0.76, 1.0), (0.75, 0.75), (0.6, 0.75),
                                          (0.5, 0.5), (0.2, 0.5), (0.0, 0.5), (-1.0, 0.5), (2.0, 1.0)])
def test_the_narrowest_width_at_least_the_one_fed_runs(resnet, knob, alone, inputs, asked, width):
    assert chosen_width((1.0, 0.75, 0.5), asked) == width
    expected = run(alone[width] if width < 1 else resnet, {"input": inputs[0]})[0]
    assert np.abs(run(knob[0], {"input": inputs[0], "width": at(asked)})[0] - expected).max() <= 1e-5


def _executed_convs(model: onnx.ModelProto, width: float, tmp_path) -> list[str]:
    """Names of the Conv kernels onnxruntime ran for one digit at `width` (from its profile)."""
    opts = ort.SessionOptions()
    opts.enable_profiling, opts.profile_file_prefix, opts.log_severity_level = True, str(tmp_path / "knob"), 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    session.run(None, {"input": np.zeros((1, 1, 28, 28), np.float32), "width": at(width)})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    return [e["name"] for e in events if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == "Conv"]


def test_only_the_chosen_width_runs_and_its_macs_are_the_pruned_models(resnet, knob, alone, tmp_path):
    new = knob[0]
    for w in (0.75, 0.5):
        ran = _executed_convs(new, w, tmp_path)
        assert len(ran) == 15 and all(n.startswith(f"width_{w:g}/") for n in ran)
    assert len(full := _executed_convs(new, 1.0, tmp_path)) == 15 and not any(n.startswith("width_") for n in full)
    (top,) = [d for d in macs_breakdown(new) if d.op == "If"]
    (inner,) = [d for d in top.bodies["else_branch"] if d.op == "If"]
    assert top.branches["then_branch"] == total_macs(resnet)
    assert inner.branches == {"then_branch": total_macs(alone[0.75]), "else_branch": total_macs(alone[0.5])}
    assert total_macs(alone[0.5]) < total_macs(alone[0.75]) < total_macs(resnet)
    assert knob[1].stats["macs_ratio_0.5"] == pytest.approx(total_macs(alone[0.5]) / total_macs(resnet))


def test_inputs_and_outputs_keep_names_types_and_shapes(resnet, knob):
    new, result = knob
    session = ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [(i.name, i.type, i.shape) for i in session.get_overridable_initializers()] == [("width", "tensor(float)", [])]
    assert list(new.graph.output) == list(resnet.graph.output)
    assert [n.op_type for n in new.graph.node] == ["Greater", "Greater", "If"]
    assert "runs the narrowest width at least the one fed" in result.notes[0]
    validate_model(new)   # checker, strict shape inference, onnxruntime


def test_a_small_graph_in_code(two_convs):
    new, result = apply_pass(WidthKnob(widths=(0.5, 1.0, 0.75), **FAST), two_convs)
    x = rand(2, 3, 8, 8, seed=5)
    for w, channels in ((0.75, 6), (0.5, 4)):
        pruned, _ = apply_pass(PruneChannels(ratio=1 - w, **FAST), two_convs)
        assert np.abs(run(new, {"x": x, "width": at(w)})[0] - run(pruned, {"x": x})[0]).max() == 0
        assert result.stats[f"channels_{w:g}"] == channels and result.stats[f"macs_ratio_{w:g}"] == pytest.approx(w)
    assert np.abs(run(new, {"x": x})[0] - run(two_convs, {"x": x})[0]).max() == 0


def test_without_the_full_width_the_widest_is_the_default(two_convs):
    new, _ = apply_pass(WidthKnob(widths=(0.75, 0.5), **FAST), two_convs)
    pruned, _ = apply_pass(PruneChannels(ratio=0.25, **FAST), two_convs)
    x = rand(2, 3, 8, 8, seed=5)
    assert np.abs(run(new, {"x": x})[0] - run(pruned, {"x": x})[0]).max() == 0


def test_refusals_leave_the_graph_as_it_is(two_convs, conv_bn_model):
    cases = [(WidthKnob(), two_convs, "needs calibration data (--calib)"),
             (WidthKnob(input_name="w1", **FAST), two_convs, "already has a tensor named 'w1'"),
             (WidthKnob(**FAST), conv_bn_model, "at width 0.75 prune-channels removes no channel")]
    for p, model, why in cases:
        new, result = apply_pass(p, model)
        assert not result.modified and why in result.notes[0] and new.graph == model.graph


@pytest.mark.parametrize("options, message", [
    ({"widths": [1.0]}, "widths needs at least two widths"),
    ({"widths": [1.0, 0.0]}, r"widths must be in \(0, 1\], got 0.0"),
    ({"widths": [1.5, 0.5]}, r"widths must be in \(0, 1\], got 1.5"),
    ({"widths": [1.0, 0.5, 0.5]}, "widths must be distinct"),
    ({"input_name": ""}, "input_name must not be empty"),
    ({"round_to": 0}, "round_to must be 'auto' or an integer"),
    ({"criterion": "nope"}, "option 'criterion' must be"),
])
def test_bad_options(options, message):
    with pytest.raises(OptionError, match=message):
        default_registry().create("width-knob", options)
    if "criterion" not in options:
        with pytest.raises(ValueError, match=message):
            WidthKnob(**options)


def test_the_pipeline_syntax_finds_the_pass():
    ((name, options),) = parse_pipeline("width-knob(widths=[1.0,0.5])")
    p = default_registry().create(name, options)
    assert isinstance(p, WidthKnob) and p.widths == (1.0, 0.5) and p.pruner(0.5).ratio == 0.5


def test_quantize_after_the_knob_reaches_the_bodies(two_convs):
    from onnxcompress import Dataset
    calib = Dataset({"x": rand(16, 3, 8, 8, seed=9)})
    result = PassManager([WidthKnob(widths=(1.0, 0.5), **FAST), Quantize()], calib=calib, max_drop=None,
                         latency=LatencyConfig(enabled=False)).run(two_convs)
    step = result.report.steps[-1]
    assert step.status == "applied" and any("body" in n and "activations are not" in n for n in step.notes)
