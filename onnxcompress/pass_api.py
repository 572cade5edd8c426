"""What a pass is: options as dataclass fields, a name, the ops it handles, and `run(graph, ctx)`.

A pass edits a `gs.Graph` and returns a `PassResult`; it never reads or writes files. Everything a
pass may need besides the graph (calibration data, teachers, providers, caches) comes in `Context`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .data import Dataset
from .errors import OptionError
from .metrics import LatencyConfig
from .runtime import DEFAULT_PROVIDERS

__all__ = ["Pass", "PassResult", "Context", "RunState", "Registry", "ChannelMap"]


@dataclass(frozen=True)
class ChannelMap:
    """Which channels of a tensor remain, as indices into the `domain` channels it had before."""
    domain: int
    kept: np.ndarray

    @staticmethod
    def identity(n: int) -> "ChannelMap":
        return ChannelMap(n, np.arange(n))

    def then(self, keep: np.ndarray) -> "ChannelMap":
        """This map after a further cut (`keep`: a mask or indices over the current channels)."""
        return ChannelMap(self.domain, self.kept[keep])

    def after(self, earlier: "ChannelMap") -> "ChannelMap":
        """This map (relative to what `earlier` kept) expressed against `earlier`'s domain."""
        return ChannelMap(earlier.domain, earlier.kept[self.kept])


@dataclass
class PassResult:
    graph: gs.Graph
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)   # feeds the report
    notes: list[str] = field(default_factory=list)        # what was left untouched, and why


@dataclass
class RunState:
    """What passes record during a run, and a rollback must restore whole: the recovery constraint
    of each layer they changed, which channels each pruned tensor kept, factored layer pairs.
    Layers are keyed by their stable id (the name of their first output tensor), never node names."""
    constraints: dict[str, Any] = field(default_factory=dict)     # layer id -> constraints.Constraint
    channel_maps: dict[str, ChannelMap] = field(default_factory=dict)   # relative to this run's original
    pairs: dict[str, str] = field(default_factory=dict)           # second layer id -> first layer id
    refit: set[str] = field(default_factory=set)   # layer ids that read where a removed branch was: refit as changed
    # Probability that each If's then-branch runs (keyed by the If's first output), for expected MACs.
    branch_probs: dict[str, float] = field(default_factory=dict)

    def snapshot(self) -> "RunState":
        return copy.deepcopy(self)


@dataclass
class Context:
    """Shared by every pass of a run: data, teachers, providers, per-run caches and the run state."""
    calib: Dataset | None = None
    original: onnx.ModelProto | None = None   # the model the run started from (layer-wise targets)
    teachers: list[onnx.ModelProto] = field(default_factory=list)  # output-level teachers; default: original
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    temperature: float = 4.0
    alpha: float = 0.0
    batch_size: int = 64
    max_drop: float | None = None             # the run's budget, for passes that search within it
    timing: LatencyConfig | None = None       # how the run measures latency (None: it does not), for
                                              # passes that choose between variants by their speed
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("onnxcompress"))
    cache: dict[Any, Any] = field(default_factory=dict)  # activation captures and teacher outputs
    state: RunState = field(default_factory=RunState)
    # Channels earlier runs kept (read from the model's metadata), relative to the model they started from.
    inherited_maps: dict[str, ChannelMap] = field(default_factory=dict)

    def fork(self) -> "Context":
        """The same data, teachers and caches with an empty run state (a trial that starts afresh)."""
        return dataclasses.replace(self, state=RunState())

    def target_channels(self, tensor: str, teacher_channels: int, n_out: int) -> np.ndarray | None:
        """Indices of a teacher's channels that the student's tensor (n_out channels) still has:
        through this run's cuts, or through earlier runs' too when the teacher is that older model."""
        here, before = self.state.channel_maps.get(tensor), self.inherited_maps.get(tensor)
        candidates = [here] if here is not None else []
        if before is not None:
            candidates.append(here.after(before) if here is not None else before)
        for m in candidates:
            if m.domain == teacher_channels and len(m.kept) == n_out:
                return m.kept
        return None

    def require_calib(self, pass_name: str) -> Dataset:
        if self.calib is None:
            raise OptionError(f"pass '{pass_name}' needs calibration data (--calib)")
        return self.calib


class Pass:
    """Base class. Subclasses are dataclasses whose fields are the pass's options."""

    name: ClassVar[str] = ""
    handles: ClassVar[frozenset[str]] = frozenset()
    # A recovering pass (distill) is judged against the budget together with the pass before it.
    recovers: ClassVar[bool] = False

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def required_opset(self) -> int:
        """The lowest default-domain opset this pass (with these options) can emit; the manager
        converts a model below it first and the report says so. A pass may also raise
        `graph.opset` itself: the saved model keeps the higher opset."""
        return 0

    # -- options ---------------------------------------------------------------------------
    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def option_fields(cls) -> list[tuple[str, Any, Any]]:
        """(name, type, default) for every option."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out.append((f.name, hints[f.name], default))
        return out

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "Pass":
        """Build the pass from user options, checking names and types before any work is done."""
        known = {name: tp for name, tp, _ in cls.option_fields()}
        values = {}
        for key, value in options.items():
            if key not in known:
                raise OptionError(f"pass '{cls.name}' has no option '{key}' (options: {', '.join(known) or 'none'})")
            values[key] = _coerce(value, known[key], f"{cls.name}: option '{key}'")
        try:
            return cls(**values)
        except (ValueError, TypeError) as e:
            raise OptionError(f"{cls.name}: {e}") from None

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"dict of {type_name(k)} to {type_name(v)}"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against an option's type; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    bad = OptionError(f"{where} must be {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, where)
            except OptionError:
                continue
        raise bad
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            value = [value] if isinstance(value, str) else None
        if value is None:
            raise bad
        item = typing.get_args(tp)[0]
        try:
            return tuple(_coerce(v, item, where) for v in value)
        except OptionError:
            raise bad from None
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        k_tp, v_tp = typing.get_args(tp)
        try:
            return {_coerce(k, k_tp, where): _coerce(v, v_tp, where) for k, v in value.items()}
        except OptionError:
            raise bad from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is int or tp is str or tp is bool:
        if type(value) is not tp:
            raise bad
        return value
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    raise OptionError(f"{where}: unsupported option type {tp!r}")


class Registry:
    """Pass classes by name. Not global: the default one lists the built-in passes explicitly."""

    def __init__(self, passes: Sequence[type[Pass]] = ()):
        self._passes: dict[str, type[Pass]] = {}
        for p in passes:
            self.add(p)

    def add(self, cls: type[Pass]) -> type[Pass]:
        if not cls.name:
            raise ValueError(f"{cls.__name__} has no name")
        if cls.name in self._passes and self._passes[cls.name] is not cls:
            raise ValueError(f"two passes are named '{cls.name}'")
        self._passes[cls.name] = cls
        return cls

    def get(self, name: str) -> type[Pass]:
        try:
            return self._passes[name]
        except KeyError:
            raise OptionError(f"unknown pass '{name}' (known: {', '.join(sorted(self._passes))})") from None

    def create(self, name: str, options: dict[str, Any] | None = None) -> Pass:
        return self.get(name).from_options(options or {})

    def __iter__(self):
        return iter(sorted(self._passes.values(), key=lambda c: c.name))

    def __contains__(self, name: str) -> bool:
        return name in self._passes


def default_registry() -> Registry:
    from . import passes  # noqa: PLC0415 - the built-in passes, listed in passes/__init__.py

    return Registry(passes.BUILTIN)
