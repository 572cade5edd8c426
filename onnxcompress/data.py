"""Calibration and evaluation data: feeds keyed by graph input name, with optional labels.

A `Dataset` holds whole arrays and hands out feed dicts, in one of two layouts:
- "batch" (the default): axis 0 of every array is the model's batch axis; samples are cut into
  batches of any size (or of the model's fixed batch).
- "feeds": axis 0 indexes complete feeds, each handed to the model as it is, one run per feed and
  never concatenated or cut: for inputs without a batch axis (a scalar, a recurrent state
  [layers, batch, hidden]) or with the batch elsewhere. Declared by a `__layout__` array holding
  "feeds" in the .npz (then its arrays are stacked feeds), by a folder of .npz files each holding
  one feed with that key, or by the CLI's `--layout feeds` (a folder: one feed per file).

It is built from a `.npz` file or a folder (through `io.read_arrays`), a dict of arrays, any
iterable of feed dicts, or an onnxruntime `CalibrationDataReader`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from . import io
from .errors import InputError

__all__ = ["Dataset", "load_dataset", "as_dataset", "conform", "check_batch_first", "shifted_copies", "LAYOUTS"]

LABELS = "labels"
LAYOUT = "__layout__"           # key of the layout declaration in a .npz
LAYOUTS = ("batch", "feeds")


@dataclass
class Dataset:
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    layout: str = "batch"           # or "feeds": axis 0 indexes complete feeds (module docstring)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise InputError(f"unknown data layout {self.layout!r}: use one of {', '.join(LAYOUTS)}")
        scalars = [k for k, v in self.feeds.items() if np.ndim(v) == 0]
        if scalars:
            raise InputError(f"data for input(s) {', '.join(map(repr, scalars))} is a scalar (a 0-d array): with the batch "
                             "layout every array needs the batch axis first; an input without one is fed with the "
                             "feeds layout (a stack of complete feeds: --layout feeds, or '__layout__': 'feeds' in the .npz)")
        sizes = {k: len(v) for k, v in self.feeds.items()}
        if not sizes:
            raise InputError("dataset has no input arrays")
        if len(set(sizes.values())) != 1:
            raise InputError(f"dataset arrays differ in length: {sizes}")
        if self.labels is not None and len(self.labels) != len(self) and self.layout == "batch":
            raise InputError(f"dataset has {len(self.labels)} labels for {len(self)} samples")

    @property
    def per_feed(self) -> bool:
        return self.layout == "feeds"

    def __len__(self) -> int:
        """Samples (the batch layout) or feeds."""
        return len(next(iter(self.feeds.values())))

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts: `batch_size` samples at a time, or one complete feed at a time."""
        if self.per_feed:
            for i in range(len(self)):
                yield {k: np.asarray(v[i]) for k, v in self.feeds.items()}
            return
        for start in range(0, len(self), batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.feeds.items()}

    def n_batches(self, batch_size: int) -> int:
        return len(self) if self.per_feed else -(-len(self) // batch_size)

    def feed_shapes(self) -> dict[str, list[int]]:
        """Each input's shape in one run at batch 1 (the first feed as it is, for the feeds layout)."""
        return {k: list(np.shape(v[0])) if self.per_feed else [1, *v.shape[1:]] for k, v in self.feeds.items()}

    def example(self, batch: int) -> dict[str, np.ndarray]:
        """One feed of `batch` samples (repeated if there are fewer); the first feed as it is, per feed."""
        if self.per_feed:
            return {k: np.asarray(v[0]) for k, v in self.feeds.items()}
        idx = np.arange(batch) % len(self)
        return {k: v[idx] for k, v in self.feeds.items()}

    def rows(self, name: str) -> np.ndarray:
        """An input's values as the model's outputs come back over the dataset: the array itself,
        or per feed, the feeds joined along their axis 0 (as outputs are)."""
        v = self.feeds[name]
        return np.concatenate(list(v)) if self.per_feed and v.ndim > 1 else v

    def take(self, n: int) -> "Dataset":
        """The first n samples or feeds (all of them if n is larger)."""
        labels = None if self.labels is None or self.per_feed else self.labels[:n]
        return Dataset({k: v[:n] for k, v in self.feeds.items()}, labels, self.layout)

    def split(self, n: int) -> tuple["Dataset", "Dataset"]:
        """The first n samples (or feeds) and the rest."""
        cut = lambda a: (a[:n], a[n:])
        parts = {k: cut(v) for k, v in self.feeds.items()}
        labels = (None, None) if self.labels is None or self.per_feed else cut(self.labels)
        return (Dataset({k: v[0] for k, v in parts.items()}, labels[0], self.layout),
                Dataset({k: v[1] for k, v in parts.items()}, labels[1], self.layout))

    def folds(self, k: int) -> list[tuple["Dataset", "Dataset"]]:
        """k (rest, part) pairs for cross-validation: the samples (or feeds) in k contiguous parts,
        each held out in turn (the last pair is `split` at (k-1)/k of them)."""
        bounds = [len(self) * i // k for i in range(k + 1)]
        labeled = self.labels is not None and not self.per_feed

        def pick(idx: np.ndarray) -> "Dataset":
            return Dataset({n: v[idx] for n, v in self.feeds.items()}, self.labels[idx] if labeled else None, self.layout)

        every = np.arange(len(self))
        return [(pick(np.concatenate([every[:a], every[b:]])), pick(every[a:b])) for a, b in zip(bounds, bounds[1:])]

    def fingerprint(self) -> str:
        """A digest of the inputs' values and shapes: equal for the same samples, whatever object
        holds them (what run caches key on; two folds of one length are different data)."""
        if "_fingerprint" not in self.__dict__:
            h = hashlib.blake2b(self.layout.encode(), digest_size=16)
            for k in sorted(self.feeds):
                v = self.feeds[k]
                for a in (list(v) if v.dtype == object else [v]):    # the feeds layout may pack unequal feeds
                    a = np.ascontiguousarray(a)
                    h.update(f"{k}{a.dtype}{a.shape}".encode())
                    h.update(a.tobytes())
            self.__dict__["_fingerprint"] = h.hexdigest()
        return self.__dict__["_fingerprint"]

    def check_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Raise InputError unless the dataset feeds exactly the model's graph inputs `inputs`."""
        missing = [n for n in inputs if n not in self.feeds]
        extra = [n for n in self.feeds if n not in inputs]
        if missing or extra:
            raise InputError(f"data does not match the model's inputs: missing {missing}, unexpected {extra}")


SHIFT = 2   # pixels: the largest translation of a shifted copy


def shifted_copies(data: Dataset, copies: int, seed: int = 0) -> Dataset | None:
    """`data` with `copies` translated copies of every sample, each sample followed by its copies
    (so whole groups can be held out together). Images only: float inputs of rank 4 (N, C, H, W,
    or N, H, W, C where the last axis is 4 or fewer and the second is not) move by up to SHIFT
    pixels along H and W, edges repeated; every such input of a sample by the same offset, other
    inputs and labels repeated. None where nothing can be shifted (tokens, vectors, images smaller
    than 2 x SHIFT + 1, the feeds layout)."""
    if copies < 1 or data.per_feed:
        return None
    images = {k: _spatial_axes(v) for k, v in data.feeds.items()}
    images = {k: ax for k, ax in images.items() if ax is not None}
    if not images:
        return None
    group, rng = copies + 1, np.random.default_rng(seed)
    offsets = rng.integers(-SHIFT, SHIFT + 1, (len(data), copies, 2))
    feeds = {}
    for k, v in data.feeds.items():
        out = np.repeat(v, group, axis=0)
        if k in images:
            ax = images[k]
            pad = [(0, 0)] * v.ndim
            pad[ax[0]] = pad[ax[1]] = (SHIFT, SHIFT)
            padded = np.pad(v, pad, mode="edge")
            size = (v.shape[ax[0]], v.shape[ax[1]])
            for j in range(copies):
                for dy, dx in {tuple(o) for o in offsets[:, j]}:
                    idx = np.flatnonzero((offsets[:, j, 0] == dy) & (offsets[:, j, 1] == dx))
                    window = [slice(None)] * v.ndim
                    window[ax[0]] = slice(SHIFT + dy, SHIFT + dy + size[0])
                    window[ax[1]] = slice(SHIFT + dx, SHIFT + dx + size[1])
                    out[idx * group + j + 1] = padded[idx][tuple(window)]
        feeds[k] = out
    labels = None if data.labels is None else np.repeat(data.labels, group, axis=0)
    return Dataset(feeds, labels, data.layout)


def _spatial_axes(v: np.ndarray) -> tuple[int, int] | None:
    """The H and W axes of a float image batch (rank 4), or None."""
    if v.ndim != 4 or not np.issubdtype(v.dtype, np.floating):
        return None
    ax = (1, 2) if v.shape[3] <= 4 < v.shape[1] else (2, 3)
    return ax if min(v.shape[ax[0]], v.shape[ax[1]]) > 2 * SHIFT else None


def _from_arrays(arrays: Mapping[str | None, np.ndarray], input_names: list[str], layout: str | None = None) -> Dataset:
    arrays = dict(arrays)
    labels = arrays.pop(LABELS, None)
    declared = arrays.pop(LAYOUT, None)
    if declared is not None:
        declared = str(np.asarray(declared).reshape(-1)[0])
        if declared not in LAYOUTS:
            raise InputError(f"the data declares layout {declared!r} ('{LAYOUT}'): use one of {', '.join(LAYOUTS)}")
    if None in arrays:  # .npy batches for a model's only input
        if len(input_names) != 1:
            raise InputError(".npy data is only for models with one input; use .npz keyed by input name")
        arrays[input_names[0]] = arrays.pop(None)
    return Dataset({str(k): np.asarray(v) for k, v in arrays.items()}, labels, layout or declared or "batch")


def load_dataset(path: str, input_names: list[str], layout: str | None = None) -> Dataset:
    """Read a dataset from a .npz file or a folder of .npz/.npy files, and check it feeds the model.
    `layout` overrides what the data declares ("feeds" with a folder: one complete feed per file)."""
    if layout is not None and layout not in LAYOUTS:
        raise InputError(f"unknown data layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    ds = _from_arrays(io.read_arrays(path, stack=layout), input_names, layout)
    ds.check_inputs({n: None for n in input_names})
    return ds


def as_dataset(data: Any, input_names: list[str]) -> Dataset:
    """Accept a Dataset, a dict of arrays, an iterable of feed dicts or a CalibrationDataReader (its
    feeds joined as batches; kept as complete feeds where they hold scalars or do not join)."""
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
        try:                                    # batches, joined along their batch axis
            if not any(a.ndim == 0 for v in feeds.values() for a in v):
                return Dataset({k: np.concatenate(v) for k, v in feeds.items()})
        except ValueError:
            pass
        return Dataset({k: io.pack(v) for k, v in feeds.items()}, layout="feeds")   # scalars, or shapes that differ
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
                                 f"{later[0]}: the batch layout needs the batch axis first; feed such inputs with the "
                                 "feeds layout (a stack of complete feeds: --layout feeds, or '__layout__': 'feeds' in the .npz)")


def conform(data: Dataset, model) -> Dataset:
    """Check the dataset against the model's graph inputs: same names, same rank, matching static
    dimensions (after the batch, or all of them for the feeds layout); floating-point arrays are
    cast to the input's float type. Raises InputError naming the input and the mismatch."""
    import onnx

    inits = {t.name for t in model.graph.initializer}
    specs = {i.name: i.type.tensor_type for i in model.graph.input if i.name not in inits}
    data.check_inputs(specs)
    if not data.per_feed:
        check_batch_first(specs)
    feeds = {}
    for name, tt in specs.items():
        want = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        parts = [np.asarray(f) for f in data.feeds[name]] if data.per_feed else [data.feeds[name]]
        for arr in parts:
            what = "each feed of input" if data.per_feed else "data for input"
            if tt.HasField("shape") and arr.ndim != len(dims):
                raise InputError(f"{what} '{name}' has shape {list(arr.shape)}; the model expects rank {len(dims)} "
                                 f"({['?' if d is None else d for d in dims]})")
            for axis, (have, need) in enumerate(zip(arr.shape, dims)):
                if (axis > 0 or data.per_feed) and need is not None and have != need:
                    raise InputError(f"{what} '{name}' has shape {list(arr.shape)}; the model expects "
                                     f"{['?' if d is None else d for d in dims]}")
            if arr.dtype != want and not (arr.dtype.kind == want.kind == "f" or (arr.dtype.kind in "iu" and want.kind in "iu")):
                raise InputError(f"data for input '{name}' is {arr.dtype}; the model expects {want}")
        parts = [a.astype(want, copy=False) for a in parts]
        feeds[name] = io.pack(parts) if data.per_feed else parts[0]
    return Dataset(feeds, data.labels, data.layout)
