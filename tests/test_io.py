import os

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import MODELS, run
from onnxcompress import InputError, LatencyConfig, PassManager, io
from onnxcompress.passes import FoldBatchNorm, PruneWeights


def signature(model):
    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
    return ([(i.name, i.type.tensor_type.elem_type, dims(i)) for i in model.graph.input],
            [(o.name, o.type.tensor_type.elem_type, dims(o)) for o in model.graph.output])


def test_compressed_model_keeps_names_metadata_and_dynamic_dims(tmp_path, resnet, mnist_test):
    model = onnx.ModelProto()
    model.CopyFrom(resnet)
    helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    model.model_version = 7
    result = PassManager([FoldBatchNorm(), PruneWeights(sparsity=0.3)], latency=LatencyConfig(enabled=False)).run(model)
    out = io.save_model(result.model, tmp_path / "out.onnx")
    back = io.load_model(out)
    assert signature(back) == signature(resnet)
    assert signature(back)[0][0][2][0] == "batch"
    assert back.opset_import == resnet.opset_import and back.ir_version == resnet.ir_version
    meta = {p.key: p.value for p in back.metadata_props}
    assert meta["author"] == "tests" and meta["license"] == "MIT" and "onnxcompress" in meta
    assert back.model_version == 7
    assert run(back, {"input": mnist_test["input"][:5]})[0].shape == (5, 10)


def test_external_data_round_trip(tmp_path, resnet, mnist_test):
    out = io.save_model(resnet, tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 600_000
    assert out.stat().st_size < 50_000
    back = io.load_model(out)
    feeds = {"input": mnist_test["input"][:4]}
    np.testing.assert_array_equal(run(back, feeds)[0], run(resnet, feeds)[0])
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx", "ext.onnx.data"]  # no temporary files left


def test_external_data_outside_the_model_folder_is_refused(tmp_path, resnet):
    (tmp_path / "sub").mkdir()
    io.save_model(resnet, tmp_path / "sub" / "m.onnx", external_data=True)
    model = onnx.load(str(tmp_path / "sub" / "m.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../m.onnx.data"
    (tmp_path / "m.onnx.data").write_bytes(b"\0" * 10)
    (tmp_path / "sub" / "evil.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match="points outside the model's folder"):
        io.load_model(tmp_path / "sub" / "evil.onnx")


def test_missing_external_data_is_reported(tmp_path, resnet):
    io.save_model(resnet, tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(InputError, match="external data file 'm.onnx.data' is missing"):
        io.load_model(tmp_path / "m.onnx")


def test_large_models_switch_to_external_data(tmp_path, resnet, monkeypatch):
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1000)
    io.save_model(resnet, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()


def test_save_into_missing_folder_fails_cleanly(tmp_path, resnet):
    with pytest.raises(InputError, match="output folder does not exist"):
        io.save_model(resnet, tmp_path / "nope" / "m.onnx")


def test_read_arrays_from_folder(tmp_path):
    np.savez(tmp_path / "a.npz", input=np.zeros((2, 3)), labels=np.array([1, 2]))
    np.savez(tmp_path / "b.npz", input=np.ones((3, 3)), labels=np.array([3, 4, 5]))
    arrays = io.read_arrays(tmp_path)
    assert arrays["input"].shape == (5, 3) and arrays["labels"].tolist() == [1, 2, 3, 4, 5]


def test_read_arrays_refuses_pickles(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="not a readable numpy file"):
        io.read_arrays(tmp_path / "obj.npy")


def test_write_text_is_atomic_and_leaves_nothing_behind(tmp_path):
    io.write_text(tmp_path / "r.txt", "hello")
    assert os.listdir(tmp_path) == ["r.txt"] and (tmp_path / "r.txt").read_text() == "hello"


def test_reference_files_exist():
    for name in ("resnet", "vgg", "mobilenet", "mlp"):
        assert (MODELS / f"{name}.onnx").exists()


def test_a_model_over_the_limit_keeps_its_weights_on_disk_through_a_pipeline(tmp_path, resnet, mnist_test, monkeypatch):
    """Above the threshold the loader leaves the weights in their file (no raw bytes in memory),
    passes read them tensor by tensor, computed weights are spilled at export, sessions load from a
    file; the saved result equals the same pipeline run in memory."""
    feeds = {"input": mnist_test["input"][:8]}
    passes = lambda: [FoldBatchNorm(), PruneWeights(sparsity=0.3, criterion="magnitude")]
    expected = PassManager(passes(), latency=LatencyConfig(enabled=False)).run(resnet).model
    io.save_model(resnet, tmp_path / "m.onnx", external_data=True)
    before = (tmp_path / "m.onnx.data").read_bytes()
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 10_000)
    model = io.load_model(tmp_path / "m.onnx")
    assert io.needs_file(model) and not any(t.HasField("raw_data") and len(t.raw_data) > 1024
                                            for t in model.graph.initializer)
    result = PassManager(passes(), latency=LatencyConfig(enabled=False)).run(model)
    assert not any(len(t.raw_data) > 1024 for t in result.model.graph.initializer)   # spilled, not held
    (tmp_path / "out").mkdir()
    out = io.save_model(result.model, tmp_path / "out" / "r.onnx")
    assert (tmp_path / "out" / "r.onnx.data").exists() and (tmp_path / "m.onnx.data").read_bytes() == before
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1_800_000_000)
    np.testing.assert_allclose(run(io.load_model(out), feeds)[0], run(expected, feeds)[0], rtol=1e-5, atol=1e-5)


def test_a_large_single_file_model_is_worked_on_with_its_weights_in_a_scratch_file(tmp_path, resnet, mnist_test,
                                                                                  monkeypatch):
    """Above ON_DISK_BYTES the CLI moves a model's initializers to the process's scratch data file
    once it is checked (the original, kept all run long, holds no copy of them); saving puts them
    back inline: one file, as the user gave, equal to the same pipeline run in memory."""
    feeds = {"input": mnist_test["input"][:8]}
    passes = lambda: [FoldBatchNorm(), PruneWeights(sparsity=0.3, criterion="magnitude")]
    expected = PassManager(passes(), latency=LatencyConfig(enabled=False)).run(resnet).model
    path = io.save_model(resnet, tmp_path / "m.onnx")
    before = path.read_bytes()
    monkeypatch.setattr(io, "ON_DISK_BYTES", 10_000)
    model = io.weights_to_scratch(io.load_model(path))
    big = [t for t in model.graph.initializer if io.tensor_nbytes(t) >= io.EXTERNAL_MIN_BYTES]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data for t in big)
    result = PassManager(passes(), latency=LatencyConfig(enabled=False)).run(model)
    (tmp_path / "out").mkdir()
    out = io.save_model(result.model, tmp_path / "out" / "r.onnx")
    assert os.listdir(tmp_path / "out") == ["r.onnx"] and path.read_bytes() == before
    saved = onnx.load_model(str(out), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in saved.graph.initializer)
    np.testing.assert_allclose(run(saved, feeds)[0], run(expected, feeds)[0], rtol=1e-5, atol=1e-5)


def test_saving_with_external_data_leaves_the_model_as_it_was(tmp_path, resnet):
    model = onnx.ModelProto()
    model.CopyFrom(resnet)
    io.save_model(model, tmp_path / "m.onnx", external_data=True)
    assert model == resnet and io.model_size(model) == resnet.ByteSize()


def test_shape_inference_copies_no_weights():
    from onnxcompress.metrics import _shape_only_copy

    w = np.ones((256, 256), np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [helper.make_tensor_value_info("x", 1, [1, 256])],
        [helper.make_tensor_value_info("y", 1, [1, 256])], [onnx.numpy_helper.from_array(w, "w")]))
    assert _shape_only_copy(model).ByteSize() < 1000 < w.nbytes


@pytest.mark.parametrize("name, moves", [("constant_weights", False), ("if_branches", True), ("conv_op17", True)])
def test_the_cli_gives_the_same_file_with_weights_in_the_scratch_file(tmp_path, capsys, monkeypatch, name, moves):
    """`compress` with every model over ON_DISK_BYTES (lowered to 0): initializers, in bodies too,
    go to the scratch file and come back inline, Constant-node weights stay where they are; the
    output file is byte for byte the one of an in-memory run, alone in its folder."""
    from onnxcompress.cli import main

    src, calib = MODELS / "corpus" / f"{name}.onnx", MODELS / "corpus" / f"{name}.npz"
    outs, moved, to_scratch = [], [], io.weights_to_scratch

    def spy(model):
        out = to_scratch(model)
        moved.append(sum(t.data_location == onnx.TensorProto.EXTERNAL for t in out.graph.initializer))
        return out
    monkeypatch.setattr(io, "weights_to_scratch", spy)
    monkeypatch.setattr(io, "EXTERNAL_MIN_BYTES", 64)      # the corpus's weights are small
    for limit in (io.ON_DISK_BYTES, 0):
        monkeypatch.setattr(io, "ON_DISK_BYTES", limit)
        folder = tmp_path / str(limit)
        folder.mkdir()
        assert main(["compress", str(src), "-o", str(folder / "o.onnx"), "--passes", "fold-bn,prune-weights,quantize",
                     "--calib", str(calib), "--max-drop", "none", "--no-latency"]) == 0, capsys.readouterr().err
        assert os.listdir(folder) == ["o.onnx"]
        outs.append((folder / "o.onnx").read_bytes())
    assert moved[0] == 0 and (moved[1] > 0) == moves and outs[0] == outs[1]
