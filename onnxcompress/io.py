"""All file reading and writing in onnxcompress happens here.

Models are loaded with their external data (refusing locations that escape the model's folder) and
saved atomically: everything is written into a temporary folder beside the target, then renamed into
place, so a failed run never leaves a half-written file and never touches its input.
"""
from __future__ import annotations

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
from google.protobuf.message import DecodeError

from .errors import InputError

log = logging.getLogger(__name__)

# Protobuf cannot serialize a message of 2 GiB or more; above this we switch to external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

__all__ = [
    "load_model", "save_model", "read_arrays", "read_text", "write_text", "write_bytes", "write_json",
    "scratch_dir", "EXTERNAL_DATA_THRESHOLD",
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
    for loc in _external_locations(model):
        target = (base / loc).resolve()
        if base not in target.parents:
            raise InputError(f"{p}: external data location '{loc}' points outside the model's folder")
        if not target.is_file():
            raise InputError(f"{p}: external data file '{loc}' is missing")
    if _external_locations(model):
        try:
            onnx.load_external_data_for_model(model, str(base))
        except (OSError, ValueError) as e:
            raise InputError(f"{p}: cannot read external data ({e})") from e
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write a model atomically. Weights go to `<name>.data` beside it when asked, or when the model
    is too large for one protobuf (over ~1.8 GB)."""
    out = Path(path)
    if not out.parent.exists():
        raise InputError(f"output folder does not exist: {out.parent}")
    if external_data is None:
        external_data = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    tmp = Path(tempfile.mkdtemp(prefix=".onnxcompress-", dir=out.parent))
    try:
        tmp_model = tmp / out.name
        if external_data:
            m = onnx.ModelProto()
            m.CopyFrom(model)  # save_model(save_as_external_data=True) rewrites tensors in place
            data_name = out.name + ".data"
            onnx.save_model(m, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            if (tmp / data_name).exists():
                os.replace(tmp / data_name, out.parent / data_name)
        else:
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString())
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
