"""Weight clustering and the entropy-coded container on the reference models (part of
`python benchmarks/run.py`): every bit width, per tensor and per channel, with and without recovery,
with the .onnx and container sizes beside the original's and the coded size beside its entropy bound;
latency of the clustered models against the dense original, measured in the same interleaved rounds."""
from __future__ import annotations

import time

import onnx

from benchmarks.run import accuracy, median_latency
from onnxcompress import LatencyConfig, PassManager, container
from onnxcompress.passes import ClusterWeights, Distill
from onnxcompress.report import human_bytes, markdown_table

BITS = (8, 5, 4, 3, 2)


def cluster_section(calib, test, cfg: LatencyConfig, rounds: int, models: dict[str, onnx.ModelProto]) -> str:
    parts = []
    for name, model in models.items():
        print(f"  cluster {name} ...", flush=True)
        original = len(model.SerializeToString())
        packed, _ = container.pack(model)
        rows = [["original (fp32)", "-", "-", f"{accuracy(model, test):.2f}%", f"{human_bytes(original)} (1.00x)",
                 f"{human_bytes(len(packed))} ({original / len(packed):.1f}x smaller)", "-", "-"]]
        timed = {"original": model}
        for bits in BITS:
            for per in ("tensor", "channel"):
                for recover in (False, True):
                    passes = [ClusterWeights(bits=bits, per=per)] + ([Distill()] if recover else [])
                    t0 = time.perf_counter()
                    result = PassManager(passes, calib=calib, eval_data=test, max_drop=None,
                                         latency=LatencyConfig(enabled=False)).run(model)
                    seconds = time.perf_counter() - t0
                    blob, stats = container.pack(result.model)
                    size = len(result.model.SerializeToString())
                    bound = f"{stats.coded_bytes / stats.entropy_bytes:.3f}x" if stats.entropy_bytes else "-"
                    rows.append([f"{bits}-bit", per, "distill" if recover else "none",
                                 f"{result.report.steps[-1].accuracy:.2f}%",
                                 f"{human_bytes(size)} ({size / original:.2f}x)",
                                 f"{human_bytes(len(blob))} ({original / len(blob):.1f}x smaller)", bound, f"{seconds:.1f}s"])
                    if bits == 4 and not recover:
                        timed[f"4-bit per {per}"] = result.model
        lat = _latency_ratios(timed, cfg, rounds, test)
        header = ["bits", "codebook", "recovery", "accuracy", ".onnx size", "container", "coded / entropy bound",
                  "compress time"]
        parts.append(f"### {name}\n\n" + markdown_table(header, rows) + "\n\nLatency of the clustered models "
                     "(decode folded by onnxruntime at load) over the dense original, same rounds: " + lat + ".")
    return SECTION + "\n\n".join(parts) + "\n"


def _latency_ratios(models: dict[str, onnx.ModelProto], cfg: LatencyConfig, rounds: int, test) -> str:
    medians = dict(zip(models, median_latency(list(models.values()), test, cfg, rounds)))
    base = medians["original"]
    return "; ".join(f"{label} " + ", ".join(f"b{b} {ms / base[b]:.2f}x" for b, ms in m.items())
                     for label, m in medians.items() if label != "original")


SECTION = """## Weight clustering and the container

`cluster-weights(bits=B, per=...)` alone and followed by `distill` (all 1,000 calibration digits),
on every reference model. ".onnx size" is the clustered model (float codebook + uint8 index per
layer; layers under 1,024 weights stay dense); "container" is `onnxcompress pack` of it (Huffman-
or gap-coded indices, LZMA for the rest) against the original `.onnx` file; "coded / entropy bound"
is the size of the entropy-coded index streams over their empirical order-0 entropy.

"""
