"""factor-lowrank: exact where the weights have the rank, geometry carried over, refusals explained."""
import numpy as np
import onnx
from onnx import helper

from conftest import make_model, max_abs_diff, rand, run, tensor
from onnxcompress import Dataset, LatencyConfig, PassManager
from onnxcompress import graph as G, weights as W
from onnxcompress.metrics import total_macs
from onnxcompress.passes import FactorLowRank
from onnxcompress.runtime import channel_multiple

NO_LATENCY = LatencyConfig(enabled=False)


def _run(model, p, x):
    return PassManager([p], calib=Dataset({"x": x}), latency=NO_LATENCY).run(model)


def test_a_rank_k_gemm_is_recovered_exactly_at_rank_k():
    w = rand(24, 3) @ rand(3, 40, seed=1)                     # rank 3, [out, in] with transB
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="fc")]
    model = make_model(nodes, [tensor("x", ["N", 40])], [tensor("y", ["N", 24])], {"w": w, "b": rand(24, seed=2)}, opset=13)
    x = rand(64, 40, seed=3)
    result = _run(model, FactorLowRank(ranks={"fc": 3}, recover=False), x)
    gemms = [n for n in G.to_graph(result.model).nodes if n.op == "Gemm"]
    assert [W.layer_weight(n).value.shape for n in gemms] == [(3, 40), (24, 3)]
    assert max_abs_diff(model, result.model, {"x": x}) < 1e-4
    assert "factored: fc rank 3 (100.0% energy)" in result.report.steps[-1].notes


def test_a_low_rank_conv_keeps_strides_pads_and_dilations_exactly():
    rows = rand(16, 2) @ rand(2, 8 * 9, seed=1)               # [O, I*k*k] of rank 2
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[2, 1, 2, 1], dilations=[2, 1],
                              name="conv")]
    model = make_model(nodes, [tensor("x", ["N", 8, 11, 9])], [tensor("y", ["N", 16, 6, 5])],
                       {"w": rows.reshape(16, 8, 3, 3), "b": rand(16, seed=2)}, opset=13)
    x = rand(8, 8, 11, 9, seed=4)
    result = _run(model, FactorLowRank(ranks={"conv": 2}, conv_split="kxk-1x1", recover=False), x)
    first, second = [n for n in G.to_graph(result.model).nodes if n.op == "Conv"]
    assert W.layer_weight(first).value.shape == (2, 8, 3, 3) and W.layer_weight(second).value.shape == (16, 2, 1, 1)
    assert first.attrs == {"strides": [2, 2], "pads": [2, 1, 2, 1], "dilations": [2, 1]} and second.attrs == {}
    assert second.outputs[0].name == "y" and W.layer_bias(second) is not None
    assert max_abs_diff(model, result.model, {"x": x}) < 1e-4


def test_a_batched_matmul_factors_and_whitening_beats_the_plain_svd():
    """Inputs with a few strong directions: the data-aware factors lose less on them than the
    weights' own truncated SVD at the same rank."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = make_model(nodes, [tensor("x", ["N", 5, 32])], [tensor("y", ["N", 5, 32])], {"w": rand(32, 32)}, opset=13)
    x = (rand(64, 5, 32, seed=5) * np.geomspace(10, 0.01, 32).astype(np.float32))
    errs = {}
    for aware in (True, False):
        result = _run(model, FactorLowRank(ranks={"mm": 8}, data_aware=aware, recover=False), x)
        assert [W.layer_weight(n).value.shape for n in G.to_graph(result.model).nodes if n.op == "MatMul"] == [(32, 8), (8, 32)]
        errs[aware] = max_abs_diff(model, result.model, {"x": x})
    assert errs[True] < 0.3 * errs[False]


def test_ranks_at_or_above_break_even_are_refused_with_a_note():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc")]
    model = make_model(nodes, [tensor("x", ["N", 10])], [tensor("y", ["N", 10])], {"w": rand(10, 10)}, opset=13)
    result = _run(model, FactorLowRank(ranks={"fc": 5}), rand(32, 10))
    step = result.report.steps[-1]
    assert step.status != "applied" or step.stats["layers_factored"] == 0
    assert "Gemm 'fc': rank 5 is at or above break-even (5.0): factoring would not reduce MACs; left as is" in step.notes
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]


def test_resnet_at_half_the_macs_stays_valid_and_close(resnet, calib, test_set):
    """Residual blocks, BatchNorm folded first; the allocation reaches the MAC target."""
    from onnxcompress.pass_api import default_registry
    result = PassManager([default_registry().create("fold-bn", {}), FactorLowRank(macs=0.5)],
                         calib=calib.take(256), eval_data=test_set, latency=NO_LATENCY).run(resnet)
    steps = result.report.steps
    onnx.checker.check_model(result.model)
    shapes = {"input": [1, 1, 28, 28]}
    assert total_macs(result.model, shapes) <= 0.5 * total_macs(resnet, shapes)
    assert steps[-1].accuracy >= steps[0].accuracy - 1.5


def test_an_exactly_separable_conv_is_recovered_by_factor_depthwise():
    """A conv built as depthwise (multiplier 2) x pointwise, with strides and dilations: factored
    back at multiplier 2 it computes the same to 1e-5."""
    from onnxcompress.passes import FactorDepthwise
    i, m, o = 6, 2, 12
    dw, pw = rand(i * m, 3, 3, seed=1), rand(o, i * m, seed=2)
    w = np.einsum("ocm,cmhw->ochw", pw.reshape(o, i, m), dw.reshape(i, m, 3, 3))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[2, 1], pads=[1, 2, 1, 2], dilations=[1, 2],
                              name="conv")]
    model = make_model(nodes, [tensor("x", ["N", i, 9, 9])], [tensor("y", ["N", o, 5, 9])],
                       {"w": w.astype(np.float32), "b": rand(o, seed=3)}, opset=13)
    x = rand(16, i, 9, 9, seed=4)
    result = _run(model, FactorDepthwise(multipliers={"conv": 2}, recover=False), x)
    first, second = [n for n in G.to_graph(result.model).nodes if n.op == "Conv"]
    assert W.layer_weight(first).value.shape == (12, 1, 3, 3) and first.attrs["group"] == 6
    assert first.attrs["strides"] == [2, 1] and first.attrs["dilations"] == [1, 2]
    assert W.layer_weight(second).value.shape == (12, 12, 1, 1)
    y = np.abs(run(model, {"x": x})[0]).max()
    assert max_abs_diff(model, result.model, {"x": x}) <= 1e-5 * max(y, 1.0)
    assert "factored: conv multiplier 2 (100.0% energy)" in result.report.steps[-1].notes


def test_factor_depthwise_refuses_multipliers_above_break_even_and_1x1_convs():
    from onnxcompress.passes import FactorDepthwise
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1], name="c3"),
             helper.make_node("Conv", ["h", "w1"], ["y"], name="c1")]
    model = make_model(nodes, [tensor("x", ["N", 4, 6, 6])], [tensor("y", ["N", 4, 6, 6])],
                       {"w": rand(4, 4, 3, 3), "w1": rand(4, 4, 1, 1, seed=1)}, opset=13)
    result = _run(model, FactorDepthwise(multipliers={"c3": 3}), rand(8, 4, 6, 6))
    notes = result.report.steps[-1].notes
    assert "Conv 'c3': multiplier 3 is at or above break-even (2.8): factoring would not reduce MACs; left as is" in notes
    assert "Conv 'c1': a 1x1 conv (nothing to split); left as is" in notes


def test_constant_node_weights_at_opset_11_and_quantize_after_factoring():
    """A conv whose weight is a Constant node (as PP-OCR's opset-11 exports), factored, then both
    factors quantized to int8 by the next pass."""
    from onnxcompress.passes import Quantize
    rows = rand(8, 3) @ rand(3, 4 * 9, seed=1)
    nodes = [helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(rows.reshape(8, 4, 3, 3), "w")),
             helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["h"], ["y"])]
    model = make_model(nodes, [tensor("x", ["N", 4, 6, 6])], [tensor("y", ["N", 8, 6, 6])], {}, opset=11)
    x = rand(32, 4, 6, 6, seed=2)
    result = PassManager([FactorLowRank(ranks={"conv": 3}, conv_split="kxk-1x1", recover=False), Quantize()], calib=Dataset({"x": x}),
                         latency=NO_LATENCY).run(model)
    assert [s.status for s in result.report.steps[1:]] == ["applied", "applied"]
    convs = [n for n in G.to_graph(result.model).nodes if n.op == "Conv"]
    assert [W.layer_weight(n).kind for n in convs] == ["qdq", "qdq"]
    # rank 3 between the factors: quantize pads the 1x1 conv's input to 4 channels for the int8 kernel
    assert [W.layer_weight(n).value.shape for n in convs] == [(3, 4, 3, 3), (8, 4, 1, 1)]
    y = run(model, {"x": x})[0]
    assert np.abs(run(result.model, {"x": x})[0] - y).max() < 0.05 * np.abs(y).max()


def test_factoring_a_clustered_layer_says_its_factors_are_float():
    from onnxcompress.passes import ClusterWeights
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc")]
    model = make_model(nodes, [tensor("x", ["N", 64])], [tensor("y", ["N", 64])], {"w": rand(64, 64)}, opset=13)
    result = PassManager([ClusterWeights(bits=4), FactorLowRank(ranks={"fc": 8}, recover=False)],
                         calib=Dataset({"x": rand(128, 64, seed=1)}), latency=NO_LATENCY).run(model)
    notes = result.report.steps[-1].notes
    assert "1 factored layers had codebook weights; their factors are float (quantize or cluster after factoring)" in notes
    assert [W.layer_weight(n).kind for n in G.to_graph(result.model).nodes if n.op == "Gemm"] == ["dense", "dense"]


def test_chosen_ranks_are_multiples_of_round_to_below_break_even():
    """A 50x50 Gemm at half its MACs: rank 12 exactly (break-even 25), 16 in multiples of 8."""
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc")]
    model = make_model(nodes, [tensor("x", ["N", 50])], [tensor("y", ["N", 50])], {"w": rand(50, 50)}, opset=13)
    x = rand(64, 50, seed=1)
    auto = {16: 16, 8: 16, 4: 12, 1: 12}[channel_multiple()[0]]    # "auto": this machine's kernels' multiple
    for round_to, rank in ((8, 16), (1, 12), ("auto", auto)):
        result = _run(model, FactorLowRank(macs=0.5, allocation="uniform", round_to=round_to, recover=False), x)
        first = next(n for n in G.to_graph(result.model).nodes if n.op == "Gemm")
        assert W.layer_weight(first).value.shape == (rank, 50)


def test_kx1_then_1xk_split_is_exact_for_a_separable_conv_with_its_geometry():
    """conv_split='kx1-1xk' (the default): a conv whose weights are a sum of 3 (vertical x
    horizontal) products is split into a 3x1 conv to 3 channels and a 1x3 conv, strides, pads and
    dilations shared out between them, and computes the same; a bad conv_split is refused."""
    import pytest
    vertical, horizontal = rand(3, 5, 3, seed=1), rand(10, 3, 3, seed=2)
    w = np.einsum("okx,kiy->oiyx", horizontal, vertical).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 2, 0, 1], dilations=[1, 2],
                              name="conv")]
    model = make_model(nodes, [tensor("x", ["N", 5, 11, 12])], [tensor("y", ["N", 10, 5, 6])],
                       {"w": w, "b": rand(10, seed=3)}, opset=13)
    x = rand(8, 5, 11, 12, seed=4)
    result = _run(model, FactorLowRank(ranks={"conv": 3}, conv_split="kx1-1xk", recover=False), x)
    first, second = [n for n in G.to_graph(result.model).nodes if n.op == "Conv"]
    assert W.layer_weight(first).value.shape == (3, 5, 3, 1) and W.layer_weight(second).value.shape == (10, 3, 1, 3)
    assert dict(first.attrs) == {"kernel_shape": [3, 1], "strides": [2, 1], "pads": [1, 0, 0, 0], "dilations": [1, 1]}
    assert dict(second.attrs) == {"kernel_shape": [1, 3], "strides": [1, 2], "pads": [0, 2, 0, 1], "dilations": [1, 2]}
    assert max_abs_diff(model, result.model, {"x": x}) < 1e-4
    assert "factored: conv rank 3 as 3x1 + 1x3 (100.0% energy)" in result.report.steps[-1].notes
    with pytest.raises(ValueError, match="conv_split must be"):
        FactorLowRank(conv_split="3x1")


def _conv_pair_model(seed=0):
    """conv 3x3 (8 -> 16), ReLU, a Gemm head; the conv's output is a second graph output."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc")]
    return make_model(nodes, [tensor("x", ["N", 8, 6, 6])], [tensor("y", ["N", 4]), tensor("c", ["N", 16, 6, 6])],
                      {"w": rand(16, 8, 3, 3, seed=seed), "b": rand(16, seed=seed + 1),
                       "wf": rand(4, 16, seed=seed + 2), "bf": rand(4, seed=seed + 3)}, opset=13)


def test_recovery_refits_both_factors_of_a_pair_together():
    """Recovery fits a low-rank pair as one rank-K map (reduced-rank regression) and a depthwise
    pair by alternating least squares: both factors change, and the pair's output error on the
    calibration data falls below that of the factors fit before recovery."""
    from onnxcompress.passes import FactorDepthwise
    model = _conv_pair_model()
    # correlated channels: the per-channel initial depthwise factors are then not the best pair
    mix = (rand(8, 8, seed=8) + 2 * np.eye(8)) * np.geomspace(4, 0.05, 8)[:, None]
    x = np.einsum("dc,nchw->ndhw", mix, rand(64, 8, 6, 6, seed=9)).astype(np.float32)
    lowrank = dict(ranks={"conv": 4}, data_aware=False, conv_split="kxk-1x1")   # from the weights alone, then fit on data
    for p_fit, p_plain in ((FactorLowRank(**lowrank), FactorLowRank(**lowrank, recover=False)),
                           (FactorDepthwise(multipliers={"conv": 1}), FactorDepthwise(multipliers={"conv": 1}, recover=False))):
        plain, fit = _run(model, p_plain, x), _run(model, p_fit, x)
        convs = [[W.layer_weight(n).value for n in G.to_graph(r.model).nodes if n.op == "Conv"] for r in (plain, fit)]
        assert all(not np.allclose(a, b) for a, b in zip(*convs))           # first and second factors both moved
        assert not any("first of a factored pair, fixed" in n for n in fit.report.steps[-1].notes)
        err = {k: float(np.mean((run(model, {"x": x})[1] - run(r.model, {"x": x})[1]) ** 2))
               for k, r in (("plain", plain), ("fit", fit))}
        assert err["fit"] < 0.9 * err["plain"], (p_fit.name, err)


def test_kx1_then_1xk_factors_are_whitened_by_the_input_columns():
    """Correlated, anisotropic input channels: at rank 4 the data-aware k x 1 / 1 x k factors lose
    far less on those inputs than the weights' own truncated SVD."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    model = make_model(nodes, [tensor("x", ["N", 5, 11, 12])], [tensor("y", ["N", 10, 11, 12])],
                       {"w": rand(10, 5, 3, 3, seed=2), "b": rand(10, seed=3)}, opset=13)
    mix = (rand(5, 5, seed=8) + 2 * np.eye(5)) * np.geomspace(4, 0.05, 5)[:, None]
    x = np.einsum("dc,nchw->ndhw", mix, rand(32, 5, 11, 12, seed=4)).astype(np.float32)
    err = {}
    for aware in (True, False):
        result = _run(model, FactorLowRank(ranks={"conv": 4}, data_aware=aware, recover=False), x)
        assert "as 3x1 + 1x3" in " ".join(result.report.steps[-1].notes)
        err[aware] = float(np.mean((run(model, {"x": x})[0] - run(result.model, {"x": x})[0]) ** 2))
    assert err[True] < 0.1 * err[False], err


def test_a_first_conv_with_few_inputs_is_still_fit_on_its_data():
    """A 1-channel 3x3 stem conv has 9 inputs per output, at or below the threshold under which
    GPTQ/SparseGPT skip a layer's input moments: factoring still whitens it by its inputs (smooth
    images: neighbouring taps correlated) and loses much less than the plain truncated SVD."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], name="stem")]
    model = make_model(nodes, [tensor("x", ["N", 1, 16, 16])], [tensor("y", ["N", 16, 16, 16])],
                       {"w": rand(16, 1, 3, 3), "b": rand(16, seed=2)}, opset=13)
    x = np.repeat(np.repeat(rand(64, 1, 4, 4, seed=6), 4, axis=2), 4, axis=3) + 0.01 * rand(64, 1, 16, 16, seed=7)
    (y,), errs = run(model, {"x": x}), {}
    for aware in (True, False):
        result = _run(model, FactorLowRank(ranks={"stem": 3}, conv_split="kxk-1x1", data_aware=aware, recover=False), x)
        assert [W.layer_weight(n).value.shape for n in G.to_graph(result.model).nodes if n.op == "Conv"] == [(3, 1, 3, 3), (16, 3, 1, 1)]
        errs[aware] = float(np.sqrt(np.mean((run(result.model, {"x": x})[0] - y) ** 2)))
    assert errs[True] < 0.5 * errs[False]


def test_factor_depthwise_aims_at_latency_by_default_and_takes_one_target():
    """Depthwise factors are smaller but not always faster in onnxruntime, so with no target given
    factor-depthwise allocates for half the measured latency (factor-lowrank: half the MACs)."""
    import pytest
    from onnxcompress.passes import FactorDepthwise
    assert FactorDepthwise().target() == ("latency", 0.5)
    assert FactorDepthwise(macs=0.6).target() == ("macs", 0.6)
    assert FactorLowRank().target() == ("macs", 0.5) and FactorLowRank(latency=0.7).target() == ("latency", 0.7)
    with pytest.raises(ValueError, match="give one target: macs or latency"):
        FactorDepthwise(macs=0.5, latency=0.5)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1], name="c2")]
    model = make_model(nodes, [tensor("x", ["N", 16, 12, 12])], [tensor("y", ["N", 32, 12, 12])],
                       {"w1": rand(32, 16, 3, 3), "w2": rand(32, 32, 3, 3, seed=1)}, opset=13)
    step = _run(model, FactorDepthwise(), rand(32, 16, 12, 12, seed=2)).report.steps[-1]
    assert "latency_ratio" in step.stats          # the allocation timed its candidates (no timing asserted)
    result = _run(model, FactorDepthwise(allocation="uniform", recover=False), rand(32, 16, 12, 12, seed=2))
    assert ("allocation='uniform' takes each layer to 0.5 of its MACs: a latency target is measured only "
            "by the sensitivity allocation") in result.report.steps[-1].notes
