"""Shared test helpers: paths to the reference models, small graphs built in code, and one helper
that compares onnxruntime outputs of two models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper


ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def max_abs_diff(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """Largest absolute difference over all outputs of two models on the same feeds."""
    return max(float(np.max(np.abs(x - y))) for x, y in zip(run(a, feeds), run(b, feeds)))


def make_model(nodes, inputs, outputs, initializers, opset: int = 17) -> onnx.ModelProto:
    """A checked model from onnx.helper parts; initializers are given as {name: array}."""
    graph = helper.make_graph(nodes, "test", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def rand(*shape, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def bn_params(c: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"scale": rng.uniform(0.5, 2, c).astype(np.float32), "bias": rng.normal(size=c).astype(np.float32),
            "mean": rng.normal(size=c).astype(np.float32), "var": rng.uniform(0.5, 2, c).astype(np.float32)}


@pytest.fixture(scope="session")
def mnist_test() -> dict[str, np.ndarray]:
    with np.load(MODELS / "mnist_test.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def calib():
    """300 labeled calibration digits (a Dataset)."""
    from onnxcompress import Dataset

    with np.load(MODELS / "mnist_calib.npz") as z:
        return Dataset({"input": z["input"][:300]}, z["labels"][:300])


@pytest.fixture(scope="session")
def test_set(mnist_test):
    """500 labeled held-out digits (a Dataset)."""
    from onnxcompress import Dataset

    return Dataset({"input": mnist_test["input"][:500]}, mnist_test["labels"][:500])


@pytest.fixture(scope="session")
def resnet() -> onnx.ModelProto:
    return onnx.load(str(MODELS / "resnet.onnx"))


@pytest.fixture
def conv_bn_model() -> onnx.ModelProto:
    """input[N,3,8,8] -> Conv(4, 3x3, bias) -> BatchNormalization -> Relu -> output."""
    p = bn_params(4, 1)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"], name="bn", epsilon=1e-3),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    return make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 4, 8, 8])],
                      {"w": rand(4, 3, 3, 3), "b": rand(4, seed=2), **p})


def apply_pass(p, model: onnx.ModelProto, ctx=None):
    """Run one pass outside the manager; return (new model, PassResult). The new model is checked."""
    from onnxcompress import Context, graph as G

    result = p.run(G.to_graph(model), ctx or Context())
    new = G.to_model(G.tidy(result.graph), like=model)
    onnx.checker.check_model(new, full_check=True)
    return new, result


def scripted_sessions(monkeypatch, costs: dict[str, float]) -> list[str]:
    """onnxruntime sessions for the latency timings, in `costs` order (name -> clock units a run),
    under a scripted clock that only their runs advance; returns the order the runs happen in."""
    from onnxcompress import metrics as M
    now, order = [0.0], []

    class Session:
        def __init__(self, name, cost):
            self.name, self.cost = name, cost

        def run(self, outputs, feed):
            order.append(self.name)
            now[0] += self.cost

    made = iter([Session(n, c) for n, c in costs.items()])
    monkeypatch.setattr(M, "make_session", lambda *a, **k: next(made))
    monkeypatch.setattr(M, "fixed_batch", lambda session: None)
    monkeypatch.setattr(M.time, "perf_counter", lambda: now[0])
    return order
