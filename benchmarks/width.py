"""Width knob (`python benchmarks/run.py --only width`): `width-knob` with its default widths (1, 0.75,
0.5) on the reference CNNs, judged at batch 1 on the 1,000 test digits: per width, accuracy, MACs,
latency (the knob fed that width, the separately pruned model, and a prototype of the other
structure, one set of weights Sliced at run time), file sizes; every model interleaved digit by
digit on one thread (order rotating), median of the rounds, ratios to the original of the same run."""
from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from benchmarks.run import ROOT
from onnxcompress import Context, LatencyConfig, PassManager, graph as G, io
from onnxcompress.metrics import size_bytes, total_macs
from onnxcompress.passes import FoldBatchNorm, PruneChannels, WidthKnob
from onnxcompress.report import human_bytes, markdown_table

SECTION_TITLE = "## Width knob (width-knob)"
MODELS = ("resnet", "vgg", "mobilenet")
WIDTHS = (1.0, 0.75, 0.5)
ROUNDS = 3
NO_LATENCY = LatencyConfig(enabled=False)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def interleaved(runs: list[tuple[onnx.ModelProto, dict]], x: np.ndarray, rounds: int = ROUNDS,
                feed: str = "input") -> tuple[list[float], list[np.ndarray]]:
    """Each (model, extra feeds) run digit by digit at batch 1, all of them per digit, the order rotating:
    the median over rounds of the mean latency (ms), and each model's logits (first round)."""
    sessions = [(_session(m), extra) for m, extra in runs]
    for i in range(20):
        for s, extra in sessions:
            s.run(None, {feed: x[i:i + 1], **extra})
    times, outs = np.zeros((len(runs), rounds, len(x))), [[None] * len(x) for _ in runs]
    for r in range(rounds):
        for i in range(len(x)):
            one = {feed: x[i:i + 1]}
            for k in np.roll(np.arange(len(runs)), i + r):
                s, extra = sessions[k]
                t0 = time.perf_counter()
                out = s.run(None, {**one, **extra})[0]
                times[k, r, i] = time.perf_counter() - t0
                if r == 0:
                    outs[k][i] = out
    return [float(np.median(t.mean(1)) * 1e3) for t in times], [np.concatenate(o) for o in outs]


def sliced_prototype(pruned: onnx.ModelProto, width: float, name: str = "width") -> onnx.ModelProto:
    """The other structure, for timing only: `pruned` with BatchNorm folded and every Conv/Gemm weight
    and bias read through a Slice of a zero-padded full-width tensor (axes 0 and 1 padded to
    ceil(dim / width)), the slice ends computed from a float input `name` at run time (fed `width`,
    they give the pruned sizes): one set of weights for every width, as a shared-weight knob stores them."""
    graph = G.to_graph(pruned)
    FoldBatchNorm().run(graph, Context())
    G.tidy(graph)
    knob = gs.Variable(name, np.float32, [])
    graph.inputs.append(knob)
    for node in [n for n in graph.nodes if n.op in ("Conv", "Gemm")]:
        for i in range(1, min(len(node.inputs), 3)):
            value = G.constant_value(node.inputs[i])
            if value is not None:
                node.inputs[i] = _sliced(graph, knob, value, width)
    return G.to_model(G.tidy(graph), like=pruned)


def _sliced(graph: gs.Graph, knob: gs.Variable, value: np.ndarray, width: float) -> gs.Variable:
    axes = list(range(min(value.ndim, 2)))
    full = np.zeros([int(np.ceil(d / width)) if a in axes else d for a, d in enumerate(value.shape)], value.dtype)
    full[tuple(slice(0, d) for d in value.shape)] = value
    new = lambda op, inputs, dtype, **attrs: _node(graph, op, inputs, dtype, **attrs)
    per_width = G.make_constant(G.unique_name(graph, "proto_dims"), np.array([value.shape[a] / width for a in axes],
                                                                             np.float32))
    ends = new("Cast", [new("Round", [new("Mul", [knob, per_width], np.float32)], np.float32)], np.int64,
               to=onnx.TensorProto.INT64)
    starts = G.make_constant(G.unique_name(graph, "proto_starts"), np.zeros(len(axes), np.int64))
    axes_c = G.make_constant(G.unique_name(graph, "proto_axes"), np.array(axes, np.int64))
    padded = G.make_constant(G.unique_name(graph, "proto_full"), full)
    return new("Slice", [padded, starts, ends, axes_c], value.dtype)


def _node(graph: gs.Graph, op: str, inputs: list, dtype, **attrs) -> gs.Variable:
    out = gs.Variable(G.unique_name(graph, f"proto_{op.lower()}"), dtype)
    graph.nodes.append(gs.Node(op, G.unique_name(graph, f"proto_{op}"), attrs, inputs, [out]))
    return out


def _run(passes, model: onnx.ModelProto, calib) -> tuple[onnx.ModelProto, float, list[str]]:
    t0 = time.perf_counter()
    result = PassManager(passes, calib=calib, max_drop=None, latency=NO_LATENCY).run(model)
    return result.model, time.perf_counter() - t0, result.report.steps[-1].notes


def width_section(calib, test, models=MODELS) -> str:
    x, labels = test.feeds["input"], test.labels
    rows = []
    for name in models:
        print(f"  width-knob {name} ...", flush=True)
        rows += _model_rows(name, io.load_model(ROOT / "models" / f"{name}.onnx"), calib, x, labels)
    return SECTION_TITLE + "\n\n" + INTRO + "\n\n" + markdown_table(
        ["model", "width", "accuracy (vs original)", "MACs", "latency b1: knob", "pruned alone",
         "sliced weights (prototype)", "file: pruned alone", "knob vs pruned alone (max abs diff)"], rows)


def _model_rows(name: str, model: onnx.ModelProto, calib, x: np.ndarray, labels: np.ndarray) -> list[list[str]]:
    knob, seconds, notes = _run([WidthKnob(widths=WIDTHS)], model, calib)
    if not any(n.op_type == "If" for n in knob.graph.node):
        return [[name, "-", "not applied: " + "; ".join(notes)[:200]] + ["-"] * 6]
    narrow = [w for w in WIDTHS if w < 1]
    pruned = {w: _run([PruneChannels(ratio=1 - w)], model, calib)[0] for w in narrow}
    runs = [(model, {})] + [(knob, {"width": np.array(w, np.float32)}) for w in WIDTHS]
    runs += [(pruned[w], {}) for w in narrow] + [(sliced_prototype(pruned[w], w), {"width": np.array(w, np.float32)})
                                                 for w in narrow]
    ms, logits = interleaved(runs, x)
    acc = [float(np.mean(z.argmax(1) == labels) * 100) for z in logits]
    macs0, k = total_macs(model), len(WIDTHS)
    rows = []
    for j, w in enumerate(WIDTHS):
        knob_i = 1 + j
        alone = 1 + k + narrow.index(w) if w in narrow else 0
        proto = alone + len(narrow) if w in narrow else None
        macs = total_macs(pruned[w]) / macs0 if w in narrow else 1.0
        rows.append([name, f"{w:g}", f"{acc[knob_i]:.1f}% ({acc[knob_i] - acc[0]:+.1f})", f"{macs:.2f}x",
                     _ratio(ms, knob_i), _ratio(ms, alone) if alone else "original", _ratio(ms, proto) if proto else "-",
                     human_bytes(size_bytes(pruned[w] if w in narrow else model)),
                     f"{np.abs(logits[knob_i] - logits[alone]).max():.1e}"])
    rows.append([name, "knob file", f"all {k} widths in one file, pass time {seconds:.0f} s", "-", "-", "-",
                 f"{human_bytes(size_bytes(sliced_prototype(pruned[min(narrow)], min(narrow))))} (all widths)",
                 f"{human_bytes(size_bytes(knob))} ({size_bytes(knob) / size_bytes(model):.2f}x the original)", "-"])
    return rows


def _ratio(ms: list[float], i: int) -> str:
    return f"{ms[i]:.3f} ms ({ms[i] / ms[0]:.2f}x)"


INTRO = """`width-knob` with its defaults (widths 1, 0.75 and 0.5; each narrower width built by
`prune-channels(ratio=1 - width)`, ThiNet ranking and recovery on the 1,000 calibration digits), one
file with an optional float input `width`. Judged at batch 1 on the 1,000 test digits: the original,
the knob fed each width, each separately pruned model and the sliced-weight prototype run
interleaved digit by digit, one thread, the order rotating, 3 rounds; latency is the mean over the
digits, the median over rounds, the ratio to the original of the same run. "Pruned alone":
`prune-channels(ratio=1 - width)` with the same options, its own file; the last column shows that
the knob fed a width computes that model. "Sliced weights (prototype)": the other structure the
issue names, for timing only: the pruned model with BatchNorm folded and every Conv/Gemm weight
read through a Slice (of one zero-padded full-width tensor) whose ends come from the width input at
run time; its file size is what one shared set of weights would weigh."""


OCR_TITLE = "## Width knob on PP-OCR (width-knob)"


def ocr_section() -> str:
    """`width-knob` with its defaults on the three PP-OCR models, each width judged by what a user
    sees (decoded strings, text maps, angle labels): the knob file with its `width` default set to
    that width (each width is `prune-channels(ratio=1 - width)` with recovery, as the MNIST section
    checks); latency ratios of the whole knob file fed that width."""
    from benchmarks import ocr

    knobs: dict[int, tuple] = {}

    def run(model, calib, passes):
        label = passes[0]
        if id(model) not in knobs:                 # one knob per model, fed each width below
            t0 = time.perf_counter()
            result = PassManager([WidthKnob()], calib=calib, max_drop=None, latency=LatencyConfig(enabled=False)).run(model)
            knobs[id(model)] = (result.model, time.perf_counter() - t0, result.report.steps[-1])
        knob, secs, step = knobs[id(model)]
        fed = onnx.ModelProto()
        fed.CopyFrom(knob)
        value = next(t for t in fed.graph.initializer if t.name == "width")
        value.CopyFrom(onnx.numpy_helper.from_array(np.array(label, np.float32), "width"))
        return fed, secs, step.notes, {**step.stats, "width": label}

    widths = [(f"width-knob fed width {w:g} (defaults; MACs column: the full knob)", lambda w=w: w) for w in (1.0, 0.75, 0.5)]
    stat = lambda st: "{:.2f}x".format(st.get("macs_ratio_{:g}".format(st["width"]), float("nan"))) if "width" in st else "-"
    return OCR_TITLE + "\n\n" + ocr_section.__doc__.split("\n\n")[0].replace("    ", "") + "\n\n" + \
        ocr.pass_rows(widths, "MACs at that width", stat, run)
