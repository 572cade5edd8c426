import json
import os
import re
import subprocess
import sys

import onnx
import pytest
from onnx import helper

from conftest import MODELS, tensor
from onnxcompress.cli import main

RESNET = str(MODELS / "resnet.onnx")
TEST = str(MODELS / "mnist_test.npz")
CALIB = str(MODELS / "mnist_calib.npz")


def cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_writes_model_report_and_table(tmp_path, capsys):
    out, report = tmp_path / "r.onnx", tmp_path / "r.json"
    code, stdout, err = cli(capsys, "compress", RESNET, "-o", str(out), "--passes", "fold-bn,prune-weights(sparsity=0.5)",
                            "--calib", CALIB, "--eval", TEST, "--report", str(report), "--runs", "3", "--max-drop", "none")
    assert code == 0, err
    assert "fold-bn" in stdout and "prune-weights" in stdout and "accuracy" in stdout
    assert "budget: accuracy, no limit" in stdout
    steps = json.loads(report.read_text())["steps"]
    assert [s["pass"] for s in steps] == ["original", "fold-bn", "prune-weights"]
    assert steps[2]["sparsity"] > 0.45 and steps[2]["accuracy"] > 90
    onnx.checker.check_model(str(out))


def test_default_budget_rolls_back_a_destructive_pass(tmp_path, capsys):
    """Without --max-drop, a budget of 1 point protects the user: prune-weights(0.9) is rolled back."""
    out = tmp_path / "r.onnx"
    code, stdout, err = cli(capsys, "compress", RESNET, "-o", str(out), "--passes", "prune-weights(sparsity=0.9)",
                            "--eval", TEST, "--no-latency")
    assert code == 1 and "budget of 1 points of accuracy not met" in err and "'none' lifts it" in err
    assert "rolled back" in stdout and "budget: accuracy, at most 1 points below the original" in stdout
    assert out.exists()   # holds the passes that fit: here, none


def test_recipe_and_budget_failure_exit_1(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('max_drop = 0.5\n[[pass]]\nname = "prune-weights"\nsparsity = 0.97\n')
    code, stdout, err = cli(capsys, "compress", RESNET, "-o", str(tmp_path / "o.onnx"), "--recipe", str(recipe),
                            "--eval", TEST, "--no-latency")
    assert code == 1
    assert "rolled back" in stdout and err.count("\n") == 1 and "budget" in err


def bad_models(tmp_path):
    data = (MODELS / "resnet.onnx").read_bytes()
    (tmp_path / "text.onnx").write_bytes(b"this is not an onnx model at all\n" * 10)
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 3])
    node = helper.make_node("Relu", ["undefined"], ["y"])
    bad = helper.make_model(helper.make_graph([node], "g", [tensor("x", [1])], [tensor("y", [1])]),
                            opset_imports=[helper.make_opsetid("", 17)])
    (tmp_path / "invalid.onnx").write_bytes(bad.SerializeToString())
    import numpy as np
    with np.load(TEST) as z:
        np.savez(tmp_path / "flat.npz", input=z["input"].reshape(len(z["input"]), -1))
        np.savez(tmp_path / "ints.npz", input=z["input"].astype(np.int32))
    return {
        "missing": ([str(tmp_path / "nope.onnx")], "no such file"),
        "not onnx": ([str(tmp_path / "text.onnx")], "not a readable ONNX model"),
        "truncated": ([str(tmp_path / "truncated.onnx")], "not a readable ONNX model"),
        "checker": ([str(tmp_path / "invalid.onnx")], "is not a valid model: ONNX checker"),
        "provider": ([RESNET, "--providers", "NoSuchExecutionProvider"], "execution provider 'NoSuchExecutionProvider' is not available"),
        "unknown pass": ([RESNET, "--passes", "shrink"], "unknown pass 'shrink'"),
        "bad option": ([RESNET, "--passes", "prune-weights(sparsity='x')"], "must be float"),
        "bad data": ([RESNET, "--passes", "fold-bn", "--eval", str(tmp_path / "text.onnx")], "not a readable numpy file"),
        "same path": ([RESNET, "--passes", "fold-bn", "-o", RESNET], "never overwrites its input"),
        "data shape": ([RESNET, "--eval", str(tmp_path / "flat.npz")], "the model expects rank 4"),
        "data dtype": ([RESNET, "--calib", str(tmp_path / "ints.npz")], "is int32; the model expects float32"),
    }


@pytest.mark.parametrize("case", ["missing", "not onnx", "truncated", "checker", "provider", "unknown pass",
                                  "bad option", "bad data", "same path", "data shape", "data dtype"])
def test_bad_input_exit_2_one_line_no_output(tmp_path, capsys, case):
    args, message = bad_models(tmp_path)[case]
    out = tmp_path / "out.onnx"
    if "-o" not in args:
        args = [*args, "-o", str(out)]
    if "--passes" not in args:
        args = [*args, "--passes", "fold-bn"]
    before = sorted(os.listdir(tmp_path))
    code, stdout, err = cli(capsys, "compress", *args)
    assert code == 2
    assert message in err and err.startswith("onnxcompress: error:") and err.count("\n") == 1
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_debug_shows_the_cause_of_an_input_error(tmp_path, capsys):
    args, _ = bad_models(tmp_path)["checker"]
    base = ["compress", *args, "-o", str(tmp_path / "out.onnx"), "--passes", "fold-bn"]
    code, _, err = cli(capsys, *base)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    code, _, err = cli(capsys, "--debug", *base)
    assert code == 2 and err.startswith("onnxcompress: error:") and "is not a valid model" in err
    assert "Traceback" in err and "ValidationError" in err and "direct cause" in err  # the checker's own error
    assert not (tmp_path / "out.onnx").exists()


def test_inspect_lists_layers_and_applicable_passes(capsys):
    code, out, _ = cli(capsys, "inspect", RESNET)
    assert code == 0
    assert "Conv x" in out and "BatchNormalization x15" in out
    assert "fold-bn: " in out and "prune-weights: " in out and "MACs" in out
    assert "channel groups (9 of 10 prunable by prune-channels)" in out and "frozen: graph output" in out


def test_bench_shows_ratios(tmp_path, capsys):
    code, out, _ = cli(capsys, "bench", RESNET, str(MODELS / "vgg.onnx"), "--eval", TEST, "--runs", "3")
    assert code == 0 and "resnet.onnx" in out and "vgg.onnx" in out and "(1.00x)" in out


def test_passes_lists_options(capsys):
    code, out, _ = cli(capsys, "passes")
    assert code == 0 and "prune-weights:" in out and "sparsity: float = 0.5" in out


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "onnxcompress.cli", "compress", str(tmp_path / "x.onnx"), "-o",
                           str(tmp_path / "y.onnx"), "--passes", "fold-bn"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"onnxcompress: error: no such file: {tmp_path / 'x.onnx'}"


def test_sensitivity_table_allocation_and_report(tmp_path, capsys):
    report = tmp_path / "s.json"
    code, out, err = cli(capsys, "sensitivity", RESNET, "--calib", CALIB, "--eval", TEST, "--samples", "100",
                         "--ratios", "0.5", "--round-to", "8", "--target-macs", "0.7", "--report", str(report))
    assert code == 0, err
    assert "/blocks/blocks.4/a/a.0/Conv" in out and "accuracy @0.5" in out
    # residual branches are also tried whole (@1); the other groups show no trial there
    assert "accuracy @1" in out and "MACs @1" in out
    assert re.search(r"/blocks/blocks.1/a/a.0/Conv +16 .* 0\.91x +0\.82x", out)
    assert re.search(r"/stem/stem.0/Conv +16 .* - +0\.79x +-", out)
    assert "allocation for macs <= 0.7x: met" in out and "pipeline: prune-channels(ratios=" in out
    data = json.loads(report.read_text())
    assert data["allocation"]["measured"]["target_met"] is True
    assert len(data["sensitivity"]["groups"]) == 9


def test_sensitivity_rejects_a_bad_criterion(capsys):
    code, _, err = cli(capsys, "sensitivity", RESNET, "--calib", CALIB, "--criterion", "magic")
    assert code == 2 and "option 'criterion' must be" in err


def test_default_budget_protects_a_sequence_model_by_its_decoded_strings(tmp_path, capsys):
    """A small CTC-style model [batch, time, classes] without labels: the default budget judges
    whole decoded sequences, and rolls back a pass that destroys them."""
    import numpy as np
    from conftest import make_model, rand

    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Add", ["z", "b"], ["l"]),
             helper.make_node("Softmax", ["l"], ["y"], axis=-1)]
    model = make_model(nodes, [tensor("x", ["N", 12, 16])], [tensor("y", ["N", 12, 5])],
                       {"w": rand(16, 5, seed=1), "b": rand(5, seed=2)})
    onnx.save(model, tmp_path / "seq.onnx")
    np.savez(tmp_path / "seq.npz", x=rand(64, 12, 16, seed=3))
    code, stdout, err = cli(capsys, "compress", str(tmp_path / "seq.onnx"), "-o", str(tmp_path / "o.onnx"),
                            "--passes", "prune-weights(sparsity=0.9)", "--eval", str(tmp_path / "seq.npz"),
                            "--no-latency")
    assert code == 1 and "points of sequence_agreement not met" in err
    assert "rolled back" in stdout and "budget: sequence_agreement, at most 1 points" in stdout
