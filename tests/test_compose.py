"""Passes compose through the weight view: pruning and recovery keep a clustered or quantized
model clustered or quantized; the graph boundary (opsets, inputs and outputs, metadata, failures)
is kept or reported under the pass's name; nothing depends on node names."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from benchmarks.experiments import clustered
from benchmarks.peers import ort_quantize_static
from conftest import make_model, rand, run, tensor
from onnxcompress import Context, LatencyConfig, Pass, PassError, PassManager, PassResult, graph as G, weights as W
from onnxcompress.channels import analyze
from onnxcompress.passes import Distill, PruneChannels, PruneWeights
from onnxcompress.recovery import RecoverySettings, recover

NO_LATENCY = LatencyConfig(enabled=False)


def conv_channels(model: onnx.ModelProto) -> list[int]:
    graph = G.to_graph(model)
    return [W.layer_weight(n).value.shape[0] for n in graph.nodes if n.op == "Conv"]


def storages(model: onnx.ModelProto) -> Counter:
    graph = G.to_graph(model)
    return Counter(W.layer_weight(n).kind for n in graph.nodes if n.op in ("Conv", "Gemm"))


def test_pruning_a_clustered_model_keeps_it_clustered_and_recovers(resnet, calib, test_set):
    model = clustered(resnet)
    assert storages(model) == Counter(codebook=16)
    plain = PassManager([PruneChannels(round_to=1, ratio=0.3, recover=False)], eval_data=test_set, latency=NO_LATENCY).run(model)
    rec = PassManager([PruneChannels(round_to=1, ratio=0.3)], calib=calib, eval_data=test_set, latency=NO_LATENCY).run(model)
    assert storages(rec.model) == Counter(codebook=16)
    graph = G.to_graph(rec.model)
    for node in [n for n in graph.nodes if n.op in ("Conv", "Gemm")]:
        assert len(np.unique(W.layer_weight(node).value)) <= 16      # still at most k shared values
    assert conv_channels(rec.model) == conv_channels(plain.model) and sum(conv_channels(rec.model)) < 0.75 * sum(
        conv_channels(model))
    base, after, before = (s.accuracy for s in (rec.report.steps[0], rec.report.steps[1], plain.report.steps[1]))
    # 16 shared values per layer recover less than free weights would (about 91% here, 98% dense)
    assert before < 20 and after > 85 and base - after <= 10


@pytest.fixture(scope="module")
def quantized_resnet(resnet, calib):
    return ort_quantize_static(resnet, calib.take(200))


def test_onnxruntime_quantized_resnet_prunes_and_stays_qdq(quantized_resnet, calib, test_set):
    """onnxruntime's own quantize_static output (QDQ, per-channel weights, Q/DQ pairs on the
    activations), then structured pruning: fewer MACs, still QDQ, accuracy within 1.5 points."""
    model = quantized_resnet
    result = PassManager([PruneChannels(ratio=0.5, round_to=16)], calib=calib, eval_data=test_set,
                         latency=NO_LATENCY).run(model)
    base, pruned = result.report.steps
    assert pruned.status == "applied" and base.macs / pruned.macs >= 1.6
    assert storages(result.model) == storages(model) == Counter(qdq=16)
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert ops["QuantizeLinear"] == Counter(n.op_type for n in model.graph.node)["QuantizeLinear"]
    assert base.accuracy - pruned.accuracy <= 1.5
    assert pruned.weight_bytes.keys() == {"qdq"} and 8.0 <= pruned.bits_per_weight < 10.0


def test_prune_weights_then_quantized_recovery_keeps_zeros(quantized_resnet, calib, test_set):
    result = PassManager([PruneWeights(sparsity=0.6), Distill()], calib=calib, eval_data=test_set,
                         latency=NO_LATENCY).run(quantized_resnet)
    steps = result.report.steps
    assert steps[1].sparsity >= 0.59 and steps[2].sparsity >= 0.59          # zeros are codes == zero point
    assert storages(result.model) == Counter(qdq=16)
    assert steps[2].accuracy >= steps[1].accuracy


def _named_cnn(names: bool) -> onnx.ModelProto:
    """conv -> relu -> conv -> relu -> conv, with or without node names."""
    n = (lambda s: s) if names else (lambda s: "")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name=n("c1"), pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ra"], name=n("r1")),
             helper.make_node("Conv", ["ra", "w2"], ["b"], name=n("c2"), pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["rb"], name=n("r2")),
             helper.make_node("Conv", ["rb", "w3"], ["y"], name=n("c3"))]
    return make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 3, 6, 6])],
                      {"w1": rand(8, 2, 3, 3), "w2": rand(8, 8, 3, 3, seed=1), "w3": rand(3, 8, 1, 1, seed=2)})


def test_nothing_depends_on_node_names():
    named, nameless = _named_cnn(True), _named_cnn(False)
    groups = lambda m: sorted((len(g.units), bool(g.frozen)) for g in analyze(G.to_graph(m), m).groups if g.producers)
    assert groups(nameless) == groups(named) == [(3, True), (8, False), (8, False)]
    result = PassManager([PruneChannels(round_to=1, ratio=0.5, recover=False, exclude=("a",))], latency=NO_LATENCY).run(nameless)
    assert conv_channels(result.model) == [8, 4, 3]        # group "a" excluded by its tensor's name, "b" halved
    ratios = PassManager([PruneChannels(round_to=1, ratio=0.0, ratios={"b": 0.75}, recover=False)], latency=NO_LATENCY).run(nameless)
    assert conv_channels(ratios.model) == [8, 2, 3]


@dataclass
class NeedsOpset21(Pass):
    """Declares opset 21 and changes one weight."""
    name = "needs-21"

    def required_opset(self) -> int:
        return 21

    def run(self, graph, ctx):
        node = next(n for n in graph.nodes if n.op == "Conv")
        W.write(graph, node, 1, W.layer_weight(node), W.layer_weight(node).value * 1.0001)
        return PassResult(graph, True)


def test_a_pass_that_raises_the_opset_keeps_it_and_says_so():
    model = _named_cnn(True)
    result = PassManager([NeedsOpset21(), PruneWeights(sparsity=0.3)], latency=NO_LATENCY).run(model)
    assert G.default_opset(result.model) == 21 and result.model.ir_version >= 10
    assert any("raised the opset from 17 to 21 (the pass needs 21)" in n for n in result.report.steps[1].notes)
    assert result.report.steps[2].status == "applied" and not any("opset" in n for n in result.report.steps[2].notes)


@dataclass
class RenamesOutput(Pass):
    name = "renames-output"

    def run(self, graph, ctx):
        graph.outputs[0].name = "renamed"
        return PassResult(graph, True)


def test_changing_the_graph_outputs_is_an_error_naming_the_pass():
    with pytest.raises(PassError, match="pass 'renames-output'.*changed the graph's outputs"):
        PassManager([RenamesOutput()], latency=NO_LATENCY).run(_named_cnn(True))


def test_a_measurement_failure_names_its_pass(monkeypatch):
    import onnxcompress.manager as M

    calls = []

    def flaky(model):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("disk full")
        return 1

    monkeypatch.setattr(M, "gzip_bytes", flaky)
    with pytest.raises(PassError, match="pass 'prune-weights'.*could not be measured: RuntimeError: disk full"):
        PassManager([PruneWeights(sparsity=0.3)], latency=NO_LATENCY).run(_named_cnn(True))


def test_malformed_metadata_is_ignored_with_a_note():
    model = _named_cnn(True)
    entry = model.metadata_props.add()
    entry.key = "onnxcompress"
    entry.value = json.dumps({"passes": "oops", "channel_maps": {
        "a": {"of": 4, "kept": [0, 9]}, "b": {"of": 8, "kept": [3, 1]}, "ra": {"kept": "x"}, "rb": {"of": 8, "kept": [0, 2]}}})
    result = PassManager([PruneWeights(sparsity=0.3)], latency=NO_LATENCY).run(model)
    assert any("malformed channel map record(s) ignored: a, b, ra" in n for n in result.report.steps[0].notes)
    meta = json.loads({p.key: p.value for p in result.model.metadata_props}["onnxcompress"])
    assert [p["pass"] for p in meta["passes"]] == ["prune-weights"] and list(meta["channel_maps"]) == ["rb"]


def test_a_factored_pair_is_refit_against_the_teachers_output():
    """A Gemm split in two (rank 4 of 8) keeps its output name; recovery refits both halves
    together (the best rank-4 map) onto the teacher's output of the pair."""
    w, b = rand(16, 8, seed=3), rand(8, seed=4)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")]
    teacher = make_model(nodes, [tensor("x", ["N", 16])], [tensor("y", ["N", 8])], {"w": w, "b": b})
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    w1, w2 = (u[:, :4] * s[:4]).astype(np.float32), (vt[:4] * 1.5).astype(np.float32)    # a poor second factor
    graph = G.to_graph(teacher)
    fc = graph.nodes[0]
    mid = gs.Variable("fc_mid", dtype=np.float32)
    graph.nodes.append(gs.Node("Gemm", "fc_a", inputs=[fc.inputs[0], gs.Constant("w1", w1)], outputs=[mid]))
    fc.inputs[0], fc.inputs[1] = mid, gs.Constant("w2", w2)
    G.tidy(graph)
    x = np.random.default_rng(0).standard_normal((400, 16)).astype(np.float32) @ np.diag(np.r_[np.full(4, 3.0), np.full(12, 0.1)]).astype(np.float32)
    data = __import__("onnxcompress").Dataset({"x": x})
    ctx = Context(calib=data, original=teacher, teachers=[teacher])
    ctx.state.pairs["y"] = "fc_mid"
    err = lambda m: float(np.mean((run(m, {"x": x})[0] - run(teacher, {"x": x})[0]) ** 2))
    before = err(G.to_model(G.tidy(graph.copy()), like=teacher))
    result = recover(graph, ctx, data, RecoverySettings(head=False))
    after = err(G.to_model(G.tidy(graph), like=teacher))
    assert result.stats["layers_refit"] == 1 and after < 0.1 * before
    first = next(n for n in graph.nodes if n.name == "fc_a")
    assert not np.allclose(first.inputs[1].values, w1)                   # the first half moved too
    assert not any("first of a factored pair" in n for n in result.notes)


@dataclass
class KnowsItsBranches(Pass):
    """Records how often the If's then-branch runs (as an early-exit pass would)."""
    name = "knows-branches"

    def run(self, graph, ctx):
        ctx.state.branch_probs["i"] = 0.25
        return PassResult(graph, True)


def test_macs_inside_branches_are_reported_per_branch_and_as_expected_value():
    conv = lambda out, w, **kw: helper.make_node("Conv", ["x", w], [out], **kw)
    then_g = helper.make_graph([conv("t", "wt", pads=[1, 1, 1, 1])], "then", [], [tensor("t", ["N", 4, 6, 6])],
                               [onnx.numpy_helper.from_array(rand(4, 2, 3, 3), "wt")])
    else_g = helper.make_graph([conv("e", "we")], "else", [], [tensor("e", ["N", 4, 6, 6])])
    nodes = [helper.make_node("If", ["cond"], ["i"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Relu", ["i"], ["y"])]
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 4, 6, 6])],
                       {"we": rand(4, 2, 1, 1, seed=1), "cond": np.array(True)})
    result = PassManager([KnowsItsBranches()], latency=NO_LATENCY).run(model)
    original, known = result.report.steps
    assert original.branch_macs == {"i": {"then_branch": 2592, "else_branch": 288}}
    assert original.macs == 2592 and known.macs == 864            # worst case; then 0.25 * 2592 + 0.75 * 288
