"""The benchmark suite: every pass and pipeline on the reference models, beside the original and
onnxruntime's own quantizer, measured in one run. Writes BENCHMARKS.md.

    python benchmarks/run.py                 # all reference models (a few minutes on 2 cores)
    python benchmarks/run.py --models resnet --runs 50 --output /tmp/B.md
    python -m benchmarks.run                 # the same, as a module
"""
from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if not __package__:  # run as a script: put the repository root first so that `benchmarks.*` imports resolve
    sys.path.insert(0, str(ROOT))

import numpy as np
import onnx
import onnxruntime as ort

import onnxcompress
from onnxcompress import LatencyConfig, PassManager, default_registry, io, load_dataset, parse_pipeline
from onnxcompress.manager import Evaluator
from onnxcompress.metrics import latency_ms
from onnxcompress.passes import Distill
from onnxcompress.report import Step, human_bytes, human_count, markdown_table

from benchmarks.peers import ort_quantize_static

MODELS = ("resnet", "vgg", "mobilenet", "mlp")

# (label, pipeline). Each row is one compressed model; add rows here as passes arrive.
VARIANTS = [
    ("fold-bn", "fold-bn"),
    ("prune-weights 50%", "prune-weights(sparsity=0.5)"),
    ("prune-weights 90%", "prune-weights(sparsity=0.9)"),
    ("fold-bn + prune-weights 50%", "fold-bn,prune-weights(sparsity=0.5)"),
    ("prune-weights 90% + distill", "prune-weights(sparsity=0.9),distill"),
    ("prune-channels 50% (round_to=16) + recovery", "prune-channels(ratio=0.5, round_to=16)"),
]

# Distillation experiments: (student, damage, level). Levels are chosen to cost at least 5 points.
DISTILL_CASES = [("resnet", "prune-weights", 0.85), ("resnet", "noise", 0.3),
                 ("vgg", "prune-weights", 0.9), ("vgg", "noise", 1.2)]
ENSEMBLE_PARTNER = {"resnet": "vgg", "vgg": "resnet"}


@dataclass
class Row:
    label: str
    model: onnx.ModelProto
    seconds: float
    step: Step | None = None


def compress_variants(model: onnx.ModelProto, calib, test) -> list[Row]:
    registry = default_registry()
    rows = [Row("original", model, 0.0)]
    for label, spec in VARIANTS:
        passes = [registry.create(n, o) for n, o in parse_pipeline(spec)]
        t0 = time.perf_counter()
        result = PassManager(passes, calib=calib, eval_data=test, latency=LatencyConfig(enabled=False)).run(model)
        rows.append(Row(label, result.model, time.perf_counter() - t0))
    t0 = time.perf_counter()
    rows.append(Row("onnxruntime quantize_static (QDQ int8, per-channel)", ort_quantize_static(model, calib),
                    time.perf_counter() - t0))
    return rows


def measure(rows: list[Row], test, cfg: LatencyConfig, rounds: int) -> None:
    """Quality once per model; latency in interleaved rounds so drift on a shared machine hits all alike."""
    evaluator = Evaluator(rows[0].model, test, latency=LatencyConfig(enabled=False))
    for row in rows:
        row.step = evaluator.measure(row.model, Step(row.label, "measured"))
    samples: dict[int, dict[int, list[float]]] = {i: {} for i in range(len(rows))}
    for _ in range(rounds):
        for i, row in enumerate(rows):
            for batch, ms in latency_ms(row.model, cfg, test).items():
                samples[i].setdefault(batch, []).append(ms)
    for i, row in enumerate(rows):
        row.step.latency_ms = {b: float(np.median(v)) for b, v in samples[i].items()}


def table(rows: list[Row], batches: tuple[int, ...]) -> str:
    base = rows[0].step
    header = ["variant", "accuracy", "agreement", "size", "gzip size", "params", "sparsity", "MACs"]
    header += [f"latency b{b}" for b in batches] + ["compress time"]
    out = []
    for row in rows:
        s = row.step
        agree = next(iter(s.fidelity.values())).get("top1_agreement", float("nan"))
        cells = [row.label, f"{s.accuracy:.2f}%", f"{agree:.1f}%",
                 f"{human_bytes(s.size_bytes)} ({s.size_bytes / base.size_bytes:.2f}x)",
                 f"{human_bytes(s.gzip_bytes)} ({s.gzip_bytes / base.gzip_bytes:.2f}x)",
                 human_count(s.params), f"{s.sparsity * 100:.1f}%", f"{human_count(s.macs)} ({s.macs / base.macs:.2f}x)"]
        cells += [f"{s.latency_ms[b] / base.latency_ms[b]:.2f}x" for b in batches]
        cells.append(f"{row.seconds:.1f}s")
        out.append(cells)
    return markdown_table(header, out)


def _accuracy(model: onnx.ModelProto, test) -> float:
    return Evaluator(model, test, latency=LatencyConfig(enabled=False)).measure(model, Step("", "")).accuracy


def distill_section(calib, test) -> str:
    """Accuracy before/after distill for damaged students, with a single and an ensemble teacher."""
    from benchmarks.experiments import add_weight_noise, ensemble_accuracy, zero_counts
    from onnxcompress.passes import PruneWeights
    from onnxcompress.recovery import teacher_logits
    from onnxcompress.pass_api import Context

    header = ["student", "damage", "original", "damaged", "distill: single teacher", "recovered",
              "time", "ensemble teachers (their accuracy)", "distill: ensemble", "recovered", "time", "zeros kept"]
    out = []
    for name, damage, level in DISTILL_CASES:
        clean = io.load_model(ROOT / "models" / f"{name}.onnx")
        partner = io.load_model(ROOT / "models" / f"{ENSEMBLE_PARTNER[name]}.onnx")
        if damage == "noise":
            student, label = add_weight_noise(clean, level), f"noise {level} x std"
        else:
            student = PassManager([PruneWeights(sparsity=level)], latency=LatencyConfig(enabled=False)).run(clean).model
            label = f"prune-weights {level:.0%}"
        orig, damaged = _accuracy(clean, test), _accuracy(student, test)
        cells = [name, label, f"{orig:.2f}%", f"{damaged:.2f}%"]
        zeros_before = zero_counts(student)
        kept = True
        for teachers in ([clean], [clean, partner]):
            t0 = time.perf_counter()
            result = PassManager([Distill()], calib=calib, eval_data=test, teachers=teachers,
                                 latency=LatencyConfig(enabled=False)).run(student)
            seconds = time.perf_counter() - t0
            acc = result.report.steps[-1].accuracy
            kept &= all(zero_counts(result.model)[k] >= v for k, v in zeros_before.items())
            if len(teachers) == 2:
                logits = teacher_logits(Context(teachers=teachers), test)
                cells.append(f"{name} + {ENSEMBLE_PARTNER[name]} ({ensemble_accuracy(logits, test.labels):.2f}%)")
            cells += [f"{acc:.2f}%", f"{(acc - damaged) / (orig - damaged) * 100:.1f}%", f"{seconds:.1f}s"]
        cells.append("yes" if kept else "NO")
        out.append(cells)
        print(f"  distill {name} {label}: done", flush=True)
    return DISTILL_TEXT + markdown_table(header, out) + "\n"


DISTILL_TEXT = """## Distillation: recovering damaged students

`distill` with default options (temperature 4, alpha 0, all 1,000 calibration digits, no labels used)
on students damaged by `prune-weights` and by Gaussian noise on every weight (scale x each
tensor's std). "recovered" is the share of the lost accuracy won back:
(distilled - damaged) / (original - damaged). Single teacher: the clean original. Ensemble: the
clean original plus the other reference model; its soft targets are the average of both models'
softened probabilities (layer-wise targets come from the teacher that shares the student's tensors).
"zeros kept": every weight that was zero before distillation is still exactly zero.

"""


# -- structured pruning -------------------------------------------------------------------------

STRUCTURED_MODELS = ("resnet", "vgg", "mobilenet")
STRUCTURED = dict(round_to=16, target_macs=0.5)
# The criterion per model: the one that lost least accuracy at this target in our runs (lasso, the
# reconstruction-based ranking, wins on the depthwise-separable MobileNet; l1 elsewhere).
CRITERION = {"resnet": "l1", "vgg": "l1", "mobilenet": "lasso"}


def structured_section(calib, test, cfg: LatencyConfig, rounds: int, models=STRUCTURED_MODELS) -> str:
    """At >= 2x fewer MACs: one-shot without and with recovery, iterative with recovery, and
    unstructured pruning at the same parameter count, all measured in one run."""
    from onnxcompress.metrics import count_params
    from onnxcompress.pass_api import Context
    from onnxcompress.passes import PruneChannels, PruneWeights
    from onnxcompress.sensitivity import allocate, pass_pruner, sensitivity

    parts = [STRUCTURED_TEXT.format(**STRUCTURED)]
    for name in models:
        print(f"  structured {name} ...", flush=True)
        model = io.load_model(ROOT / "models" / f"{name}.onnx")
        ctx = Context(calib=calib.take(300), original=model, teachers=[model])
        criterion = CRITERION.get(name, "l1")
        prune = pass_pruner(default_registry(), ctx, criterion, STRUCTURED["round_to"], recover=True)
        t0 = time.perf_counter()
        sens = sensitivity(model, prune, calib.take(300), test.take(500), ratios=(0.25, 0.5, 0.75))
        ratios, _ = allocate(model, prune, sens, calib, STRUCTURED["target_macs"])
        alloc_s = time.perf_counter() - t0
        opts = dict(ratio=0.0, ratios=ratios, criterion=criterion, round_to=STRUCTURED["round_to"])
        rows = [Row("original", model, 0.0)]
        for label, p in (("one-shot, no recovery", PruneChannels(**opts, recover=False)),
                         ("one-shot + recovery", PruneChannels(**opts)),
                         ("iterative (3 steps) + recovery", PruneChannels(**opts, steps=3))):
            t0 = time.perf_counter()
            result = PassManager([p], calib=calib, latency=LatencyConfig(enabled=False)).run(model)
            rows.append(Row(label, result.model, time.perf_counter() - t0))
        sparsity = 1 - count_params(rows[2].model) / count_params(model)
        t0 = time.perf_counter()
        same = PassManager([PruneWeights(sparsity=sparsity), Distill()], calib=calib,
                           latency=LatencyConfig(enabled=False)).run(model).model
        rows.append(Row(f"unstructured, same parameter count (prune-weights {sparsity:.0%} + distill)", same,
                        time.perf_counter() - t0))
        measure(rows, test, cfg, rounds)
        spec = f"prune-channels(ratios={ratios}, criterion='{criterion}', round_to={STRUCTURED['round_to']})"
        parts.append(f"### {name}\n\nAllocation (sensitivity with recovery at 0.25/0.5/0.75, 300 calibration and 500 "
                     f"test digits, then greedy, "
                     f"{alloc_s:.0f}s): `{spec}`\n\n" + structured_table(rows, cfg.batch_sizes))
    return "\n\n".join(parts)


def structured_table(rows: list[Row], batches: tuple[int, ...]) -> str:
    base = rows[0].step
    header = ["variant", "accuracy", "drop", "MACs", "params (nonzero)", "size", "gzip size"]
    header += [f"speedup b{b}" for b in batches] + [f"speedup / MAC reduction b{b}" for b in batches] + ["time"]
    out = []
    for row in rows:
        s = row.step
        mac_red = base.macs / s.macs
        nonzero = s.params * (1 - s.sparsity)
        cells = [row.label, f"{s.accuracy:.2f}%", f"{base.accuracy - s.accuracy:+.2f}", f"{human_count(s.macs)} ({mac_red:.2f}x fewer)",
                 f"{human_count(nonzero)} ({base.params / nonzero:.2f}x fewer)",
                 f"{human_bytes(s.size_bytes)} ({s.size_bytes / base.size_bytes:.2f}x)",
                 f"{human_bytes(s.gzip_bytes)} ({s.gzip_bytes / base.gzip_bytes:.2f}x)"]
        speed = [base.latency_ms[b] / s.latency_ms[b] for b in batches]
        cells += [f"{x:.2f}x" for x in speed] + [f"{x / mac_red:.2f}" for x in speed] + [f"{row.seconds:.1f}s"]
        out.append(cells)
    return markdown_table(header, out)


STRUCTURED_TEXT = """## Structured pruning (prune-channels)

Target: at least 2x fewer MACs. The per-group ratios come from `onnxcompress sensitivity --recover
--target-macs {target_macs}` (criterion as given per model, channel counts rounded to multiples of {round_to}: on
this AVX-512 machine onnxruntime's blocked convolution kernels work in blocks of 16 channels, and
other counts cost more time per MAC than they save). The same structure is then reached one shot
without recovery, one shot with recovery (least-squares refit of the changed layers, BatchNorm
re-estimation, soft-target head refit), and in 3 steps with recovery after each. The last row is
unstructured pruning (`prune-weights` + `distill`) leaving the same number of nonzero parameters as
the structured model. "speedup / MAC reduction" is the latency speedup divided by the MAC
reduction (1.0 = latency falls exactly as MACs do)."""


def ocr_section(cfg: LatencyConfig, rounds: int) -> str:
    """The three PP-OCR models shipped in rapidocr-onnxruntime: prunable groups, validity, fidelity."""
    try:
        import rapidocr_onnxruntime
    except ImportError:
        return "## PP-OCR models\n\nSkipped: rapidocr-onnxruntime is not installed (`pip install rapidocr-onnxruntime==1.4.4`).\n"
    from onnxcompress.channels import analyze
    from onnxcompress.data import Dataset
    from benchmarks.experiments import digit_strips
    from onnxcompress.graph import to_graph
    from onnxcompress.passes import PruneChannels
    from onnxcompress.validate import validate_model

    folder = Path(rapidocr_onnxruntime.__file__).parent / "models"
    with np.load(ROOT / "models" / "mnist_test.npz") as z:
        digits = (z["input"][:, 0] * 0.3081 + 0.1307).clip(0, 1)
    header = ["model", "input", "groups (prunable / frozen)", "channels pruned", "MACs", "params", "size",
              "latency b1", "fidelity (held-out strips)", "valid", "I/O unchanged", "time", "frozen because"]
    out = []
    for file, shape in OCR_MODELS:
        print(f"  PP-OCR {file} ...", flush=True)
        model = io.load_model(folder / file)
        calib = Dataset({"x": digit_strips(digits, shape, 32, seed=1)})
        held_out = Dataset({"x": digit_strips(digits, shape, 32, seed=2)})
        an = analyze(to_graph(model), model, {"x": [1, *shape]})
        frozen = [g for g in an.groups if g.frozen and g.producers]
        t0 = time.perf_counter()
        result = PassManager([PruneChannels(ratio=0.25, round_to=8)], calib=calib, eval_data=held_out,
                             latency=LatencyConfig(enabled=False)).run(model)
        seconds = time.perf_counter() - t0
        rows = [Row("original", model, 0.0), Row("pruned", result.model, seconds)]
        measure(rows, held_out, LatencyConfig(batch_sizes=(1,), runs=max(5, cfg.runs // 5), warmup=2, threads=cfg.threads), rounds)
        base, s = rows[0].step, rows[1].step
        fid = next(iter(s.fidelity.values()))
        fid_text = f"cosine {fid['cosine']:.3f}" + (f", top-1 agreement {fid['top1_agreement']:.1f}%" if "top1_agreement" in fid else "")
        try:
            validate_model(result.model)
            valid = "yes"
        except Exception as e:  # reported, not hidden
            valid = f"NO: {e}"
        io_same = _io(result.model) == _io(model)
        stats = result.report.steps[1].stats
        out.append([file, "x".join(str(d) for d in shape),
                    f"{len(an.groups)} ({len([g for g in an.groups if not g.frozen])} / {len(frozen)})",
                    f"{stats.get('channels_before', 0) - stats.get('channels_after', 0)} of {stats.get('channels_before', 0)}",
                    f"{s.macs / base.macs:.2f}x", f"{s.params / base.params:.2f}x", f"{s.size_bytes / base.size_bytes:.2f}x",
                    f"{s.latency_ms[1] / base.latency_ms[1]:.2f}x", fid_text, valid, "yes" if io_same else "NO",
                    f"{seconds:.0f}s", "; ".join(sorted({g.frozen for g in frozen})) or "-"])
    return OCR_TEXT + markdown_table(header, out) + "\n"


OCR_MODELS = [("ch_ppocr_mobile_v2.0_cls_infer.onnx", (3, 48, 192)), ("ch_PP-OCRv4_rec_infer.onnx", (3, 48, 320)),
              ("ch_PP-OCRv4_det_infer.onnx", (3, 320, 320))]

OCR_TEXT = """## PP-OCR models (third-party, from rapidocr-onnxruntime 1.4.4)

`prune-channels(ratio=0.25, round_to=8)` with recovery, calibrated on 32 text-like images made of
real handwritten digits (`digit_strips` in `benchmarks/experiments.py`), fidelity measured on 32 other
such images (no labels: these are not the models' real inputs, so fidelity is what is shown, not
accuracy). Shapes are fixed per row (the models have dynamic spatial dimensions). "valid": the
pruned model passes the full ONNX checker, strict shape inference and loads in onnxruntime.

"""


def _io(model: onnx.ModelProto):
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return [(v.name, dims(v)) for v in list(model.graph.input) + list(model.graph.output)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--runs", type=int, default=100, help="latency runs per round (median taken)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for latency")
    ap.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--skip-distill", action="store_true", help="skip the distillation experiments")
    ap.add_argument("--skip-structured", action="store_true", help="skip the structured pruning experiments")
    ap.add_argument("--skip-ocr", action="store_true", help="skip the PP-OCR models")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer warns through the root logger
    batches = tuple(int(b) for b in args.batch_sizes.split(","))
    cfg = LatencyConfig(batch_sizes=batches, runs=args.runs, warmup=10, threads=args.threads)
    calib = load_dataset(str(ROOT / "models" / "mnist_calib.npz"), ["input"])
    test = load_dataset(str(ROOT / "models" / "mnist_test.npz"), ["input"])
    sections = []
    for name in args.models:
        print(f"benchmarking {name} ...", flush=True)
        model = io.load_model(ROOT / "models" / f"{name}.onnx")
        rows = compress_variants(model, calib, test)
        measure(rows, test, cfg, args.rounds)
        base = rows[0].step
        lat = ", ".join(f"b{b} {base.latency_ms[b]:.3f} ms" for b in batches)
        sections.append(f"### {name}\n\nOriginal latency this run (for scale only; compare ratios): {lat}.\n\n"
                        + table(rows, batches))
    if not args.skip_distill:
        print("distillation experiments ...", flush=True)
        sections.append(distill_section(calib, test))
    if not args.skip_structured:
        print("structured pruning ...", flush=True)
        sections.append(structured_section(calib, test, cfg, args.rounds,
                                           [m for m in STRUCTURED_MODELS if m in args.models]))
    if not args.skip_ocr:
        print("PP-OCR models ...", flush=True)
        sections.append(ocr_section(cfg, args.rounds))
    text = HEADER.format(version=onnxcompress.__version__, ort=ort.__version__, py=platform.python_version(),
                         runs=args.runs, rounds=args.rounds, threads=args.threads, date=time.strftime("%Y-%m-%d"))
    io.write_text(args.output, text + "\n\n".join(sections) + "\n" + FOOTER)
    print(f"wrote {args.output}")


HEADER = """# Benchmarks

Written by `python benchmarks/run.py` on {date} (onnxcompress {version}, onnxruntime {ort}, Python {py}).
Every number comes from one run of the suite on one machine: the reference models in `models/`,
accuracy on the 1,000 held-out digits of `models/mnist_test.npz`, calibration on
`models/mnist_calib.npz`. Sizes and MACs are exact; latency is onnxruntime CPU, {threads} intra-op
thread(s), median of {runs} runs in each of {rounds} interleaved rounds, shown as a ratio to the
original measured in the same run (the machines are shared and noisy: read ratios, not absolute times).
"agreement" is top-1 agreement with the original model; "gzip size" is the model after zlib
compression (what sparse or clustered weights save in storage); MACs are at batch 1.

"""

FOOTER = """
## Reading these numbers

- `prune-weights` zeroes weights but stores them densely: the file is the same size and onnxruntime
  runs the same dense kernels, so latency does not improve. The zeros only pay off in storage
  (the gzip column) or on a sparse runtime. Structured pruning (removing whole channels) is what
  makes models faster.
- `fold-bn` removes BatchNormalization nodes; onnxruntime already fuses Conv+BatchNormalization at
  load time, so the latency gain is small; the file shrinks by the BN parameters.
- onnxruntime's `quantize_static` (QDQ, int8 weights per channel and int8 activations, MinMax
  calibration on the same 1,000 calibration digits) is the peer every quantization pass must beat.
  Its QDQ models are 2-4x smaller here, but int8 QDQ is not automatically faster on this CPU:
  latency ranges from 0.84x of the original (VGG, batch 1) to 2.15x (MobileNet, batch 1).
- `prune-channels` is the pass that makes models faster, but latency falls less than MACs:
  narrower convolutions run at fewer MACs per second (at batch 32 here, a 16-channel 3x3 conv on
  28x28 runs at about 85 GMAC/s, a 64-channel one on 7x7 at about 125), the layers already at the
  minimum width (16 with `round_to=16`: the first ResNet stage, about 36% of its MACs) keep their
  cost, and at batch 1 onnxruntime's fixed cost per node does not shrink at all (MobileNet's
  0.12 ms run at batch 1 spends about 45 us outside its kernels, and its kernels take 2-9 us each
  whatever their width). That is why the batch-1 MobileNet and the ResNet rows stay near or under
  0.8 of the MAC reduction while VGG, whose pruned layers are large, gets about 0.9.
- One shot with recovery vs three steps with recovery: neither wins consistently on these models
  (within a few tenths of a point); without recovery the same structure loses 50 to 88 points.
  Unstructured pruning at the same nonzero parameter count keeps accuracy as well but gives no
  speedup at all.
"""

if __name__ == "__main__":
    main()
