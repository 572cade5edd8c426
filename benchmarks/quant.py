"""Quantization against onnxruntime's own quantizer (`python benchmarks/run.py --only quantize`):
on the reference models (accuracy, size, latency ratios from interleaved rounds) and on the PP-OCR
models with rendered text (their decoded strings), both tools calibrated on the same data."""
from __future__ import annotations

import string
import time

import numpy as np
import onnx

from benchmarks import ocr
from benchmarks.peers import ort_quantize_static
from benchmarks.run import accuracy, median_latency
from onnxcompress import Dataset, LatencyConfig, PassManager
from onnxcompress.passes import FoldBatchNorm, Quantize
from onnxcompress.report import human_bytes, markdown_table

SECTION_TITLE = "## Quantization: `quantize` against onnxruntime's `quantize_static`"
MNIST_MODELS = ("resnet", "vgg", "mobilenet", "mlp")


def _ours(model: onnx.ModelProto, calib, **options) -> tuple[onnx.ModelProto, float, list[str]]:
    t0 = time.perf_counter()
    result = PassManager([FoldBatchNorm(), Quantize(**options)], calib=calib, max_drop=None,
                         latency=LatencyConfig(enabled=False)).run(model)
    return result.model, time.perf_counter() - t0, result.report.steps[-1].notes


def _theirs(model: onnx.ModelProto, calib) -> tuple[onnx.ModelProto, float]:
    """quantize_static as a user runs it: per-channel needs opset 13, so lower opsets are converted first."""
    t0 = time.perf_counter()
    if model.opset_import[0].version < 13:
        model = onnx.version_converter.convert_version(model, 13)
    return ort_quantize_static(model, calib, per_channel=True), time.perf_counter() - t0


def quant_section(calib, test, cfg: LatencyConfig, rounds: int, models: dict[str, onnx.ModelProto]) -> str:
    parts = [SECTION_TITLE + "\n\n" + INTRO]
    rows = []
    for name in [m for m in MNIST_MODELS if m in models]:
        print(f"  quantize {name} ...", flush=True)
        model = models[name]
        ours, t_ours, _ = _ours(model, calib)
        tensor, t_tensor, _ = _ours(model, calib, per_channel=False)
        theirs, t_theirs = _theirs(model, calib.take(200))
        variants = [("fp32 original", model, 0.0), ("onnxruntime quantize_static (per channel)", theirs, t_theirs),
                    ("quantize (default)", ours, t_ours), ("quantize(per_channel=False)", tensor, t_tensor)]
        lat = median_latency([m for _, m, _ in variants], test, cfg, rounds)
        base_size = len(model.SerializeToString())
        for (label, m, secs), ms in zip(variants, lat):
            rows.append([name, label, f"{accuracy(m, test):.2f}%", f"{human_bytes(len(m.SerializeToString()))} "
                         f"({len(m.SerializeToString()) / base_size:.2f}x)"]
                        + [f"{ms[b] / lat[0][b]:.2f}x" for b in cfg.batch_sizes] + [f"{secs:.1f}s" if secs else "-"])
    parts.append("### Reference models (MNIST)\n\n" + markdown_table(
        ["model", "variant", "accuracy", "size"] + [f"latency b{b}" for b in cfg.batch_sizes] + ["compress time"], rows))
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
            (calib_x, _), (eval_x, truth) = ocr.rec_data(32, 1, alphabet), ocr.rec_data(128, 2, alphabet)
        elif kind == "cls":
            (calib_x, _), (eval_x, truth) = ocr.cls_data(32, 1, alphabet), ocr.cls_data(128, 2, alphabet)
        else:
            (calib_x, _), (eval_x, truth) = (ocr.det_data(32, 1, alphabet, ocr.DET_PAGE),
                                             ocr.det_data(16, 2, alphabet, ocr.DET_PAGE))
        calib = Dataset({"x": calib_x})
        ref = ocr._run(model, eval_x)
        rows = [["fp32 original", ocr.user_metric(kind, ref, ref, truth, chars), "1.0000", "1.00x", "-", "-"]]
        for label, make in (("onnxruntime quantize_static (opset 13, per channel)", lambda: _theirs(model, calib)),
                            ("quantize (default)", lambda: _ours(model, calib)[:2])):
            try:
                q, secs = make()
                got = ocr._run(q, eval_x)
                speed = _speed(model, q, eval_x[:1])
                rows.append([label, ocr.user_metric(kind, got, ref, truth, chars), f"{ocr._cosine(got, ref):.4f}",
                             f"{len(q.SerializeToString()) / len(model.SerializeToString()):.2f}x", f"{speed:.2f}x",
                             f"{secs:.1f}s"])
            except Exception as e:          # reported in the table, not hidden
                rows.append([label, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}", "-", "-", "-", "-"])
            print(f"    {rows[-1][:2]}", flush=True)
        out.append(f"### {file} ({kind})\n\n" + markdown_table(
            ["variant", ocr.METRIC_HEADER[kind], "cosine vs fp32", "size", "latency b1 vs fp32", "compress time"], rows))
    return "\n\n".join(out)


def _speed(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray) -> float:
    """Median latency of b over a's at batch 1, interleaved rounds, one thread."""
    base, new = median_latency([a, b], Dataset({"x": x}), LatencyConfig(batch_sizes=(1,), runs=20, warmup=3, threads=1), 3)
    return new[1] / base[1]


INTRO = """Both quantizers get the same calibration data (200 digits for onnxruntime's, as in the tables
above; all 1,000 for ours, of which `quantize` ranges activations on 512; 32 rendered lines, pages
or crops for PP-OCR). onnxruntime's `quantize_static` is run as a user would for the best result it
offers: QDQ, per-channel int8 weights, int8 activations, MinMax calibration; per-channel weights
need opset 13, so PP-OCR's opset-11/12 models are converted with onnx's version converter first
(without it onnxruntime refuses to load the output). Ours is `fold-bn,quantize` with default
options (uint8 activations ranged by "auto", int8 symmetric per-channel weights rounded by GPTQ,
bias correction, head logits in float; opset raised to 13 the same way). Latency is onnxruntime
CPU, one thread, as a ratio to the fp32 model in the same interleaved rounds."""
