"""quantize: static int8 QDQ that onnxruntime runs with integer kernels, at the model's accuracy."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from conftest import MODELS, make_model, rand, run, tensor
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
    # every residual Add, the pooling and Flatten run on uint8 too: nothing is dequantized before the logits
    assert ops.count("QLinearAdd") == 6 and "QLinearGlobalAveragePool" in ops and "QGemm" in ops
    assert "DequantizeLinear" not in ops and ops.count("QuantizeLinear") == 1        # the image's


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


def test_ranges_summarized_batch_by_batch_equal_the_whole_tensors_summary(monkeypatch):
    from onnxcompress import Dataset
    from onnxcompress.runtime import capture
    model, x = _mlp(), rand(300, 8, seed=7) * 40
    names = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    monkeypatch.setattr(Cal, "SAMPLE", 1000)           # 300 x 16 values each: the sample is a random draw
    streamed = Cal.summarize_activations(model, Dataset({"x": x}), names, ("CPUExecutionProvider",), batch_size=64)
    whole = capture(model, Dataset({"x": x}), names, batch_size=300)
    for name in names:
        a, b = Cal.summarize([whole[name]]), streamed[name]
        assert (a.lo, a.hi) == (b.lo, b.hi) and 0 < a.sample.size < whole[name].size
        assert np.array_equal(a.sample, b.sample)


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


def _mlp(opset=13):
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)]
    return make_model(nodes, [tensor("x", ["N", 8])], [tensor("y", ["N", 4])],
                      {"w1": rand(16, 8), "b1": rand(16, seed=2), "w2": rand(4, 16, seed=1), "b2": rand(4, seed=3)}, opset=opset)


def test_onnxruntime_integer_kernels_agree_with_fake_quantization_in_numpy():
    """The QDQ model's meaning computed in numpy (quantize, dequantize, float layer) against what
    onnxruntime's integer kernels compute: within one output quantization step."""
    from onnxcompress import Dataset
    x = rand(64, 8, seed=7)
    model = PassManager([Quantize(rounding="nearest", bias_correction=False)], calib=Dataset({"x": x}),
                        latency=NO_LATENCY).run(_mlp()).model
    graph = G.to_graph(model)
    qparams = {n.inputs[0].name: (float(G.constant_value(n.inputs[1])), int(G.constant_value(n.inputs[2])))
               for n in graph.nodes if n.op == "QuantizeLinear"}
    fq = lambda v, s, z: (np.clip(np.round(v / s) + z, 0, 255) - z) * s
    gemms = [n for n in graph.nodes if n.op == "Gemm"]
    w = [W.layer_weight(n).value for n in gemms]
    b = [W.layer_bias(n).value for n in gemms]
    h = fq(x, *qparams["x"]) @ w[0].T + b[0]
    r = fq(np.maximum(h, 0), *qparams["r"])
    expected = r @ w[1].T + b[1]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    step = qparams["r"][0] * np.abs(w[1]).sum(1).max()       # one input step through the last layer
    assert np.max(np.abs(got - expected)) <= step
    assert np.max(np.abs(got - expected)) < 0.02 * np.abs(expected).max()


def test_per_channel_scales_are_max_abs_over_127_exactly():
    from onnxcompress import Dataset
    model = _mlp()
    w1 = np.array([numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "w1"][0])
    result = PassManager([Quantize(rounding="nearest", equalize=False)], calib=Dataset({"x": rand(32, 8)}),
                         latency=NO_LATENCY).run(model)
    gemm = next(n for n in G.to_graph(result.model).nodes if n.op == "Gemm")
    scale, zp = W.layer_weight(gemm).storage.tables()
    np.testing.assert_array_equal(scale, (np.abs(w1).max(1) / np.float32(127)).astype(np.float32))
    assert scale.shape == (16,) and np.all(zp == 0)
    np.testing.assert_array_equal(np.abs(W.layer_weight(gemm).storage.q).max(1), 127)   # each row's largest weight


def test_an_opset_11_model_with_constant_node_weights_quantizes_to_a_loadable_model():
    from onnxcompress import Dataset
    w = rand(8, 3, 3, 3)
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
             helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["y"])]
    model = make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 8, 8, 8])], {}, opset=11)
    data = Dataset({"x": rand(16, 3, 8, 8, seed=1)})
    result = PassManager([Quantize()], calib=data, eval_data=data, latency=NO_LATENCY).run(model)
    step = result.report.steps[-1]
    assert step.status == "applied" and "raised the opset from 11 to 13" in str(step.notes)
    conv = next(n for n in G.to_graph(result.model).nodes if n.op == "Conv")
    assert W.layer_weight(conv).kind == "qdq" and W.layer_weight(conv).storage.axis == 0
    ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert step.fidelity["y"]["cosine"] > 0.999


def test_layers_inside_an_if_body_are_quantized():
    from onnxcompress import Dataset
    branch = lambda name, seed: helper.make_graph(
        [helper.make_node("MatMul", ["x", f"w_{name}"], [f"y_{name}"])], name, [], [tensor(f"y_{name}", ["N", 4])],
        [numpy_helper.from_array(rand(8, 4, seed=seed), f"w_{name}")])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.float32))),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=branch("a", 1), else_branch=branch("b", 2))]
    model = make_model(nodes, [tensor("x", [1, 8])], [tensor("y", ["N", 4])], {}, opset=13)
    result = PassManager([Quantize()], calib=Dataset({"x": rand(1, 8, seed=3)}), latency=NO_LATENCY).run(model)
    step = result.report.steps[-1]
    assert step.status == "applied" and sorted(n.split(":")[0] for n in step.notes if "layers quantized" in n) == \
        [f"If 'y' body '{b}'" for b in ("a", "b")]   # one note per body, named
    ops = [n.op for n in G.iter_nodes(G.to_graph(result.model))]
    assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops
    x = np.abs(rand(1, 8, seed=9))
    for sign in (1, -1):                                                  # both branches
        got = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": sign * x})[0]
        ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": sign * x})[0]
        step = np.ptp(np.append(x, 0)) / 255                              # one step of the input's dynamic range
        w = numpy_helper.to_array(model.graph.node[-1].attribute[sign < 0].g.initializer[0])
        assert 0 < np.max(np.abs(got - ref)) <= step * np.abs(w).sum(0).max() + 0.01 * np.abs(ref).max()


def test_a_gru_is_left_in_float_with_a_note():
    from onnxcompress import Dataset
    hidden, inp = 8, 4
    nodes = [helper.make_node("GRU", ["x", "W", "R", "B"], ["y"], hidden_size=hidden),
             helper.make_node("Squeeze", ["y", "axes"], ["s"]), helper.make_node("MatMul", ["s", "w"], ["z"])]
    model = make_model(nodes, [tensor("x", [5, "N", inp])], [tensor("z", [5, "N", 3])],
                       {"W": rand(1, 3 * hidden, inp, scale=0.3), "R": rand(1, 3 * hidden, hidden, seed=1, scale=0.3),
                        "B": rand(1, 6 * hidden, seed=2, scale=0.1), "axes": np.array([1], np.int64),
                        "w": rand(hidden, 3, seed=3)}, opset=13)
    result = PassManager([Quantize()], calib=Dataset({"x": rand(5, 4, inp, seed=4)}), latency=NO_LATENCY).run(model)
    notes = result.report.steps[-1].notes
    assert "GRU 'y': onnxruntime has no integer kernel for it; left in float" in notes
    assert [n.op_type for n in result.model.graph.node].count("GRU") == 1


def test_dynamic_activations_fuse_into_dynamic_quantize_matmul(tmp_path):
    model = _mlp()
    result = PassManager([Quantize(activations="dynamic")], latency=NO_LATENCY).run(model)
    assert result.report.steps[-1].stats["layers_quantized"] == 2
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(result.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node] == ["DynamicQuantizeMatMul", "Relu", "DynamicQuantizeMatMul"]
    x = rand(32, 8, seed=5)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.max(np.abs(sess.run(None, {"x": x})[0] - ref)) < 0.03 * np.abs(ref).max()


def test_an_lstm_is_quantized_dynamically():
    from onnxcompress import Dataset
    hidden, inp = 16, 8
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=hidden)]
    model = make_model(nodes, [tensor("x", [5, "N", inp])], [tensor("y", [5, 1, "N", hidden])],
                       {"W": rand(1, 4 * hidden, inp, scale=0.3), "R": rand(1, 4 * hidden, hidden, seed=1, scale=0.3),
                        "B": rand(1, 8 * hidden, seed=2, scale=0.1)}, opset=13)
    x = rand(5, 3, inp, seed=4)
    result = PassManager([Quantize()], calib=Dataset({"x": x}), latency=NO_LATENCY).run(model)
    assert [n.op_type for n in result.model.graph.node] == ["DynamicQuantizeLSTM"]
    assert "1 LSTM layers quantized dynamically" in str(result.report.steps[-1].notes)
    got = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == ref.shape and np.max(np.abs(got - ref)) < 0.02


def test_mixed_precision_keeps_the_one_sensitive_layer_in_float_within_the_budget():
    """The second layer reads an activation with one huge channel: 8 bits for its range erase the
    other channels, which carry the signal. Only that layer needs float to meet a 1-point budget."""
    from onnxcompress import Dataset
    w1 = rand(16, 8, scale=0.3)
    w1[0] = 0.0
    b1 = np.zeros(16, np.float32)
    b1[0] = 2000.0                                        # channel 0 of h: a constant 2000 (after Relu)
    w2 = rand(10, 16, seed=1)
    w2[:, 0] = 0.0
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["m"], transB=1), helper.make_node("Relu", ["m"], ["m2"]),
             helper.make_node("Gemm", ["m2", "w3"], ["y"], transB=1)]
    nodes[2].name = "sensitive"
    model = make_model(nodes, [tensor("x", ["N", 8])], [tensor("y", ["N", 10])],
                       {"w1": w1, "b1": b1, "w2": w2, "w3": rand(10, 10, seed=2)}, opset=13)
    data = Dataset({"x": rand(256, 8, seed=3)})
    plain = PassManager([Quantize(equalize=False)], calib=data, eval_data=data, latency=NO_LATENCY).run(model).report.steps[-1]
    assert plain.fidelity["y"]["top1_agreement"] < 90                # all-int8 loses the small channels
    result = PassManager([Quantize(max_drop=1.0, equalize=False)], calib=data, eval_data=data, latency=NO_LATENCY).run(model)
    step = result.report.steps[-1]
    assert step.fidelity["y"]["top1_agreement"] >= 99.0
    assert step.stats["layers_float"] == 1 and step.stats["layers_quantized"] == 2
    assert "1 layers and 0 activations kept in float (budget 1 points): layers Gemm 'sensitive'" in str(step.notes)
    kinds = [(n.name, W.layer_weight(n).kind) for n in G.to_graph(result.model).nodes if n.op == "Gemm"]
    assert [k for _, k in kinds] == ["qdq", "dense", "qdq"] and kinds[1][0] == "sensitive"


def test_a_conv_with_3_input_channels_is_padded_to_4_and_computes_the_same(monkeypatch):
    """The padded conv (a zero weight channel, the uint8 input padded with its zero point) against the
    same quantization without padding: outputs within one output step, the weight has 4 channels."""
    from onnxcompress import Dataset, qdq
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    model = make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 4, 8, 8])],
                       {"w1": rand(8, 3, 3, 3), "b1": rand(8, seed=2), "w2": rand(4, 8, 1, 1, seed=1)}, opset=13)
    x = rand(16, 3, 8, 8, seed=5)
    compress = lambda: PassManager([Quantize()], calib=Dataset({"x": x}), latency=NO_LATENCY).run(model)
    result = compress()
    assert "input channels padded to a multiple of 4 with zero weights (onnxruntime's fast int8 conv kernel): h" \
        in result.report.steps[-1].notes
    graph = G.to_graph(result.model)
    conv = next(n for n in graph.nodes if n.op == "Conv" and n.outputs[0].name == "h")
    w = W.layer_weight(conv).storage
    assert w.q.shape == (8, 4, 3, 3) and np.all(w.q[:, 3] == 0) and np.abs(w.q[:, :3]).max() == 127
    dq = G.producer(conv.inputs[0])
    pad = G.producer(dq.inputs[0])
    assert pad.op == "Pad" and G.producer(pad.inputs[0]).op == "QuantizeLinear"
    assert list(G.constant_value(pad.inputs[1])) == [0, 0, 0, 0, 0, 1, 0, 0]
    assert G.constant_value(pad.inputs[2]) == G.constant_value(dq.inputs[2])            # the zero point
    monkeypatch.setattr(qdq, "CHANNEL_MULTIPLE", 1)
    unpadded = compress()
    assert "Pad" not in [n.op_type for n in unpadded.model.graph.node]
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y_scale = np.abs(run(model)).max() / 127
    np.testing.assert_allclose(run(result.model), run(unpadded.model), atol=y_scale)


def test_maxpool_and_flatten_before_a_quantized_gemm_run_on_the_convs_codes(tmp_path):
    """conv -> relu -> maxpool -> flatten -> gemm: the pool and Flatten take the conv output's scale,
    so onnxruntime drops their Q/DQ pairs and nothing is dequantized between the two layers."""
    from onnxcompress import Dataset
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "w2"], ["y"], transB=1)]
    model = make_model(nodes, [tensor("x", ["N", 4, 8, 8])], [tensor("y", ["N", 5])],
                       {"w1": rand(8, 4, 3, 3), "w2": rand(5, 72, seed=1)}, opset=13)
    result = PassManager([Quantize()], calib=Dataset({"x": rand(32, 4, 8, 8, seed=3)}), latency=NO_LATENCY).run(model)
    q = {n.inputs[0].name: (float(G.constant_value(n.inputs[1])), int(G.constant_value(n.inputs[2])))
         for n in G.to_graph(result.model).nodes if n.op == "QuantizeLinear"}
    assert set(q) == {"x", "r", "p", "f"} and q["r"] == q["p"] == q["f"]
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(result.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "DequantizeLinear" not in ops and "QGemm" in ops and "QLinearConv" in ops, ops


def _imbalanced(between: str = "Relu"):
    """conv -> `between` -> depthwise conv -> conv, the first conv's output channels 100x apart in range."""
    w1 = rand(8, 4, 3, 3) * np.array([100.0, 1, 1, 1, 0.01, 1, 1, 1], np.float32).reshape(8, 1, 1, 1)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node(between, ["h", "lo", "hi"] if between == "Clip" else ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["d"], group=8, pads=[1, 1, 1, 1]), helper.make_node("Relu", ["d"], ["e"]),
             helper.make_node("Conv", ["e", "w3"], ["y"])]
    return make_model(nodes, [tensor("x", ["N", 4, 6, 6])], [tensor("y", ["N", 3, 6, 6])],
                      {"w1": w1, "b1": rand(8, seed=4), "w2": rand(8, 1, 3, 3, seed=1), "w3": rand(3, 8, 1, 1, seed=2),
                       "lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}, opset=13)


def test_cross_layer_equalization_keeps_the_function_and_equalizes_channel_ranges():
    from onnxcompress.equalize import equalize
    model = _imbalanced()
    graph = G.to_graph(model)
    assert equalize(graph) == [("h", "d"), ("d", "y")]
    convs = [n for n in graph.nodes if n.op == "Conv"]
    ranges = [np.abs(W.layer_weight(n).value).reshape(8 if i < 2 else 3, -1).max(1) for i, n in enumerate(convs)]
    into = [np.abs(W.layer_weight(convs[1]).value).reshape(8, -1).max(1), np.abs(W.layer_weight(convs[2]).value).max((0, 2, 3))]
    # after the sweeps each channel's range is (nearly) the same on both sides of every pair
    np.testing.assert_allclose(ranges[0], into[0], rtol=0.05)
    np.testing.assert_allclose(ranges[1], into[1], rtol=0.05)
    x = rand(4, 4, 6, 6, seed=9)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    before, after = run(model), run(G.to_model(G.tidy(graph), like=model))
    np.testing.assert_allclose(after, before, atol=1e-4 * np.abs(before).max())
    assert equalize(G.to_graph(_imbalanced("Clip"))) == [("d", "y")]       # Clip (ReLU6) is not homogeneous


def test_equalization_helps_per_tensor_weights_on_imbalanced_channels():
    from onnxcompress import Dataset
    model, x = _imbalanced(), rand(64, 4, 6, 6, seed=3)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    def error(equalize: bool) -> float:
        result = PassManager([Quantize(per_channel=False, equalize=equalize, rounding="nearest")], calib=Dataset({"x": x}),
                             latency=NO_LATENCY).run(model)
        if equalize:
            assert "cross-layer equalization: 2 layer pairs rescaled" in result.report.steps[-1].notes[0]
        y = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    assert error(True) < 0.5 * error(False)


def test_quantize_folds_batchnorm_first_as_fold_bn_would(conv_bn_model):
    """A Conv -> BatchNormalization pair: quantize alone folds it (an integer kernel cannot apply the
    BN after requantizing), and gives the same model as fold-bn followed by quantize."""
    from onnxcompress import Dataset
    from onnxcompress.passes import FoldBatchNorm
    x = Dataset({"x": rand(32, *[d.dim_value for d in conv_bn_model.graph.input[0].type.tensor_type.shape.dim[1:]], seed=4)})
    alone = PassManager([Quantize()], calib=x, latency=NO_LATENCY).run(conv_bn_model)
    assert "BatchNormalization" not in [n.op_type for n in alone.model.graph.node]
    assert any("BatchNormalization folded into the layers before them" in n for n in alone.report.steps[-1].notes)
    both = PassManager([FoldBatchNorm(), Quantize()], calib=x, latency=NO_LATENCY).run(conv_bn_model)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.feeds["x"]})[0]
    np.testing.assert_array_equal(run(alone.model), run(both.model))
    searched = PassManager([Quantize(max_drop=5.0)], calib=x, eval_data=x, latency=NO_LATENCY).run(conv_bn_model)
    assert searched.report.steps[-1].status == "applied"        # the search builds models from the folded graph
    unfolded = PassManager([Quantize(fold_bn=False)], calib=x, latency=NO_LATENCY).run(conv_bn_model)
    assert "BatchNormalization" in [n.op_type for n in unfolded.model.graph.node]


def test_faster_in_float_keeps_a_kind_in_float_only_when_the_timing_says_so():
    """The greedy choice by kind, with the timing replaced by a table: depthwise in float takes 0.6x
    the time (kept), the stem 0.99x (within noise: stays int8); the kept set carries over."""
    from onnxcompress import LatencyConfig
    from onnxcompress.precision import faster_in_float
    kinds = {"depthwise convs": {"d1", "d2"}, "layers reading a graph input": {"s"}}
    build = lambda kept: frozenset(kept)                       # a stand-in for the model
    speed = {frozenset({"m"}): 1.0, frozenset({"m", "d1", "d2"}): 0.6, frozenset({"m", "d1", "d2", "s"}): 0.594,
             frozenset({"m", "s"}): 1.0}
    kept, lines = faster_in_float(kinds, build, {"m"}, LatencyConfig(), None, (),
                                  ratio=lambda cand, cur: speed[cand] / speed[cur])
    assert kept == {"m", "d1", "d2"}
    assert lines == ["depthwise convs (2) in float: 0.60x the time (kept in float)",
                     "layers reading a graph input (1) in float: 0.99x the time"]
    accuracy = {frozenset({"m"}): 90.0, frozenset({"m", "d1", "d2"}): 87.5}    # faster, but less accurate: refused
    kept, lines = faster_in_float(kinds, build, {"m"}, LatencyConfig(), None, (),
                                  ratio=lambda cand, cur: speed[cand] / speed[cur], score=accuracy.get)
    assert kept == {"m"} and lines[0] == "depthwise convs (2) in float: 0.60x the time, but less accurate (87.5 against 90.0)"


def test_quantize_keeps_depthwise_convs_float_when_they_run_faster_so(monkeypatch):
    """With the run measuring latency, quantize times the model with each kind of layer in float;
    here the timing (replaced) says the depthwise conv is faster in float: it stays a float Conv,
    the pointwise convs are int8 kernels, and the report says why."""
    from onnxcompress import Dataset, LatencyConfig, precision
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("Conv", ["ra", "wd"], ["d"], group=8, pads=[1, 1, 1, 1]), helper.make_node("Relu", ["d"], ["rd"]),
             helper.make_node("Conv", ["rd", "w2"], ["y"])]
    model = make_model(nodes, [tensor("x", ["N", 4, 8, 8])], [tensor("y", ["N", 4, 8, 8])],
                       {"w1": rand(8, 4, 1, 1), "wd": rand(8, 1, 3, 3, seed=1), "w2": rand(4, 8, 1, 1, seed=2)}, opset=13)

    def timing(model, reference, *args, **kwargs):           # depthwise int8 in the reference, float in the model
        dw = lambda m: next(n for n in m.graph.node if n.op_type == "Conv" and n.output[0] == "d")
        is_float = lambda m: dw(m).input[1] in {t.name for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
        return 0.5 if is_float(model) and not is_float(reference) else 1.0
    monkeypatch.setattr(precision, "paired_latency_ratio", timing)
    result = PassManager([Quantize()], calib=Dataset({"x": rand(32, 4, 8, 8, seed=3)}),
                         latency=LatencyConfig(runs=2, warmup=1)).run(model)
    step = result.report.steps[-1]
    assert step.stats["layers_float_for_speed"] == 1 and step.stats["layers_quantized"] == 2
    assert any("depthwise convs (1) in float: 0.50x the time (kept in float)" in n for n in step.notes)
    graph = G.to_graph(result.model)
    kinds = {n.outputs[0].name: W.layer_weight(n).kind for n in graph.nodes if n.op == "Conv"}
    assert kinds == {"a": "qdq", "d": "dense", "y": "qdq"}
    none = PassManager([Quantize()], calib=Dataset({"x": rand(32, 4, 8, 8, seed=3)}), latency=NO_LATENCY).run(model)
    assert "layers_float_for_speed" not in none.report.steps[-1].stats


def test_sequential_refit_compensates_a_change_upstream_against_the_reference():
    """x -> Gemm -> Gemm: the first layer's weights perturbed; walking the layers with the float
    graph as reference refits the second one from its (changed) inputs onto the reference's
    outputs, and the model's error drops by more than 10x on samples the fit never saw."""
    from onnxcompress import Context, Dataset
    from onnxcompress.recovery import sequential
    w1, w2 = rand(16, 8, seed=1), rand(4, 16, seed=2)
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1), helper.make_node("Gemm", ["h", "w2"], ["y"], transB=1)]
    model = make_model(nodes, [tensor("x", ["N", 8])], [tensor("y", ["N", 4])], {"w1": w1, "w2": w2}, opset=13)
    reference = G.to_graph(model)
    graph = G.to_graph(model)
    first = next(n for n in graph.nodes if n.outputs[0].name == "h")
    W.write(graph, first, 1, W.layer_weight(first), w1 + rand(16, 8, seed=3, scale=0.2))
    before = G.to_model(graph.copy(), like=model)
    ctx = Context(original=model)
    second = next(n for n in graph.nodes if n.outputs[0].name == "y")
    refit = sequential(graph, ctx, Dataset({"x": rand(256, 8, seed=4)}), {id(second): lambda node, grams: None},
                       reference=reference)
    assert refit == 1
    x = {"x": rand(64, 8, seed=5)}
    err = lambda m: np.abs(run(m, x)[0] - run(model, x)[0]).mean()
    assert err(G.to_model(graph, like=model)) < err(before) / 10


def test_a_weight_row_of_denormals_quantizes_to_zero_without_nan():
    """PP-OCR has conv rows whose largest weight is ~1e-44: range / 127 underflows float32 to 0 and
    rounding divided by it. Such a row now counts as zero."""
    from onnxcompress import Dataset
    w = rand(4, 8, seed=1)
    w[2] = np.float32(4e-44)
    model = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], [tensor("x", ["N", 8])],
                       [tensor("y", ["N", 4])], {"w": w}, opset=13)
    with np.errstate(divide="raise", invalid="raise"):
        result = PassManager([Quantize()], calib=Dataset({"x": rand(64, 8, seed=2)}), latency=NO_LATENCY).run(model)
    step = result.report.steps[-1]
    assert step.status == "applied" and np.isfinite(step.stats["weight_rel_error"])
    q = W.layer_weight(next(n for n in G.to_graph(result.model).nodes if n.op == "Gemm")).storage.q
    assert np.all(q[2] == 0) and np.abs(q[[0, 1, 3]]).max() == 127
