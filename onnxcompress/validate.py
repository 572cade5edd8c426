"""Model validation: the full ONNX checker, strict shape inference and an onnxruntime session."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import onnx

from . import io
from .runtime import DEFAULT_PROVIDERS, make_session

__all__ = ["ValidationError", "validate_model"]


class ValidationError(Exception):
    """The model is invalid; the message says which check failed, in one line. The failure the check
    raised is kept as the cause (`__cause__`) for --debug."""


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _check(what: str) -> Iterator[None]:
    """Turn any failure inside into a ValidationError naming the check, keeping the failure as cause."""
    try:
        yield
    except Exception as e:  # the checker, inference and onnxruntime raise several types
        raise ValidationError(f"{what}: {_first_line(e)}") from e


def _check_file(model: onnx.ModelProto) -> None:
    """Checker and strict shape inference through a file with external data: a model over
    io.EXTERNAL_DATA_THRESHOLD cannot be serialized into one protobuf for the in-memory checks."""
    with io.scratch_dir() as d:
        path = io.save_model(model, d / "model.onnx", external_data=True)
        with _check("ONNX checker"):
            onnx.checker.check_model(str(path), full_check=True)
        with _check("shape inference"):
            onnx.shape_inference.infer_shapes_path(str(path), str(d / "inferred.onnx"), check_type=True,
                                                   strict_mode=True)


def validate_model(model: onnx.ModelProto, providers: Sequence[str] = DEFAULT_PROVIDERS,
                   session: bool = True) -> None:
    """Raise ValidationError unless the model passes the checker, shape inference and loads in onnxruntime."""
    if model.ByteSize() > io.EXTERNAL_DATA_THRESHOLD:
        _check_file(model)
    else:
        with _check("ONNX checker"):
            onnx.checker.check_model(model, full_check=True)
        with _check("shape inference"):
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    if session:
        with _check("onnxruntime"):
            make_session(model, providers)
