import onnx
import pytest
from onnx import helper

from conftest import make_model, rand, tensor
from onnxcompress import io, validate
from onnxcompress.validate import ValidationError, validate_model


@pytest.fixture
def matmul_model():
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", [2, 16])], [tensor("y", [2, 16])],
                      {"w": rand(16, 16)})


def broken(model):
    """The model with an output shape that contradicts what MatMul produces."""
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 3
    return bad


@pytest.fixture(params=[False, True], ids=["in memory", "through a file"])
def large(request, monkeypatch):
    """Each test runs on both paths: in memory, and as if the model were over the external-data
    threshold. Yields the keyword arguments of every infer_shapes_path call."""
    calls = []
    if request.param:
        monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 100)
        infer_path = onnx.shape_inference.infer_shapes_path
        monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", lambda *a, **k: calls.append(k) or infer_path(*a, **k))
    return request.param, calls


def test_valid_model_passes_and_loads_in_onnxruntime(matmul_model, large):
    through_file, calls = large
    validate_model(matmul_model)
    assert calls == ([{"check_type": True, "strict_mode": True}] if through_file else [])


def test_failure_names_the_check_and_keeps_the_cause(matmul_model, large):
    with pytest.raises(ValidationError, match=r"^ONNX checker: .*differ") as info:
        validate_model(broken(matmul_model))
    assert isinstance(info.value.__cause__, Exception) and "differ" in str(info.value.__cause__)
    assert "\n" not in str(info.value)


def test_session_failure_keeps_the_cause(matmul_model, monkeypatch, large):
    cause = RuntimeError("no kernel\nsecond line")
    # a small model's session is built from memory, a large one's from the checked file
    monkeypatch.setattr(validate, "session_from_file" if large[0] else "make_session",
                        lambda *a, **k: (_ for _ in ()).throw(cause))
    with pytest.raises(ValidationError, match=r"^onnxruntime: no kernel$") as info:
        validate_model(matmul_model)
    assert info.value.__cause__ is cause
    validate_model(matmul_model, session=False)
