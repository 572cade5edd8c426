"""Streaming activation capture (runtime.Stepper), SparseGPT, and the tiling ConvTranspose refit."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from benchmarks.experiments import add_weight_noise
from conftest import apply_pass, make_model, rand, run, tensor
from onnxcompress import Context, Dataset
from onnxcompress import graph as G, weights as W
from onnxcompress.layers import out_rows
from onnxcompress.passes import Distill, PruneWeights
from onnxcompress.runtime import StepError, Stepper, capture
from onnxcompress.solvers import sparsegpt, tile_rows


def branchy():
    """Conv -> (Relu, Sigmoid) -> Add (a skip) -> Reshape by a Shape computed per batch -> MatMul."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("Sigmoid", ["c1"], ["s"], name="sig"),
             helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "s"], ["a"], name="add"),
             helper.make_node("Shape", ["a"], ["shp"], name="shape", end=1),
             helper.make_node("Concat", ["shp", "minus1"], ["new"], name="cat", axis=0),
             helper.make_node("Reshape", ["a", "new"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "w3"], ["y"], name="fc")]
    inits = {"w1": rand(4, 2, 3, 3, seed=1), "b1": rand(4, seed=2), "w2": rand(4, 4, 3, 3, seed=3),
             "minus1": np.array([-1], np.int64), "w3": rand(4 * 6 * 6, 3, seed=4)}
    return make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 3])], inits)


def test_stepper_gives_the_same_tensors_as_a_capture_in_one_pass():
    model = branchy()
    data = Dataset({"x": rand(10, 2, 6, 6, seed=5)})
    ref = capture(model, data, ["c1", "r", "c2", "s", "f", "y"])
    stepper = Stepper(G.to_graph(model), model, data, batch_size=4)   # 3 batches, the last of 2
    for name in ["r", "c2", "s", "f", "y"]:        # s was made before c2 and is still held for the Add
        batches = stepper.fetch(name)
        assert [len(b) for b in batches] == [4, 4, 2]
        np.testing.assert_allclose(np.concatenate(batches), ref[name], rtol=1e-5, atol=1e-5)
    with pytest.raises(StepError, match="no longer held"):
        stepper.fetch("c1")                        # made, read by nodes that already ran, dropped


def test_stepper_sees_a_weight_changed_after_its_input_was_fetched():
    model = branchy()
    data = Dataset({"x": rand(6, 2, 6, 6, seed=5)})
    graph = G.to_graph(model)
    stepper = Stepper(graph, model, data, batch_size=4)
    stepper.fetch("r")                            # conv2's input
    conv2 = next(n for n in graph.nodes if n.name == "conv2")
    s = W.layer_weight(conv2)
    W.write(graph, conv2, 1, s, np.zeros_like(s.value), refit=False, in_place=True)
    got = np.concatenate(stepper.fetch("a"))
    np.testing.assert_allclose(got, capture(model, data, ["s"])["s"], rtol=1e-6)   # a = 0 + s


def test_sparsegpt_zeroes_exactly_and_reconstructs_better_than_magnitude():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 48)) @ rng.normal(size=(48, 48)) * 0.5 + rng.normal(size=(3000, 48))
    w = rng.normal(size=(20, 48))
    pruned = sparsegpt(w, X.T @ X, 20 * 48 // 2, block=16)
    assert int((pruned == 0).sum()) == 480
    magnitude = np.where(np.abs(w) >= np.median(np.abs(w)), w, 0)
    err = lambda v: float(np.mean((X @ v.T - X @ w.T) ** 2))
    assert err(pruned) < 0.8 * err(magnitude)


def correlated(n: int, seed: int) -> np.ndarray:
    """64 input features that are mixtures of 8 sources, plus a little noise."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(0).normal(size=(8, 64))
    return (rng.normal(size=(n, 8)) @ mix + 0.1 * rng.normal(size=(n, 64))).astype(np.float32)


def test_sparsegpt_prune_weights_beats_magnitude_on_correlated_inputs():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    model = make_model(nodes, [tensor("x", ["N", 64])], [tensor("y", ["N", 10])],
                       {"w1": rand(64, 48, seed=1), "w2": rand(48, 10, seed=2)})
    ctx = Context(calib=Dataset({"x": correlated(512, 1)}), original=model, teachers=[model])
    feeds = {"x": correlated(256, 2)}
    err = lambda m: float(np.mean((run(m, feeds)[0] - run(model, feeds)[0]) ** 2))
    sgpt, result = apply_pass(PruneWeights(sparsity=0.5, scope="layer", criterion="sparsegpt"), model, ctx)
    mag, _ = apply_pass(PruneWeights(sparsity=0.5, scope="layer"), model)
    assert result.stats["zeros"] == (64 * 48 + 48 * 10) // 2
    assert err(sgpt) < 0.5 * err(mag)


def tiling_head():
    """Conv -> Relu -> ConvTranspose (kernel 2, stride 2) -> Sigmoid: a detector's map head."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("ConvTranspose", ["r", "w2", "b2"], ["u"], name="up", strides=[2, 2]),
             helper.make_node("Sigmoid", ["u"], ["y"], name="sig")]
    inits = {"w1": rand(6, 3, 3, 3, seed=1), "b1": rand(6, seed=2), "w2": rand(6, 2, 2, 2, seed=3),
             "b2": rand(2, seed=4)}
    return make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 2, 16, 16])], inits)


def test_tile_rows_reproduce_conv_transpose():
    model = tiling_head()
    x = np.maximum(rand(2, 6, 8, 8, seed=5), 0)
    node = next(n for n in G.to_graph(model).nodes if n.op == "ConvTranspose")
    w, b = W.layer_weight(node).value, W.value_of(node.inputs[2])
    positions = np.random.default_rng(0).integers(0, 256, size=(2, 9))
    rows = tile_rows(x, (2, 2), positions)
    sub = make_model([helper.make_node("ConvTranspose", ["r", "w2", "b2"], ["u"], strides=[2, 2])],
                     [tensor("r", ["N", 6, 8, 8])], [tensor("u", ["N", 2, 16, 16])], {"w2": w, "b2": b})
    y = run(sub, {"r": x})[0].reshape(2, 2, 256)
    expected = np.take_along_axis(y, positions[:, None, :], 2).transpose(0, 2, 1).reshape(-1, 2)
    np.testing.assert_allclose(rows @ out_rows(node, w).T + b, expected, rtol=1e-5, atol=1e-5)


def test_a_dense_map_head_is_refit_onto_the_teachers_maps():
    teacher = tiling_head()
    student = add_weight_noise(teacher, 0.5, seed=3)     # every weight damaged, as a clean teacher's copy
    data = Dataset({"x": rand(64, 3, 8, 8, seed=9)})
    ctx = Context(calib=data, original=teacher, teachers=[teacher])
    recovered, result = apply_pass(Distill(), student, ctx)
    assert result.stats["layers_refit"] == 2            # the Conv and the ConvTranspose
    feeds = {"x": rand(32, 3, 8, 8, seed=10)}
    agree = lambda m: float(np.mean((run(m, feeds)[0] > 0.5) == (run(teacher, feeds)[0] > 0.5)))
    assert agree(student) < 0.9 and agree(recovered) >= 0.99


def test_stepper_runs_an_if_whose_branches_read_an_outer_tensor():
    then_g = helper.make_graph([helper.make_node("Relu", ["c"], ["t"])], "then", [], [tensor("t", ["N", 4, 6, 6])])
    else_g = helper.make_graph([helper.make_node("Neg", ["c"], ["e"])], "else", [], [tensor("e", ["N", 4, 6, 6])])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="c1"),
             helper.make_node("Conv", ["x", "w0"], ["side"], name="c0"),
             helper.make_node("If", ["cond"], ["i"], name="branch", then_branch=then_g, else_branch=else_g),
             helper.make_node("Add", ["i", "side"], ["s"], name="add"),
             helper.make_node("Conv", ["s", "w2"], ["y"], name="c2")]
    inits = {"w1": rand(4, 2, 1, 1, seed=1), "w0": rand(4, 2, 1, 1, seed=2), "w2": rand(3, 4, 1, 1, seed=3),
             "cond": np.array(True)}
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 3, 6, 6])], inits)
    data = Dataset({"x": rand(5, 2, 6, 6, seed=4)})
    ref = capture(model, data, ["side", "s"])
    stepper = Stepper(G.to_graph(model), model, data, batch_size=2)
    np.testing.assert_allclose(np.concatenate(stepper.fetch("side")), ref["side"], rtol=1e-6)
    np.testing.assert_allclose(np.concatenate(stepper.fetch("s")), ref["s"], rtol=1e-6)   # c, read in the If, was held


def test_recovery_falls_back_to_whole_model_runs_when_a_segment_fails(monkeypatch):
    teacher = tiling_head()
    student = add_weight_noise(teacher, 0.5, seed=3)
    ctx = lambda: Context(calib=Dataset({"x": rand(64, 3, 8, 8, seed=9)}), original=teacher, teachers=[teacher])
    streamed, result = apply_pass(Distill(head=False), student, ctx())

    def refuse(self, wanted):
        raise StepError("refused")
    monkeypatch.setattr(Stepper, "_run", refuse)
    fallback, again = apply_pass(Distill(head=False), student, ctx())
    assert again.stats["layers_refit"] == result.stats["layers_refit"] == 2
    feeds = {"x": rand(8, 3, 8, 8, seed=10)}
    np.testing.assert_allclose(run(fallback, feeds)[0], run(streamed, feeds)[0], atol=1e-4)


def test_stepper_feeds_a_model_with_a_fixed_first_dim_the_batches_it_takes():
    """A state input [layers=1, N, 4] fixes the first dim to 1: a sample per run, as sessions run
    it (`runtime.fixed_batch`). Batches of `batch_size` made the segments fail in onnxruntime."""
    nodes = [helper.make_node("Squeeze", ["h", "zero"], ["hs"], name="squeeze"),
             helper.make_node("Add", ["x", "hs"], ["a"], name="add"),
             helper.make_node("MatMul", ["a", "w"], ["y"], name="fc")]
    model = make_model(nodes, [tensor("x", ["N", 4]), tensor("h", [1, "N", 4])], [tensor("y", ["N", 3])],
                       {"zero": np.array([0], np.int64), "w": rand(4, 3, seed=1)})
    data = Dataset({"x": rand(6, 4, seed=2), "h": rand(6, 1, 4, seed=3)})
    stepper = Stepper(G.to_graph(model), model, data, batch_size=4)
    batches = stepper.fetch("a")
    assert [len(b) for b in batches] == [1] * 6
    np.testing.assert_allclose(np.concatenate(batches), capture(model, data, ["a"])["a"], rtol=1e-6)
    new, result = apply_pass(PruneWeights(sparsity=0.5), model, Context(calib=data, original=model))
    assert result.modified and result.stats["zeros"] == 6
