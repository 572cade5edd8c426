"""quantize: static int8 QDQ that onnxruntime runs with integer kernels, at the model's accuracy."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from conftest import MODELS, make_model, rand, tensor
from onnxcompress import LatencyConfig, OptionError, PassManager
from onnxcompress import calibration as Cal, graph as G, weights as W
from onnxcompress.pass_api import default_registry
from onnxcompress.passes import Quantize

NO_LATENCY = LatencyConfig(enabled=False)


@pytest.fixture(scope="module")
def quantized(resnet, calib, test_set):
    return PassManager([default_registry().create("fold-bn", {}), Quantize()], calib=calib, eval_data=test_set,
                       latency=NO_LATENCY).run(resnet)


def test_resnet_keeps_its_accuracy_with_int8_weights_per_channel(quantized):
    steps = quantized.report.steps
    assert steps[-1].accuracy >= steps[0].accuracy - 0.5
    graph = G.to_graph(quantized.model)
    layers = [n for n in graph.nodes if n.op in ("Conv", "Gemm")]
    for node in layers:
        w = W.layer_weight(node)
        assert w.kind == "qdq" and w.storage.elem_type == onnx.TensorProto.INT8 and np.all(w.storage.zero_point == 0)
        assert node.op == "Gemm" or w.storage.axis == 0                      # one scale per output channel
        b = W.layer_bias(node)
        x_scale = float(G.constant_value(G.producer(node.inputs[0]).inputs[1]))
        np.testing.assert_allclose(b.storage.scale.reshape(-1), x_scale * w.storage.tables()[0].reshape(-1)
                                   if node.op == "Conv" else b.storage.scale.reshape(-1), rtol=1e-6)
    assert quantized.model.opset_import[0].version >= 13


def test_onnxruntime_runs_every_conv_as_an_integer_kernel(quantized, tmp_path):
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(quantized.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "Conv" not in ops and ops.count("QLinearConv") == 15, sorted(set(ops))
    # no weight is dequantized at run time: every DequantizeLinear left reads an activation
    assert ops.count("DequantizeLinear") <= 3


def test_calibration_methods_on_a_tensor_with_outliers():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(100_000), [40.0, -35.0]]).astype(np.float32)
    s = Cal.summarize([x[:50_000], x[50_000:]])
    assert (s.lo, s.hi) == (-35.0, 40.0)
    minmax = Cal.activation_range(s, "minmax")
    assert minmax == (-35.0, 40.0)
    for method in ("percentile", "entropy"):
        lo, hi = Cal.activation_range(s, method)
        assert -10 < lo < -2 and 2 < hi < 10, (method, lo, hi)            # the two outliers are clipped
    err = lambda r: Cal._mse(x.astype(np.float64), *r)
    assert err(Cal.activation_range(s, "mse")) < 0.9 * err(minmax)       # clipping traded against resolution
    assert err(Cal.activation_range(s, "auto")) <= min(err(minmax), err(Cal.activation_range(s, "percentile")))
    scale, zp = Cal.uint8_params(0.0, 6.0)
    assert zp == 0 and scale == pytest.approx(6 / 255)


def test_excluded_layers_stay_in_float_and_the_report_says_so():
    from onnxcompress import Dataset
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    model = make_model(nodes, [tensor("x", ["N", 8])], [tensor("y", ["N", 4])],
                       {"w1": rand(16, 8), "w2": rand(4, 16, seed=1)}, opset=13)
    model.graph.node[2].name = "head"
    result = PassManager([Quantize(exclude=("head",))], calib=Dataset({"x": rand(64, 8)}), latency=NO_LATENCY).run(model)
    step = result.report.steps[-1]
    assert step.stats["layers_quantized"] == 1 and "Gemm 'head': excluded; left in float" in step.notes
    graph = G.to_graph(result.model)
    kinds = {n.name: W.layer_weight(n).kind for n in graph.nodes if n.op == "Gemm"}
    assert kinds["head"] == "dense" and sorted(kinds.values()) == ["dense", "qdq"]


def test_bad_options():
    with pytest.raises(OptionError, match="percentile"):
        default_registry().create("quantize", {"percentile": 20.0})


def test_per_tensor_weights_keep_a_model_below_opset_13_at_its_opset():
    """Per-tensor codes need no DequantizeLinear axis: an opset-11 model stays at opset 11."""
    from onnxcompress import Dataset
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    model = make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 4, 8, 8])],
                       {"w": rand(8, 3, 3, 3), "b": rand(8, seed=2), "w2": rand(4, 8, 1, 1, seed=1)}, opset=11)
    data = Dataset({"x": rand(32, 3, 8, 8, seed=4)})
    result = PassManager([Quantize(per_channel=False)], calib=data, eval_data=data, latency=NO_LATENCY).run(model)
    assert result.model.opset_import[0].version == 11
    assert all("axis" not in [a.name for a in n.attribute] for n in result.model.graph.node if n.op_type == "DequantizeLinear")
    per_channel = PassManager([Quantize()], calib=data, eval_data=data, latency=NO_LATENCY).run(model)
    assert per_channel.model.opset_import[0].version == 13 and "raised the opset from 11 to 13" in str(per_channel.report.steps[-1].notes)


@pytest.mark.parametrize("wide, per_channel", [(1.0, False), (10.0, True)])
def test_depthwise_convs_get_one_scale_unless_their_channel_ranges_differ(wide, per_channel):
    from onnxcompress import Dataset
    w = rand(8, 1, 3, 3, seed=5)
    w[0] *= wide
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], group=8, pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["y"])]
    model = make_model(nodes, [tensor("x", ["N", 8, 6, 6])], [tensor("y", ["N", 8, 6, 6])], {"w": w}, opset=13)
    result = PassManager([Quantize()], calib=Dataset({"x": rand(16, 8, 6, 6, seed=6)}), latency=NO_LATENCY).run(model)
    conv = next(n for n in G.to_graph(result.model).nodes if n.op == "Conv")
    assert (W.layer_weight(conv).storage.axis is not None) == per_channel


def test_an_already_quantized_model_is_left_as_it_is_with_a_note(quantized, calib):
    again = PassManager([Quantize()], calib=calib.take(64), latency=NO_LATENCY).run(quantized.model)
    step = again.report.steps[-1]
    assert step.stats["layers_quantized"] == 0 and "already quantized (16 layers" in str(step.notes)
    ops = lambda m: sorted(n.op_type for n in m.graph.node)
    assert ops(again.model) == ops(quantized.model)
