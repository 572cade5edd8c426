"""Early exits (`python benchmarks/run.py --only early-exit`): `early-exit` with a budget of 0.5 points
on the reference CNNs, judged at batch 1 as deployed: accuracy, share exiting, expected MACs and mean
latency over the 1,000 test digits, the exit model and the original interleaved digit by digit on
one thread (order alternating), median of the rounds; how many batches of 32 exit; and beside each,
`prune-channels` to the same average MACs (a static model that spends them on every input)."""
from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.run import ROOT
from onnxcompress import LatencyConfig, PassManager, io
from onnxcompress.metrics import total_macs
from onnxcompress.passes import EarlyExit, FoldBatchNorm, PruneChannels
from onnxcompress.report import markdown_table

SECTION_TITLE = "## Early exits (early-exit)"
MODELS = ("resnet", "vgg", "mobilenet")
ROUNDS = 3
BUDGET = 0.5     # points: the target


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _batch1(original: onnx.ModelProto, exited: onnx.ModelProto, x: np.ndarray, labels: np.ndarray,
            feed: str = "input") -> dict:
    a, b = _session(original), _session(exited)
    for i in range(20):
        a.run(None, {feed: x[i:i + 1]}), b.run(None, {feed: x[i:i + 1]})
    ta, tb = np.zeros((ROUNDS, len(x))), np.zeros((ROUNDS, len(x)))
    pred_a, pred_b, index = np.zeros(len(x), int), np.zeros(len(x), int), np.zeros(len(x), int)
    for r in range(ROUNDS):
        for i in range(len(x)):
            one = {feed: x[i:i + 1]}
            for sess in ((a, b) if (i + r) % 2 == 0 else (b, a)):
                t0 = time.perf_counter()
                out = sess.run(None, one)
                if sess is a:
                    ta[r, i], pred_a[i] = time.perf_counter() - t0, out[0].argmax()
                else:   # a model without the exit_index output (a static one) never exits
                    tb[r, i], pred_b[i], index[i] = time.perf_counter() - t0, out[0].argmax(), out[-1].ravel()[0] \
                        if len(out) > 1 else 1
    ratio = float(np.median(tb.mean(1) / ta.mean(1)))
    exits32 = [int(len(o := b.run(None, {feed: x[s:s + 32]})) > 1 and o[-1][0] == 0) for s in range(0, len(x), 32)]
    return {"acc0": np.mean(pred_a == labels) * 100, "acc1": np.mean(pred_b == labels) * 100,
            "agree": np.mean(pred_a == pred_b) * 100, "share": float(np.mean(index == 0)),
            "ms0": float(np.median(ta.mean(1)) * 1e3), "ms1": float(np.median(tb.mean(1)) * 1e3), "ratio": ratio,
            "b32": f"{sum(exits32)} of {len(exits32)}"}


def exits_section(calib, test, models=MODELS) -> str:
    x, labels = test.feeds["input"], test.labels
    rows = []
    for name in models:
        print(f"  early-exit {name} ...", flush=True)
        model = io.load_model(ROOT / "models" / f"{name}.onnx")
        t0 = time.perf_counter()
        result = PassManager([EarlyExit(max_drop=BUDGET)], calib=calib, max_drop=None,
                             latency=LatencyConfig(enabled=False)).run(model)
        seconds = time.perf_counter() - t0
        step = result.report.steps[-1]
        if step.status != "applied":
            rows.append([name, "not applied: " + "; ".join(step.notes)[:200]] + ["-"] * 8)
            continue
        m = _batch1(model, result.model, x, labels)
        macs = total_macs(result.model, branch_probs={"logits": m["share"]}) / total_macs(model)
        where = next((n for n in step.notes if n.startswith("exit after")), "").split(":")[0]
        rows.append([name, where, f"{m['acc1']:.1f}% ({m['acc1'] - m['acc0']:+.1f})", f"{m['agree']:.1f}%",
                     f"{m['share']:.1%}", f"{macs:.2f}x", f"{m['ms1']:.3f} vs {m['ms0']:.3f} ms ({m['ratio']:.2f}x)",
                     m["b32"], f"{seconds:.1f}s"])
        rows.append(_static_row(name, model, calib, x, labels, macs))
    rows.append(_cls_row())
    return (SECTION_TITLE + "\n\n" + INTRO + "\n\n" + markdown_table(
        ["model", "exit (budget 0.5 points)", "accuracy at batch 1 (vs original)", "agreement", "exiting",
         "expected MACs", "mean latency b1 (vs original)", "batches of 32 exiting", "pass time"], rows))


def _static_row(name: str, model: onnx.ModelProto, calib, x: np.ndarray, labels: np.ndarray, macs: float) -> list[str]:
    """prune-channels (fold-bn first) to the exit model's average MACs: the same compute on every input."""
    t0 = time.perf_counter()
    result = PassManager([FoldBatchNorm(), PruneChannels(macs=round(macs, 2))], calib=calib, max_drop=None,
                         latency=LatencyConfig(enabled=False)).run(model)
    seconds = time.perf_counter() - t0
    m = _batch1(model, result.model, x, labels)
    got = total_macs(result.model) / total_macs(model)
    return [f"{name}, pruned instead", f"prune-channels(macs={macs:.2f}), static", f"{m['acc1']:.1f}% "
            f"({m['acc1'] - m['acc0']:+.1f})", f"{m['agree']:.1f}%", "-", f"{got:.2f}x",
            f"{m['ms1']:.3f} vs {m['ms0']:.3f} ms ({m['ratio']:.2f}x)", "-", f"{seconds:.1f}s"]


def _cls_row() -> list[str]:
    """The PP-OCR angle classifier: 96 rendered calibration crops, 128 others (half upside down) to judge."""
    import string

    from benchmarks import ocr
    from onnxcompress import Dataset

    folder = ocr.models_dir()
    chars = ocr.rec_characters(onnx.load(str(folder / "ch_PP-OCRv4_rec_infer.onnx")))
    alphabet = "".join(c for c in string.digits + string.ascii_letters if c in set(chars[1:-1]))
    model = onnx.load(str(folder / "ch_ppocr_mobile_v2.0_cls_infer.onnx"))
    (cx, _), (ex, truth) = ocr.cls_data(96, 1, alphabet), ocr.cls_data(128, 2, alphabet)
    t0 = time.perf_counter()
    result = PassManager([EarlyExit(max_drop=BUDGET)], calib=Dataset({"x": cx}), max_drop=None,
                         latency=LatencyConfig(enabled=False)).run(model)
    seconds, step = time.perf_counter() - t0, result.report.steps[-1]
    if step.status != "applied":
        return ["PP-OCR cls", "not applied: " + "; ".join(step.notes)[:300]] + ["-"] * 7
    m = _batch1(model, result.model, ex, np.asarray(truth), feed="x")
    pins = {"x": [1, *cx.shape[1:]]}     # the crops' size: the model's height and width are symbolic
    macs = total_macs(result.model, pins, {next(iter(result.model.graph.output)).name: m["share"]}) / total_macs(model, pins)
    where = next((n for n in step.notes if n.startswith("exit after")), "").split(":")[0]
    return ["PP-OCR cls (128 rendered crops)", where, f"{m['acc1']:.1f}% ({m['acc1'] - m['acc0']:+.1f})",
            f"{m['agree']:.1f}%", f"{m['share']:.1%}", f"{macs:.2f}x",
            f"{m['ms1']:.3f} vs {m['ms0']:.3f} ms ({m['ratio']:.2f}x)", m["b32"], f"{seconds:.1f}s"]



INTRO = """`early-exit` with a budget of 0.5 points and otherwise default options: every cut between 10%
and 75% of the MACs, each with heads pooled 1x1 to 4x4 fit on the model's own soft outputs; the
cheapest few judged again by 3-fold cross-fitting on all 1,000 calibration digits, and the
(cut, pooling, threshold) with the least expected MACs kept whose drop plus two standard errors
stays within the budget. Judged at batch 1 on the 1,000 test digits: the exit model and the
original run interleaved digit by digit, one thread, order alternating, 3 rounds; latency is the
mean over the digits, the median over rounds. A batch exits only when every sample in it is
confident, so batches of 32 almost never do. "Pruned instead": `fold-bn`, then `prune-channels`
with a MAC target equal to the exit model's measured average MACs, judged the same way. The PP-OCR
angle classifier: 96 rendered crops calibrate, 128 others (half upside down) judge, labels = the
known angle."""
