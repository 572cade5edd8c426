"""The channel-dependency table, rule by rule, on small graphs built in code.

Each test removes channels that carry nothing (their producer's weights and bias are zero), so the
pruned model must agree with the original to 1e-5, with exact expected weight shapes."""
import numpy as np
import pytest
from onnx import helper, numpy_helper

from conftest import make_model, max_abs_diff, rand, tensor
from onnxcompress import Dataset, LatencyConfig, PassManager, graph as G
from onnxcompress.channels import analyze, apply_removal
from onnxcompress.passes import PruneChannels

X = rand(3, 2, 6, 6, seed=7)


def conv(name, x, y, w, b=None, **attrs):
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], name=name, **attrs)


def dead(w, channels, axis=0):
    """Zero the given output channels of a weight (or bias)."""
    w = w.copy()
    idx = [slice(None)] * w.ndim
    idx[axis] = channels
    w[tuple(idx)] = 0
    return w


def remove(model, tensor_name, channels):
    """Remove the units of `channels` of a tensor; return the pruned model and the analysis."""
    graph = G.to_graph(model)
    an = analyze(graph, model)
    roots = set(an.uf.roots(an.ids[tensor_name])[channels].tolist())
    apply_removal(graph, an, roots)
    new = G.to_model(G.tidy(graph), like=model)
    import onnx
    onnx.checker.check_model(new, full_check=True)
    return new, an


def shapes(model):
    return {t.name: list(t.dims) for t in model.graph.initializer}


def check(model, new, feeds=None, tol=1e-5):
    assert max_abs_diff(model, new, feeds or {"x": X}) <= tol


def test_chain_conv_relu_conv():
    w1 = dead(rand(4, 2, 3, 3), [1, 3])
    b1 = dead(rand(4), [1, 3])
    nodes = [conv("c1", "x", "a", "w1", "b1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"], name="relu"),
             conv("c2", "r", "y", "w2", "b2")]
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 5, 4, 4])],
                       {"w1": w1, "b1": b1, "w2": rand(5, 4, 3, 3), "b2": rand(5)})
    new, _ = remove(model, "a", [1, 3])
    s = shapes(new)
    assert s["w1_pruned"] == [2, 2, 3, 3] and s["b1_pruned"] == [2] and s["w2_pruned"] == [5, 2, 3, 3]
    check(model, new)


def test_batchnorm_and_per_channel_constants_are_sliced():
    w1 = dead(rand(4, 2, 1, 1), [0])
    nodes = [conv("c1", "x", "a", "w1"),
             helper.make_node("BatchNormalization", ["a", "s", "bb", "m", "v"], ["n"], name="bn"),
             helper.make_node("PRelu", ["n", "slope"], ["p"], name="prelu"),
             helper.make_node("Mul", ["p", "k"], ["q"], name="mul"),
             helper.make_node("Add", ["q", "half"], ["r"], name="add_scalar"),
             conv("c2", "r", "y", "w2")]
    inits = {"w1": w1, "s": np.ones(4, np.float32), "bb": np.array([0, 1, 2, 3], np.float32),
             "m": np.zeros(4, np.float32), "v": np.ones(4, np.float32), "slope": rand(4, 1, 1, seed=2),
             "k": rand(1, 4, 1, 1, seed=3), "half": np.array(0.5, np.float32), "w2": dead(rand(3, 4, 1, 1), [0], axis=1)}
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 3, 6, 6])], inits)
    new, _ = remove(model, "a", [0])
    s = shapes(new)
    assert s["s_pruned"] == [3] and s["slope_pruned"] == [3, 1, 1] and s["k_pruned"] == [1, 3, 1, 1]
    assert s["half"] == [] and s["w2_pruned"] == [3, 3, 1, 1]
    check(model, new)


def test_residual_add_ties_both_producers():
    nodes = [conv("c1", "x", "a", "w1", "b1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"], name="relu"),
             conv("c2", "r", "b", "w2", "b2", pads=[1, 1, 1, 1]), helper.make_node("Add", ["r", "b"], ["s"], name="add"),
             conv("c3", "s", "y", "w3")]
    inits = {"w1": dead(rand(4, 2, 3, 3), [2]), "b1": dead(rand(4), [2]), "w2": dead(rand(4, 4, 3, 3), [2]),
             "b2": dead(rand(4), [2]), "w3": rand(3, 4, 1, 1)}
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 3, 6, 6])], inits)
    new, an = remove(model, "b", [2])
    s = shapes(new)
    assert s["w1_pruned"] == [3, 2, 3, 3] and s["w2_pruned"] == [3, 3, 3, 3] and s["w3_pruned"] == [3, 3, 1, 1]
    group = [g for g in an.groups if "a" in g.producers][0]   # layers are known by their output tensor
    assert set(group.producers) == {"a", "b"} and set(group.consumers) == {"b", "y"} and group.name == "c1"
    check(model, new)


def test_concat_maps_channel_offsets():
    nodes = [conv("c1", "x", "a", "w1"), conv("c2", "x", "b", "w2"),
             helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1), conv("c3", "cat", "y", "w3")]
    w3 = rand(2, 7, 1, 1)
    inits = {"w1": rand(3, 2, 1, 1), "w2": dead(rand(4, 2, 1, 1), [1]), "w3": w3}
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 2, 6, 6])], inits)
    new, _ = remove(model, "b", [1])
    s = shapes(new)
    assert s["w1"] == [3, 2, 1, 1] and s["w2_pruned"] == [3, 2, 1, 1] and s["w3_pruned"] == [2, 6, 1, 1]
    got = numpy_helper.to_array([t for t in new.graph.initializer if t.name == "w3_pruned"][0])
    np.testing.assert_array_equal(got, np.delete(w3, 3 + 1, axis=1))  # concat offset 3 + channel 1
    check(model, new)


def test_depthwise_ties_input_to_output_and_updates_group():
    nodes = [conv("pw1", "x", "a", "w1"), conv("dw", "a", "d", "wd", group=4, pads=[1, 1, 1, 1]),
             conv("pw2", "d", "y", "w2")]
    inits = {"w1": dead(rand(4, 2, 1, 1), [0, 2]), "wd": rand(4, 1, 3, 3), "w2": rand(3, 4, 1, 1)}
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 3, 6, 6])], inits)
    new, _ = remove(model, "d", [0, 2])
    s = shapes(new)
    assert s["w1_pruned"] == [2, 2, 1, 1] and s["wd_pruned"] == [2, 1, 3, 3] and s["w2_pruned"] == [3, 2, 1, 1]
    assert [a.i for n in new.graph.node if n.name == "dw" for a in n.attribute if a.name == "group"] == [2]
    check(model, new)


def test_grouped_conv_removes_whole_groups():
    nodes = [conv("c1", "x", "a", "w1"), conv("g", "a", "b", "wg", group=2), conv("c3", "b", "y", "w3")]
    inits = {"w1": dead(rand(4, 2, 1, 1), [2, 3]), "wg": rand(6, 2, 1, 1), "w3": dead(rand(2, 6, 1, 1), [3, 4, 5], axis=1)}
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 2, 6, 6])], inits)
    graph = G.to_graph(model)
    an = analyze(graph, model)
    roots = an.uf.roots(an.ids["a"])
    assert roots[2] == roots[3] and roots[0] == roots[1] and roots[0] != roots[2]
    assert set(an.uf.roots(an.ids["b"])[3:].tolist()) == {roots[2]}  # outputs 3..5 are group 2's
    new, _ = remove(model, "a", [2])
    s = shapes(new)
    assert s["w1_pruned"] == [2, 2, 1, 1] and s["wg_pruned"] == [3, 2, 1, 1] and s["w3_pruned"] == [2, 3, 1, 1]
    assert [a.i for n in new.graph.node if n.name == "g" for a in n.attribute if a.name == "group"] == [1]
    check(model, new)


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_flatten_into_gemm_removes_hw_columns(flatten):
    flat = (helper.make_node("Flatten", ["r"], ["f"], name="flat", axis=1) if flatten == "Flatten"
            else helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"))
    nodes = [conv("c1", "x", "a", "w1"), helper.make_node("Relu", ["a"], ["r"], name="relu"), flat,
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    inits = {"w1": dead(rand(3, 2, 2, 2), [1]), "wf": rand(5, 3 * 25), "bf": rand(5), "shape": np.array([0, -1], np.int64)}
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 5])], inits)
    new, _ = remove(model, "a", [1])
    assert shapes(new)["wf_pruned"] == [5, 50] and shapes(new)["w1_pruned"] == [2, 2, 2, 2]
    check(model, new)


def test_split_and_slice_on_the_channel_axis():
    nodes = [conv("c1", "x", "a", "w1"),
             helper.make_node("Split", ["a", "split"], ["s1", "s2"], name="split", axis=1),
             helper.make_node("Slice", ["a", "st", "en", "ax"], ["sl"], name="slice"),
             conv("c2", "s1", "y1", "w2"), conv("c3", "s2", "y2", "w3"), conv("c4", "sl", "y3", "w4")]
    inits = {"w1": dead(rand(6, 2, 1, 1), [1, 4]), "split": np.array([2, 4], np.int64), "st": np.array([1], np.int64),
             "en": np.array([5], np.int64), "ax": np.array([1], np.int64),
             "w2": rand(3, 2, 1, 1), "w3": rand(3, 4, 1, 1), "w4": rand(3, 4, 1, 1)}
    outs = [tensor(f"y{i}", ["N", 3, 6, 6]) for i in (1, 2, 3)]
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], outs, inits)
    new, _ = remove(model, "a", [1, 4])
    s = shapes(new)
    assert s["split_pruned"] == [2] and s["w2_pruned"] == [3, 1, 1, 1] and s["w3_pruned"] == [3, 3, 1, 1]
    assert s["w4_pruned"] == [3, 2, 1, 1]
    vals = {t.name: numpy_helper.to_array(t).tolist() for t in new.graph.initializer}
    assert vals["split_pruned"] == [1, 3] and vals["st_pruned"] == [1] and vals["en_pruned"] == [3]
    check(model, new)


def test_squeeze_excitation_block():
    nodes = [conv("c1", "x", "a", "w1", "b1"), helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             conv("se1", "g", "s1", "ws1", "bs1"), helper.make_node("Relu", ["s1"], ["s2"], name="se_relu"),
             conv("se2", "s2", "s3", "ws2", "bs2"), helper.make_node("Sigmoid", ["s3"], ["s4"], name="sig"),
             helper.make_node("Mul", ["r", "s4"], ["m"], name="scale"), conv("c2", "m", "y", "w2")]
    inits = {"w1": dead(rand(4, 2, 1, 1), [3]), "b1": dead(rand(4), [3]), "ws1": rand(2, 4, 1, 1), "bs1": rand(2),
             "ws2": rand(4, 2, 1, 1), "bs2": rand(4), "w2": rand(3, 4, 1, 1)}
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 3, 6, 6])], inits)
    new, an = remove(model, "a", [3])
    s = shapes(new)
    assert s["ws1_pruned"] == [2, 3, 1, 1] and s["ws2_pruned"] == [3, 2, 1, 1] and s["bs2_pruned"] == [3]
    check(model, new)


def test_conv_transpose_and_matmul():
    nodes = [helper.make_node("ConvTranspose", ["x", "wt", "bt"], ["a"], name="deconv"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"), helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"), helper.make_node("MatMul", ["f", "wm"], ["m"], name="mm"),
             helper.make_node("MatMul", ["m", "wo"], ["y"], name="out")]
    inits = {"wt": dead(rand(2, 5, 3, 3), [0], axis=1), "bt": dead(rand(5), [0]), "wm": rand(5, 4), "wo": rand(4, 3)}
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 3])], inits)
    new, _ = remove(model, "a", [0])
    s = shapes(new)
    assert s["wt_pruned"] == [2, 4, 3, 3] and s["bt_pruned"] == [4] and s["wm_pruned"] == [4, 4]
    check(model, new)
    new2, _ = remove(model, "m", [1])
    assert shapes(new2)["wm_pruned"] == [5, 3] and shapes(new2)["wo_pruned"] == [3, 3]


def test_unknown_op_freezes_its_groups_and_is_named():
    nodes = [conv("c1", "x", "a", "w1"), helper.make_node("LRN", ["a"], ["l"], name="lrn_node", size=3),
             conv("c2", "l", "b", "w2"), helper.make_node("Relu", ["b"], ["r"], name="relu"), conv("c3", "r", "y", "w3")]
    inits = {"w1": rand(4, 2, 1, 1), "w2": rand(4, 4, 1, 1), "w3": rand(3, 4, 1, 1)}
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 3, 6, 6])], inits)
    an = analyze(G.to_graph(model), model)
    by_producer = {g.name: g for g in an.groups if g.producers}
    assert by_producer["c1"].frozen == "LRN 'lrn_node' is not in the channel table"
    assert by_producer["c2"].frozen is None
    assert by_producer["c3"].frozen == "graph output"
    result = PassManager([PruneChannels(round_to=1, ratio=0.5, recover=False)], latency=LatencyConfig(enabled=False)).run(model)
    notes = result.report.steps[1].notes
    assert any("'c1'" in n and "LRN 'lrn_node'" in n for n in notes)
    s = shapes(result.model)
    assert s["w1"] == [4, 2, 1, 1] and s["w2_pruned"] == [2, 4, 1, 1] and s["w3_pruned"] == [3, 2, 1, 1]


def test_exclude_is_honoured_and_io_shapes_never_change(resnet, mnist_test):
    data = Dataset({"input": mnist_test["input"][:64]})
    keep = "/blocks/blocks.0/a/a.0/Conv"
    result = PassManager([PruneChannels(round_to=1, ratio=0.5, recover=False, exclude=(keep,))], calib=data,
                         latency=LatencyConfig(enabled=False)).run(resnet)
    s = shapes(result.model)
    conv_w = {n.name: s[n.input[1]] for n in result.model.graph.node if n.op_type == "Conv"}
    assert conv_w[keep][0] == 16                       # excluded group kept whole
    assert conv_w["/blocks/blocks.1/a/a.0/Conv"][0] == 8  # others halved
    io = lambda m: [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                    for v in list(m.graph.input) + list(m.graph.output)]
    assert io(result.model) == io(resnet)
    assert any("excluded" in n for n in result.report.steps[1].notes)


def test_round_to_and_min_channels():
    from onnxcompress.passes.prune_channels import kept_count
    assert kept_count(64, 0.3) == 45 and kept_count(64, 0.3, round_to=8) == 48 and kept_count(64, 0.3, round_to=16) == 48
    assert kept_count(16, 0.9, round_to=8) == 8 and kept_count(10, 0.95, min_channels=2) == 2
    assert kept_count(4, 0.5, round_to=8) == 4


def _op_cases():
    """(node builder, extra initializers, expected pruned shapes) for ops between two convs."""
    n = lambda op, ins, **a: helper.make_node(op, ["a", *ins], ["b"], name="op", **a)
    return {
        "Relu": (n("Relu", []), {}, {}),
        "Clip": (n("Clip", ["lo", "hi"]), {"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}, {}),
        "LeakyRelu": (n("LeakyRelu", [], alpha=0.1), {}, {}),
        "Sigmoid": (n("Sigmoid", []), {}, {}),
        "HardSigmoid": (n("HardSigmoid", []), {}, {}),
        "HardSwish": (n("HardSwish", []), {}, {}),
        "Tanh": (n("Tanh", []), {}, {}),
        "MaxPool": (n("MaxPool", [], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), {}, {}),
        "AveragePool": (n("AveragePool", [], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), {}, {}),
        "Resize": (n("Resize", ["", "scales"], mode="nearest"), {"scales": np.array([1, 1, 1, 1], np.float32)}, {}),
        "Pad": (n("Pad", ["pads"]), {"pads": np.array([0, 0, 0, 0, 0, 0, 0, 0], np.int64)}, {}),
        "InstanceNormalization": (n("InstanceNormalization", ["s", "bb"]), {"s": rand(4, seed=5), "bb": rand(4, seed=6)},
                                  {"s_pruned": [3], "bb_pruned": [3]}),
        "Sub": (n("Sub", ["k"]), {"k": rand(4, 1, 1, seed=8)}, {"k_pruned": [3, 1, 1]}),
        "Div": (n("Div", ["k"]), {"k": np.full((1, 4, 1, 1), 2.0, np.float32)}, {"k_pruned": [1, 3, 1, 1]}),
        "Softmax": (n("Softmax", [], axis=-1), {}, {}),
        "Identity": (n("Identity", []), {}, {}),
    }


@pytest.mark.parametrize("op", list(_op_cases()))
def test_channels_pass_through_each_op(op):
    node, extra, expected = _op_cases()[op]
    nodes = [conv("c1", "x", "a", "w1", pads=[0, 0, 0, 0]), node, conv("c2", "b", "y", "w2")]
    inits = {"w1": rand(4, 2, 1, 1), "w2": dead(rand(3, 4, 1, 1), [1], axis=1), **extra}
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 3, 6, 6])], inits)
    new, an = remove(model, "a", [1])
    s = shapes(new)
    assert s["w1_pruned"] == [3, 2, 1, 1] and s["w2_pruned"] == [3, 3, 1, 1]
    for name, shape in expected.items():
        assert s[name] == shape
    check(model, new)


def test_squeeze_unsqueeze_keep_track_of_the_channel_axis():
    nodes = [conv("c1", "x", "a", "w1"), helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
             helper.make_node("Squeeze", ["g", "axes"], ["sq"], name="sq"),
             helper.make_node("Unsqueeze", ["sq", "axes"], ["us"], name="us"), conv("c2", "us", "y", "w2")]
    inits = {"w1": rand(4, 2, 1, 1), "axes": np.array([2, 3], np.int64), "w2": dead(rand(3, 4, 1, 1), [0, 2], axis=1)}
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 3, 1, 1])], inits)
    new, an = remove(model, "a", [0, 2])
    assert an.axis["sq"] == 1 and shapes(new)["w2_pruned"] == [3, 2, 1, 1]
    check(model, new)


def test_padding_the_channel_axis_freezes():
    nodes = [conv("c1", "x", "a", "w1"), helper.make_node("Pad", ["a", "pads"], ["b"], name="chanpad"),
             conv("c2", "b", "y", "w2")]
    inits = {"w1": rand(4, 2, 1, 1), "pads": np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int64), "w2": rand(3, 5, 1, 1)}
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 3, 6, 6])], inits)
    an = analyze(G.to_graph(model), model)
    assert [g.frozen for g in an.groups if g.producers == ["a"]] == ["Pad 'chanpad': pads the channel axis"]


def test_tensors_read_inside_if_branches_are_frozen():
    then_g = helper.make_graph([helper.make_node("Relu", ["c"], ["t"])], "then", [], [tensor("t", ["N", 4, 6, 6])])
    else_g = helper.make_graph([helper.make_node("Neg", ["c"], ["e"])], "else", [], [tensor("e", ["N", 4, 6, 6])])
    nodes = [conv("c1", "x", "c", "w1"),
             helper.make_node("If", ["cond"], ["i"], name="branch", then_branch=then_g, else_branch=else_g),
             conv("c2", "i", "d", "w2"), helper.make_node("Relu", ["d"], ["r"], name="relu"), conv("c3", "r", "y", "w3")]
    inits = {"w1": rand(4, 2, 1, 1), "w2": rand(6, 4, 1, 1), "w3": dead(rand(3, 6, 1, 1), [0, 1], axis=1),
             "cond": np.array(True)}
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 3, 6, 6])], inits)
    an = analyze(G.to_graph(model), model)
    frozen = {g.name: g.frozen for g in an.groups if g.producers}
    assert frozen["c1"] == "If 'branch' is not in the channel table" and frozen["c2"] is None
    new, _ = remove(model, "d", [0, 1])
    assert shapes(new)["w2_pruned"] == [4, 4, 1, 1] and shapes(new)["w1"] == [4, 2, 1, 1]
    check(model, new)
