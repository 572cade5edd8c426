"""The pass manager: run passes in order, validate and measure after each, roll back budget breakers."""
from __future__ import annotations

import gc
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import onnx
import onnx.version_converter

from . import graph as G, resources
from ._version import __version__
from .data import Dataset, check_batch_first, conform
from .errors import CompressError, InputError, PassError
from .metrics import LatencyConfig, accuracy, budget_metric, count_params, fidelity, gzip_bytes, if_outputs, latency_ms, macs_breakdown, size_bytes
from .pass_api import ChannelMap, Context, Pass
from .report import Report, Step
from .runtime import DEFAULT_PROVIDERS, make_session, run_model
from .validate import ValidationError, validate_model
from .weights import storage_summary

log = logging.getLogger(__name__)

__all__ = ["PassManager", "CompressResult", "Evaluator", "METADATA_KEY"]

METADATA_KEY = "onnxcompress"


def random_dataset(model: onnx.ModelProto, n: int = 16, seed: int = 0) -> Dataset:
    """Standard-normal inputs for models given no data (symbolic dims other than batch become 1)."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    check_batch_first({i.name: i.type.tensor_type for i in model.graph.input if i.name not in inits})
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        if tt.HasField("shape") and not dims:
            raise InputError(f"input '{inp.name}' is a scalar (no batch axis): random inputs cannot be made for it, "
                             "and inputs without a batch axis cannot be fed yet")
        shape = [n] + dims[1:] if dims else [n]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return Dataset(feeds)


@dataclass
class Evaluator:
    """Measures a model against the original on fixed data (outputs of the original computed once)."""
    original: onnx.ModelProto
    data: Dataset
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    latency: LatencyConfig = LatencyConfig()
    batch_size: int = 64
    reference: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.reference = self.outputs(self.original)
        self.input_shapes = self.data.feed_shapes()

    def outputs(self, model: onnx.ModelProto, batch_size: int | None = None) -> dict[str, np.ndarray]:
        return run_model(make_session(model, self.providers), self.data, batch_size or self.batch_size,
                         desc="evaluate")

    def measure(self, model: onnx.ModelProto, step: Step, branch_probs: dict[str, float] | None = None) -> Step:
        ifs = if_outputs(model)
        # A model with an exit (an If the run knows the odds of) is judged one input at a time, as it is
        # deployed: in a batch it exits only when every sample is confident, so batches of 64 would
        # show the full model's answers.
        one_by_one = bool(ifs & set(branch_probs or {}))
        # the original's outputs are the reference: not computed (and held) a second time
        outs = self.reference if model is self.original and not one_by_one else self.outputs(model, 1 if one_by_one else None)
        first = next(iter(outs.values()))
        step.accuracy = accuracy(first, self.data.labels) if self.data.labels is not None else None
        step.fidelity = fidelity(self.reference, outs)
        step.size_bytes, step.gzip_bytes = size_bytes(model), gzip_bytes(model)
        storage = storage_summary(G.to_graph(model))
        step.params, step.sparsity = count_params(model), storage.sparsity
        step.bits_per_weight, step.weight_bytes = storage.bits_per_weight, dict(storage.bytes_by_kind)
        try:
            detail = macs_breakdown(model, self.input_shapes, {k: v for k, v in (branch_probs or {}).items() if k in ifs})
            step.macs = int(sum(d.macs or 0 for d in detail))
            step.branch_macs = {d.output: dict(d.branches) for d in detail if d.branches}
        except Exception as e:  # shape inference can fail on exotic graphs; MACs are then unknown
            step.notes.append(f"MACs unknown: {e}")
        if self.latency.enabled:
            step.latency_ms = latency_ms(model, self.latency, self.data, self.providers)
        return step


def score(step: Step) -> float:
    """What the budget protects (see `metrics.budget_metric`)."""
    return budget_metric(step.accuracy, step.fidelity)[1]


@dataclass
class CompressResult:
    model: onnx.ModelProto
    report: Report
    budget_met: bool


class PassManager:
    """Runs passes; after each: checker, shape inference, an onnxruntime session, metrics, budget."""

    def __init__(self, passes: Sequence[Pass], *, calib: Dataset | None = None, eval_data: Dataset | None = None,
                 teachers: Sequence[onnx.ModelProto] = (), providers: Sequence[str] = DEFAULT_PROVIDERS,
                 max_drop: float | None = None, latency: LatencyConfig = LatencyConfig(),
                 temperature: float = 4.0, alpha: float = 0.0, batch_size: int = 64):
        self.passes = list(passes)
        self.calib, self.eval_data = calib, eval_data
        self.teachers = list(teachers)
        self.providers = tuple(providers)
        self.max_drop = max_drop
        self.latency = latency
        self.temperature, self.alpha, self.batch_size = temperature, alpha, batch_size

    def run(self, model: onnx.ModelProto, name: str = "model") -> CompressResult:
        for i, teacher in enumerate(self.teachers):
            if _signature(teacher) != _signature(model):
                raise InputError(f"teacher {i + 1} has graph inputs/outputs {_signature(teacher)}, "
                                 f"the student {_signature(model)}: they must match")
        calib = conform(self.calib, model) if self.calib is not None else None
        evaluation = conform(self.eval_data, model) if self.eval_data is not None else None
        data = evaluation or calib or random_dataset(model)
        try:
            evaluator = Evaluator(model, data, self.providers, self.latency, self.batch_size)
        except Exception as e:  # a model that loads but cannot run on its own declared inputs
            what = "the given data" if (evaluation or calib) else "inputs of its declared shapes"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(f"the model does not run in onnxruntime on {what}: {first}") from e
        ctx = Context(calib=calib, original=model, teachers=self.teachers or [model], providers=self.providers,
                      temperature=self.temperature, alpha=self.alpha, batch_size=self.batch_size,
                      max_drop=self.max_drop, timing=self.latency if self.latency.enabled else None)
        ctx.inherited_maps, metadata_notes = _inherited_maps(model)
        report = Report(name, budget={"max_drop": self.max_drop})
        resources.reset_peak()
        t0 = time.perf_counter()
        report.steps.append(evaluator.measure(model, Step("original", "original")))
        report.steps[0].seconds, report.steps[0].peak_mb = time.perf_counter() - t0, resources.peak_mb()
        report.budget["metric"] = budget_metric(report.steps[0].accuracy, report.steps[0].fidelity)[0]
        report.steps[0].notes += metadata_notes + _nonfinite_note(model)
        if evaluation is None and calib is None:
            report.steps[0].notes += _symbolic_dims_note(model)
        baseline, current, budget_met, done = score(report.steps[0]), model, True, []
        for unit in _units(self.passes):
            saved = ctx.state.snapshot()
            candidate, steps = current, []
            for p in unit:
                step, new = self._apply(p, candidate, steps[-1] if steps else report.final(), ctx, evaluator,
                                        tuple(done + [s.pass_ for s in steps if s.status == "applied"]))
                steps.append(step)
                candidate = new if new is not None else candidate
            last = steps[-1]
            changed = any(s.status == "applied" for s in steps)
            if changed and self.max_drop is not None and baseline - score(last) > self.max_drop + 1e-9:
                what = " + ".join(p.name for p in unit)
                for s in steps:
                    s.status = "rolled back"
                last.notes.append(f"rolled back ({what}): {report.budget['metric']} {score(last):.2f} is "
                                  f"{baseline - score(last):.2f} points below the original's {baseline:.2f} "
                                  f"(budget {self.max_drop})")
                ctx.state = saved
                budget_met = False
            elif changed:
                current = candidate
                done += [s.pass_ for s in steps if s.status == "applied"]
            report.steps.extend(steps)
        if done:
            current = _with_metadata(current, self.passes_applied(report), _combined_maps(ctx))
        return CompressResult(current, report, budget_met)

    @staticmethod
    def passes_applied(report: Report) -> list[dict[str, Any]]:
        return [{"pass": s.pass_, "options": s.options} for s in report.steps[1:] if s.status == "applied"]

    def _apply(self, p: Pass, current: onnx.ModelProto, last: Step, ctx: Context,
               evaluator: Evaluator, previous: tuple[str, ...]) -> tuple[Step, onnx.ModelProto | None]:
        """Run one pass on a fresh graph of `current`; return its step and the new model (None if unchanged)."""
        t0 = time.perf_counter()
        resources.reset_peak()
        step = Step(p.name, "applied", options=_jsonable(p.options()))
        start, raised = _with_opset(current, p, previous)
        try:
            result = p.run(G.to_graph(start), ctx)
        except CompressError:
            raise
        except Exception as e:
            raise PassError(p.name, f"{type(e).__name__}: {e}", previous) from e
        step.stats, step.notes = dict(result.stats), list(result.notes)
        if not result.modified:  # same model: same measurements
            step.notes += _body_notes(p, start, start)
            step.notes += _nothing_to_do(p, start) if not step.notes else []
            return replace(last, pass_=p.name, status="unchanged", options=step.options, stats=step.stats,
                           notes=step.notes, seconds=time.perf_counter() - t0, peak_mb=resources.peak_mb()), None
        try:
            new = G.to_model(G.tidy(result.graph), like=start)
            del result      # the pass's graph (every weight it read or computed) is not needed past export
            gc.collect()    # graphsurgeon's nodes and tensors refer to each other: only the cycle collector frees them
            validate_model(new, self.providers)
        except ValidationError as e:
            raise PassError(p.name, f"produced an invalid model: {e}", previous) from e
        except Exception as e:
            raise PassError(p.name, f"produced a graph that cannot be exported: {e}", previous) from e
        step.notes += _body_notes(p, start, new)
        changed = _boundary_changes(current, new)
        if changed:
            raise PassError(p.name, f"changed the graph's {changed}; inputs and outputs must stay as they are", previous)
        if G.default_opset(new) > G.default_opset(current):
            step.notes.append(f"raised the opset from {G.default_opset(current)} to {G.default_opset(new)}"
                              + (f" (the pass needs {p.required_opset()})" if raised else ""))
        try:
            evaluator.measure(new, step, ctx.state.branch_probs)
        except Exception as e:
            raise PassError(p.name, f"its output could not be measured: {type(e).__name__}: {e}", previous) from e
        step.seconds, step.peak_mb = time.perf_counter() - t0, resources.peak_mb()
        return step, new


def _nothing_to_do(p: Pass, model: onnx.ModelProto) -> list[str]:
    """Why a model was left as is, where the model itself says so: it has none of the ops the pass
    handles, in the graph or in any If/Loop/Scan body."""
    if any(n.op_type in p.handles for n in model.graph.node) or any(n.op_type in p.handles for _, n in _body_nodes(model.graph)):
        return []   # the pass saw nodes it handles: only it can say why it left them
    ops = sorted(p.handles)
    if len(ops) > 6:
        what = f"node of the {len(ops)} op types this pass handles"
    else:
        what = (f"{', '.join(ops[:-1])} or " if len(ops) > 1 else "") + f"{ops[-1]} node" if ops else "node it handles"
    return [f"nothing to do: the model has no {what}"]


def _body_nodes(graph: onnx.GraphProto, owner: onnx.NodeProto | None = None):
    """(owner, node) for the nodes inside the If/Loop/Scan bodies of a graph, at any depth; the
    owner is the top-level node that holds the body."""
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                for inner in sub.node:
                    yield owner or node, inner
                yield from _body_nodes(sub, owner or node)


def _bodies(model: onnx.ModelProto) -> dict[str, list[bytes]]:
    """The nodes of the bodies of each top-level If/Loop/Scan node (serialized, nested bodies
    included), by the node's first output. Initializers are left out: an export moves an outer
    constant into the body that alone still reads it, which changes nothing the body computes."""
    return {owner.output[0]: [n.SerializeToString() for o, n in _body_nodes(model.graph) if o is owner]
            for owner in model.graph.node if owner.output}


def _body_notes(p: Pass, before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
    """A note for each If/Loop/Scan body that holds ops the pass handles and that the pass left as
    it was: what those nodes are, so that the report says which part of the model was not touched."""
    inside: dict[str, tuple[onnx.NodeProto, Counter]] = {}
    for owner, node in _body_nodes(before.graph):
        if node.op_type in p.handles:
            inside.setdefault(owner.output[0], (owner, Counter()))[1][node.op_type] += 1
    if not inside:
        return []
    old, new = _bodies(before), _bodies(after)
    notes = []
    for key, (owner, ops) in inside.items():
        if new.get(key) == old.get(key):
            what = ", ".join(f"{k} x{v}" for k, v in sorted(ops.items()))
            notes.append(f"{owner.op_type} '{owner.name or key}': the nodes in its body ({what}) were left as they are "
                         "(this pass does not compress If/Loop/Scan bodies)")
    return notes


def _with_opset(model: onnx.ModelProto, p: Pass, previous: tuple[str, ...]) -> tuple[onnx.ModelProto, bool]:
    """The model at the opset the pass needs (converted by onnx's version converter when lower)."""
    need = p.required_opset()
    if G.default_opset(model) >= need:
        return model, False
    try:
        converted = onnx.version_converter.convert_version(model, need)
    except Exception as e:
        raise PassError(p.name, f"needs opset {need}; converting the model from opset {G.default_opset(model)} failed: "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", previous) from e
    return converted, True


def _io(values) -> list[tuple[str, int, tuple]]:
    out = []
    for v in values:
        tt = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim) \
            if tt.HasField("shape") else None
        out.append((v.name, tt.elem_type, dims))
    return out


def _boundary_changes(before: onnx.ModelProto, after: onnx.ModelProto) -> str:
    """What a pass changed of the graph's inputs and outputs (names, types, declared dims), or ''.
    A pass may append outputs and add inputs with a default (an initializer of the same name, as
    early-exit's "exit_threshold"): a caller that feeds and reads what it did before is unaffected."""
    inits = {t.name for t in before.graph.initializer}
    defaults = inits | {t.name for t in after.graph.initializer}
    ins0 = [v for v in _io(before.graph.input) if v[0] not in inits]
    ins1 = [v for v in _io(after.graph.input) if v[0] not in defaults]
    outs0, outs1 = _io(before.graph.output), _io(after.graph.output)[:len(before.graph.output)]
    parts = [f"{what}: {a} -> {b}" for what, a, b in (("inputs", ins0, ins1), ("outputs", outs0, outs1)) if a != b]
    return "; ".join(parts)


def _units(passes: Sequence[Pass]) -> list[list[Pass]]:
    """Budget units: a pass together with the recovering passes (distill) right after it, so that
    "prune, then recover" is judged after the recovery."""
    units: list[list[Pass]] = []
    for p in passes:
        if units and p.recovers:
            units[-1].append(p)
        else:
            units.append([p])
    return units


def _nonfinite_note(model: onnx.ModelProto) -> list[str]:
    """Initializers holding NaN or Inf: named in the report, since every fit on such a model (and
    its scores) inherits them."""
    bad = []
    for t in model.graph.initializer:
        if t.data_type in FLOAT_TYPES and t.data_location != onnx.TensorProto.EXTERNAL:
            a = onnx.numpy_helper.to_array(t)
            n = int(a.size - np.count_nonzero(np.isfinite(a)))
            if n:
                bad.append(f"'{t.name}' ({n} of {a.size})")
    if not bad:
        return []
    return [f"NaN or Inf values in {len(bad)} initializer(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
            "outputs, scores and fits that read them are not meaningful: fix the model first"]


FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _symbolic_dims_note(model: onnx.ModelProto) -> list[str]:
    """Without data, symbolic dimensions other than the batch become 1: say so."""
    inits = {t.name for t in model.graph.initializer}
    odd = [i.name for i in model.graph.input if i.name not in inits
           and any(not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim[1:])]
    if not odd:
        return []
    return [f"input(s) {', '.join(odd)} have symbolic dimensions besides the batch; with no --calib/--eval "
            "data they were set to 1, so MACs, latency and fidelity reflect 1-pixel inputs: pass data"]


def _signature(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return G.input_names(model), G.output_names(model)


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def _read_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """What an earlier onnxcompress run recorded in the model (passes, channel maps), if anything."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                meta = json.loads(prop.value)
            except ValueError:
                return {}
            return meta if isinstance(meta, dict) else {}
    return {}


def _inherited_maps(model: onnx.ModelProto) -> tuple[dict[str, ChannelMap], list[str]]:
    """Channel maps an earlier run recorded: {"tensor": {"of": channels before, "kept": [...]}}.
    Every record is range-checked (indices unique, increasing, within `of`); a malformed one is
    ignored and named in the returned notes."""
    maps = _read_metadata(model).get("channel_maps", {})
    out, bad = {}, []
    for name, entry in (maps.items() if isinstance(maps, dict) else []):
        try:
            of, kept = int(entry["of"]), np.asarray(entry["kept"], dtype=np.int64)
        except (KeyError, TypeError, ValueError, OverflowError):
            bad.append(str(name))
            continue
        if kept.ndim != 1 or of < 1 or (kept.size and (kept.min() < 0 or kept.max() >= of or np.any(np.diff(kept) <= 0))):
            bad.append(str(name))
            continue
        out[str(name)] = ChannelMap(of, kept)
    if not isinstance(maps, dict):
        bad.append("channel_maps")
    notes = [f"metadata: malformed channel map record(s) ignored: {', '.join(bad[:5])}"
             + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")] if bad else []
    return out, notes


def _combined_maps(ctx: Context) -> dict[str, ChannelMap]:
    """This run's cuts composed with the inherited ones: relative to the first original."""
    out = dict(ctx.inherited_maps)
    for name, here in ctx.state.channel_maps.items():
        out[name] = here.after(out[name]) if name in out else here
    return out


def _with_metadata(model: onnx.ModelProto, applied: list[dict[str, Any]],
                   channel_maps: dict[str, ChannelMap]) -> onnx.ModelProto:
    """Record the applied pipeline (appended to any earlier onnxcompress run) and the channel maps
    (which of the original's channels each pruned tensor kept, so a later run can still match a
    teacher's channels) in metadata_props."""
    history = _read_metadata(model).get("passes", [])
    history = history if isinstance(history, list) else []
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    record: dict[str, Any] = {"version": __version__, "passes": history + applied}
    if channel_maps:
        record["channel_maps"] = {k: {"of": m.domain, "kept": [int(i) for i in m.kept]} for k, m in channel_maps.items()}
    entry.value = json.dumps(record)
    return model
