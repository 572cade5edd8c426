import numpy as np
import pytest
from onnx import helper

from conftest import make_model, rand, tensor
from onnxcompress.metrics import accuracy, count_params, fidelity, node_macs, sparsity, total_macs


def single(node, x_shape, y_shape, inits, extra_inputs=()):
    return make_model([node], [tensor("x", x_shape), *extra_inputs], [tensor("y", y_shape)], inits)


@pytest.mark.parametrize("node, x, y, inits, expected", [
    (helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]), ["N", 3, 8, 8], ["N", 4, 8, 8],
     {"w": rand(4, 3, 3, 3)}, 4 * 8 * 8 * 27),
    (helper.make_node("Conv", ["x", "w"], ["y"], group=2), [1, 4, 5, 5], [1, 6, 3, 3],
     {"w": rand(6, 2, 3, 3)}, 6 * 3 * 3 * 2 * 9),
    (helper.make_node("Conv", ["x", "w"], ["y"], group=4, strides=[2, 2]), [1, 4, 6, 6], [1, 4, 2, 2],
     {"w": rand(4, 1, 3, 3)}, 4 * 2 * 2 * 9),
    (helper.make_node("ConvTranspose", ["x", "w"], ["y"], group=2), [1, 4, 5, 5], [1, 6, 7, 7],
     {"w": rand(4, 3, 3, 3)}, 4 * 5 * 5 * 3 * 9),
    (helper.make_node("Gemm", ["x", "w"], ["y"], transB=1), ["N", 7], ["N", 5], {"w": rand(5, 7)}, 35),
    (helper.make_node("MatMul", ["x", "w"], ["y"]), [2, 3], [2, 4], {"w": rand(3, 4)}, 2 * 4 * 3),
])
def test_macs_per_op(node, x, y, inits, expected):
    assert total_macs(single(node, x, y, inits)) == expected


def test_macs_use_given_input_shape():
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    model = single(node, ["N", 1, "H", "W"], ["N", 2, "h", "w"], {"w": rand(2, 1, 1, 1)})
    assert total_macs(model, {"x": [1, 1, 10, 20]}) == 2 * 10 * 20
    assert node_macs(model, {"x": [1, 1, 10, 20]})[0][1] == "Conv"


def test_params_and_sparsity_ignore_shape_tensors():
    node = helper.make_node("Reshape", ["x", "shape"], ["y"])
    w = np.zeros((2, 2), np.float32)
    model = make_model([node, helper.make_node("MatMul", ["y", "w"], ["z"])], [tensor("x", [4])], [tensor("z", [2, 2])],
                       {"shape": np.array([2, 2], np.int64), "w": w})
    assert count_params(model) == 4
    assert sparsity(model) == 1.0


def test_fidelity_and_accuracy():
    ref = {"y": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])}
    out = {"y": np.array([[1.0, 0.5], [0.0, 1.0], [0.0, 1.0]])}
    f = fidelity(ref, out)["y"]
    assert f["max_abs"] == 1.0 and f["max_rel"] == 1.0
    assert f["top1_agreement"] == pytest.approx(200 / 3)
    assert f["cosine"] == pytest.approx(2 / np.sqrt(3 * 3.25))
    assert accuracy(out["y"], np.array([0, 1, 1])) == 100.0
