"""Structured pruning from one line (`python benchmarks/run.py --only prune`): `prune-channels` with
default options and a MAC or latency target on resnet, vgg and mobilenet, beside the old default
(a uniform ratio, no rounding), a small network of the same MACs trained from scratch
(`models/<name>_small.onnx`, `python models/train.py --twins`) and unstructured pruning at the same
parameter count; accuracy, MACs, latency ratios at batch 1 and 32 (each model and the original run by run in turn), the
pass's own time; the sensitivity sweep serial against parallel; a batch-1 profile."""
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
    the pass kept, and the criterion and steps it chose."""
    note = next((n for n in notes if "allocated:" in n), "")
    rival = next((n for n in notes if " also met by " in n), "")
    chosen = [n.split(" chosen by ")[0] for n in notes if n.startswith("criterion ") or " step(s) chosen by " in n]
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
    """Batch 1: onnxruntime's profile of the original and the macs=0.5 model, time inside kernels
    against the whole run, to show what bounds the batch-1 speedup."""
    rows = []
    for name in MODELS:
        model = io.load_model(ROOT / "models" / f"{name}.onnx")
        pruned, _, _ = _run([PruneChannels(macs=0.5)], model, calib)
        fewer = total_macs(model) / total_macs(pruned)
        (k0, t0, n0), (k1, t1, n1) = _profile(model, calib), _profile(pruned, calib)
        bound = t0 / (k0 / fewer + (t1 - k1))      # kernels as much faster as MACs fell; the overhead as measured
        for label, (kernels, total, nodes), cells in (("original", (k0, t0, n0), ["-", "-", "-"]),
                                                      ("macs=0.5", (k1, t1, n1), [f"{fewer:.2f}x", f"{bound:.2f}x", f"{bound / fewer:.2f}"])):
            rows.append([name, label, str(nodes), f"{total:.0f}", f"{kernels:.0f}", f"{total - kernels:.0f}",
                         f"{kernels / total:.0%}", *cells])
    return ("Batch-1 profile (onnxruntime's profiler, 1 thread, median over 200 runs, microseconds): time in "
            "kernels against the whole `run` call; the rest is per-run and per-node overhead, which pruning "
            "does not shrink. \"bound\": the batch-1 speedup if the kernels' time fell exactly with the MACs "
            "and the time outside them stayed as measured; \"bound / MAC reduction\" is the most the speedup "
            "/ MAC reduction column above can reach at batch 1.\n\n" + markdown_table(
                ["model", "variant", "nodes run", "run total", "in kernels", "outside kernels", "kernel share",
                 "MAC reduction", "bound", "bound / MAC reduction"], rows))


def _profile(model: onnx.ModelProto, calib, runs: int = 200) -> tuple[float, float, int]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.enable_profiling = True
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"input": calib.feeds["input"][:1]}
    for _ in range(runs + 20):      # the first 20 are warm-up, dropped below
        session.run(None, feed)
    path = session.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    runs_us = [e["dur"] for e in events if e.get("name") == "model_run"][20:]
    per_run: dict[int, float] = {}
    nodes: set[str] = set()
    run_index = -1
    for e in events:
        if e.get("name") == "model_run":
            run_index += 1
        elif e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and run_index >= 20:
            per_run[run_index] = per_run.get(run_index, 0.0) + e["dur"]
            nodes.add(e["name"])
    return float(np.median(list(per_run.values()))), float(np.median(runs_us)), len(nodes)


TEXT = """Structured pruning from one line. `prune-channels(macs=0.5)` and `prune-channels(latency=0.5)`
allocate per-group ratios inside the pass: every channel group pruned alone at 25/50/75% (ThiNet
ranking, recovery fit on two thirds of the 1,000 calibration digits, accuracy on the other third;
trials in parallel workers), then the greedy allocation of the `sensitivity` command (the same code)
and its rivals (every group at one ratio; for latency, the progressive search), then the cut and the
recovery. The candidate, the criterion (ThiNet or l1) and the steps (1 or 3) are chosen one after
the other on the calibration digits in three folds, each third scored after recovery on the rest. Kept channel counts are multiples of {multiple} (`round_to="auto"`:
{why} on this machine; the latency target, which times every width, half of it). The latency target compares the time of a batch of 1 plus a batch of 32
(one thread, so batch 32 dominates), each candidate measured in onnxruntime against the original,
the two sessions run by run in turn. Speedups in the tables: every model timed against the original the
same way (the two run by run in turn, 3 x 100 turns), the ratio of the medians.
"speedup / MAC reduction" is the latency speedup divided by the MAC
reduction (1.0 = latency falls exactly as MACs do). The twins are the same architectures at about
0.7x the width, trained from scratch with the same recipe on the same 3,000 digits; "time" is the
pass's own time (the twins': not counted, about a minute each with torch)."""
