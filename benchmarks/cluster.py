"""Weight clustering and the entropy-coded container on the reference models (part of
`python benchmarks/run.py`, or alone: `python benchmarks/run.py --only cluster`): every bit width,
per tensor and per channel, with and without recovery, with the .onnx and container sizes beside the
original's and the coded size beside its entropy bound; latency of the clustered models against the
dense original, each timed against it run by run; the Deep Compression recipe stage by stage;
packing and unpacking a 25M-weight model against the k-means pass that precedes them."""
from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from benchmarks.run import accuracy, median_latency
from onnxcompress import LatencyConfig, PassManager, container
from onnxcompress.pass_api import default_registry
from onnxcompress.passes import ClusterWeights, Distill, PruneWeights
from onnxcompress.pipeline import format_pipeline, parse_recipe
from onnxcompress.report import human_bytes, markdown_table

BITS = (8, 5, 4, 3, 2)
ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "deep-compression.toml"
DEEP_MODELS = ("resnet", "vgg", "mlp")
SECTION_TITLE = "## Weight clustering and the container"
DEEP_TITLE = "## Deep Compression: `recipes/deep-compression.toml`, then `onnxcompress pack`"


def cluster_section(calib, test, cfg: LatencyConfig, rounds: int, models: dict[str, onnx.ModelProto]) -> str:
    parts = []
    for name, model in models.items():
        print(f"  cluster {name} ...", flush=True)
        original = len(model.SerializeToString())
        packed, _ = container.pack(model)
        rows = [["original (fp32)", "-", "-", f"{accuracy(model, test):.2f}%", f"{human_bytes(original)} (1.00x)",
                 f"{human_bytes(len(packed))} ({original / len(packed):.1f}x smaller)", "-", "-", "-"]]
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
                    rows.append([f"{bits}-bit", per, "distill" if recover else "none",
                                 f"{result.report.steps[-1].accuracy:.2f}%",
                                 f"{human_bytes(size)} ({size / original:.2f}x)",
                                 f"{human_bytes(len(blob))} ({original / len(blob):.1f}x smaller)", _bound(stats),
                                 _coders(stats), f"{seconds:.1f}s"])
                    if bits == 4 and not recover:
                        timed[f"4-bit per {per}"] = result.model
        lat = _latency_ratios(timed, cfg, rounds, test)
        header = ["bits", "codebook", "recovery", "accuracy", ".onnx size", "container", "coded / entropy bound",
                  "coder (share of symbols)", "compress time"]
        parts.append(f"### {name}\n\n" + markdown_table(header, rows) + "\n\nLatency of the clustered models "
                     "(decode folded by onnxruntime at load) over the dense original, same rounds: " + lat + ".")
    return SECTION + "\n\n".join(parts) + "\n"


def deep_compression_section(calib, test, models: dict[str, onnx.ModelProto]) -> str:
    """`python benchmarks/run.py --only deep-compression`: the recipe stage by stage, and the
    container's speed on a 25M-weight model."""
    return (DEEP_TITLE + "\n\n" + deep_compression(calib, test, {m: models[m] for m in DEEP_MODELS if m in models})
            + "\n\n" + container_speed() + "\n")


def _bound(stats: container.PackStats) -> str:
    """Coded index streams over their entropy bound (order-0 entropy + the codebooks' bytes)."""
    if not stats.entropy_bytes:
        return "-"
    return f"{stats.coded_bytes / (stats.entropy_bytes + stats.codebook_bytes):.3f}x"


def _coders(stats: container.PackStats) -> str:
    total = sum(stats.coders.values())
    return ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(stats.coders.items(), key=lambda kv: -kv[1])) or "-"


def deep_compression(calib, test, models: dict[str, onnx.ModelProto]) -> str:
    """The recipe stage by stage, as in Deep Compression's table: accuracy, .onnx and container
    size after each pass (the container of the pruned stage from a run of that prefix alone)."""
    steps = parse_recipe(RECIPE.read_text(), str(RECIPE)).steps
    cut = next(i for i, (name, _) in enumerate(steps) if name == "cluster-weights")
    registry = default_registry()
    make = lambda part: [registry.create(n, o) for n, o in part]
    out = []
    for name, model in models.items():
        print(f"  deep compression {name} ...", flush=True)
        original = len(model.SerializeToString())
        run = lambda part: PassManager(make(part), calib=calib, eval_data=test, max_drop=None,
                                       latency=LatencyConfig(enabled=False)).run(model)
        t0 = time.perf_counter()
        full = run(steps)
        seconds = time.perf_counter() - t0
        pruned = run(steps[:cut]).model
        packs = {cut: len(container.pack(pruned)[0]), len(steps): len(container.pack(full.model)[0]), 0: len(container.pack(model)[0])}
        final_blob, stats = container.pack(full.model)
        same = container.unpack(final_blob).SerializeToString() == full.model.SerializeToString()
        rows = []
        for i, step in enumerate(full.report.steps):
            packed = packs.get(i)
            rows.append([step.pass_ if i else "original (fp32)", f"{step.accuracy:.2f}%",
                         f"{step.accuracy - full.report.steps[0].accuracy:+.2f}",
                         f"{human_bytes(step.size_bytes)} ({original / step.size_bytes:.1f}x smaller)",
                         f"{human_bytes(packed)} ({original / packed:.1f}x smaller)" if packed else ""])
        out.append(f"### {name}: the Deep Compression recipe, stage by stage ({seconds:.0f} s)\n\n"
                   + markdown_table(["stage", "accuracy", "points", ".onnx size", "container"], rows)
                   + f"\n\nFinal container: {human_bytes(len(final_blob))}, {original / len(final_blob):.1f}x smaller than "
                   f"the original .onnx; its index streams {_bound(stats)} of their entropy bound ({_coders(stats)}); "
                   f"`unpack` restores the model bit for bit: {'yes' if same else 'NO'}.")
    return (f"Pipeline: `{format_pipeline(parse_recipe(RECIPE.read_text()).steps)}`. "
            "The accuracy after each pass is from the same run (test digits); the container column is `onnxcompress "
            "pack` of the model after the stage above it.\n\n" + "\n\n".join(out))


def big_model(n: int = 5000, layers: int = 1, seed: int = 0) -> onnx.ModelProto:
    """A Gemm chain with n x n weights per layer (25M weights for n = 5000), random normal values."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for i in range(layers):
        inits += [numpy_helper.from_array((rng.standard_normal((n, n)) * 0.02).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(np.zeros(n, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"y{i}"], transB=1))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", n])],
                              [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["N", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def container_speed() -> str:
    """Pack and unpack a 25M-weight model clustered to 4 bits (dense, and after 90% pruning), timed
    beside the clustering pass that produced it (both single-threaded numpy and LZMA work)."""
    print("  container speed (25M weights) ...", flush=True)
    model = big_model()
    rows = []
    for label, passes in (("4-bit clusters", [ClusterWeights(bits=4)]),
                          ("90% zeros, 4-bit clusters", [PruneWeights(sparsity=0.9), ClusterWeights(bits=4)])):
        result = PassManager(passes, max_drop=None, latency=LatencyConfig(enabled=False)).run(model)
        cluster_s = result.report.steps[-1].seconds
        t0 = time.perf_counter()
        blob, stats = container.pack(result.model)
        pack_s = time.perf_counter() - t0
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            back = container.unpack(blob)
            times.append(time.perf_counter() - t0)
        same = back.SerializeToString() == result.model.SerializeToString()
        rows.append([label, f"{human_bytes(len(result.model.SerializeToString()))}",
                     f"{human_bytes(len(blob))}", _bound(stats), _coders(stats), f"{cluster_s:.1f}s", f"{pack_s:.1f}s",
                     f"{pack_s / cluster_s:.2f}", f"{np.median(times):.2f}s", "yes" if same else "NO"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return ("### Container speed on a 25M-weight model\n\n"
            "One Gemm of 5000 x 5000 random weights (100 MB as fp32), clustered by `cluster-weights(bits=4)` "
            "(the time of that pass, as the report gives it), then packed and unpacked (median of 3). Decoding is "
            "vectorized over lanes of the streams decoded in lockstep; numpy and LZMA run on one core here.\n\n"
            + markdown_table(["model", ".onnx size", "container", "coded / entropy bound", "coder", "cluster-weights",
                              "pack", "pack / cluster", "unpack", "bit-identical"], rows)
            + f"\n\nPeak RSS of the benchmark process so far: {peak:.1f} GiB.")


def _latency_ratios(models: dict[str, onnx.ModelProto], cfg: LatencyConfig, rounds: int, test) -> str:
    medians = dict(zip(models, median_latency(list(models.values()), test, cfg, rounds)))
    base = medians["original"]
    return "; ".join(f"{label} " + ", ".join(f"b{b} {ms / base[b]:.2f}x" for b, ms in m.items())
                     for label, m in medians.items() if label != "original")


SECTION = SECTION_TITLE + """

`cluster-weights(bits=B, per=...)` alone and followed by `distill` (all 1,000 calibration digits),
on every reference model. ".onnx size" is the clustered model (float codebook + uint8 index per
layer; layers under 1,024 weights stay dense); "container" is `onnxcompress pack` of it (indices
coded by rANS or Huffman, plain or as gaps, whichever is smaller; LZMA for the rest) against the
original `.onnx` file; "coded / entropy bound" is the size of the entropy-coded index streams
(tables and lane states included) over their bound: the streams' empirical order-0 entropy plus
the codebooks' bytes; "coder" is the share of index symbols each coder won.

"""
