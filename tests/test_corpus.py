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

# Models today's data layouts cannot feed (a clean exit 2 naming the input is the expected answer).
REFUSED: dict[str, str] = {"scalar_input": "is a scalar", "gru_state2": "has its batch axis 'N' at position 1"}


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
    if name in REFUSED:
        assert code == 2 and stderr.count("\n") == 1 and REFUSED[name] in stderr, stderr
        assert not out.exists()
        return
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
    with np.load(calib) as z:
        feeds = {k: (z[k][:1] if z[k].ndim else z[k]) for k in z.files}
    outputs = session.run(None, feeds)
    assert all(np.all(np.isfinite(o)) for o in outputs if np.issubdtype(o.dtype, np.floating))
