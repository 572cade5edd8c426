"""Every registered pass, with its default options, on every model of the corpus (`models/corpus/`,
built by `models/corpus.py`: recurrent nets, If/Loop bodies, transformers, conv nets at opsets
11-21, Constant-node weights, initializers listed as inputs, QDQ and integer models, a fixed batch,
inputs without a batch axis, several inputs and outputs, token ids, external data).

Run through the CLI in-process, with the corpus calibration data and no budget (`--max-drop none`,
so that the output file holds what the pass did). A pass may leave any part of a model alone, but
must say so: no traceback, no internal error, no failed pass, an output that onnxruntime loads and
runs with the graph inputs and outputs of the original, and a note whenever nothing changed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import MODELS
from onnxcompress import default_registry
from onnxcompress.cli import main

CORPUS = MODELS / "corpus"
NAMES = sorted(p.name[:-len(".onnx")] for p in CORPUS.glob("*.onnx"))
PASSES = [c.name for c in default_registry()]



def test_corpus_is_complete_and_small():
    assert len(NAMES) >= 21, NAMES
    for name in NAMES:
        assert (CORPUS / f"{name}.npz").is_file(), name
    for f in CORPUS.iterdir():
        assert f.stat().st_size < 200_000, f


def _io(values, skip=frozenset()) -> list[tuple]:
    out = []
    for v in values:
        if v.name in skip:
            continue
        tt = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim) \
            if tt.HasField("shape") else None
        out.append((v.name, tt.elem_type, dims))
    return out


def _signature(m: onnx.ModelProto, outputs: int | None = None) -> tuple[list, list]:
    """The inputs a caller feeds (initializers listed as inputs are constants) and the first
    `outputs` outputs (a pass may append outputs, as early-exit's "exit_index")."""
    inits = {t.name for t in m.graph.initializer}
    return _io(m.graph.input, inits), _io(m.graph.output)[:outputs]


@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("name", NAMES)
def test_every_pass_on_every_corpus_model(name, pass_name, tmp_path, capsys):
    src, calib = CORPUS / f"{name}.onnx", CORPUS / f"{name}.npz"
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["compress", str(src), "-o", str(out), "--passes", pass_name, "--calib", str(calib),
                 "--max-drop", "none", "--no-latency", "--report", str(report)])
    stdout, stderr = capsys.readouterr()
    text = stdout + stderr
    assert "Traceback" not in text, text
    assert "internal error" not in stderr, stderr
    assert code in (0, 1), stderr
    assert " failed: " not in stderr, stderr          # a pass raised or produced a broken model
    assert code == 0, stderr                          # no budget: nothing else makes a run fail

    steps = json.loads(report.read_text())["steps"]
    step = steps[-1]
    assert step["pass"] == pass_name
    if step["status"] == "unchanged":
        assert step["notes"], f"{pass_name} left {name} unchanged without saying why"

    assert out.is_file()
    original, result = onnx.load(str(src)), onnx.load(str(out))
    assert _signature(result, len(original.graph.output)) == _signature(original)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with np.load(calib) as z:                        # the first sample, or the first feed
        per_feed = "__layout__" in z.files
        feeds = {k: np.asarray(z[k][0] if per_feed else z[k][:1]) for k in z.files if k != "__layout__"}
    outputs = session.run(None, feeds)
    assert all(np.all(np.isfinite(o)) for o in outputs if np.issubdtype(o.dtype, np.floating))


def test_inputs_without_a_batch_axis_first_are_fed_as_complete_feeds(tmp_path, capsys):
    """gru_state2 reads h0 [layers=2, batch, hidden]. Cut along axis 0 as a batch its data would
    mix samples into layers: the batch layout refuses it by name and points to the feeds layout; a
    folder of one .npz per feed with --layout feeds runs (each feed as it is, never concatenated),
    and so does the corpus file, which declares the layout itself."""
    src, data = CORPUS / "gru_state2.onnx", np.load(CORPUS / "gru_state2.npz")
    batch = tmp_path / "batch.npz"
    np.savez(batch, x=np.concatenate(data["x"]), h0=np.concatenate(data["h0"]))   # [samples, ...]: not h0's layout
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i in range(len(data["x"])):
        np.savez(folder / f"{i:03d}.npz", x=data["x"][i], h0=data["h0"][i])
    runs = {}
    for key, calib, extra in (("batch", batch, []), ("folder", folder, ["--layout", "feeds"])):
        out = tmp_path / f"{key}.onnx"
        runs[key] = main(["compress", str(src), "-o", str(out), "--passes", "distill", "--calib", str(calib),
                          "--max-drop", "none", "--no-latency", *extra]), capsys.readouterr().err, out
    code, err, out = runs["batch"]
    assert code == 2 and err.count("\n") == 1 and not out.exists()
    assert "input 'h0' [2, 'N', 4] has its batch axis 'N' at position 1" in err and "--layout feeds" in err
    code, err, out = runs["folder"]
    assert code == 0, err
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": data["x"][0], "h0": data["h0"][0]})[0].shape == (2, 2, 4)


@pytest.mark.parametrize("passes", ["prune-channels(ratio=0.5, round_to=1)", "distill(layers='all')", "quantize"])
def test_a_sequence_first_recognizer_on_text_lines_of_different_widths(passes, tmp_path, capsys):
    """The issue's case: a conv + LSTM recognizer with the batch fixed to 1 and a sequence-first LSTM
    [time, batch, features] inside, calibrated on lines of four widths (a folder of one .npz per
    feed): each line runs as it is, and the passes compress it with no reshape assuming axis 0."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "lines"
    folder.mkdir()
    for i, width in enumerate([16, 24, 32, 40] * 6):
        np.savez(folder / f"{i:03d}.npz", x=rng.standard_normal((1, 1, 16, width)).astype(np.float32))
    out = tmp_path / "out.onnx"
    code = main(["compress", str(CORPUS / "crnn_seqfirst.onnx"), "-o", str(out), "--passes", passes, "--calib",
                 str(folder), "--layout", "feeds", "--max-drop", "none", "--no-latency"])
    stdout, stderr = capsys.readouterr()
    assert code == 0 and "Traceback" not in stdout + stderr, stderr
    assert " applied " in stdout, stdout
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": rng.standard_normal((1, 1, 16, 36)).astype(np.float32)})[0].shape == (9, 1, 10)
