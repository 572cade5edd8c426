"""prune-channels at ratio 1 on a residual branch's inner width: the branch goes whole, replaced by
its mean output, the layers after the sum are refit; targets weigh that against narrowing."""
import numpy as np
import onnx
import pytest

from conftest import MODELS, apply_pass, run
from onnxcompress import Context, OptionError, graph as G
from onnxcompress.channels import analyze
from onnxcompress.metrics import total_macs
from onnxcompress.passes import PruneChannels
from onnxcompress.sensitivity import trial_ratios

BLOCK1 = "/blocks/blocks.1/a/a.0/Conv"          # the inner width of ResNet's second 16-channel block
BLOCK1_SUM = "/blocks/blocks.1/b/b.1/BatchNormalization_output_0"
SHAPES = {"input": [1, 1, 28, 28]}


def convs(model):
    return [n.name for n in model.graph.node if n.op_type == "Conv"]


def tensor_of(model, name, feeds):
    """A tensor of `model` on `feeds`, made an output for the occasion."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return run(m, feeds)[-1]


def constant_read_by(model, node_name):
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    return next(inits[i] for i in node.input if i in inits)


def test_a_branch_removed_whole_is_its_mean(resnet, calib):
    data = calib.take(100)
    pruned, result = apply_pass(PruneChannels(ratio=0.0, ratios={BLOCK1: 1.0}, recover=False),
                                resnet, Context(calib=data, original=resnet, teachers=[resnet]))
    assert set(convs(resnet)) - set(convs(pruned)) == {BLOCK1, "/blocks/blocks.1/b/b.0/Conv"}
    # the two 3x3 16->16 convs at 28x28 are gone, nothing else
    assert total_macs(resnet, SHAPES) - total_macs(pruned, SHAPES) == 2 * 16 * 16 * 9 * 28 * 28
    mean = constant_read_by(pruned, "/blocks/blocks.1/Add")
    expected = tensor_of(resnet, BLOCK1_SUM, {"input": data.feeds["input"]}).mean(axis=(0, 2, 3), keepdims=True)
    assert mean.shape == (1, 16, 1, 1) and np.allclose(mean, expected, atol=1e-5)
    assert result.stats["branches_removed"] == 1
    assert result.stats["channels_before"] - result.stats["channels_after"] == 16
    assert f"residual branches removed (ratio 1; each replaced by its mean output, the layers after its sum refit): " \
           f"'{BLOCK1}' (16 channels)" in result.notes


def test_the_layers_after_a_removed_branch_are_refit(resnet, calib, test_set):
    ctx = Context(calib=calib, original=resnet, teachers=[resnet])
    kept_whole, _ = apply_pass(PruneChannels(ratio=0.0, ratios={BLOCK1: 1.0}, recover=False), resnet,
                               Context(calib=calib, original=resnet, teachers=[resnet]))
    pruned, _ = apply_pass(PruneChannels(ratio=0.0, ratios={BLOCK1: 1.0}, shifts=0), resnet, ctx)
    after = {"/blocks/blocks.2/a/a.0/Conv_output_0", "/blocks/blocks.2/short/short.0/Conv_output_0"}
    assert ctx.state.refit == after      # the two layers that read the sum
    weights = lambda m: {n.name: constant_read_by(m, n.name) for n in m.graph.node if n.op_type == "Conv"}
    before, now = weights(resnet), weights(pruned)
    assert not np.array_equal(before["/blocks/blocks.2/a/a.0/Conv"], now["/blocks/blocks.2/a/a.0/Conv"])
    assert np.array_equal(before["/blocks/blocks.0/a/a.0/Conv"], now["/blocks/blocks.0/a/a.0/Conv"])
    accuracy = lambda m: 100 * float(np.mean(run(m, test_set.feeds)[0].argmax(1) == test_set.labels))
    assert accuracy(pruned) > 95.0 > accuracy(kept_whole)     # the mean alone is not enough; the refit is


def test_a_removed_branch_composes_with_narrowing(resnet, calib):
    """The mean the sum reads is cut with the residual channels when a later pass narrows them."""
    data = calib.take(64)
    first, _ = apply_pass(PruneChannels(ratio=0.0, ratios={BLOCK1: 1.0}, recover=False), resnet,
                          Context(calib=data, original=resnet, teachers=[resnet]))
    second, _ = apply_pass(PruneChannels(ratio=0.5, round_to=8, recover=False, criterion="l1"), first,
                           Context(calib=data, original=first, teachers=[first]))
    assert constant_read_by(second, "/blocks/blocks.1/Add").shape == (1, 8, 1, 1)
    assert run(second, {"input": data.feeds["input"][:4]})[0].shape == (4, 10)


def test_ratio_1_is_refused_where_no_branch_goes_whole(resnet, calib):
    ctx = Context(calib=calib.take(64), original=resnet, teachers=[resnet])
    with pytest.raises(OptionError, match=r"group '/blocks/blocks.4/short/short.0/Conv' cannot be removed whole "
                                          r"\(ratio 1\): it is not the inner width of a residual branch"):
        PruneChannels(ratio=0.0, ratios={"/blocks/blocks.4/short/short.0/Conv": 1.0}, recover=False).run(
            G.to_graph(resnet), ctx)
    with pytest.raises(OptionError, match=f"removing group '{BLOCK1}' whole needs calibration data"):
        PruneChannels(ratio=0.0, ratios={BLOCK1: 1.0}, recover=False, criterion="l1").run(
            G.to_graph(resnet), Context(original=resnet))


@pytest.mark.parametrize("name, branches", [("resnet", 6), ("mobilenet", 0), ("vgg", 0)])
def test_trials_try_each_residual_branch_whole(name, branches):
    model = onnx.load(str(MODELS / f"{name}.onnx"))
    an = analyze(G.to_graph(model), model, SHAPES)
    trials = trial_ratios(an, [g for g in an.groups if not g.frozen], (0.5,))
    assert sum(r == (0.5, 1.0) for r in trials.values()) == branches
    assert all(r in ((0.5,), (0.5, 1.0)) for r in trials.values())
    if branches:
        assert trials[BLOCK1] == (0.5, 1.0) and trials["/stem/stem.0/Conv"] == (0.5,)
