"""Architecture rewriting (`python benchmarks/run.py --only factor`): factor-lowrank and
factor-depthwise at half the MACs on the reference models, beside structured pruning at the same
MACs and the two combined (accuracy, MACs, parameters, latency ratios at batch 1 and 32 from
turns, run by run); the three PP-OCR models with default options and at 0.7x MACs on rendered text; and the arithmetic, layer
by layer, for one model."""
from __future__ import annotations

import time

import numpy as np
import onnx

from benchmarks import ocr
from benchmarks.run import accuracy, median_latency
from onnxcompress import LatencyConfig, PassManager, graph as G, weights as W
from onnxcompress.metrics import node_macs, total_macs
from onnxcompress.passes import FactorDepthwise, FactorLowRank, FoldBatchNorm, PruneChannels
from onnxcompress.report import markdown_table

SECTION_TITLE = "## Architecture rewriting: low-rank and depthwise factoring"
OCR_START = "### {} ({})".format(*ocr.OCR_PASS_MODELS[0])    # where its PP-OCR part begins
MNIST_MODELS = ("resnet", "vgg", "mobilenet", "mlp")


def _run(model: onnx.ModelProto, calib, passes) -> tuple[onnx.ModelProto, float, list[str], dict]:
    t0 = time.perf_counter()
    result = PassManager(passes, calib=calib, max_drop=None, latency=LatencyConfig(enabled=False)).run(model)
    step = result.report.steps[-1]
    return result.model, time.perf_counter() - t0, step.notes, step.stats


def _variants(fold: bool) -> list[tuple[str, list]]:
    pre = [FoldBatchNorm()] if fold else []
    return [
        ("factor-lowrank(macs=0.5)", pre + [FactorLowRank(macs=0.5)]),
        ("factor-lowrank(macs=0.5, allocation='uniform')", pre + [FactorLowRank(macs=0.5, allocation="uniform")]),
        ("factor-lowrank(macs=0.5, data_aware=false)", pre + [FactorLowRank(macs=0.5, data_aware=False)]),
        ("factor-lowrank(macs=0.5, conv_split='kxk-1x1')", pre + [FactorLowRank(macs=0.5, conv_split="kxk-1x1")]),
        ("factor-depthwise(macs=0.5)", pre + [FactorDepthwise(macs=0.5)]),
        ("factor-lowrank(latency=0.5)", pre + [FactorLowRank(latency=0.5)]),
        ("factor-depthwise (default: latency=0.5)", pre + [FactorDepthwise()]),
        # pruning as a user runs it: BatchNorm kept (its refit helps recovery; MobileNet 98.0% vs 96.3% folded)
        ("prune-channels(macs=0.5)", [PruneChannels(macs=0.5)]),
        ("prune-channels(macs=0.7), then factor-lowrank to 0.5x", [PruneChannels(macs=0.7), FactorLowRank(macs=0.5 / 0.7)]),
    ]


def factor_section(calib, test, cfg: LatencyConfig, rounds: int, models: dict[str, onnx.ModelProto],
                   ocr_part: bool = True) -> str:
    parts = [SECTION_TITLE + "\n\n" + INTRO]
    rows, shapes = [], {"input": [1, 1, 28, 28]}
    layer_table = ""
    for name in [m for m in MNIST_MODELS if m in models]:
        print(f"  factor {name} ...", flush=True)
        model = models[name]
        cal = calib.take(500)
        made = [("fp32 original", model, 0.0, [], {})]
        for label, passes in _variants(fold=True):
            made.append((label, *_run(model, cal, passes)))
            print(f"    {label}: made", flush=True)
        lat = median_latency([m for _, m, *_ in made], test, cfg, rounds)
        base_macs, base_params = total_macs(model, shapes), _params(model)
        for (label, m, secs, notes, stats), ms in zip(made, lat):
            macs = total_macs(m, shapes)
            rows.append([name, label, f"{accuracy(m, test):.2f}%", f"{macs / base_macs:.2f}x",
                         f"{_params(m) / base_params:.2f}x"]
                        + [f"{ms[b] / lat[0][b]:.2f}x" for b in cfg.batch_sizes]
                        + [f"{(base_macs / macs) / (lat[0][b] / ms[b]):.2f}" for b in cfg.batch_sizes]
                        + [f"{secs:.1f}s" if secs else "-"])
            if name == "resnet" and label == "factor-lowrank(macs=0.5)":     # against the BN-folded model
                folded = PassManager([FoldBatchNorm()], latency=LatencyConfig(enabled=False)).run(model).model
                layer_table = _layer_table(folded, m, shapes)
    parts.append("### Reference models (MNIST), batch 1 and 32, one thread\n\n" + markdown_table(
        ["model", "variant", "accuracy", "MACs", "params"] + [f"latency b{b}" for b in cfg.batch_sizes]
        + [f"MAC cut / speedup b{b}" for b in cfg.batch_sizes] + ["compress time"], rows))
    if layer_table:
        parts.append("### The arithmetic, layer by layer: resnet, factor-lowrank(macs=0.5)\n\n" + layer_table)
    if ocr_part:
        parts.append(_ocr_part())
    return "\n\n".join(parts) + "\n"


def _params(model: onnx.ModelProto) -> int:
    """The layers' weights (distinct ones, whatever their storage)."""
    return W.storage_summary(G.to_graph(model)).weights


def _layer_table(before: onnx.ModelProto, after: onnx.ModelProto, shapes) -> str:
    """Per original layer: its weight, parameters and MACs before and after (its two factors)."""
    macs_before = {n: m for n, _, m in node_macs(before, shapes)}
    macs_after = {n: m for n, _, m in node_macs(after, shapes)}
    g_before, g_after = G.to_graph(before), G.to_graph(after)
    after_by_out = {n.outputs[0].name: n for n in g_after.nodes if n.outputs}
    producers = {o.name: n for n in g_after.nodes for o in n.outputs}
    rows = []
    for node in g_before.nodes:
        if node.op not in ("Conv", "Gemm") or W.layer_weight(node) is None:
            continue
        second = after_by_out.get(node.outputs[0].name)
        if second is None:
            continue
        first = producers.get(second.inputs[0].name)
        pair = [second] if first is None or first.op not in ("Conv", "Gemm") or W.layer_weight(first) is None else [first, second]
        p_before = int(np.prod(W.layer_weight(node).value.shape))
        p_after = sum(int(np.prod(W.layer_weight(n).value.shape)) for n in pair)
        m_before = macs_before.get(node.name) or 0
        m_after = sum(macs_after.get(n.name) or 0 for n in pair)
        shape = " -> ".join("x".join(map(str, W.layer_weight(n).value.shape)) for n in pair)
        rows.append([G.display_name(node), "x".join(map(str, W.layer_weight(node).value.shape)), shape,
                     f"{p_before:,}", f"{p_after:,}", f"{m_before:,}", f"{m_after:,}",
                     f"{m_after / m_before:.2f}x" if m_before else "-"])
    total = [sum(int(r[i].replace(",", "")) for r in rows) for i in (3, 4, 5, 6)]
    rows.append(["total", "", "", *(f"{t:,}" for t in total), f"{total[3] / total[2]:.2f}x"])
    return markdown_table(["layer", "weight", "factors", "params before", "params after", "MACs before",
                           "MACs after", "MACs ratio"], rows)


def _ocr_part() -> str:
    return ocr.pass_rows([("factor-lowrank (defaults: macs=0.5)", FactorLowRank),
                          ("factor-depthwise (defaults: latency=0.5)", FactorDepthwise),
                          ("factor-lowrank(macs=0.7)", lambda: FactorLowRank(macs=0.7)),
                          ("factor-depthwise(macs=0.7)", lambda: FactorDepthwise(macs=0.7)),
                          ("factor-depthwise(latency=0.7)", lambda: FactorDepthwise(latency=0.7))],
                         "layers factored", lambda stats: stats.get("layers_factored", "-"), _run)


INTRO = """`factor-lowrank` and `factor-depthwise` with their defaults (data-aware factors, per-layer
sizes allocated by measured sensitivity for the target: half the MACs for factor-lowrank, half the
onnxruntime latency for factor-depthwise, whose factors are smaller but not always faster), recovery of each factored pair as a whole
and of the head on the original's outputs), beside `prune-channels` with per-group ratios allocated by the
same sensitivity analysis for the same MACs, and both combined; `fold-bn` first for the factoring
rows on the MNIST models (the pruning rows keep BatchNorm, whose refit helps pruning's recovery); 500 calibration digits (32 rendered lines or angle crops, 8 pages for PP-OCR). MACs at batch 1 from
shape inference; params: weights of Conv/Gemm/MatMul layers. Latency: onnxruntime CPU, one
thread, each model timed against the original run by run, the two in turn, the ratio of the
medians. "MAC cut / speedup" is the MAC
reduction divided by the measured speedup: 1.0 means the model got as much faster as it got
smaller; above 1, the kernels run the factored layers slower per MAC."""
