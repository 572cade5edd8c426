"""Calibration and evaluation data: feeds keyed by graph input name, with optional labels.

A `Dataset` holds whole arrays (batch axis first) and hands out batches of feed dicts. It is built
from a `.npz` file or a folder (through `io.read_arrays`), a dict of arrays, any iterable of feed
dicts, or an onnxruntime `CalibrationDataReader`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from . import io
from .errors import InputError

__all__ = ["Dataset", "load_dataset", "as_dataset", "conform", "check_batch_first"]

LABELS = "labels"


@dataclass
class Dataset:
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        scalars = [k for k, v in self.feeds.items() if np.ndim(v) == 0]
        if scalars:
            raise InputError(f"data for input(s) {', '.join(map(repr, scalars))} is a scalar (a 0-d array): every array "
                             "needs the batch axis first, and inputs without a batch axis cannot be fed yet")
        sizes = {k: len(v) for k, v in self.feeds.items()}
        if not sizes:
            raise InputError("dataset has no input arrays")
        if len(set(sizes.values())) != 1:
            raise InputError(f"dataset arrays differ in length: {sizes}")
        if self.labels is not None and len(self.labels) != len(self):
            raise InputError(f"dataset has {len(self.labels)} labels for {len(self)} samples")

    def __len__(self) -> int:
        return len(next(iter(self.feeds.values())))

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self), batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.feeds.items()}

    def take(self, n: int) -> "Dataset":
        """The first n samples (all of them if n is larger)."""
        labels = None if self.labels is None else self.labels[:n]
        return Dataset({k: v[:n] for k, v in self.feeds.items()}, labels)

    def split(self, n: int) -> tuple["Dataset", "Dataset"]:
        """The first n samples and the rest."""
        cut = lambda a: (a[:n], a[n:])
        parts = {k: cut(v) for k, v in self.feeds.items()}
        labels = (None, None) if self.labels is None else cut(self.labels)
        return (Dataset({k: v[0] for k, v in parts.items()}, labels[0]),
                Dataset({k: v[1] for k, v in parts.items()}, labels[1]))

    def check_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Raise InputError unless the dataset feeds exactly the model's graph inputs `inputs`."""
        missing = [n for n in inputs if n not in self.feeds]
        extra = [n for n in self.feeds if n not in inputs]
        if missing or extra:
            raise InputError(f"data does not match the model's inputs: missing {missing}, unexpected {extra}")


def _from_arrays(arrays: Mapping[str | None, np.ndarray], input_names: list[str]) -> Dataset:
    arrays = dict(arrays)
    labels = arrays.pop(LABELS, None)
    if None in arrays:  # .npy batches for a model's only input
        if len(input_names) != 1:
            raise InputError(".npy data is only for models with one input; use .npz keyed by input name")
        arrays[input_names[0]] = arrays.pop(None)
    return Dataset({str(k): np.asarray(v) for k, v in arrays.items()}, labels)


def load_dataset(path: str, input_names: list[str]) -> Dataset:
    """Read a dataset from a .npz file or a folder of .npz/.npy files, and check it feeds the model."""
    ds = _from_arrays(io.read_arrays(path), input_names)
    ds.check_inputs({n: None for n in input_names})
    return ds


def as_dataset(data: Any, input_names: list[str]) -> Dataset:
    """Accept a Dataset, a dict of arrays, an iterable of feed dicts or a CalibrationDataReader."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, Mapping):
        return _from_arrays(data, input_names)
    if hasattr(data, "get_next"):  # onnxruntime.quantization.CalibrationDataReader
        data = iter(data.get_next, None)
    if isinstance(data, Iterable):
        feeds: dict[str, list[np.ndarray]] = {}
        for feed in data:
            for k, v in feed.items():
                feeds.setdefault(k, []).append(np.asarray(v))
        return Dataset({k: np.concatenate(v) for k, v in feeds.items()})
    raise InputError(f"cannot use {type(data).__name__} as data")


def check_batch_first(specs: Mapping[str, Any]) -> None:
    """Refuse an input whose batch axis is provably not its first: a fixed first dim above 1 and,
    further on, the symbolic dim that leads the other inputs (a recurrent state [layers, batch,
    hidden] beside x [batch, ...]). Its data would be cut along the fixed axis, and every batch
    run at that size (`runtime.fixed_batch`), mixing samples up without an error."""
    dims = {name: list(tt.shape.dim) for name, tt in specs.items() if tt.HasField("shape")}
    batch = {d[0].dim_param for d in dims.values() if d and d[0].dim_param}
    for name, d in dims.items():
        if d and d[0].HasField("dim_value") and d[0].dim_value > 1:
            later = [i for i, x in enumerate(d[1:], 1) if x.dim_param and x.dim_param in batch]
            if later:
                shape = [x.dim_value if x.HasField("dim_value") else (x.dim_param or "?") for x in d]
                raise InputError(f"input '{name}' {shape} has its batch axis '{d[later[0]].dim_param}' at position "
                                 f"{later[0]}: data arrays need the batch axis first, and inputs laid out otherwise "
                                 "cannot be fed yet")


def conform(data: Dataset, model) -> Dataset:
    """Check the dataset against the model's graph inputs: same names, same rank, matching static
    dimensions (after the batch); floating-point arrays are cast to the input's float type.
    Raises InputError naming the input and the mismatch."""
    import onnx

    inits = {t.name for t in model.graph.initializer}
    specs = {i.name: i.type.tensor_type for i in model.graph.input if i.name not in inits}
    data.check_inputs(specs)
    check_batch_first(specs)
    feeds = {}
    for name, tt in specs.items():
        arr = data.feeds[name]
        want = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if tt.HasField("shape") and arr.ndim != len(dims):
            raise InputError(f"data for input '{name}' has shape {list(arr.shape)}; the model expects rank {len(dims)} "
                             f"({['?' if d is None else d for d in dims]})")
        for axis, (have, need) in enumerate(zip(arr.shape, dims)):
            if axis > 0 and need is not None and have != need:
                raise InputError(f"data for input '{name}' has shape {list(arr.shape)}; the model expects "
                                 f"{['?' if d is None else d for d in dims]}")
        if arr.dtype != want:
            if arr.dtype.kind == want.kind == "f" or (arr.dtype.kind in "iu" and want.kind in "iu"):
                arr = arr.astype(want)
            else:
                raise InputError(f"data for input '{name}' is {arr.dtype}; the model expects {want}")
        feeds[name] = arr
    return Dataset(feeds, data.labels)
