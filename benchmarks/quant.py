"""Quantization against onnxruntime's own quantizers (`python benchmarks/run.py --only quantize`):
every variant of ours (the default, each accuracy tool off, dynamic, int4, binary) beside
onnxruntime's `quantize_static` and `quantize_dynamic`, on the reference models (accuracy, size,
latency ratios at 1 and 2 threads, each model and the original run by run in turn) and on the PP-OCR models with rendered
text (their decoded strings), all calibrated on the same data."""
from __future__ import annotations

import string
import time
from dataclasses import replace

import onnx

from benchmarks import ocr
from benchmarks.peers import ort_quantize_dynamic, ort_quantize_static
from benchmarks.run import accuracy, median_latency
from onnxcompress import Dataset, LatencyConfig, PassManager
from onnxcompress.passes import Distill, FoldBatchNorm, Quantize, QuantizeWeights
from onnxcompress.report import human_bytes, markdown_table

SECTION_TITLE = "## Quantization: `quantize` against onnxruntime's `quantize_static`"
OCR_START = "### {} ({})".format(*ocr.OCR_PASS_MODELS[0])    # where its PP-OCR part begins
MNIST_MODELS = ("resnet", "vgg", "mobilenet", "mlp")
OCR_EVAL = 512          # rendered lines / crops scored (128 left a few lines' luck in every figure)
OCR_LATENCY = {"rec": (1, 32), "cls": (1, 32), "det": (1, 4)}   # batch sizes (det pages are 480x640)


def _ours(model: onnx.ModelProto, calib, passes) -> tuple[onnx.ModelProto, float, list[str]]:
    t0 = time.perf_counter()
    # The CLI's default latency settings (batch 1, 30 runs): quantize's choice of int8 or float by speed uses them.
    result = PassManager(passes, calib=calib, max_drop=None, latency=LatencyConfig()).run(model)
    return result.model, time.perf_counter() - t0, [n for s in result.report.steps[1:] for n in s.notes]


def _theirs(model: onnx.ModelProto, calib) -> tuple[onnx.ModelProto, float, list[str]]:
    """quantize_static as a user runs it: per-channel needs opset 13, so lower opsets are converted first."""
    t0 = time.perf_counter()
    if model.opset_import[0].version < 13:
        model = onnx.version_converter.convert_version(model, 13)
    return ort_quantize_static(model, calib, per_channel=True), time.perf_counter() - t0, []


def _dynamic(model: onnx.ModelProto) -> tuple[onnx.ModelProto, float, list[str]]:
    t0 = time.perf_counter()
    return ort_quantize_dynamic(model), time.perf_counter() - t0, []


def _variants(fold: bool) -> list[tuple[str, list]]:
    """(label, passes): our default with the CLI's default budget (1 point of agreement with the
    float model on the calibration data, which turns the mixed-precision search on), then each
    accuracy tool switched off, then the other precisions."""
    pre = [FoldBatchNorm()] if fold else []
    return [
        ("quantize (default, budget 1)", pre + [Quantize(max_drop=1.0)]),
        ("quantize, no mixed precision", pre + [Quantize()]),
        ("quantize, no mixed precision, not latency-aware", pre + [Quantize(latency_aware=False)]),
        ("quantize, no mixed precision, no refit", pre + [Quantize(refit=False)]),
        ("quantize, no mixed precision, rounding nearest", pre + [Quantize(rounding="nearest")]),
        ("quantize, no mixed precision, no bias correction", pre + [Quantize(bias_correction=False)]),
        ("quantize, no mixed precision, minmax ranges", pre + [Quantize(calibration="minmax")]),
        ("quantize, no mixed precision, no equalization", pre + [Quantize(equalize=False)]),
        ("quantize, no mixed precision, per-tensor weights", pre + [Quantize(per_channel=False)]),
        ("quantize, no mixed precision, per-tensor weights, no equalization", pre + [Quantize(per_channel=False, equalize=False)]),
        ("quantize(activations='dynamic')", pre + [Quantize(activations="dynamic")]),
        ("quantize-weights(bits=4)", pre + [QuantizeWeights(bits=4)]),
        ("quantize-weights(bits=1)", pre + [QuantizeWeights(bits=1)]),
        ("quantize-weights(bits=1), distill(layers='all')", pre + [QuantizeWeights(bits=1), Distill(layers="all")]),
    ]


def _latency_cells(models: list[onnx.ModelProto], data, cfg: LatencyConfig, rounds: int) -> list[list[str]]:
    """Per model, its latency over the first model's at each batch size, with 1 and with 2 threads."""
    cells: list[list[str]] = [[] for _ in models]
    for threads in (1, 2):
        lat = median_latency(models, data, replace(cfg, threads=threads), rounds)
        for row, ms in zip(cells, lat):
            row += [f"{ms[b] / lat[0][b]:.2f}x" for b in cfg.batch_sizes]
    return cells


def _kept(notes: list[str]) -> str:
    """What the mixed-precision search kept in float, and the kinds of layers kept in float for
    speed, from the pass's notes ("-" if nothing)."""
    note = next((n for n in notes if n.startswith("mixed precision:") and " kept in float" in n), None)
    cells = [note.split(" kept in float")[0].rsplit(" with ", 1)[-1].replace(" layers and ", " layers, ")] if note else []
    speed = next((n for n in notes if n.startswith("int8 or float by measured latency")), "")
    kinds = [part.split(" in float:")[0] for part in speed.split(": ", 1)[-1].split("; ") if part.endswith("(kept in float)")]
    if kinds:
        cells.append("for speed: " + ", ".join(kinds))
    return "; ".join(cells) or "-"


def _latency_header(batches: tuple[int, ...]) -> list[str]:
    return [f"latency b{b} {t}T" for t in (1, 2) for b in batches]


def quant_section(calib, test, cfg: LatencyConfig, rounds: int, models: dict[str, onnx.ModelProto],
                  ocr_part: bool = True) -> str:
    parts = [SECTION_TITLE + "\n\n" + INTRO]
    rows = []
    for name in [m for m in MNIST_MODELS if m in models]:
        print(f"  quantize {name} ...", flush=True)
        model = models[name]
        made = [("fp32 original", model, 0.0, []),
                ("onnxruntime quantize_static (per channel)", *_theirs(model, calib.take(200))),
                ("onnxruntime quantize_dynamic", *_dynamic(model))]
        made += [(label, *_ours(model, calib, passes)) for label, passes in _variants(fold=True)]
        lat = _latency_cells([m for _, m, _, _ in made], test, cfg, rounds)
        base_size = len(model.SerializeToString())
        for (label, m, secs, notes), cells in zip(made, lat):
            size = len(m.SerializeToString())
            rows.append([name, label, f"{accuracy(m, test):.2f}%", f"{human_bytes(size)} ({size / base_size:.2f}x)"]
                        + cells + [f"{secs:.1f}s" if secs else "-", _kept(notes)])
    parts.append("### Reference models (MNIST)\n\n" + markdown_table(
        ["model", "variant", "accuracy", "size"] + _latency_header(cfg.batch_sizes) + ["compress time", "kept in float"],
        rows))
    if ocr_part:
        parts.append(_ocr_part())
    return "\n\n".join(parts) + "\n"


def _ocr_part() -> str:
    folder = ocr.models_dir()
    chars = ocr.rec_characters(onnx.load(str(folder / "ch_PP-OCRv4_rec_infer.onnx")))
    alphabet = "".join(c for c in string.digits + string.ascii_letters if c in set(chars[1:-1]))
    out = []
    for file, kind in ocr.OCR_PASS_MODELS:
        print(f"  quantize PP-OCR {kind} ...", flush=True)
        model = onnx.load(str(folder / file))
        if kind == "rec":
            (calib_x, _), (eval_x, truth) = ocr.rec_data(32, 1, alphabet), ocr.rec_data(OCR_EVAL, 2, alphabet)
        elif kind == "cls":
            (calib_x, _), (eval_x, truth) = ocr.cls_data(32, 1, alphabet), ocr.cls_data(OCR_EVAL, 2, alphabet)
        else:
            (calib_x, _), (eval_x, truth) = (ocr.det_data(32, 1, alphabet, ocr.DET_PAGE),
                                             ocr.det_data(16, 2, alphabet, ocr.DET_PAGE))
        calib = Dataset({"x": calib_x})
        ref = ocr._run(model, eval_x)
        makers = [("onnxruntime quantize_static (opset 13, per channel)", lambda: _theirs(model, calib)),
                  ("onnxruntime quantize_dynamic", lambda: _dynamic(model))]
        makers += [(label, lambda passes=passes: _ours(model, calib, passes)) for label, passes in _variants(fold=False)
                   if "distill" not in label]
        made, rows = [("fp32 original", model, 0.0, [])], []
        for label, make in makers:
            try:
                made.append((label, *make()))
            except Exception as e:          # reported in the table, not hidden
                rows.append([label, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}"] + ["-"] * 8)
            print(f"    {label}: made", flush=True)
        batches = OCR_LATENCY[kind]
        lat = _latency_cells([m for _, m, _, _ in made], Dataset({"x": eval_x[:max(batches)]}),
                             LatencyConfig(batch_sizes=batches, runs=10, warmup=2), 3)
        for (label, m, secs, notes), cells in zip(made, lat):
            got = ocr._run(m, eval_x)
            rows.append([label, ocr.user_metric(kind, got, ref, truth, chars), f"{ocr._cosine(got, ref):.4f}",
                         f"{len(m.SerializeToString()) / len(model.SerializeToString()):.2f}x"] + cells
                        + [f"{secs:.1f}s" if secs else "-", _kept(notes)])
            print(f"    {rows[-1][:2]}", flush=True)
        out.append(f"### {file} ({kind})\n\n" + markdown_table(
            ["variant", ocr.METRIC_HEADER[kind], "cosine vs fp32", "size"] + _latency_header(batches)
            + ["compress time", "kept in float"], rows))
    return "\n\n".join(out)


INTRO = """All quantizers get the same calibration data (200 digits for onnxruntime's `quantize_static`,
as in the tables above; all 1,000 for ours, of which `quantize` ranges activations on 512; 32
rendered lines, pages or crops for PP-OCR, scored on 512 other lines and crops and 16 pages;
`quantize_dynamic` needs none). `quantize_static` is
run as a user would for the best result it offers: QDQ, per-channel int8 weights, int8
activations, MinMax calibration; per-channel weights need opset 13, so PP-OCR's opset-11/12 models
are converted with onnx's version converter first (without it onnxruntime refuses to load the
output). `quantize_dynamic` runs with its defaults. Ours: `fold-bn` first on the MNIST models
(`quantize` folds BatchNorm itself too: PP-OCR's angle classifier has 35 unfolded), then `quantize`
with default options (uint8 activations ranged by "auto", int8 symmetric per-channel weights
refit to the float model's layer outputs from the quantized inputs, then rounded by GPTQ, bias correction, head logits in float, kinds of layers whose int8 kernels are
slower kept in float by timing the model both ways at batch 1, the CLI's latency default) and a
budget of 1 point, the CLI's default, for the mixed-precision search (the "kept in float"
column); then the same with each tool switched off, dynamic activations,
`quantize-weights` at 4 bits and binary. Latency is onnxruntime CPU as a ratio to the fp32 model
in the same turns (the two run by run in turn), with 1 and 2 intra-op threads ("1T", "2T")."""
