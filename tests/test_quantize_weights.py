"""quantize-weights: int4 (MatMulNBits, int4 QDQ) and binary weights, read back through the weight view."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from conftest import make_model, rand, tensor
from onnxcompress import Dataset, LatencyConfig, OptionError, PassManager
from onnxcompress import graph as G, weights as W
from onnxcompress.pass_api import default_registry
from onnxcompress.passes import Distill, QuantizeWeights

NO_LATENCY = LatencyConfig(enabled=False)


def _model():
    nodes = [helper.make_node("Conv", ["x", "wc", "bc"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "wg", "bg"], ["g"], transB=1),
             helper.make_node("Relu", ["g"], ["g2"]), helper.make_node("MatMul", ["g2", "wm"], ["h"]),
             helper.make_node("Relu", ["h"], ["h2"]), helper.make_node("Gemm", ["h2", "wo"], ["y"], transB=1)]
    inits = {"wc": rand(8, 3, 3, 3, scale=0.3), "bc": rand(8, seed=1, scale=0.1), "wg": rand(64, 8 * 16, seed=2, scale=0.1),
             "bg": rand(64, seed=3, scale=0.1), "wm": rand(64, 48, seed=4, scale=0.15), "wo": rand(10, 48, seed=5, scale=0.2)}
    return make_model(nodes, [tensor("x", ["N", 3, 4, 4])], [tensor("y", ["N", 10])], inits, opset=13)


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_int4_round_trip_matmulnbits_and_int4_conv_codes():
    model, x = _model(), rand(64, 3, 4, 4, seed=9)
    result = PassManager([QuantizeWeights(bits=4, block_size=32, rounding="nearest")], latency=NO_LATENCY).run(model)
    graph = G.to_graph(result.model)
    ops = [n.op for n in graph.nodes]
    assert ops.count("MatMulNBits") == 3 and "Gemm" not in ops and "MatMul" not in ops
    originals = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in graph.nodes:
        if node.op not in W.LAYERS:
            continue
        s = W.layer_weight(node)
        if node.op == "Conv":
            assert s.kind == "qdq" and s.storage.elem_type == onnx.TensorProto.INT4 and s.storage.axis == 0
            assert s.storage.q.min() >= -7 and s.storage.q.max() <= 7
            w = originals["wc"]
            np.testing.assert_allclose(s.storage.tables()[0], np.abs(w).reshape(8, -1).max(1) / 7, rtol=1e-6)
        else:
            assert s.kind == "nbits" and s.storage.bits == 4 and s.storage.block_size == 32
            assert node.attrs["K"] == s.value.shape[0] and node.attrs["N"] == s.value.shape[1]
        np.testing.assert_allclose(s.storage.decode(), s.value)          # the stored codes decode to the weight read
    # the model computes what its decoded weights say: a float copy with those weights agrees
    dense = G.to_graph(model)
    for a, b in zip([n for n in dense.nodes if n.op in W.LAYERS], [n for n in graph.nodes if n.op in W.LAYERS]):
        value = W.layer_weight(b).value
        W.write(dense, a, W.LAYERS[a.op].weight, W.layer_weight(a), value.T if a.op == "Gemm" else value)
    np.testing.assert_allclose(_run(result.model, x), _run(G.to_model(dense, like=model), x), atol=2e-4)
    assert result.model.opset_import[0].version == 21


def test_int4_asymmetric_blocks_carry_zero_points():
    result = PassManager([QuantizeWeights(bits=4, symmetric=False, rounding="nearest")], latency=NO_LATENCY).run(_model())
    nbits = [n for n in G.to_graph(result.model).nodes if n.op == "MatMulNBits"]
    assert len(nbits) == 3 and all(len(n.inputs) > 3 and n.inputs[3].name for n in nbits)
    s = W.layer_weight(nbits[0]).storage
    assert s.q.min() == 0 and s.q.max() == 15 and len(np.unique(s.zero_point)) > 1


def test_binary_weights_take_exactly_two_values_per_channel_and_survive_distillation():
    model, x = _model(), rand(128, 3, 4, 4, seed=9)
    data = Dataset({"x": x})
    result = PassManager([QuantizeWeights(bits=1), Distill(layers="all")], calib=data, eval_data=data,
                         latency=NO_LATENCY).run(model)
    steps = result.report.steps
    assert "kept at int8 (keep_ends): Conv" in str(steps[1].notes) and steps[2].status == "applied"
    layers = [n for n in G.to_graph(result.model).nodes if n.op in W.LAYERS]
    for node in layers[1:-1]:
        s = W.layer_weight(node)
        assert s.storage.elem_type == onnx.TensorProto.INT2 and set(np.unique(s.storage.q)) == {-1, 1}
        rows = s.value if node.op != "MatMul" else s.value.T
        for row in rows.reshape(rows.shape[0], -1):
            assert len(np.unique(row)) == 2 and np.isclose(row.max(), -row.min())      # +alpha_c and -alpha_c
    assert W.layer_weight(layers[0]).storage.elem_type == onnx.TensorProto.INT8
    assert result.model.opset_import[0].version == 25
    nearest = PassManager([QuantizeWeights(bits=1, rounding="nearest")], calib=data, eval_data=data,
                          latency=NO_LATENCY).run(model).report.steps[-1]
    assert steps[1].fidelity["y"]["cosine"] > nearest.fidelity["y"]["cosine"] + 0.05   # signs and alphas fit on data


def test_bad_block_size():
    with pytest.raises(OptionError, match="block_size"):
        default_registry().create("quantize-weights", {"block_size": 24})
