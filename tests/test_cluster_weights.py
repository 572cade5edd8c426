"""cluster-weights: k-means codebooks decoded by standard ops, folded by onnxruntime at load."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from conftest import apply_pass, make_model, max_abs_diff, rand, run, tensor
from onnxcompress import Context, Dataset, LatencyConfig, OptionError, PassManager
from onnxcompress import graph as G, weights as W
from onnxcompress.layers import out_rows
from onnxcompress.pass_api import default_registry
from onnxcompress.passes import ClusterWeights, Distill, PruneWeights
from passes.cluster_weights import cluster_values

NO_LATENCY = LatencyConfig(enabled=False)


def distinct_per_layer(model: onnx.ModelProto, per_channel: bool = False) -> dict[str, int]:
    """Distinct decoded values of every Conv/Gemm weight (the most of any output channel)."""
    out = {}
    for node in G.to_graph(model).nodes:
        if node.op in ("Conv", "Gemm"):
            rows = out_rows(node, W.layer_weight(node).value)
            out[node.name] = max(len(np.unique(r)) for r in rows) if per_channel else len(np.unique(rows))
    return out


def test_a_tensor_with_k_distinct_values_gets_exactly_them():
    values = np.array([-1.5, 0.25, 3.0, 7.0], np.float32)[np.random.default_rng(0).integers(0, 4, 500)]
    book, index = cluster_values(values, 4)
    np.testing.assert_array_equal(book, [-1.5, 0.25, 3.0, 7.0])
    np.testing.assert_array_equal(book[index], values)


def test_zeros_are_a_centroid_of_their_own():
    v = np.concatenate([np.zeros(300), np.random.default_rng(1).normal(size=700) * 1e-3 + 0.002])
    book, index = cluster_values(v.astype(np.float32), 4)
    assert 0.0 in book and len(book) <= 4
    np.testing.assert_array_equal(book[index] == 0, v == 0)   # no tiny weight falls into the zero centroid


@pytest.mark.parametrize("per", ["tensor", "channel"])
def test_at_most_k_values_before_and_after_recovery(resnet, calib, per):
    ctx = Context(calib=calib, original=resnet, teachers=[resnet])
    clustered, result = apply_pass(ClusterWeights(bits=3, per=per, min_size=0), resnet, ctx)
    assert result.stats["layers_clustered"] == len(distinct_per_layer(resnet))
    assert max(distinct_per_layer(clustered, per == "channel").values()) <= 8
    recovered, _ = apply_pass(Distill(), clustered, ctx)
    assert max(distinct_per_layer(recovered, per == "channel").values()) <= 8


def test_decoded_model_matches_a_dense_model_with_the_same_values(resnet):
    clustered, _ = apply_pass(ClusterWeights(bits=4), resnet)
    graph = G.to_graph(clustered)
    dense = G.to_graph(clustered)
    for node in dense.nodes:            # every clustered weight written back as a plain initializer
        s = W.layer_weight(node) if node.op in ("Conv", "Gemm") else None
        if s is not None and s.kind == "codebook":
            W.convert(dense, node, 1, s, W.Dense(s.value))
    dense_model = G.to_model(G.tidy(dense), like=resnet)
    assert not any(n.op_type == "Gather" for n in dense_model.graph.node)
    feeds = {"input": rand(16, 1, 28, 28, seed=3)}
    assert max_abs_diff(clustered, dense_model, feeds) <= 1e-6
    assert any(n.op_type == "Gather" for n in G.to_model(graph).graph.node)


def test_onnxruntime_folds_the_decode_at_load(resnet, tmp_path):
    clustered, _ = apply_pass(ClusterWeights(bits=4), resnet)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC   # constant folding
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(clustered.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert sum(n.op_type in ("Gather", "GatherElements", "Cast") for n in clustered.graph.node) >= 26
    assert [n.op_type for n in optimized.graph.node if n.op_type in ("Gather", "GatherElements", "Cast")] == []


def test_packed_indices_raise_the_opset_to_4_bit_types(resnet, calib, test_set):
    result = PassManager([ClusterWeights(bits=4, packed=True)], eval_data=test_set, latency=NO_LATENCY).run(resnet)
    model = result.model
    assert G.default_opset(model) >= 21
    index_types = {t.data_type for t in model.graph.initializer if t.name.endswith("_index")}
    assert index_types == {onnx.TensorProto.UINT4}
    assert result.report.steps[-1].accuracy >= result.report.steps[0].accuracy - 1.0
    assert result.report.steps[-1].bits_per_weight < 5


def test_sparsity_survives_clustering_and_distillation(resnet, calib):
    ctx = Context(calib=calib, original=resnet, teachers=[resnet])
    pruned, _ = apply_pass(PruneWeights(sparsity=0.8, scope="layer"), resnet)
    clustered, _ = apply_pass(ClusterWeights(bits=4), pruned, ctx)
    recovered, _ = apply_pass(Distill(), clustered, ctx)
    zeros = lambda m: {n.name: out_rows(n, W.layer_weight(n).value) == 0
                       for n in G.to_graph(m).nodes if n.op in ("Conv", "Gemm")}
    before, after = zeros(pruned), zeros(recovered)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # three rewrites of each weight, and its name carries one suffix, not three
    names = {t.name for t in recovered.graph.initializer if t.data_type == onnx.TensorProto.UINT8}
    assert "blocks.0.a.0.weight_refit_index" in names
    assert all(n.count("_") <= 2 for n in names), sorted(names)[:3]


def test_stem_drops_the_suffixes_of_earlier_rewrites():
    assert G.stem("conv.weight_bnfold_refit_codebook_codebook_refit_index_1") == "conv.weight"
    assert G.stem("/fc/Gemm_in2_refit") == "/fc/Gemm_in2" and G.stem("_refit") == "_refit"


def test_two_bit_clusters_recover_with_distillation(resnet, calib, test_set):
    steps = PassManager([ClusterWeights(bits=2, assign="nearest"), Distill()], calib=calib, eval_data=test_set,
                        latency=NO_LATENCY).run(resnet).report.steps
    assert steps[1].accuracy < 50 and steps[2].accuracy >= steps[0].accuracy - 1.0


def test_per_channel_books_for_every_row_at_once_match_k_means():
    from onnxcompress.solvers import kmeans_1d, kmeans_rows
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((6, 900)) * np.arange(1, 7)[:, None]
    rows[:, :300] = 0.0
    rows[5] = 0.0                                                                   # a channel pruned away
    books, index = kmeans_rows(rows, 16)
    assert np.isfinite(books).all() and np.all(books[5] == 0)
    decoded = np.take_along_axis(books, index, 1)
    assert books.shape == (6, 16) and np.all((decoded == 0) == (rows == 0))       # zeros kept, no other weight is 0
    for r in range(5):
        ref = kmeans_1d(rows[r, 300:], 15)
        ref_err = np.mean((ref[np.abs(rows[r, 300:, None] - ref).argmin(1)] - rows[r, 300:]) ** 2)
        assert np.mean((decoded[r] - rows[r]) ** 2) * 900 / 600 <= 1.4 * ref_err
    exact = np.tile([0.5, -1.0, 2.0, 3.0], (3, 5))
    books, index = kmeans_rows(exact, 4)
    np.testing.assert_array_equal(np.take_along_axis(books, index, 1), exact)


def test_auto_gives_per_channel_books_where_channel_ranges_differ():
    w = np.ones((4, 8, 1, 1), np.float32) * np.linspace(-1, 1, 8, dtype=np.float32)[None, :, None, None]
    w[0] *= 10.0                                                                     # one wide channel
    conv = lambda w: make_model([helper.make_node("Conv", ["x", "w"], ["y"])], [tensor("x", [1, 8, 4, 4])],
                                [tensor("y", [1, 4, 4, 4])], {"w": w})
    assert apply_pass(ClusterWeights(bits=2, min_size=0), conv(w))[1].stats["per_channel_layers"] == 1
    w[0] /= 10.0
    assert apply_pass(ClusterWeights(bits=2, min_size=0), conv(w))[1].stats["per_channel_layers"] == 0


def test_data_aware_assignment_beats_nearest_centroids(resnet, calib, test_set):
    """GPTQ picks each weight's centroid against the layer's inputs: at 2 bits the model stays
    usable before any refit, where nearest centroids break it."""
    run = lambda assign: PassManager([ClusterWeights(bits=2, min_size=0, assign=assign)], calib=calib, eval_data=test_set,
                                     latency=NO_LATENCY).run(resnet)
    nearest, data = run("nearest"), run("gptq")
    assert data.report.steps[1].accuracy > nearest.report.steps[1].accuracy + 50
    assert max(distinct_per_layer(data.model).values()) <= 4


@pytest.mark.parametrize("options, message", [({"bits": 9}, "bits must be in 1..8"), ({"k": 1}, "k must be in 2..256"),
                                              ({"per": "row"}, "must be 'tensor'|'channel'|'auto'")])
def test_bad_options(options, message):
    with pytest.raises(OptionError, match=message):
        default_registry().create("cluster-weights", options)
