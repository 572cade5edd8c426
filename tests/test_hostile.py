"""Hostile files: every bad input is answered with one line on stderr and exit code 2; no output
file, no traceback, the input untouched."""
import hashlib
import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import MODELS, tensor
from onnxcompress.cli import main


def _relu_model(**graph_kw) -> onnx.ModelProto:
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    g = helper.make_graph([node], "g", [tensor("x", ["N", 4])], [tensor("y", ["N", 4])], **graph_kw)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _gemm_model(w: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)
    g = helper.make_graph([node], "g", [tensor("x", ["N", w.shape[1]])], [tensor("y", ["N", w.shape[0]])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _external(tmp_path, location: str, length: int | None = None) -> onnx.ModelProto:
    """A Gemm whose 4x4 weight claims to live in `location` (external data)."""
    model = _gemm_model(np.ones((4, 4), np.float32))
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(64 if length is None else length))):
        entry = w.external_data.add()
        entry.key, entry.value = k, v
    return model


def cases(tmp_path):
    """name -> (path of the hostile model, a phrase the one-line error must contain)."""
    made = {}

    def put(name, data: bytes | onnx.ModelProto, phrase):
        path = tmp_path / f"{name.replace(' ', '_')}.onnx"
        path.write_bytes(data if isinstance(data, bytes) else data.SerializeToString())
        made[name] = (path, phrase)

    put("empty", b"", "empty")
    put("random bytes", np.random.default_rng(0).bytes(4096), "not a readable ONNX model")
    put("a tensor, not a model", numpy_helper.from_array(np.ones(3, np.float32), "t").SerializeToString(),
        "not a readable ONNX model")
    cyc = [helper.make_node("Relu", ["x", ], ["a"], name="r0"), helper.make_node("Add", ["a", "b"], ["c"], name="add"),
           helper.make_node("Relu", ["c"], ["b"], name="r1")]
    g = helper.make_graph(cyc, "g", [tensor("x", ["N", 4])], [tensor("c", ["N", 4])])
    put("cycle", helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), "is not a valid model")
    dup = _relu_model()
    dup.graph.node.append(helper.make_node("Relu", ["x"], ["y"], name="relu"))
    put("duplicate output name", dup, "is not a valid model")
    dom = _relu_model()
    dom.graph.node[0].domain = "com.example.unknown"
    dom.opset_import.append(helper.make_opsetid("com.example.unknown", 1))
    put("unknown opset domain", dom, "com.example.unknown")
    huge = _relu_model()
    huge.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 10 ** 12
    huge.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 10 ** 12
    put("terabyte dims", huge, "graph input 'x' declares dims [1000000000000, 4] (14.6 TiB per feed)")
    bad_meta = _relu_model()
    entry = bad_meta.metadata_props.add()
    entry.key, entry.value = "onnxcompress", "{not json"
    made["malformed metadata"] = None          # loads fine: a note, not an error (tested below)
    put("external data with ..", _external(tmp_path, "../outside.bin"), "outside the model's folder")
    put("external data absolute", _external(tmp_path, "/etc/passwd"), "outside the model's folder")
    (tmp_path / "short.bin").write_bytes(b"\0" * 16)
    put("external data too short", _external(tmp_path, "short.bin"), "external data")
    outside = tmp_path.parent / f"{tmp_path.name}_secret.bin"
    outside.write_bytes(b"\0" * 64)
    os.symlink(outside, tmp_path / "link.bin")
    put("external data through a symlink", _external(tmp_path, "link.bin"), "outside the model's folder")
    nameless = _external(tmp_path, "w.bin")     # hypothesis: one byte flip marks a weight external, no file named
    del nameless.graph.initializer[0].external_data[:]
    put("external data without a location", nameless, "tensor 'w' is marked as external data but names no file")
    return {k: v for k, v in made.items() if v is not None}


NAMES = ["empty", "random bytes", "a tensor, not a model", "cycle", "duplicate output name", "unknown opset domain",
         "terabyte dims", "external data with ..", "external data absolute", "external data too short",
         "external data through a symlink", "external data without a location"]


@pytest.mark.parametrize("name", NAMES)
def test_hostile_model_one_line_exit_2_nothing_written(tmp_path, capsys, name):
    path, phrase = cases(tmp_path)[name]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / "out.onnx"
    code = main(["compress", str(path), "-o", str(out), "--passes", "fold-bn", "--no-latency"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("onnxcompress: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert phrase in err
    assert sorted(os.listdir(tmp_path)) == before and not out.exists()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_malformed_metadata_is_a_note_not_a_crash(tmp_path, capsys):
    model = onnx.load(str(MODELS / "mlp.onnx"))
    entry = model.metadata_props.add()
    entry.key, entry.value = "onnxcompress", "{not json"
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    code = main(["compress", str(path), "-o", str(tmp_path / "o.onnx"), "--passes", "fold-bn", "--no-latency"])
    assert code == 0, capsys.readouterr().err


def test_nan_weights_are_named_in_the_report(tmp_path, capsys):
    w = np.ones((4, 4), np.float32)
    w[0, :3] = [np.nan, np.inf, -np.inf]
    path = tmp_path / "nan.onnx"
    path.write_bytes(_gemm_model(w).SerializeToString())
    code = main(["compress", str(path), "-o", str(tmp_path / "o.onnx"), "--passes", "fold-bn", "--no-latency"])
    out = capsys.readouterr().out
    assert code == 0
    assert "NaN or Inf values in 1 initializer(s): 'w' (3 of 16)" in out


_SMALL = _gemm_model(np.arange(16, dtype=np.float32).reshape(4, 4)).SerializeToString()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=600),
                 st.tuples(st.integers(0, len(_SMALL) - 1), st.integers(0, 255)).map(
                     lambda p: _SMALL[:p[0]] + bytes([p[1]]) + _SMALL[p[0] + 1:]),
                 st.integers(0, len(_SMALL)).map(lambda n: _SMALL[:n])))
def test_loader_fuzz_only_one_line_errors(tmp_path, capsys, data):
    """Random bytes, one byte changed, truncations: `inspect` either reads a model or says in one
    line why not (exit 2); nothing else."""
    path = tmp_path / "fuzz.onnx"
    path.write_bytes(data)
    code = main(["inspect", str(path)])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        assert err.startswith("onnxcompress: error:") and err.count("\n") == 1 and "Traceback" not in err


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(_SMALL) - 1), st.integers(0, 255)), min_size=1, max_size=3))
def test_compress_fuzz_only_one_line_errors(tmp_path, capsys, changes):
    """A small model with up to three bytes changed, through `compress` with two passes: it
    compresses (exit 0) or is refused in one line (exit 2). Found: names that are not UTF-8, a
    graph with no outputs (both crashed deep inside before)."""
    data = bytearray(_SMALL)
    for at, value in changes:
        data[at] = value
    path, out = tmp_path / "fuzz.onnx", tmp_path / "out.onnx"
    out.unlink(missing_ok=True)          # tmp_path is shared by the examples
    path.write_bytes(bytes(data))
    code = main(["compress", str(path), "-o", str(out), "--passes", "fold-bn,prune-weights", "--no-latency",
                 "--max-drop", "none"])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        assert err.startswith("onnxcompress: error:") and err.count("\n") == 1 and not out.exists()


def test_names_that_are_not_utf8_and_graphs_without_outputs_are_refused(tmp_path, capsys):
    model = _relu_model()
    model.graph.ClearField("output")
    bad = _SMALL.replace(b"fc", b"\xccc", 1)
    for name, data, phrase in (("noout", model.SerializeToString(), "the graph has no outputs"),
                               ("utf8", bad, "model.graph.node: name b'\\xccc' is not valid UTF-8")):
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(data)
        assert main(["compress", str(path), "-o", str(tmp_path / "o.onnx"), "--passes", "fold-bn"]) == 2
        err = capsys.readouterr().err
        assert phrase in err and err.count("\n") == 1, err


def test_deeply_nested_subgraphs_pass_through_every_pass(tmp_path, capsys):
    """If inside If, 30 deep (protobuf's own decoder stops near 33): every pass leaves it valid."""
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    body = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "b0", [], [out])
    for i in range(30):
        cond = helper.make_node("Constant", [], [f"c{i}"], value=numpy_helper.from_array(np.array(True)))
        leaf = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], f"l{i}", [], [out])
        body = helper.make_graph([cond, helper.make_node("If", [f"c{i}"], ["y"], then_branch=body, else_branch=leaf)],
                                 f"b{i + 1}", [], [out])
    model = helper.make_model(helper.make_graph(list(body.node), "g", [tensor("x", ["N", 4])], [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    path, data = tmp_path / "nested.onnx", tmp_path / "x.npz"
    path.write_bytes(model.SerializeToString())
    np.savez(data, x=np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    code = main(["compress", str(path), "-o", str(tmp_path / "o.onnx"), "--calib", str(data), "--no-latency",
                 "--max-drop", "none", "--passes", "fold-bn,prune-weights,prune-channels,quantize,distill"])
    assert code == 0, capsys.readouterr().err
    assert onnx.load(str(tmp_path / "o.onnx")).graph.node[1].op_type == "If"


def test_fuzz_findings_stay_fixed(tmp_path, capsys):
    """Two byte flips hypothesis found: an unknown input element type (crashed the size check) and
    an input dim the Gemm cannot take (loads, then fails in onnxruntime's run)."""
    for at, value, command, phrase in ((131, 29, "inspect", ""),
                                       (141, 16, "compress", "the model does not run in onnxruntime on inputs of its declared shapes")):
        data = bytearray(_SMALL)
        data[at] = value
        path = tmp_path / "f.onnx"
        path.write_bytes(bytes(data))
        args = [command, str(path)] + (["-o", str(tmp_path / "o.onnx"), "--passes", "fold-bn", "--no-latency"]
                                       if command == "compress" else [])
        code = main(args)
        err = capsys.readouterr().err
        assert code in (0, 2) and phrase in err and err.count("\n") <= 1, err
