"""Model validation: the full ONNX checker, strict shape inference and an onnxruntime session."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor

from . import io
from .runtime import DEFAULT_PROVIDERS, SERIALIZED_LIMIT, make_session, session_from_file

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


def _check_file(model: onnx.ModelProto, providers: Sequence[str], session: bool) -> None:
    """Checker, strict shape inference and a session, all through one file with external data:
    the in-memory checks serialize and parse the whole model (several copies of every weight at
    once), and a model over io.EXTERNAL_DATA_THRESHOLD cannot be serialized into one protobuf."""
    with io.scratch_dir() as d:
        path = io.save_model(model, d / "model.onnx", external_data=True)
        with _check("ONNX checker"):
            onnx.checker.check_model(str(path), full_check=True)
        with _check("shape inference"):
            onnx.shape_inference.infer_shapes_path(str(path), str(d / "inferred.onnx"), check_type=True,
                                                   strict_mode=True)
        if session:
            with _check("onnxruntime"):
                session_from_file(path, providers)


MAX_INPUT_BYTES = 1 << 36    # 64 GiB: a graph input declaring more than this cannot be fed


def _check_structure(model: onnx.ModelProto) -> None:
    """What the checker lets through and onnxruntime or graph export then trip over: a graph with
    no outputs, names that are not UTF-8 (protobuf hands those over as bytes)."""
    if not model.graph.output:
        raise ValidationError("the graph has no outputs")
    _check_strings(model, "model")


def _check_strings(msg, where: str) -> None:
    for fd, value in msg.ListFields():
        repeated = not isinstance(value, (str, bytes)) and not hasattr(value, "ListFields")
        items = value if repeated else [value]
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            for item in items:
                name = getattr(item, "name", "") if fd.name in ("node", "input", "output", "initializer") else ""
                _check_strings(item, f"{where}.{fd.name}" + (f" '{name}'" if isinstance(name, str) and name else ""))
        elif fd.type == FieldDescriptor.TYPE_STRING:
            for item in items:
                if isinstance(item, bytes):
                    raise ValidationError(f"{where}: {fd.name} {item!r} is not valid UTF-8")


def _check_declared_inputs(model: onnx.ModelProto) -> None:
    """Fixed input dims claiming terabytes would make every measurement fail deep inside onnxruntime."""
    for inp in model.graph.input:
        tt = inp.type.tensor_type
        dims = [d.dim_value for d in tt.shape.dim if d.HasField("dim_value")]
        if not dims or not tt.elem_type:
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
        except (KeyError, TypeError):   # not a tensor type onnx knows: the checker says so next
            continue
        size = int(np.prod([max(d, 1) for d in dims], dtype=object)) * itemsize
        if size > MAX_INPUT_BYTES:
            raise ValidationError(f"graph input '{inp.name}' declares dims {dims} ({size / 2**40:.1f} TiB per feed); "
                                  f"more than {MAX_INPUT_BYTES >> 30} GiB cannot be fed")


def validate_model(model: onnx.ModelProto, providers: Sequence[str] = DEFAULT_PROVIDERS,
                   session: bool = True) -> None:
    """Raise ValidationError unless the model passes the checker, shape inference and loads in
    onnxruntime, and no graph input declares more data than any feed could hold."""
    _check_structure(model)
    _check_declared_inputs(model)
    if not io.serializable_below(model, SERIALIZED_LIMIT):
        _check_file(model, providers, session)
        return
    # a small model in memory: its serialized copies are small, and a file costs more than the checks
    with _check("ONNX checker"):
        onnx.checker.check_model(model, full_check=True)
    with _check("shape inference"):
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    if session:
        with _check("onnxruntime"):
            make_session(model, providers)
