import numpy as np
import pytest
from onnx import helper, numpy_helper

from conftest import apply_pass, make_model, rand, tensor
from onnxcompress import Context, Dataset
from onnxcompress.passes import PruneWeights
from onnxcompress.passes.prune_weights import magnitude_mask


def two_layer_model():
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv"),
             helper.make_node("Flatten", ["c"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1)]
    inits = {"w1": rand(8, 3, 3, 3, scale=0.1), "b1": rand(8), "w2": rand(10, 8 * 4 * 4, seed=1), "b2": rand(10)}
    return make_model(nodes, [tensor("x", ["N", 3, 6, 6])], [tensor("y", ["N", 10])], inits)


def weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.97])
@pytest.mark.parametrize("scope", ["layer", "global", "normalized"])
def test_reaches_exactly_the_sparsity_asked(sparsity, scope):
    new, result = apply_pass(PruneWeights(sparsity=sparsity, scope=scope), two_layer_model())
    w = weights(new)
    total = w["w1"].size + w["w2"].size
    zeros = int((w["w1"] == 0).sum() + (w["w2"] == 0).sum())
    assert zeros == result.stats["zeros"]
    if scope == "layer":
        assert (w["w1"] == 0).sum() == round(sparsity * w["w1"].size)
        assert (w["w2"] == 0).sum() == round(sparsity * w["w2"].size)
    else:
        assert zeros == round(sparsity * total)
    assert np.count_nonzero(w["b1"]) == 8  # biases are never pruned


def test_global_scope_prunes_the_small_layer_more_but_never_empties_it():
    new, _ = apply_pass(PruneWeights(sparsity=0.5, scope="global", max_layer_sparsity=1.0), two_layer_model())
    w = weights(new)
    assert (w["w1"] == 0).mean() > 0.9 and (w["w2"] == 0).mean() < 0.5  # w1 was scaled by 0.1
    new, result = apply_pass(PruneWeights(sparsity=0.5), two_layer_model())   # default cap: (1 + 0.5) / 2
    w = weights(new)
    assert (w["w1"] == 0).sum() == int(0.75 * w["w1"].size) and result.stats["zeros"] == round(0.5 * (w["w1"].size + w["w2"].size))


def test_normalized_scope_prunes_layers_of_small_weights_alike():
    """Layer-normalised magnitudes: w1 (scaled by 0.1) loses about as much as w2, not everything."""
    new, _ = apply_pass(PruneWeights(sparsity=0.5, scope="normalized"), two_layer_model())
    w = weights(new)
    assert 0.3 < (w["w1"] == 0).mean() < 0.7 and 0.3 < (w["w2"] == 0).mean() < 0.7


def test_wanda_weighs_weights_by_their_input_norm():
    """Input feature 0 is 1000x larger than the others: Wanda keeps its (small) weights, magnitude
    pruning drops them; every output row loses exactly its share."""
    from onnxcompress import Context, Dataset

    w = np.abs(rand(8, 4, seed=2)) + 0.5
    w[0] = 0.01                                         # small weights on the loud feature
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [tensor("x", ["N", 8])],
                       [tensor("y", ["N", 4])], {"w": w})
    x = rand(64, 8, seed=3)
    x[:, 0] *= 1000
    ctx = Context(calib=Dataset({"x": x}))
    wanda = weights(apply_pass(PruneWeights(sparsity=0.5, criterion="wanda"), model, ctx)[0])["w"]
    plain = weights(apply_pass(PruneWeights(sparsity=0.5, scope="layer"), model)[0])["w"]
    assert np.all(wanda[0] != 0) and np.all(plain[0] == 0)
    assert np.all((wanda == 0).sum(0) == 4)            # each output (a column of a MatMul weight) loses half


def test_kept_weights_are_the_largest_and_unchanged():
    old = weights(two_layer_model())["w2"]
    new = weights(apply_pass(PruneWeights(sparsity=0.5, scope="layer"), two_layer_model())[0])["w2"]
    kept = new != 0
    assert np.array_equal(new[kept], old[kept])
    assert np.abs(old[kept]).min() >= np.abs(old[~kept]).max()


def test_exclude_is_honoured():
    new, _ = apply_pass(PruneWeights(sparsity=0.5, exclude=("conv",)), two_layer_model())
    assert np.count_nonzero(weights(new)["w1"]) == 8 * 27


def test_magnitude_mask_with_ties_is_exact():
    mask = magnitude_mask(np.ones(10), 0.3)
    assert mask.sum() == 7


def test_non_constant_weight_is_left_and_reported():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = make_model(nodes, [tensor("x", [2, 3]), tensor("w", [3, 4])], [tensor("y", [2, 4])], {})
    _, result = apply_pass(PruneWeights(sparsity=0.5), model)
    assert not result.modified
    assert any("MatMul 'mm'" in n for n in result.notes)


def test_weights_held_by_constant_nodes_are_pruned_and_shared():
    w = rand(4, 3, seed=4)
    nodes = [helper.make_node("Constant", [], ["w"], name="const", value=numpy_helper.from_array(w, "wv")),
             helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["x", "w"], ["b"], name="mm2"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    model = make_model(nodes, [tensor("x", [2, 4])], [tensor("y", [2, 3])], {})
    new, result = apply_pass(PruneWeights(sparsity=0.5), model)
    assert result.stats["zeros"] == 6 and not any(n.op_type == "Constant" for n in new.graph.node)
    inits = weights(new)
    assert len(inits) == 1 and (next(iter(inits.values())) == 0).sum() == 6
    assert [n.input[1] for n in new.graph.node if n.op_type == "MatMul"] == [next(iter(inits))] * 2


def test_a_weight_a_loop_body_also_reads_is_pruned_for_the_top_level_layer_only():
    """A Loop body reading the same initializer from the outer scope keeps the original weight:
    pruning it in place changed what the body computes (passes leave bodies as they are)."""
    w = rand(8, 8, seed=5)
    body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                              helper.make_node("MatMul", ["h_in", "w"], ["m"], name="body_mm"),
                              helper.make_node("Tanh", ["m"], ["h_out"])],
                             "body", [tensor("i", [], 7), tensor("cond_in", [], 9), tensor("h_in", None)],
                             [tensor("cond_out", [], 9), tensor("h_out", None)])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h0"], name="first"),
             helper.make_node("Loop", ["trips", "true", "h0"], ["y"], name="loop", body=body)]
    model = make_model(nodes, [tensor("x", ["N", 8])], [tensor("y", ["N", 8])],
                       {"w": w, "trips": np.array(2, np.int64), "true": np.array(True)})
    for criterion in ("magnitude", "sparsegpt"):
        ctx = Context(calib=Dataset({"x": rand(32, 8, seed=6)}), original=model)
        new, result = apply_pass(PruneWeights(sparsity=0.5, criterion=criterion), model, ctx)
        assert result.stats["zeros"] == 32
        first = next(n for n in new.graph.node if n.op_type == "MatMul")
        loop = next(n for n in new.graph.node if n.op_type == "Loop")
        inner = {t.name: numpy_helper.to_array(t) for t in loop.attribute[0].g.initializer} | weights(new)
        assert (inner[first.input[1]] == 0).sum() == 32
        np.testing.assert_array_equal(inner["w"], w)       # what the body reads is the original
