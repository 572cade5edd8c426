import json
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxcompress import Context, Dataset, InputError, LatencyConfig, Pass, PassError, PassManager, PassResult
from onnxcompress.passes import FoldBatchNorm, PruneWeights

NO_LATENCY = LatencyConfig(enabled=False)


@dataclass
class Explodes(Pass):
    """Raises."""
    name = "explodes"

    def run(self, graph, ctx):
        raise RuntimeError("boom")


@dataclass
class BreaksModel(Pass):
    """Adds a node onnxruntime cannot run."""
    name = "breaks-model"

    def run(self, graph, ctx):
        out = graph.outputs[0]
        tmp = gs.Variable("tmp", dtype=np.float32)
        graph.nodes[-1].outputs = [tmp]
        graph.nodes.append(gs.Node("NoSuchOp", "bad", inputs=[tmp], outputs=[out]))
        return PassResult(graph, True)


@pytest.fixture(scope="module")
def test_data(mnist_test):
    return Dataset({"input": mnist_test["input"][:300]}, mnist_test["labels"][:300])


def test_budget_breaker_is_rolled_back_and_the_rest_applied(resnet, test_data):
    passes = [PruneWeights(sparsity=0.97), FoldBatchNorm()]
    result = PassManager(passes, eval_data=test_data, max_drop=1.0, latency=NO_LATENCY).run(resnet)
    steps = result.report.steps
    assert [s.pass_ for s in steps] == ["original", "prune-weights", "fold-bn"]
    assert steps[1].status == "rolled back" and "budget 1.0" in steps[1].notes[-1]
    assert steps[2].status == "applied"
    assert not result.budget_met
    assert "BatchNormalization" not in {n.op_type for n in result.model.graph.node}
    w = [onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer if len(t.dims) == 4]
    assert all(np.count_nonzero(x) == x.size for x in w)  # the pruning did not survive
    assert abs(steps[2].accuracy - steps[0].accuracy) < 0.5


def test_within_budget_passes_apply(resnet, test_data):
    result = PassManager([FoldBatchNorm()], eval_data=test_data, max_drop=0.5, latency=NO_LATENCY).run(resnet)
    assert result.budget_met and result.report.steps[1].status == "applied"
    meta = {p.key: p.value for p in result.model.metadata_props}
    recorded = json.loads(meta["onnxcompress"])
    assert recorded["passes"] == [{"pass": "fold-bn", "options": {}}] and recorded["version"]


def test_no_labels_budget_uses_agreement(resnet, test_data):
    unlabeled = Dataset(test_data.feeds)
    result = PassManager([PruneWeights(sparsity=0.97)], eval_data=unlabeled, max_drop=2.0, latency=NO_LATENCY).run(resnet)
    step = result.report.steps[1]
    assert step.accuracy is None and step.status == "rolled back"
    assert result.report.budget["metric"] == "top1_agreement" and "top1_agreement" in step.notes[-1]


def test_a_raising_pass_is_named_with_those_before_it(resnet, test_data):
    with pytest.raises(PassError, match=r"pass 'explodes' \(after fold-bn\) failed: RuntimeError: boom"):
        PassManager([FoldBatchNorm(), Explodes()], eval_data=test_data, latency=NO_LATENCY).run(resnet)


def test_an_invalid_result_is_a_pass_error(resnet, test_data):
    with pytest.raises(PassError, match=r"pass 'breaks-model' failed: produced an invalid model"):
        PassManager([BreaksModel()], eval_data=test_data, latency=NO_LATENCY).run(resnet)


def test_report_has_the_documented_fields(resnet, test_data):
    cfg = LatencyConfig(batch_sizes=(1, 4), runs=3, warmup=1)
    report = PassManager([FoldBatchNorm()], eval_data=test_data, latency=cfg).run(resnet).report.to_dict()
    assert [s["pass"] for s in report["steps"]] == ["original", "fold-bn"]
    for step in report["steps"]:
        for key in ("pass", "accuracy", "size_bytes", "params", "macs", "latency_ms", "fidelity", "stats"):
            assert key in step
        assert set(step["latency_ms"]) == {"1", "4"}
    assert report["steps"][1]["stats"]["bn_folded"] == 15  # stem, 12 in blocks, 2 shortcuts
    assert report["steps"][1]["fidelity"]["logits"]["top1_agreement"] == 100.0


def test_unchanged_pass_keeps_measurements(test_data, resnet):
    folded = PassManager([FoldBatchNorm()], eval_data=test_data, latency=NO_LATENCY).run(resnet).model
    steps = PassManager([FoldBatchNorm()], eval_data=test_data, latency=NO_LATENCY).run(folded).report.steps
    assert steps[1].status == "unchanged" and steps[1].size_bytes == steps[0].size_bytes


def test_missing_calibration_is_an_input_error():
    from onnxcompress import InputError
    with pytest.raises(InputError, match="needs calibration data"):
        Context().require_calib("some-pass")


def test_prune_then_distill_is_judged_after_the_recovery(resnet, test_data, calib):
    from onnxcompress.passes import Distill
    result = PassManager([PruneWeights(sparsity=0.85), Distill(samples=200)], calib=calib, eval_data=test_data,
                         max_drop=2.0, latency=NO_LATENCY).run(resnet)
    steps = result.report.steps
    assert [s.status for s in steps[1:]] == ["applied", "applied"]
    assert steps[1].accuracy < 50 and steps[2].accuracy > steps[0].accuracy - 2.0
    assert result.budget_met


def test_a_rolled_back_unit_restores_the_channel_maps(resnet, test_data, calib):
    from onnxcompress.passes import Distill, PruneChannels
    result = PassManager([PruneChannels(ratio=0.9, recover=False), Distill(samples=50), FoldBatchNorm()],
                         calib=calib, eval_data=test_data, max_drop=0.1, latency=NO_LATENCY).run(resnet)
    assert [s.status for s in result.report.steps[1:]] == ["rolled back", "rolled back", "applied"]
    assert "rolled back (prune-channels + distill)" in result.report.steps[2].notes[-1]
    convs = [t for t in result.model.graph.initializer if len(t.dims) == 4]
    assert sorted({t.dims[0] for t in convs}) == [16, 32, 64]  # nothing pruned survived


@dataclass
class Hungry(Pass):
    """Touches 400 MB, changes nothing."""
    name = "hungry"

    def run(self, graph, ctx):
        block = np.ones(100 * 2 ** 20, np.float32)
        return PassResult(graph, False, {"sum": float(block[::4096].sum())}, [])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-pass peaks need /proc/self/clear_refs")
def test_each_step_reports_its_own_peak_memory(resnet):
    report = PassManager([Hungry(), FoldBatchNorm()], latency=LatencyConfig(enabled=False)).run(resnet).report
    peaks = [s.peak_mb for s in report.steps]
    assert all(p and p > 0 for p in peaks)
    assert peaks[1] > peaks[2] + 300          # the window was reset before fold-bn
    assert report.to_dict()["steps"][1]["peak_mb"] == peaks[1]


def test_a_scalar_input_without_data_is_an_input_error():
    """Random inputs for a rank-0 input were made [16]-shaped and failed in onnxruntime with a
    message blaming the declared shapes; the input is named instead."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Div", ["x", "t"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2]),
                                           helper.make_tensor_value_info("t", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InputError, match="input 't' is a scalar"):
        PassManager([FoldBatchNorm()], latency=NO_LATENCY).run(model)


def test_what_a_pass_left_alone_is_noted(resnet, test_data):
    """An unchanged step says why even when the pass gave no reason (the model has nothing it
    handles), and a body holding ops the pass handles is named when the pass left it as it was."""
    from onnx import TensorProto, helper, numpy_helper

    folded = PassManager([FoldBatchNorm()], eval_data=test_data, latency=NO_LATENCY).run(resnet).model
    step = PassManager([FoldBatchNorm()], eval_data=test_data, latency=NO_LATENCY).run(folded).report.steps[1]
    assert step.status == "unchanged" and step.notes == ["nothing to do: the model has no BatchNormalization node"]

    rng = np.random.default_rng(0)
    init = lambda name, *shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
    vi = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
    branch = lambda tag: helper.make_graph([helper.make_node("MatMul", ["h", f"{tag}.w"], [f"{tag}.y"])], tag, [],
                                           [vi(f"{tag}.y", None)], [init(f"{tag}.w", 4, 4)])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else"))]
    graph = helper.make_graph(nodes, "g", [vi("x", ["N", 4])], [vi("y", ["N", 4])],
                              [init("w", 4, 4), numpy_helper.from_array(np.array(True), "cond")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = Dataset({"x": rng.standard_normal((8, 4)).astype(np.float32)})
    step = PassManager([PruneWeights(sparsity=0.5)], calib=data, latency=NO_LATENCY).run(model).report.steps[1]
    assert step.status == "applied"
    assert "If 'if': the nodes in its body (MatMul x2) were left as they are" in " ".join(step.notes)
