"""Early exits (`python benchmarks/run.py --only early-exit`): `early-exit` with a budget of 0.5 points
on the reference CNNs (its default of up to two exits, and one and three), judged at batch 1 as
deployed: accuracy, share exiting at each exit, expected MACs and mean latency over the 1,000 test
digits, the exit model and the original interleaved digit by digit on one thread (order
alternating), median of the rounds; how many batches of 32 exit; and beside the default,
`prune-channels` to the same average MACs (a static model that spends them on every input)."""
from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.run import ROOT
from onnxcompress import LatencyConfig, PassManager, exits as X, io
from onnxcompress.metrics import total_macs
from onnxcompress.passes import EarlyExit, FoldBatchNorm, PruneChannels
from onnxcompress.report import markdown_table

SECTION_TITLE = "## Early exits (early-exit)"
MODELS = ("resnet", "vgg", "mobilenet")
ROUNDS = 3
BUDGET = 0.5     # points: the target
VARIANTS = (None, 1, 3)   # exits: the pass's default, then one and three
CLS_CALIB, CLS_TEST = 1000, 480   # PP-OCR cls crops: 96 could not vouch for 0.5 points (no loss in n: up to 3/n)


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
    exits = _exit_count(exited)
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
                        if len(out) > 1 else exits
    ratio = float(np.median(tb.mean(1) / ta.mean(1)))
    exits32 = [int(len(o := b.run(None, {feed: x[s:s + 32]})) > 1 and o[-1][0] < exits) for s in range(0, len(x), 32)]
    return {"acc0": np.mean(pred_a == labels) * 100, "acc1": np.mean(pred_b == labels) * 100,
            "agree": np.mean(pred_a == pred_b) * 100, "shares": np.bincount(index, minlength=exits + 1)[:exits] / len(x),
            "ms0": float(np.median(ta.mean(1)) * 1e3), "ms1": float(np.median(tb.mean(1)) * 1e3), "ratio": ratio,
            "b32": f"{sum(exits32)} of {len(exits32)}"}


def _exit_count(model: onnx.ModelProto) -> int:
    """How many exits the model has (0 for a model without any)."""
    return sum(i.name.startswith("exit_threshold") for i in model.graph.input)


def exit_probs(model: onnx.ModelProto, shares) -> dict[str, float]:
    """The branch probabilities of the nested exit Ifs (keyed by each If's first output) from the
    share of inputs each exit answered: the outer If exits with the first share, the If in its
    else-branch with the second share over what reaches it, and so on."""
    probs, graph, wanted = {}, model.graph, model.graph.output[0].name
    for odds in X.exit_odds(shares):
        node = next(n for n in graph.node if n.op_type == "If" and n.output[0] == wanted)
        probs[wanted] = odds
        graph = next(a.g for a in node.attribute if a.name == "else_branch")
        wanted = graph.output[0].name
    return probs


def _where(step) -> str:
    return "; ".join(f"'{e['tensor']}' ({e['grid']}x{e['grid']}, {e['threshold']:g})" for e in step.stats["exits"])


def exits_section(calib, test, models=MODELS) -> str:
    x, labels = test.feeds["input"], test.labels
    rows = []
    for name in models:
        model = io.load_model(ROOT / "models" / f"{name}.onnx")
        for exits in VARIANTS:
            print(f"  early-exit {name} exits={exits or 'default'} ...", flush=True)
            options = {} if exits is None else {"exits": exits}
            t0 = time.perf_counter()
            result = PassManager([EarlyExit(max_drop=BUDGET, **options)], calib=calib, max_drop=None,
                                 latency=LatencyConfig(enabled=False)).run(model)
            seconds = time.perf_counter() - t0
            step = result.report.steps[-1]
            label = f"{name}" + ("" if exits is None else f", exits={exits}")
            if step.status != "applied":
                rows.append([label, "not applied: " + "; ".join(step.notes)[:200]] + ["-"] * 8)
                continue
            m = _batch1(model, result.model, x, labels)
            macs = total_macs(result.model, branch_probs=exit_probs(result.model, m["shares"])) / total_macs(model)
            rows.append([label, _where(step), f"{m['acc1']:.1f}% ({m['acc1'] - m['acc0']:+.1f})", f"{m['agree']:.1f}%",
                         " + ".join(f"{p:.1%}" for p in m["shares"]), f"{macs:.2f}x",
                         f"{m['ms1']:.3f} vs {m['ms0']:.3f} ms ({m['ratio']:.2f}x)", m["b32"], f"{seconds:.1f}s"])
            if exits is None:
                rows.append(_static_row(name, model, calib, x, labels, macs))
    rows.append(_cls_row())
    return (SECTION_TITLE + "\n\n" + INTRO + "\n\n" + markdown_table(
        ["model", "exits after (pooling, threshold)", "accuracy at batch 1 (vs original)", "agreement",
         "exiting at each exit", "expected MACs", "mean latency b1 (vs original)", "batches of 32 exiting",
         "pass time"], rows))


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
    """The PP-OCR angle classifier: 1,000 rendered calibration crops, 480 others (half upside down) to judge."""
    import string

    from benchmarks import ocr
    from onnxcompress import Dataset

    folder = ocr.models_dir()
    chars = ocr.rec_characters(onnx.load(str(folder / "ch_PP-OCRv4_rec_infer.onnx")))
    alphabet = "".join(c for c in string.digits + string.ascii_letters if c in set(chars[1:-1]))
    model = onnx.load(str(folder / "ch_ppocr_mobile_v2.0_cls_infer.onnx"))
    (cx, _), (ex, truth) = ocr.cls_data(CLS_CALIB, 1, alphabet), ocr.cls_data(CLS_TEST, 2, alphabet)
    t0 = time.perf_counter()
    result = PassManager([EarlyExit(max_drop=BUDGET)], calib=Dataset({"x": cx}), max_drop=None,
                         latency=LatencyConfig(enabled=False)).run(model)
    seconds, step = time.perf_counter() - t0, result.report.steps[-1]
    if step.status != "applied":
        return [f"PP-OCR cls ({CLS_TEST} rendered crops)", "not applied: " + "; ".join(step.notes)[:300]] + ["-"] * 7
    m = _batch1(model, result.model, ex, np.asarray(truth), feed="x")
    pins = {"x": [1, *cx.shape[1:]]}     # the crops' size: the model's height and width are symbolic
    macs = total_macs(result.model, pins, exit_probs(result.model, m["shares"])) / total_macs(model, pins)
    return [f"PP-OCR cls ({CLS_TEST} rendered crops)", _where(step), f"{m['acc1']:.1f}% ({m['acc1'] - m['acc0']:+.1f})",
            f"{m['agree']:.1f}%", " + ".join(f"{p:.1%}" for p in m["shares"]), f"{macs:.2f}x",
            f"{m['ms1']:.3f} vs {m['ms0']:.3f} ms ({m['ratio']:.2f}x)", m["b32"], f"{seconds:.1f}s"]



INTRO = """`early-exit` with a budget of 0.5 points and otherwise default options (up to two exits; rows
"exits=1" and "exits=3" change only that): every cut between 10% and 75% of the MACs, each with heads
pooled 1x1 to 4x4 fit on the model's own soft outputs on two thirds of the 1,000 calibration
digits and judged on the rest. With one exit, the cheapest few are judged again by 3-fold
cross-fitting on all the calibration digits; with several, the best head at each cut is, and every
chain of them in graph order is swept over every combination of thresholds. The cheapest kept is
the one whose drop plus three standard errors stays within the budget. Judged at batch 1 on the
1,000 test digits: the exit model and the original run interleaved digit by digit, one thread,
order alternating, 3 rounds; latency is the mean over the digits, the median over rounds;
"expected MACs" weighs each path by the share of test digits that took it. A batch exits only when
every sample in it is confident, so batches of 32 almost never do. "Pruned instead": `fold-bn`,
then `prune-channels` with a MAC target equal to the default exit model's measured average MACs,
judged the same way. The PP-OCR angle classifier: 1,000 rendered crops calibrate, 480 others (half
upside down) judge, labels = the known angle. A drop measured without one sample changing counts a
standard error of at least one sample's (100/n points), so small calibration sets cannot vouch
for a tight budget: 0.5 points within 3 standard errors needs over 600 samples."""
