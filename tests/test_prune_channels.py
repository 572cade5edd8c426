import onnx
import pytest

from conftest import MODELS, run
from onnxcompress import Context, InputError, LatencyConfig, OptionError, PassManager, default_registry
from onnxcompress.metrics import total_macs
from onnxcompress.passes import PruneChannels
from onnxcompress.sensitivity import allocate, pass_pruner, sensitivity

NO_LATENCY = LatencyConfig(enabled=False)


def conv_channels(model):
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    return {n.name: inits[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv"}


def test_halving_every_group_shrinks_macs_and_keeps_io(resnet, mnist_test):
    result = PassManager([PruneChannels(round_to=1, ratio=0.5, recover=False)], latency=NO_LATENCY).run(resnet)
    before, after = conv_channels(resnet), conv_channels(result.model)
    assert all(after[n] == before[n] // 2 for n in before)
    step = result.report.steps[1]
    assert step.macs < 0.3 * result.report.steps[0].macs and step.params < 0.3 * result.report.steps[0].params
    assert step.stats["channels_after"] == step.stats["channels_before"] // 2
    assert run(result.model, {"input": mnist_test["input"][:3]})[0].shape == (3, 10)


def test_recovery_wins_back_accuracy(resnet, calib, test_set):
    spec = dict(ratio=0.5, round_to=8)
    plain = PassManager([PruneChannels(**spec, recover=False)], eval_data=test_set, latency=NO_LATENCY).run(resnet)
    rec = PassManager([PruneChannels(**spec)], calib=calib, eval_data=test_set, latency=NO_LATENCY).run(resnet)
    original = rec.report.steps[0].accuracy
    assert rec.report.steps[1].accuracy > plain.report.steps[1].accuracy + 10
    assert original - rec.report.steps[1].accuracy <= 3.0
    assert conv_channels(rec.model) == conv_channels(plain.model)  # same structure either way


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn-scale", "mean-act", "apoz", "thinet", "lasso"])
def test_every_criterion_reaches_the_same_structure(criterion, calib):
    mobilenet = onnx.load(str(MODELS / "mobilenet.onnx"))
    p = PruneChannels(ratio=0.5, round_to=8, criterion=criterion, recover=False)
    result = PassManager([p], calib=calib.take(64), latency=NO_LATENCY).run(mobilenet)
    reference = PassManager([PruneChannels(ratio=0.5, round_to=8, recover=False)], latency=NO_LATENCY).run(mobilenet)
    assert conv_channels(result.model) == conv_channels(reference.model)


def test_data_criteria_need_calibration(resnet):
    with pytest.raises(InputError, match="'prune-channels' needs calibration data"):
        PassManager([PruneChannels(criterion="apoz", recover=False)], latency=NO_LATENCY).run(resnet)


def test_steps_reach_the_same_final_structure(resnet, calib):
    one = PassManager([PruneChannels(round_to=1, ratio=0.5, recover=False)], latency=NO_LATENCY).run(resnet)
    three = PassManager([PruneChannels(round_to=1, ratio=0.5, steps=3)], calib=calib.take(64), latency=NO_LATENCY).run(resnet)
    assert conv_channels(one.model) == conv_channels(three.model)


def test_global_scope_spends_the_same_budget_unevenly(resnet):
    layer = PassManager([PruneChannels(round_to=1, ratio=0.5, recover=False)], latency=NO_LATENCY).run(resnet)
    glob = PassManager([PruneChannels(round_to=1, ratio=0.5, recover=False, scope="global")], latency=NO_LATENCY).run(resnet)
    assert glob.report.steps[1].stats["channels_after"] == layer.report.steps[1].stats["channels_after"]
    assert conv_channels(glob.model) != conv_channels(layer.model)


def test_per_group_ratios(resnet):
    name = "/blocks/blocks.4/a/a.0/Conv"
    result = PassManager([PruneChannels(round_to=1, ratio=0.0, ratios={name: 0.75}, recover=False)], latency=NO_LATENCY).run(resnet)
    changed = {n: c for n, c in conv_channels(result.model).items() if c != conv_channels(resnet)[n]}
    assert changed == {name: 16}


@pytest.mark.parametrize("options, message", [
    ({"ratio": 1.0}, r"ratio must be in \[0, 1\), got 1.0"),
    ({"ratios": {"a": 1.5}}, r"ratios must be in \[0, 1\] \(1: a residual branch removed whole\), got 1.5"),
    ({"criterion": "thinet", "scope": "global"}, "ranks channels within a group only"),
    ({"criterion": "random"}, "option 'criterion' must be"),
    ({"ratios": {"a": "x"}}, "option 'ratios' must be dict of str to float"),
    ({"steps": 0}, "at least 1"),
    ({"shifts": -1}, "shifts must be a whole number of at least 0, got -1"),
])
def test_bad_options(options, message):
    with pytest.raises(OptionError, match=message):
        default_registry().create("prune-channels", options)


def test_sensitivity_and_allocation_meet_a_mac_target(resnet, calib, test_set):
    ctx = Context(calib=calib, original=resnet, teachers=[resnet])
    prune = pass_pruner(default_registry(), ctx, "l1", 8)
    sens = sensitivity(resnet, prune, calib, test_set.take(200), ratios=(0.5, 0.75))
    assert len(sens.groups) == 9 and all(len(sens.score[g]) == 2 for g in sens.groups)
    assert all(sens.macs[g][1] <= sens.macs[g][0] < sens.base_macs for g in sens.groups)
    ratios, measured = allocate(resnet, prune, sens, calib, target=0.6)
    assert measured["target_met"] and measured["macs"] <= 0.6 * sens.base_macs
    pruned = prune(resnet, ratios)
    assert total_macs(pruned, {"input": [1, 1, 28, 28]}) == measured["macs"]


def test_a_group_the_rounding_keeps_whole_is_named():
    """ratio=0.3 of 8 channels in multiples of 16 keeps all 8: the report said nothing about it."""
    from onnx import helper
    from conftest import apply_pass, make_model, rand, tensor

    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    model = make_model(nodes, [tensor("x", ["N", 3, 6, 6])], [tensor("y", ["N", 4, 6, 6])],
                       {"w1": rand(8, 3, 3, 3, seed=1), "w2": rand(4, 8, 1, 1, seed=2)})
    _, result = apply_pass(PruneChannels(ratio=0.3, round_to=16, recover=False, criterion="l1"), model)
    assert not result.modified
    assert "group 'c1' (8 channels) left whole: ratio 0.3 keeps all 8 in multiples of 16" in result.notes
    _, result = apply_pass(PruneChannels(ratio=0.3, round_to=4, recover=False, criterion="l1"), model)
    assert result.modified and not any("left whole" in n for n in result.notes)
