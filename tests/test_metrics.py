import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import make_model, rand, run, scripted_sessions, tensor
from onnxcompress.errors import InputError
from onnxcompress.metrics import (accuracy, count_params, fidelity, macs_breakdown, node_macs, sparsity, static_shapes,
                                  total_macs)


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


# --- control flow: MACs inside If, Loop and Scan bodies ---------------------------------------------

X = [1, 3, 8, 8]  # every control-flow test model reads x of this shape
THEN_MACS = 4 * 8 * 8 * 27  # then_branch: 3x3 Conv, 4 filters, weight held by the body
ELSE_MACS = 4 * 8 * 8 * 3 + 4 * 8 * 8 * 8  # else_branch: 1x1 Conv on the outer weight, then MatMul by an 8x8


def body(name, nodes, out, inits=None, inputs=()):
    """A subgraph with `out` as its only output; weights given as {name: array} become its initializers."""
    from onnx import numpy_helper

    return helper.make_graph(nodes, name, list(inputs), [tensor(out, None)],
                             [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])


def const(name, value):
    from onnx import numpy_helper

    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name + "_value"))


def then_branch(out="t_out"):
    return body("then", [helper.make_node("Conv", ["x", "w_then"], [out], pads=[1, 1, 1, 1])], out,
                {"w_then": rand(4, 3, 3, 3, seed=1)})


def else_branch(out="e_out"):
    nodes = [helper.make_node("Conv", ["x", "w_outer"], [out + "_c"]), const(out + "_w", rand(8, 8, seed=2)),
             helper.make_node("MatMul", [out + "_c", out + "_w"], [out])]
    return body("else", nodes, out)


@pytest.fixture
def if_model():
    """y = Relu(If(c, then: Conv3x3(x, body weight), else: MatMul(Conv1x1(x, outer weight), Constant)))."""
    nodes = [helper.make_node("If", ["c"], ["branch_out"], name="gate", then_branch=then_branch(), else_branch=else_branch()),
             helper.make_node("Relu", ["branch_out"], ["y"])]
    inputs = [tensor("x", X), tensor("c", [], TensorProto.BOOL)]
    return make_model(nodes, inputs, [tensor("y", [1, 4, 8, 8])], {"w_outer": rand(4, 3, 1, 1, seed=3)})


def test_if_counts_each_branch(if_model):
    gate, relu = macs_breakdown(if_model)
    assert (gate.name, gate.op, gate.output) == ("gate", "If", "branch_out")
    assert gate.branches == {"then_branch": THEN_MACS, "else_branch": ELSE_MACS}
    assert [(d.op, d.macs) for d in gate.bodies["else_branch"]] == [("Conv", 768), ("Constant", 0), ("MatMul", 2048)]
    assert gate.macs == THEN_MACS and relu.macs == 0


def test_if_total_is_worst_case_or_expected(if_model):
    assert total_macs(if_model) == max(THEN_MACS, ELSE_MACS) == 6912
    assert total_macs(if_model, branch_probs={"branch_out": 0.25}) == 0.25 * THEN_MACS + 0.75 * ELSE_MACS == 3840
    assert total_macs(if_model, branch_probs={"branch_out": 0.0}) == ELSE_MACS
    assert [tuple(t) for t in node_macs(if_model)] == [("gate", "If", THEN_MACS), ("y", "Relu", 0)]


def test_branch_probs_are_checked(if_model):
    with pytest.raises(InputError, match="no If node output: gate"):
        total_macs(if_model, branch_probs={"gate": 0.5})  # keyed by the first output, not the node name
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        total_macs(if_model, branch_probs={"branch_out": 1.5})


def test_if_model_runs_in_onnxruntime(if_model):
    x = rand(*X, seed=4)
    then_y, = run(if_model, {"x": x, "c": np.array(True)})
    else_y, = run(if_model, {"x": x, "c": np.array(False)})
    assert then_y.shape == else_y.shape == (1, 4, 8, 8) and not np.allclose(then_y, else_y)


@pytest.fixture
def nested_if_model():
    """If(c, then: If(d, then: Conv3x3, else: Conv1x1+MatMul), else: MatMul(x, outer 8x8 weight))."""
    inner = helper.make_node("If", ["d"], ["inner_out"], then_branch=then_branch("it"), else_branch=else_branch("ie"))
    outer_then = body("outer_then", [inner], "inner_out")
    outer_else = body("outer_else", [helper.make_node("MatMul", ["x", "w_mm"], ["oe"])], "oe")
    outer = helper.make_node("If", ["c"], ["y"], then_branch=outer_then, else_branch=outer_else)
    inputs = [tensor("x", X), tensor("c", [], TensorProto.BOOL), tensor("d", [], TensorProto.BOOL)]
    inits = {"w_outer": rand(4, 3, 1, 1, seed=3), "w_mm": rand(8, 8, seed=5)}
    return make_model([outer], inputs, [tensor("y", [1, "C", 8, 8])], inits)


def test_nested_if(nested_if_model):
    outer, = macs_breakdown(nested_if_model)
    inner, = outer.bodies["then_branch"]
    assert inner.op == "If" and inner.branches == {"then_branch": THEN_MACS, "else_branch": ELSE_MACS}
    mm = 3 * 8 * 8 * 8
    assert outer.branches == {"then_branch": THEN_MACS, "else_branch": mm}
    assert total_macs(nested_if_model) == THEN_MACS
    probs = {"y": 0.5, "inner_out": 0.25}
    assert total_macs(nested_if_model, branch_probs=probs) == 0.5 * 3840 + 0.5 * mm
    assert macs_breakdown(nested_if_model, branch_probs=probs)[0].branches["then_branch"] == 3840
    for c, d in [(True, True), (True, False), (False, True)]:
        run(nested_if_model, {"x": rand(*X), "c": np.array(c), "d": np.array(d)})


def loop_model(trips, concat_state=False):
    """h = x[2, 8]; repeat `trips` times: h = MatMul(h, w[8, 8]) (or MatMul(Concat(h, h)) whose shape grows)."""
    nodes = [helper.make_node("Identity", ["cond"], ["cond_out"])]
    if concat_state:
        nodes += [helper.make_node("Concat", ["h", "h"], ["hh"], axis=0), helper.make_node("MatMul", ["hh", "w"], ["h2"])]
    else:
        nodes += [helper.make_node("MatMul", ["h", "w"], ["h2"])]
    loop_body = helper.make_graph(nodes, "body", [tensor("i", [], TensorProto.INT64), tensor("cond", [], TensorProto.BOOL),
                                                  tensor("h", None)], [tensor("cond_out", [], TensorProto.BOOL), tensor("h2", None)])
    top = [helper.make_node("Loop", ["M", "", "x"], ["y"], body=loop_body)]
    inputs = [tensor("x", [2, 8])]
    if trips is None:
        inputs.append(tensor("M", [], TensorProto.INT64))
    else:
        top.insert(0, const("M", np.array(trips, np.int64)))
    return make_model(top, inputs, [tensor("y", ["R", 8])], {"w": rand(8, 8)})


def test_loop_with_constant_trip_count():
    model = loop_model(5)
    _, loop = macs_breakdown(model)
    assert (loop.op, loop.trips, loop.branches, loop.macs) == ("Loop", 5, {"body": 2 * 8 * 8}, 5 * 2 * 8 * 8)
    assert total_macs(model) == 640
    assert static_shapes(model)["h2"] == [2, 8]  # the loop-carried state keeps its shape: seeded
    y, = run(model, {"x": rand(2, 8)})
    assert y.shape == (2, 8)


def test_loop_with_unknown_trip_count_counts_one_iteration():
    loop, = macs_breakdown(loop_model(None))
    assert loop.trips is None and loop.macs == 2 * 8 * 8


def test_loop_state_that_changes_shape_is_not_guessed():
    model = loop_model(3, concat_state=True)
    shapes = static_shapes(model)
    assert "h" not in shapes or -1 in shapes["h"]
    assert total_macs(model) == 0  # the MatMul's input shape is unknown, so its MACs are too
    y, = run(model, {"x": rand(2, 8)})
    assert y.shape == (16, 8)


def test_scan_multiplies_by_scan_length():
    scan_body = helper.make_graph([helper.make_node("MatMul", ["xt", "w"], ["yt"]), helper.make_node("Add", ["s", "yt"], ["s2"])],
                                  "body", [tensor("s", None), tensor("xt", None)], [tensor("s2", None)])
    node = helper.make_node("Scan", ["s0", "x"], ["s_final"], body=scan_body, num_scan_inputs=1, scan_input_axes=[1])
    model = make_model([node], [tensor("s0", [2, 8]), tensor("x", [2, 5, 8])], [tensor("s_final", [2, 8])], {"w": rand(8, 8)})
    scan, = macs_breakdown(model)
    assert (scan.trips, scan.branches, scan.macs) == (5, {"body": 2 * 8 * 8}, 5 * 2 * 8 * 8)
    run(model, {"s0": rand(2, 8), "x": rand(2, 5, 8)})


# --- models over 2 GiB: the same numbers through a shape-only copy -----------------------------------

def test_large_model_path_gives_the_same_shapes_and_macs(monkeypatch, if_model, nested_if_model):
    from onnxcompress import io, metrics

    models = [if_model, nested_if_model, loop_model(5), reshape_model()]
    expected = [(static_shapes(m), [tuple(t) for t in node_macs(m)], total_macs(m)) for m in models]
    seen = []
    infer = onnx.shape_inference.infer_shapes
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 100)
    monkeypatch.setattr(metrics, "_STUB_BYTES", 0)  # leave out the data of every float tensor, however small
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", lambda m, *a, **k: seen.append(m) or infer(m, *a, **k))
    assert [(static_shapes(m), [tuple(t) for t in node_macs(m)], total_macs(m)) for m in models] == expected
    stubs = [t for m in seen for t in _all_tensors(m) if t.data_location == TensorProto.EXTERNAL]
    assert {t.name for t in stubs} >= {"w_then", "w_outer", "ie_w_value", "w", "w_mm"}  # inside bodies too
    assert not any(t.raw_data or t.float_data for t in stubs)
    assert not any(t.name in ("shape", "M_value") for t in stubs)  # inference reads these values


def reshape_model():
    """Reshape whose target shape inference must read (kept), then MatMul by a weight it need not (left out)."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])]
    return make_model(nodes, [tensor("x", [4, 16])], [tensor("y", [8, 32])],
                      {"shape": np.array([8, 8], np.int64), "w": rand(8, 32)})


def _all_tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return list(_get_all_tensors(model))


def test_gzip_size_of_a_model_over_the_protobuf_limit_streams_its_initializers(monkeypatch):
    """Above the threshold the model is compressed initializer by initializer (no 2 GiB message)."""
    import onnxcompress.io as oio
    from onnxcompress.metrics import gzip_bytes

    w = np.zeros((64, 64), np.float32)
    w[::7] = 1.0
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", [1, 64])], [tensor("y", [1, 64])],
                       {"w": w})
    whole = gzip_bytes(model)
    monkeypatch.setattr(oio, "EXTERNAL_DATA_THRESHOLD", 100)
    streamed = gzip_bytes(model)
    assert abs(streamed - whole) < 0.2 * whole and streamed < 0.5 * model.ByteSize()


def test_ctc_greedy_decoding_and_sequence_agreement():
    from onnxcompress.metrics import budget_metric, ctc_greedy

    eye = np.eye(4)
    steps = lambda labels: eye[labels]                      # one-hot [time, classes], class 0 is the blank
    assert ctc_greedy(steps([1, 1, 0, 1, 2, 2, 0, 0, 3])) == (1, 1, 2, 3)      # repeats merge, a blank splits
    assert ctc_greedy(steps([0, 0, 0])) == ()
    ref = np.stack([steps([1, 1, 0, 2]), steps([3, 0, 3, 3])])
    out = np.stack([steps([1, 0, 1, 2]), steps([3, 3, 0, 3])])  # sample 1 decodes to (1, 1, 2) != (1, 2)
    fid = fidelity({"seq": ref}, {"seq": out})["seq"]
    assert fid["position_agreement"] == 50.0 and fid["sequence_agreement"] == 50.0
    assert budget_metric(None, {"seq": fid}) == ("sequence_agreement", 50.0)


def test_dense_maps_agree_by_iou_of_thresholded_maps():
    from onnxcompress.metrics import budget_metric

    ref = np.zeros((1, 1, 4, 4), np.float32)
    ref[0, 0, :2, :2] = 0.9                                 # 4 pixels of text
    out = ref.copy()
    out[0, 0, 0, 2] = 0.5                                   # one more above 0.3
    out[0, 0, 0, 0] = 0.2                                   # one lost
    fid = fidelity({"map": ref}, {"map": out})["map"]
    assert fid["map_iou"] == pytest.approx(3 / 5 * 100)
    assert budget_metric(None, {"map": fid})[0] == "map_iou"


def test_a_latency_target_times_page_sized_inputs_in_small_batches_within_a_budget(monkeypatch):
    """A latency target times every candidate: a batch of 32 pages of 3x480x640 took 8 s a run, so
    the larger batch shrinks to fit LATENCY_BATCH_VALUES and each batch size stops after its budget
    (at least MIN_RUNS timed runs)."""
    import onnxruntime as ort
    from onnxcompress import Dataset, LatencyConfig
    from onnxcompress.metrics import MIN_RUNS, latency_ms
    from onnxcompress.sensitivity import timing_config
    assert timing_config(Dataset({"x": np.zeros((2, 1, 28, 28), np.float32)})).batch_sizes == (1, 32)
    assert timing_config(Dataset({"x": np.zeros((2, 3, 480, 640), np.float32)})).batch_sizes == (1, 4)
    assert timing_config(Dataset({"x": np.zeros((2, 3, 2048, 2048), np.float32)})).batch_sizes == (1,)
    calls = []
    real = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    model = single(helper.make_node("Relu", ["x"], ["y"]), ["N", 4], ["N", 4], {})
    assert set(latency_ms(model, LatencyConfig(batch_sizes=(1, 2), runs=50, warmup=5, budget_s=0.0))) == {1, 2}
    assert len(calls) == 2 * (1 + MIN_RUNS)          # per batch: one warmup run, then the minimum
    calls.clear()
    latency_ms(model, LatencyConfig(batch_sizes=(1,), runs=7, warmup=2))
    assert len(calls) == 2 + 7


def test_several_models_are_timed_in_turn_the_order_rotating(monkeypatch):
    """`interleaved_latency_ms` (the benchmark's latency): one run of each model per turn, each turn
    starting one model later, so each runs first (and after each other) equally often; the medians
    per batch size, with a scripted clock (the three models take 3, 1 and 2 units a run)."""
    from onnxcompress import Dataset, LatencyConfig
    from onnxcompress import metrics as M
    order = scripted_sessions(monkeypatch, {"a": 3.0, "b": 1.0, "c": 2.0})
    out = M.interleaved_latency_ms([None] * 3, LatencyConfig(batch_sizes=(1, 4), runs=3, warmup=1),
                                   Dataset({"x": np.zeros((4, 1))}), rounds=2)
    assert out == [{1: 3000.0, 4: 3000.0}, {1: 1000.0, 4: 1000.0}, {1: 2000.0, 4: 2000.0}]
    turns = ["a", "b", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b"] * 2
    assert order == turns * 2           # per batch size: one warm-up turn, then rounds x runs turns
