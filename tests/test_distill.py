import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import MODELS, apply_pass, make_model, rand, run, tensor
from onnxcompress import Context, Dataset, InputError, LatencyConfig, OptionError, PassManager
from benchmarks.experiments import add_weight_noise, zero_counts
from onnxcompress.passes import Distill, PruneWeights

NO_LATENCY = LatencyConfig(enabled=False)


def small_cnn():
    """Conv -> Relu -> Conv -> GlobalAveragePool -> Flatten -> Gemm, random weights."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1)]
    inits = {"w1": rand(8, 2, 3, 3, seed=1), "b1": rand(8, seed=2), "w2": rand(6, 8, 3, 3, seed=3),
             "b2": rand(6, seed=4), "w3": rand(4, 6, seed=5), "b3": rand(4, seed=6)}
    return make_model(nodes, [tensor("x", ["N", 2, 8, 8])], [tensor("y", ["N", 4])], inits)


def test_refit_keeps_zeros_and_brings_the_student_back_to_the_teacher():
    teacher = small_cnn()
    student, _ = apply_pass(PruneWeights(sparsity=0.6, scope="layer"), teacher)
    data = Dataset({"x": rand(200, 2, 8, 8, seed=9)})
    ctx = Context(calib=data, original=teacher, teachers=[teacher])
    recovered, result = apply_pass(Distill(head=False), student, ctx)
    assert zero_counts(recovered) == zero_counts(student)
    assert result.stats["layers_refit"] == 3
    assert result.stats["layer_mse_after"] < 0.6 * result.stats["layer_mse_before"]  # on held-out rows
    feeds = {"x": rand(50, 2, 8, 8, seed=10)}
    err = lambda m: float(np.abs(run(m, feeds)[0] - run(teacher, feeds)[0]).mean())
    assert err(recovered) < 0.5 * err(student)


def test_unchanged_model_is_left_alone():
    teacher = small_cnn()
    ctx = Context(calib=Dataset({"x": rand(50, 2, 8, 8)}), original=teacher, teachers=[teacher])
    _, result = apply_pass(Distill(head=False), teacher, ctx)
    assert result.stats["layers_refit"] == 0 and not result.modified


def accuracy_after(passes, model, calib, test_set, teachers=()):
    steps = PassManager(passes, calib=calib, eval_data=test_set, teachers=teachers, latency=NO_LATENCY).run(model).report.steps
    return [s.accuracy for s in steps], steps


def test_resnet_pruned_student_recovers_70_percent_keeping_sparsity(resnet, calib, test_set):
    (orig, damaged, recovered), steps = accuracy_after([PruneWeights(sparsity=0.85), Distill()], resnet, calib, test_set)
    assert orig - damaged >= 5
    assert recovered - damaged >= 0.7 * (orig - damaged)


def test_sparsity_is_kept_exactly(resnet, calib):
    pruned = PassManager([PruneWeights(sparsity=0.85)], latency=NO_LATENCY).run(resnet).model
    result = PassManager([Distill()], calib=calib, teachers=[resnet], latency=NO_LATENCY).run(pruned)
    assert result.report.steps[1].status == "applied"
    assert zero_counts(result.model) == zero_counts(pruned)


def test_vgg_noisy_student_recovers_from_a_clean_teacher(calib, test_set):
    vgg = onnx.load(str(MODELS / "vgg.onnx"))
    damaged = add_weight_noise(vgg, 1.2)
    (before, after), _ = accuracy_after([Distill()], damaged, calib, test_set, teachers=[vgg])
    (orig,), _ = accuracy_after([], vgg, calib, test_set)
    assert orig - before >= 5
    assert after - before >= 0.7 * (orig - before)


def test_ensemble_teacher_averages_soft_targets(resnet, calib, test_set):
    vgg = onnx.load(str(MODELS / "vgg.onnx"))
    pruned = PassManager([PruneWeights(sparsity=0.85)], latency=NO_LATENCY).run(resnet).model
    (before, after), steps = accuracy_after([Distill()], pruned, calib, test_set, teachers=[resnet, vgg])
    assert after > before + 20
    assert steps[1].stats["layers_refit"] > 10  # layer targets from the teacher sharing the student's tensors
    assert "head_agreement_after" in steps[1].stats


def test_alpha_needs_labels(resnet):
    data = Dataset({"input": np.zeros((4, 1, 28, 28), np.float32)})
    with pytest.raises(OptionError, match="alpha > 0 needs labels"):
        PassManager([Distill(alpha=0.5)], calib=data, latency=NO_LATENCY).run(resnet)


def test_teacher_with_other_inputs_is_refused(resnet):
    with pytest.raises(InputError, match="must match"):
        PassManager([Distill()], teachers=[small_cnn()], latency=NO_LATENCY).run(resnet)


def test_distill_without_calibration_data_is_an_input_error(resnet):
    with pytest.raises(InputError, match="'distill' needs calibration data"):
        PassManager([Distill()], latency=NO_LATENCY).run(resnet)


@pytest.mark.parametrize("options, message", [({"temperature": 0}, "temperature must be positive"),
                                               ({"alpha": 2}, r"alpha must be in \[0, 1\]"),
                                               ({"shifts": -2}, "shifts must be a whole number of at least 0")])
def test_bad_options(options, message):
    from onnxcompress import default_registry
    with pytest.raises(OptionError, match=message):
        default_registry().create("distill", options)


def test_channel_maps_survive_between_runs(resnet, calib, test_set):
    import json
    from onnxcompress.passes import PruneChannels
    pruned = PassManager([PruneChannels(ratio=0.5, round_to=8, recover=False)], latency=NO_LATENCY).run(resnet).model
    meta = json.loads({p.key: p.value for p in pruned.metadata_props}["onnxcompress"])
    assert meta["channel_maps"]["/stem/stem.0/Conv_output_0"]["of"] == 16
    assert len(meta["channel_maps"]["/stem/stem.0/Conv_output_0"]["kept"]) == 8
    result = PassManager([Distill()], calib=calib, eval_data=test_set, teachers=[resnet], latency=NO_LATENCY).run(pruned)
    step = result.report.steps[1]
    assert not any("outputs vs" in n for n in step.notes)   # teacher channels matched through the maps
    assert step.stats["layers_refit"] >= 16 and step.accuracy > result.report.steps[0].accuracy + 20


def test_pruning_again_in_a_later_run_composes_the_maps(resnet, calib, test_set):
    import json
    from onnxcompress.passes import PruneChannels
    first = PassManager([PruneChannels(round_to=1, ratio=0.25, recover=False)], latency=NO_LATENCY).run(resnet).model
    # Second run: its own original (first) is the teacher for its refits...
    second = PassManager([PruneChannels(round_to=1, ratio=0.25)], calib=calib, eval_data=test_set, latency=NO_LATENCY).run(first)
    assert not any("outputs vs" in n for n in second.report.steps[1].notes)
    maps = json.loads({p.key: p.value for p in second.model.metadata_props}["onnxcompress"])["channel_maps"]
    stem = maps["/stem/stem.0/Conv_output_0"]
    assert stem["of"] == 16 and len(stem["kept"]) == 9 and len(set(stem["kept"])) == 9 and max(stem["kept"]) < 16
    # ...and a third run can still recover against the very first model through the composed maps.
    third = PassManager([Distill()], calib=calib, eval_data=test_set, teachers=[resnet], latency=NO_LATENCY).run(second.model)
    assert not any("outputs vs" in n for n in third.report.steps[1].notes)


def test_few_large_samples_refit_late_1x1_convs_on_held_out_rows():
    """8 calibration images of 64 x 64 are too few to hold whole images out: rows (positions) are
    held out instead, and the damaged late 1 x 1 convs are refit."""
    from onnx import helper
    from conftest import make_model, rand, tensor
    from onnxcompress import Dataset, graph as G
    from onnxcompress.recovery import RecoverySettings, recover

    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("Conv", ["ra", "w2"], ["b"]), helper.make_node("Relu", ["b"], ["rb"]),
             helper.make_node("Conv", ["rb", "w3"], ["y"])]
    inits = {"w1": rand(8, 3, 3, 3), "w2": rand(8, 8, 1, 1, seed=1), "w3": rand(4, 8, 1, 1, seed=2)}
    teacher = make_model(nodes, [tensor("x", ["N", 3, 64, 64])], [tensor("y", ["N", 4, 64, 64])], inits)
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    for t in student.graph.initializer:
        if t.name in ("w2", "w3"):
            a = onnx.numpy_helper.to_array(t).copy()
            a[np.abs(a) < np.median(np.abs(a))] = 0          # half of each late conv zeroed
            t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
    data = Dataset({"x": rand(8, 3, 64, 64, seed=3)})
    ctx = Context(calib=data, original=teacher, teachers=[teacher])
    graph = G.to_graph(student)
    result = recover(graph, ctx, data, RecoverySettings(head=False))
    assert result.stats["layers_refit"] == 2 and not any("too few" in n for n in result.notes)
    assert result.stats["layer_mse_after"] < 0.7 * result.stats["layer_mse_before"]   # zeros stay zero


def test_a_matmul_softmax_sequence_head_is_refit_per_time_step():
    """[batch, time, features] -> MatMul -> Add -> Softmax: the head is found through the Softmax
    and refit on the teacher's per-step probabilities."""
    from onnxcompress import graph as G
    from onnxcompress.metrics import fidelity
    from onnxcompress.recovery import RecoverySettings, recover

    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Add", ["z", "b"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["y"], axis=-1)]
    w, b = rand(16, 6, seed=1), rand(6, seed=2)
    teacher = make_model(nodes, [tensor("x", ["N", 20, 16])], [tensor("y", ["N", 20, 6])], {"w": w, "b": b})
    damaged = w + rand(16, 6, seed=3, scale=1.5)
    student = make_model(nodes, [tensor("x", ["N", 20, 16])], [tensor("y", ["N", 20, 6])], {"w": damaged, "b": b * 0})
    calib, test = Dataset({"x": rand(40, 20, 16, seed=4)}), {"x": rand(40, 20, 16, seed=5)}
    agree = lambda m: fidelity({"y": run(teacher, test)[0]}, {"y": run(m, test)[0]})["y"]["position_agreement"]
    assert agree(student) < 80
    graph = G.to_graph(student)
    ctx = Context(calib=calib, original=teacher, teachers=[teacher])
    result = recover(graph, ctx, calib, RecoverySettings(layers="changed", temperature=1.0))
    refit = G.to_model(G.tidy(graph), like=student)
    assert result.stats["head_agreement_after"] > result.stats["head_agreement_before"]
    assert agree(refit) >= 99.0


def _renamed(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose every tensor (but the graph inputs and outputs) and node has another name."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = {i.name for i in out.graph.input} | {o.name for o in out.graph.output}
    new = lambda name: name if not name or name in keep else f"renamed_{abs(hash(name)) % 10 ** 8}"
    for t in out.graph.initializer:
        t.name = new(t.name)
    for n in out.graph.node:
        n.input[:] = [new(i) for i in n.input]
        n.output[:] = [new(o) for o in n.output]
        n.name = new(n.name)
    del out.graph.value_info[:]
    return out


def test_a_renamed_teacher_still_gives_layer_wise_targets(resnet, calib, test_set):
    from onnxcompress import graph as G
    from onnxcompress.recovery import RecoverySettings, recover

    teacher = _renamed(resnet)
    assert not ({o for n in teacher.graph.node for o in n.output} & {o for n in resnet.graph.node for o in n.output}
                - {"logits"})
    student = add_weight_noise(resnet, 0.3, seed=1)
    graph = G.to_graph(student)
    ctx = Context(calib=calib, original=teacher, teachers=[teacher])
    result = recover(graph, ctx, calib, RecoverySettings(head=False))
    assert result.stats["layers_refit"] == 16 and not any("teacher has no tensor" in n for n in result.notes)
    acc = lambda m: PassManager([], eval_data=test_set, latency=LatencyConfig(enabled=False)).run(m).report.steps[0].accuracy
    before, after = acc(student), acc(G.to_model(G.tidy(graph), like=student))
    assert after >= 98.0 and after > before + 1.5          # about 96.6% -> 98.6%


def test_shifted_copies_refit_the_student_too_and_differ_from_none():
    teacher = small_cnn()
    student, _ = apply_pass(PruneWeights(sparsity=0.6, scope="layer"), teacher)
    data = Dataset({"x": rand(200, 2, 8, 8, seed=9)})
    feeds = {"x": rand(50, 2, 8, 8, seed=10)}
    err = lambda m: float(np.abs(run(m, feeds)[0] - run(teacher, feeds)[0]).mean())
    out = {}
    for shifts in (0, 2):
        ctx = Context(calib=data, original=teacher, teachers=[teacher])
        out[shifts], result = apply_pass(Distill(head=False, shifts=shifts), student, ctx)
        assert result.stats["layers_refit"] == 3 and zero_counts(out[shifts]) == zero_counts(student)
        assert err(out[shifts]) < 0.5 * err(student)
    assert not np.allclose(run(out[0], feeds)[0], run(out[2], feeds)[0])


def test_shifts_without_an_image_input_say_so():
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)]
    teacher = make_model(nodes, [tensor("x", ["N", 12])], [tensor("y", ["N", 4])],
                         {"w1": rand(16, 12, seed=1), "b1": rand(16, seed=2), "w2": rand(4, 16, seed=3), "b2": rand(4, seed=4)})
    student, _ = apply_pass(PruneWeights(sparsity=0.5, scope="layer"), teacher)
    ctx = Context(calib=Dataset({"x": rand(300, 12, seed=5)}), original=teacher, teachers=[teacher])
    _, result = apply_pass(Distill(shifts=2), student, ctx)
    assert "no image input to shift (a float input of rank 4, larger than 5 pixels a side): recovered on the " \
           "calibration data as is" in result.notes


def test_held_out_draws_keep_groups_whole_across_batches():
    from onnxcompress.recovery import HOLDOUT, _held_out_draws
    one = _held_out_draws(np.random.default_rng(3))
    assert np.array_equal(np.concatenate([one(5), one(7)]), np.random.default_rng(3).random(12) < HOLDOUT)
    three = _held_out_draws(np.random.default_rng(3), group=3)
    mask = np.concatenate([three(n) for n in (4, 64, 5, 27, 899)])    # batches that split groups
    groups = mask.reshape(-1, 3)
    assert (groups.all(1) | ~groups.any(1)).all()                     # a group is held out whole or not at all
    assert 0.15 < groups[:, 0].mean() < 0.25


def test_teacher_outputs_are_cached_per_data_not_per_length():
    from onnxcompress.recovery import teacher_logits
    teacher = small_cnn()
    x = rand(90, 2, 8, 8, seed=4)
    ctx = Context(original=teacher, teachers=[teacher])
    (a, _), (b, _) = Dataset({"x": x}).folds(3)[:2]          # 60 samples each, not the same ones
    for fold in (a, b, a):
        assert np.allclose(teacher_logits(ctx, fold)[0], run(teacher, {"x": fold.feeds["x"]})[0], atol=1e-5)
