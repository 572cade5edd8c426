from onnx import helper

from conftest import apply_pass, bn_params, make_model, max_abs_diff, rand, tensor
from onnxcompress.passes import FoldBatchNorm


def ops(model):
    return [n.op_type for n in model.graph.node]


def test_conv_bn_folds_exactly(conv_bn_model):
    new, result = apply_pass(FoldBatchNorm(), conv_bn_model)
    assert ops(new) == ["Conv", "Relu"]
    assert result.modified and result.stats["bn_folded"] == 1
    assert max_abs_diff(conv_bn_model, new, {"x": rand(2, 3, 8, 8, seed=5)}) <= 1e-4


def _bn_after(op_node, out_shape, weights, c, out_dims=None):
    nodes = [op_node, helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"], name="bn")]
    return nodes, {**weights, **bn_params(c, 3)}


def test_grouped_conv_transpose_without_bias():
    node = helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="deconv", group=2, strides=[2, 2])
    nodes, inits = _bn_after(node, None, {"w": rand(4, 3, 3, 3)}, 6)
    model = make_model(nodes, [tensor("x", [1, 4, 5, 5])], [tensor("y", [1, 6, 11, 11])], inits)
    new, _ = apply_pass(FoldBatchNorm(), model)
    assert ops(new) == ["ConvTranspose"]
    assert max_abs_diff(model, new, {"x": rand(1, 4, 5, 5, seed=1)}) <= 1e-4


def test_gemm_with_alpha_beta_and_untransposed_weight():
    node = helper.make_node("Gemm", ["x", "w", "b"], ["c"], name="fc", alpha=0.5, beta=2.0)
    nodes, inits = _bn_after(node, None, {"w": rand(7, 5), "b": rand(5, seed=4)}, 5)
    model = make_model(nodes, [tensor("x", ["N", 7])], [tensor("y", ["N", 5])], inits)
    new, _ = apply_pass(FoldBatchNorm(), model)
    assert ops(new) == ["Gemm"]
    assert max_abs_diff(model, new, {"x": rand(3, 7, seed=9)}) <= 1e-4


def test_bn_after_relu_and_shared_output_are_left_and_reported():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("BatchNormalization", ["r", "scale", "bias", "mean", "var"], ["n1"], name="bn_relu"),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n2"], name="bn_shared"),
             helper.make_node("Add", ["n1", "n2"], ["y"], name="add")]
    model = make_model(nodes, [tensor("x", [1, 2, 4, 4])], [tensor("y", [1, 3, 4, 4])], {"w": rand(3, 2, 1, 1), **bn_params(3, 0)})
    new, result = apply_pass(FoldBatchNorm(), model)
    assert not result.modified and ops(new).count("BatchNormalization") == 2
    assert any("'bn_relu'" in n and "Relu" in n for n in result.notes)
    assert any("'bn_shared'" in n and "used elsewhere" in n for n in result.notes)


def test_shared_weight_is_not_mutated_for_its_other_user():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "scale", "bias", "mean", "var"], ["n1"], name="bn"),
             helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2"),
             helper.make_node("Add", ["n1", "c2"], ["y"], name="add")]
    model = make_model(nodes, [tensor("x", [1, 2, 4, 4])], [tensor("y", [1, 3, 4, 4])], {"w": rand(3, 2, 1, 1), **bn_params(3, 0)})
    new, _ = apply_pass(FoldBatchNorm(), model)
    assert "BatchNormalization" not in ops(new)
    assert max_abs_diff(model, new, {"x": rand(1, 2, 4, 4, seed=3)}) <= 1e-4


def test_resnet_fold_agrees_on_test_images(resnet, mnist_test):
    new, result = apply_pass(FoldBatchNorm(), resnet)
    assert "BatchNormalization" not in ops(new)
    assert result.stats["bn_left"] == 0
    assert max_abs_diff(resnet, new, {"input": mnist_test["input"]}) <= 1e-4
