"""All file reading and writing in onnxcompress happens here.

Models are loaded with their external data (refusing locations that escape the model's folder) and
saved atomically: everything is written into a temporary folder beside the target, then renamed into
place, so a failed run never leaves a half-written file and never touches its input.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
from google.protobuf.message import DecodeError, Message

from .errors import InputError

log = logging.getLogger(__name__)

# Protobuf cannot serialize a message of 2 GiB or more; above this we switch to external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

# Tensors of at least this many bytes go to the data file when a model is saved with external data.
EXTERNAL_MIN_BYTES = 1024

# The CLI works on a model whose weights weigh more than this with them moved to this process's scratch
# data file (tensors refer to it, as those of a model over the protobuf limit refer to theirs): the
# original model is kept through the whole run (teacher, reference, rollback) and would otherwise
# hold a copy of every weight in memory beside the pass's own (25M Transformer quantize: 100 MB of
# its peak). Saving puts them back inline.
ON_DISK_BYTES = 64 << 20
_ALIGN = 4096      # offsets in a data file we write (onnxruntime maps aligned ones into memory)

__all__ = [
    "load_model", "save_model", "read_arrays", "read_text", "write_text", "write_bytes", "write_json",
    "scratch_dir", "EXTERNAL_DATA_THRESHOLD", "tensor_nbytes", "payload_bytes", "needs_file", "model_size",
    "read_tensor", "tensor_bytes", "spill", "map_tensors", "copy_fields", "weights_to_scratch", "ON_DISK_BYTES",
]


def _existing_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file: {p}")
    if p.is_dir():
        raise InputError(f"{p} is a folder, expected a file")
    return p


def _external_locations(model: onnx.ModelProto) -> list[str]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    locs = []
    for t in _get_all_tensors(model):
        if uses_external_data(t):
            locs += [e.value for e in t.external_data if e.key == "location"]
    return locs


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an .onnx file and its external data; raise InputError with a one-line reason if it is unusable."""
    p = _existing_file(path)
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise InputError(f"{p} is not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'decode failed'})") from e
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise InputError(f"{p} is not an ONNX model (no graph found)")
    base = p.resolve().parent
    from onnx.external_data_helper import _get_all_tensors

    for t in _get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL and "location" not in _external_info(t):
            raise InputError(f"{p}: tensor '{t.name}' is marked as external data but names no file")
    for loc in _external_locations(model):
        target = (base / loc).resolve()
        if base not in target.parents:
            raise InputError(f"{p}: external data location '{loc}' points outside the model's folder")
        if not target.is_file():
            raise InputError(f"{p}: external data file '{loc}' is missing")
    if _external_locations(model):
        if payload_bytes(model) > EXTERNAL_DATA_THRESHOLD:   # too large for one message: read tensor by tensor
            _pin_locations(model, base, p)
            return model
        try:
            onnx.load_external_data_for_model(model, str(base))
        except (OSError, ValueError) as e:
            raise InputError(f"{p}: cannot read external data ({e})") from e
    return model


def weights_to_scratch(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its initializers of EXTERNAL_MIN_BYTES or more moved to this process's scratch
    data file when its weights pass ON_DISK_BYTES (else the model itself): for the CLI, once the
    model is checked. Such a model refers to its data by absolute location, which onnxruntime
    refuses from bytes: `save_model` (which puts the data back inline) or the core's sessions read
    it. Constant-node values stay inline (the corpus model with Constant-node weights failed every
    pass with them in a file)."""
    if payload_bytes(model) <= ON_DISK_BYTES:
        return model
    data = _spill_file()
    try:
        return map_tensors(model, lambda t: data.put(t) if tensor_nbytes(t) >= EXTERNAL_MIN_BYTES
                           and t.data_type != onnx.TensorProto.STRING else t, attributes=False)
    finally:
        data.f and data.f.flush()


def _external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _pin_locations(model: onnx.ModelProto, base: Path, p: Path) -> None:
    """Leave the weights of a model over the protobuf limit in their files: every external tensor's
    location becomes absolute (checked to lie inside the model's folder, data long enough), and
    `read_tensor` reads it when a pass asks for it. Saving always writes such a model's data anew."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    for t in _get_all_tensors(model):
        if not uses_external_data(t):
            continue
        info = _external_info(t)
        target = (base / info["location"]).resolve()
        offset, length = int(info.get("offset", 0) or 0), tensor_nbytes(t)
        if offset + length > target.stat().st_size:
            raise InputError(f"{p}: external data for '{t.name}' is shorter than declared "
                             f"({target.stat().st_size} bytes, needs {offset + length})")
        for e in t.external_data:
            if e.key == "location":
                e.value = str(target)


def _dims_bytes(t: onnx.TensorProto) -> int:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 8
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, without serializing it (protobuf's ByteSize serializes the whole
    message: a second copy of the model, and an error at 2 GiB)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        length = _external_info(t).get("length")
        return int(length) if length else _dims_bytes(t)
    return _dims_bytes(t) if t.HasField("raw_data") else t.ByteSize()


def payload_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every tensor's data in the model (initializers, Constant values, bodies), inline or external."""
    from onnx.external_data_helper import _get_all_tensors

    return sum(tensor_nbytes(t) for t in _get_all_tensors(model))


def needs_file(model: onnx.ModelProto) -> bool:
    """True when a model cannot go through one serialized message: too large, or its weights are
    kept in files (a model over the limit as loaded, or as a pass left it)."""
    from onnx.external_data_helper import _get_all_tensors

    return payload_bytes(model) > EXTERNAL_DATA_THRESHOLD or any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in _get_all_tensors(model))


def serializable_below(model: onnx.ModelProto, limit: int) -> bool:
    """True when the model's weights are all inline and weigh less than `limit` bytes (below
    EXTERNAL_DATA_THRESHOLD): it can be handed around serialized, and its copies are small."""
    from onnx.external_data_helper import _get_all_tensors

    tensors = list(_get_all_tensors(model))
    return (all(t.data_location != onnx.TensorProto.EXTERNAL for t in tensors)
            and sum(tensor_nbytes(t) for t in tensors) < min(limit, EXTERNAL_DATA_THRESHOLD))


def model_size(model: onnx.ModelProto) -> int:
    """Size of the serialized model with every weight inline (the structure plus the tensors' data
    when the model is too large to serialize)."""
    if not needs_file(model):
        return _encoded_size(model)
    return payload_bytes(model) + map_tensors(model, lambda t: _header(t)).ByteSize()


_HOLDERS = frozenset({"graph", "initializer", "node", "attribute", "t", "tensors", "g", "graphs"})  # may hold weights


def _encoded_size(msg: Message) -> int:
    """msg.ByteSize(), exactly, without serializing the weights: protobuf's ByteSize encodes the
    whole message (two more copies of a model's weights at once). A tensor's raw data is counted
    from its length; the fields that may hold tensors, message by message; the rest by ByteSize."""
    if isinstance(msg, onnx.TensorProto):
        header = onnx.TensorProto()
        copy_fields(msg, header, frozenset({"raw_data"}))
        return header.ByteSize() + (_field_size(9, len(msg.raw_data)) if msg.HasField("raw_data") else 0)  # field 9
    rest = type(msg)()
    copy_fields(msg, rest, _HOLDERS)
    return rest.ByteSize() + sum(_field_size(f.number, _encoded_size(m)) for f, value in msg.ListFields()
                                 if f.name in _HOLDERS for m in (value if _is_repeated(f) else [value]))


def _field_size(number: int, length: int) -> int:
    """Bytes of a length-delimited field: its tag, the length as a varint, the payload."""
    return _varint_size(number << 3) + _varint_size(length) + length


def _varint_size(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def read_tensor(t: onnx.TensorProto) -> np.ndarray:
    """A tensor's values as numpy, read from its file when its data is external (the tensor itself
    is left as it is, where onnx's loader would copy the data into it)."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return onnx.numpy_helper.to_array(t)
    info = _external_info(t)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    if dtype.kind in "biuf" and _dims_bytes(t) == tensor_nbytes(t):
        count = int(np.prod(t.dims, dtype=np.int64))
        a = np.fromfile(info["location"], dtype=dtype.newbyteorder("<"), count=count, offset=int(info.get("offset", 0) or 0))
        return a.astype(dtype, copy=False).reshape(tuple(t.dims))
    return onnx.numpy_helper.to_array(_inlined(t))


def _inlined(t: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of the tensor with its data inline, read from its file when external."""
    out = _header(t)
    out.raw_data = tensor_bytes(t)
    return out


def tensor_bytes(t: onnx.TensorProto) -> bytes:
    """A tensor's data as ONNX stores it raw (little-endian), read from its file when external."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = _external_info(t)
        with open(info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0) or 0))
            return f.read(tensor_nbytes(t))
    if t.HasField("raw_data"):
        return t.raw_data
    return onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t)).raw_data


_DATA_FIELDS = frozenset({"raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data",
                          "uint64_data", "external_data", "data_location"})


def _header(t: onnx.TensorProto) -> onnx.TensorProto:
    """The tensor without its data (name, type, dims, doc string)."""
    out = onnx.TensorProto()
    copy_fields(t, out, _DATA_FIELDS)
    return out


def _external(t: onnx.TensorProto, location: str, offset: int, length: int) -> onnx.TensorProto:
    out = _header(t)
    out.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        out.external_data.add(key=k, value=v)
    return out


class _DataFile:
    """A data file written tensor by tensor at aligned offsets; opened on the first tensor."""

    def __init__(self, path: Path, location: str):
        self.path, self.location, self.f = path, location, None

    def put(self, t: onnx.TensorProto, data: bytes | np.ndarray | None = None) -> onnx.TensorProto:
        if self.f is None:
            self.f = open(self.path, "ab")
        offset = -(-self.f.tell() // _ALIGN) * _ALIGN
        self.f.write(b"\0" * (offset - self.f.tell()))
        data = tensor_bytes(t) if data is None else data
        self.f.write(data)
        return _external(t, self.location, offset, len(data) if isinstance(data, bytes) else data.nbytes)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def _externalized(model: onnx.ModelProto, data: _DataFile) -> onnx.ModelProto:
    """A copy of the model whose tensors of EXTERNAL_MIN_BYTES or more are written, one at a time,
    to `data` and referenced from there: the caller's model is left as it is, and only one
    tensor's bytes are copied at a time."""
    def put(t: onnx.TensorProto) -> onnx.TensorProto:
        big = t.data_location == onnx.TensorProto.EXTERNAL or tensor_nbytes(t) >= EXTERNAL_MIN_BYTES
        return data.put(t) if big and t.data_type != onnx.TensorProto.STRING else t
    try:
        return map_tensors(model, put)
    finally:
        data.close()


_SPILL: dict[str, Any] = {}


def spill(values: np.ndarray, name: str) -> onnx.TensorProto:
    """Write an array to this process's scratch data file; return a tensor that refers to it (an
    absolute location, like a model over the limit as loaded). Big models keep the weights a pass
    changed on disk between passes instead of in a second copy in memory."""
    file = _spill_file()
    header = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype), dims=values.shape)
    out = file.put(header, np.ascontiguousarray(values))
    file.f.flush()
    return out


def _spill_file() -> "_DataFile":
    """This process's scratch data file (created on first use, removed at exit)."""
    if "file" not in _SPILL:
        folder = Path(tempfile.mkdtemp(prefix="onnxcompress-spill-"))
        atexit.register(shutil.rmtree, folder, True)
        _SPILL["file"] = _DataFile(folder / "weights.bin", str(folder / "weights.bin"))
    return _SPILL["file"]


def _in_scratch(t: onnx.TensorProto) -> bool:
    """A tensor whose data this process moved to its scratch data file."""
    return "file" in _SPILL and t.data_location == onnx.TensorProto.EXTERNAL \
        and _external_info(t).get("location") == _SPILL["file"].location


def _inline_scratch(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with the tensors in the scratch data file read back inline (others as they are)."""
    from onnx.external_data_helper import _get_all_tensors

    if not any(_in_scratch(t) for t in _get_all_tensors(model)):
        return model

    return map_tensors(model, lambda t: _inlined(t) if _in_scratch(t) else t)


def _is_repeated(f) -> bool:
    return f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED


def copy_fields(src: Message, dst: Message, skip: frozenset[str] = frozenset()) -> None:
    """Copy every set field of `src` into the empty `dst`, except those named in `skip`."""
    for f, value in src.ListFields():
        if f.name in skip:
            continue
        if _is_repeated(f):
            getattr(dst, f.name).extend(value)
        elif f.type == f.TYPE_MESSAGE:
            getattr(dst, f.name).CopyFrom(value)
        else:
            setattr(dst, f.name, value)


def _map_graph(src: onnx.GraphProto, dst: onnx.GraphProto, fn, attributes: bool) -> None:
    copy_fields(src, dst, frozenset({"initializer", "node"}))
    dst.initializer.extend(fn(t) for t in src.initializer)
    keep = lambda t: fn(t) if attributes else t
    for node in src.node:
        out = dst.node.add()
        copy_fields(node, out, frozenset({"attribute"}))
        for a in node.attribute:
            b = out.attribute.add()
            copy_fields(a, b, frozenset({"t", "g", "tensors", "graphs"}))
            if a.HasField("t"):
                b.t.CopyFrom(keep(a.t))
            if a.HasField("g"):
                _map_graph(a.g, b.g, fn, attributes)
            b.tensors.extend(keep(t) for t in a.tensors)
            for g in a.graphs:
                _map_graph(g, b.graphs.add(), fn, attributes)


def map_tensors(model: onnx.ModelProto, fn, attributes: bool = True) -> onnx.ModelProto:
    """A copy of the model with every tensor (initializers, Constant and attribute values, in
    bodies too; without `attributes`, initializers only) replaced by fn(tensor), built field by
    field so the replaced tensors' data is never copied. Sparse initializers and model-local
    functions are copied whole."""
    m = onnx.ModelProto()
    copy_fields(model, m, frozenset({"graph"}))
    _map_graph(model.graph, m.graph, fn, attributes)
    return m


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write a model atomically. Weights go to `<name>.data` beside it when asked, or when the model
    is too large for one protobuf (over ~1.8 GB)."""
    out = Path(path)
    if not out.parent.exists():
        raise InputError(f"output folder does not exist: {out.parent}")
    from onnx.external_data_helper import _get_all_tensors

    # weights moved to the scratch file at load go back inline; a model with data files of its own
    # (or too large for one message) keeps them in a data file
    external_data = bool(external_data) or payload_bytes(model) > EXTERNAL_DATA_THRESHOLD or any(
        t.data_location == onnx.TensorProto.EXTERNAL and not _in_scratch(t) for t in _get_all_tensors(model))
    tmp = Path(tempfile.mkdtemp(prefix=".onnxcompress-", dir=out.parent))
    try:
        tmp_model = tmp / out.name
        if external_data:
            data_name = out.name + ".data"
            m = _externalized(model, _DataFile(tmp / data_name, data_name))
            with open(tmp_model, "wb") as f:
                f.write(m.SerializeToString())
            if (tmp / data_name).exists():
                os.replace(tmp / data_name, out.parent / data_name)
        else:
            with open(tmp_model, "wb") as f:
                f.write(_inline_scratch(model).SerializeToString())
        os.replace(tmp_model, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s", out)
    return out


def pack(arrays: list[np.ndarray]) -> np.ndarray:
    """Arrays stacked on a new axis 0, or, when their shapes differ, a 1-D object array holding them."""
    if len({np.shape(a) for a in arrays}) <= 1:
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def read_arrays(path: str | os.PathLike, stack: str | None = None) -> dict[str | None, np.ndarray]:
    """Arrays from a .npz file, or from a folder of .npz/.npy files concatenated along axis 0,
    or stacked on a new axis 0 when each file holds one complete feed (`stack="feeds"`, or the
    files declare the feeds layout under "__layout__").

    A .npy file holds a batch for a model's only input and comes back under the key None."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such data file or folder: {p}")
    files = sorted(f for f in p.iterdir() if f.suffix in (".npz", ".npy")) if p.is_dir() else [p]
    if not files:
        raise InputError(f"{p} holds no .npz or .npy files")
    parts: dict[str | None, list[np.ndarray]] = {}
    for f in files:
        try:
            if f.suffix == ".npy":
                arrays = {None: np.load(f, allow_pickle=False)}
            else:
                with np.load(f, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as e:
            raise InputError(f"{f} is not a readable numpy file ({e})") from e
        for k, v in arrays.items():
            parts.setdefault(k, []).append(v)
    layout = parts.pop("__layout__", None)
    if p.is_dir() and (stack == "feeds" or (stack is None and layout is not None
                                             and str(np.asarray(layout[0]).reshape(-1)[0]) == "feeds")):
        return {**{k: pack(v) for k, v in parts.items()}, "__layout__": np.asarray("feeds")}   # one feed per file
    try:
        arrays = {k: (v[0] if len(v) == 1 else np.concatenate(v)) for k, v in parts.items()}
    except ValueError as e:
        raise InputError(f"arrays in {p} do not stack: {e}") from e
    return arrays if layout is None else {**arrays, "__layout__": layout[0]}


def read_text(path: str | os.PathLike) -> str:
    p = _existing_file(path)
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {p}: {e}") from e


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (temporary file in the same folder, then rename)."""
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a file atomically (temporary file in the same folder, then rename)."""
    out = Path(path)
    if not out.parent.exists():
        raise InputError(f"output folder does not exist: {out.parent}")
    fd, tmp = tempfile.mkstemp(prefix=".onnxcompress-", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A private temporary folder, removed afterwards (for tools that insist on file paths)."""
    d = Path(tempfile.mkdtemp(prefix="onnxcompress-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
