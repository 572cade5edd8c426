"""Structured pruning from one line (`python benchmarks/run.py --only prune`): `prune-channels` with
default options and a MAC or latency target on resnet, vgg and mobilenet, beside the old default
(a uniform ratio, no rounding), a small network of the same MACs trained from scratch
(`models/<name>_small.onnx`, `python models/train.py --twins`) and unstructured pruning at the same
parameter count; accuracy, MACs, latency ratios at batch 1 and 32 (each model and the original run by run in turn), the
pass's own time; the sensitivity sweep serial against parallel; a profile at batch 1 and 32."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import onnx

from benchmarks import ocr
from benchmarks.run import ROOT, Row, measure, structured_table
from onnxcompress import LatencyConfig, PassManager, io
from onnxcompress.metrics import count_params, total_macs
from onnxcompress.passes import Distill, PruneChannels, PruneWeights
from onnxcompress.report import markdown_table
from onnxcompress.runtime import channel_multiple

SECTION_TITLE = "## Structured pruning (prune-channels)"
OCR_START = "PP-OCR (rendered text as in the PP-OCR section; one thread):"   # where its PP-OCR part begins
MODELS = ("resnet", "vgg", "mobilenet")
NO_LATENCY = LatencyConfig(enabled=False)


def _run(passes, model: onnx.ModelProto, calib) -> tuple[onnx.ModelProto, float, list[str]]:
    model, seconds, notes, _ = _run_stats(model, calib, passes)
    return model, seconds, notes


def _run_stats(model: onnx.ModelProto, calib, passes) -> tuple[onnx.ModelProto, float, list[str], dict]:
    t0 = time.perf_counter()
    result = PassManager(passes, calib=calib, max_drop=None, latency=NO_LATENCY).run(model)
    step = result.report.steps[-1]
    return result.model, time.perf_counter() - t0, step.notes, step.stats


def _ocr_part() -> str:
    """PP-OCR: the defaults and a MAC target on rec and cls; det (33 groups at 480x640, a target's
    sweep takes too long here) with the defaults only."""
    kept = lambda st: f"{st['channels_after'] / st['channels_before']:.2f}" if st.get("channels_before") else "-"
    defaults = ("prune-channels() (defaults: ratio 0.3, round_to auto)", PruneChannels)
    target = ("prune-channels(macs=0.7)", lambda: PruneChannels(macs=0.7))
    return (ocr.pass_rows([defaults, target], "channels kept", kept, _run_stats, kinds=("rec", "cls")) + "\n\n"
            + ocr.pass_rows([defaults], "channels kept", kept, _run_stats, kinds=("det",)))


def _allocated(notes: list[str]) -> str:
    """The allocation from a target's notes, what its rivals (uniform, progressive) did, which cut
    the pass kept, and the steps it chose."""
    note = next((n for n in notes if "allocated:" in n), "")
    rival = next((n for n in notes if " also met by " in n), "")
    chosen = [n.split(" chosen by ")[0] for n in notes if " step(s) chosen by " in n]
    return (note.split("allocated: ")[-1] + (f" (rivals: {rival.split(' also met by ', 1)[-1]})" if rival else "")
            + (f"; {', '.join(chosen)}" if chosen else ""))


def prune_section(calib, test, cfg: LatencyConfig, rounds: int, models=MODELS, facts: dict | None = None,
                  ocr_part: bool = True) -> str:
    multiple, why = channel_multiple()
    parts = [SECTION_TITLE + "\n\n" + TEXT.format(multiple=multiple, why=why)]
    for name in models:
        print(f"  prune-channels {name} ...", flush=True)
        model = io.load_model(ROOT / "models" / f"{name}.onnx")
        rows = [Row("original", model, 0.0)]
        allocations = {}
        for label, p in (("prune-channels(ratio=0.3, round_to=1): the old default", PruneChannels(ratio=0.3, round_to=1)),
                         ("prune-channels(macs=0.5)", PruneChannels(macs=0.5)),
                         ("prune-channels(latency=0.5)", PruneChannels(latency=0.5))):
            pruned, seconds, notes = _run([p], model, calib)
            rows.append(Row(label, pruned, seconds))
            allocations[label] = _allocated(notes)
        twin = ROOT / "models" / f"{name}_small.onnx"
        if twin.exists():
            rows.append(Row(f"{twin.name}: {name} at ~0.5x MACs trained from scratch (same data, recipe)",
                            io.load_model(twin), 0.0))
        sparsity = 1 - count_params(rows[2].model) / count_params(model)
        same, seconds, _ = _run([PruneWeights(sparsity=sparsity), Distill()], model, calib)
        rows.append(Row(f"unstructured at macs=0.5's parameter count (prune-weights {sparsity:.0%} + distill)",
                        same, seconds))
        measure(rows, test, cfg, rounds)
        if facts is not None:
            base, row = rows[0].step, rows[2].step
            b1 = min(cfg.batch_sizes)
            facts.setdefault("speedup_per_mac", {})[name] = (
                base.latency_ms[b1] / row.latency_ms[b1] / (base.macs / row.macs), b1)
        alloc = "\n".join(f"- `{k}`: {v}" for k, v in allocations.items() if v)
        parts.append(f"### {name}\n\nRatios the targets allocated (group: share of channels removed):\n\n{alloc}\n\n"
                     + structured_table(rows, cfg.batch_sizes))
    if "resnet" in models:
        parts.append(_jobs_part(calib))
        parts.append(_profile_part(calib))
    if ocr_part:
        parts.append(OCR_START + "\n\n" + _ocr_part())
    return "\n\n".join(parts)


def _jobs_part(calib) -> str:
    """The same target with the sensitivity trials in one process and in one worker per core."""
    model = io.load_model(ROOT / "models" / "resnet.onnx")
    out = []
    for jobs in (1, None):
        pruned, seconds, notes = _run([PruneChannels(macs=0.5, jobs=jobs)], model, calib)
        out.append((jobs, seconds, _allocated(notes), pruned.graph.SerializeToString()))
    same = out[0][2] == out[1][2] and out[0][3] == out[1][3]     # the metadata differs: it records `jobs`
    return (f"Sensitivity trials in parallel (resnet, `prune-channels(macs=0.5)`, whole pass): one process "
            f"{out[0][1]:.0f}s, `jobs` = one worker per core {out[1][1]:.0f}s "
            f"({out[0][1] / out[1][1]:.2f}x); allocations and output graphs {'identical' if same else 'DIFFERENT'}.")


def _profile_part(calib) -> str:
    """onnxruntime's profile of the original and the macs=0.5 model at batch 1 and 32: time inside
    kernels against the whole run, and two bounds on the speedup, to show what limits it."""
    rows = []
    for name in MODELS:
        model = io.load_model(ROOT / "models" / f"{name}.onnx")
        pruned, _, _ = _run([PruneChannels(macs=0.5)], model, calib)
        fewer = total_macs(model) / total_macs(pruned)
        for batch in (1, 32):
            (k0, t0, nodes0), (k1, t1, nodes1) = _profiles([model, pruned], calib, batch)
            bound = t0 / (k0 / fewer + (t1 - k1))      # kernels as much faster as MACs fell; the overhead as measured
            per_layer = t0 / (_scaled_kernels(nodes0, nodes1) + t1 - k1)
            for label, (kernels, total, nodes), cells in (
                    ("original", (k0, t0, nodes0), ["-"] * 6),
                    ("macs=0.5", (k1, t1, nodes1), [f"{fewer:.2f}x", f"{t0 / t1:.2f}x", f"{bound:.2f}x",
                                                    f"{per_layer:.2f}x", f"{bound / fewer:.2f}",
                                                    f"{per_layer / fewer:.2f}"])):
                rows.append([name, label, str(batch), str(len(nodes)), f"{total:.0f}", f"{kernels:.0f}",
                             f"{total - kernels:.0f}", f"{kernels / total:.0%}", *cells])
    return ("Profile (onnxruntime's profiler, 1 thread, median over 200 runs at batch 1 and 50 at batch 32, "
            "microseconds; the two models run by run in turn): time in kernels against the whole `run` call; the rest is per-run and per-node "
            "overhead, which pruning does not shrink. \"bound, all kernels\": the speedup if the kernels' time "
            "fell exactly with the model's MACs and the time outside them stayed as measured. \"bound, per "
            "layer\": if each layer's kernel fell with its own MACs (a layer the cut left whole keeps its time; "
            "MACs from the shapes onnxruntime ran). At batch 32, the profiled speedup below the per-layer bound is "
            "what the narrower kernels lose per MAC. The profiler adds its own time to every node, so profiled "
            "speedups at batch 1 read below the tables' (timed without it).\n\n" + markdown_table(
                ["model", "variant", "batch", "nodes run", "run total", "in kernels", "outside kernels",
                 "kernel share", "MAC reduction", "profiled speedup", "bound, all kernels", "bound, per layer",
                 "all kernels / MAC reduction", "per layer / MAC reduction"], rows))


def _scaled_kernels(original: dict[str, tuple[float, int]], cut: dict[str, tuple[float, int]]) -> float:
    """The cut's kernel time if each layer's kernel were as much faster as its own MACs fell: the
    original's time per node scaled by the node's MAC ratio; nodes without MACs, and nodes only
    one model has, as the cut measured them."""
    total = 0.0
    for name, (us, macs) in original.items():
        if name not in cut:
            continue
        cut_us, cut_macs = cut[name]
        total += us * cut_macs / macs if macs else cut_us
    return total + sum(us for name, (us, _) in cut.items() if name not in original)


def _layer_macs(op: str, args: dict) -> int:
    """Multiply-accumulates of one profiled node from the shapes onnxruntime ran (0 for other ops)."""
    shapes = [next(iter(t.values())) for t in args.get("input_type_shape", [])]
    out = [next(iter(t.values())) for t in args.get("output_type_shape", [])]
    if not shapes or not out:
        return 0
    if op in ("Conv", "FusedConv") and len(shapes) > 1:
        return int(np.prod(out[0]) * np.prod(shapes[1][1:]))
    if op in ("Gemm", "FusedGemm", "MatMul", "FusedMatMul"):     # A [.., K]; a constant B is not listed
        return int(np.prod(out[0]) * shapes[0][-1])
    return 0


def _profiles(models: list[onnx.ModelProto], calib, batch: int = 1) -> list[tuple[float, float, dict[str, tuple[float, int]]]]:
    """Per model: median time in kernels and of the whole run (us), and per node its median kernel
    time and MACs; the models profiled run by run in turn, so that drift hits them alike."""
    import onnxruntime as ort

    runs, warm = (200, 20) if batch == 1 else (50, 5)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.enable_profiling = True
    opts.log_severity_level = 3
    sessions = [ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]) for m in models]
    feed = {"input": calib.feeds["input"][:batch]}
    for i in range(runs + warm):      # the first `warm` are warm-up, dropped below
        for session in sessions[i % len(sessions):] + sessions[:i % len(sessions)]:
            session.run(None, feed)
    return [_read_profile(session.end_profiling(), warm) for session in sessions]


def _read_profile(path: str, warm: int) -> tuple[float, float, dict[str, tuple[float, int]]]:
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    runs_us = [e["dur"] for e in events if e.get("name") == "model_run"][warm:]
    per_run: dict[int, float] = {}
    per_node: dict[str, list[float]] = {}
    macs: dict[str, int] = {}
    run_index = -1
    for e in events:
        if e.get("name") == "model_run":
            run_index += 1
        elif e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and run_index >= warm:
            per_run[run_index] = per_run.get(run_index, 0.0) + e["dur"]
            per_node.setdefault(e["name"], []).append(e["dur"])
            macs[e["name"]] = _layer_macs(e["args"].get("op_name", ""), e["args"])
    nodes = {n: (float(np.median(ts)), macs[n]) for n, ts in per_node.items()}
    return float(np.median(list(per_run.values()))), float(np.median(runs_us)), nodes


TEXT = """Structured pruning from one line. `prune-channels(macs=0.5)` and `prune-channels(latency=0.5)`
allocate per-group ratios inside the pass: every channel group pruned alone at 25/50/75%, and
whole where it is a residual branch's inner width (the branch replaced by its mean) (ThiNet
ranking, recovery fit on two thirds of the 1,000 calibration digits, accuracy on the other third;
trials in parallel workers), then the greedy allocation of the `sensitivity` command (the same code)
and its rivals (every group at one ratio; for latency, the progressive search, which then steps back
while the target holds), then the cut and the
recovery (ThiNet ranking; recovery fit on each image and two shifted copies). The candidate, then the
steps (1 or 3), are chosen on the calibration digits in three folds, each third scored after recovery
on the rest, by KL from the original first and accuracy second. Kept channel counts are multiples of {multiple} (`round_to="auto"`:
{why} on this machine; the latency target, which times every width, half of it). The latency target compares the time of a batch of 1 plus a batch of 32
(one thread, so batch 32 dominates), each candidate measured in onnxruntime against the original,
the two sessions run by run in turn. Speedups in the tables: every model timed against the original the
same way (the two run by run in turn, 100 turns, in three rounds spread over the table's timing),
the median of the three rounds' ratios of the medians.
"speedup / MAC reduction" is the latency speedup divided by the MAC
reduction (1.0 = latency falls exactly as MACs do). The twins are the same architectures at about
0.7x the width, trained from scratch with the same recipe on the same 3,000 digits; "time" is the
pass's own time (the twins': not counted, about a minute each with torch)."""
