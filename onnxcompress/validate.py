"""Model validation: the full ONNX checker, strict shape inference and an onnxruntime session."""
from __future__ import annotations

from typing import Sequence

import onnx

from . import io
from .runtime import DEFAULT_PROVIDERS, make_session

__all__ = ["ValidationError", "validate_model"]


class ValidationError(Exception):
    """The model is invalid; the message says which check failed, in one line."""


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def validate_model(model: onnx.ModelProto, providers: Sequence[str] = DEFAULT_PROVIDERS,
                   session: bool = True) -> None:
    """Raise ValidationError unless the model passes the checker, shape inference and loads in onnxruntime."""
    try:
        if model.ByteSize() > io.EXTERNAL_DATA_THRESHOLD:
            with io.scratch_dir() as d:
                path = io.save_model(model, d / "model.onnx", external_data=True)
                onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # the checker raises several types
        raise ValidationError(f"ONNX checker: {_first_line(e)}") from None
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:
        raise ValidationError(f"shape inference: {_first_line(e)}") from None
    if session:
        try:
            make_session(model, providers)
        except Exception as e:
            raise ValidationError(f"onnxruntime: {_first_line(e)}") from None
