"""PP-OCR models (rapidocr-onnxruntime 1.4.4) under every pass with default options, on text rendered
with Pillow and scored by what a user sees: decoded strings (rec), text maps (det), orientation (cls).

    python benchmarks/run.py --only ocr-passes
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import string
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
         "DejaVuSansCondensed.ttf", "DejaVuSerif-Bold.ttf"]
SKIP_AFTER_S = float(os.environ.get("OCR_SKIP_AFTER_S", 240))  # a variant running longer is skipped
SECTION_TITLE = "## PP-OCR models: every pass with default options on rendered text"
DET_THRESHOLD = 0.3
DET_PAGE = (480, 640)   # height, width of the rendered det pages (multiples of 32)


def models_dir() -> Path:
    import rapidocr_onnxruntime
    return Path(rapidocr_onnxruntime.__file__).parent / "models"


def rec_characters(model: onnx.ModelProto) -> list[str]:
    """rapidocr's convention: metadata 'character' lines, 'blank' inserted at 0 and ' ' appended."""
    meta = {p.key: p.value for p in model.metadata_props}
    chars = meta["character"].splitlines()
    return ["blank"] + chars + [" "]


def _font(size: int, rng: random.Random):
    from PIL import ImageFont
    files = [FONT_DIR / f for f in FONTS if (FONT_DIR / f).exists()]
    if files:
        return ImageFont.truetype(str(rng.choice(files)), size)
    return ImageFont.load_default(size=size)


def _colours(rng: random.Random):
    bg = tuple(rng.randint(170, 255) for _ in range(3))
    fg = tuple(rng.randint(0, 80) for _ in range(3))
    if rng.random() < 0.2:  # light text on a dark background
        bg, fg = tuple(255 - c for c in bg), tuple(255 - c for c in fg)
    return bg, fg


def _text(rng: random.Random, alphabet: str, lo: int = 4, hi: int = 12) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def render_line(text: str, rng: random.Random):
    """One tightly cropped text line as an RGB Pillow image."""
    from PIL import Image, ImageDraw
    font = _font(rng.randint(20, 40), rng)
    bg, fg = _colours(rng)
    l, t, r, b = font.getbbox(text)
    pad_x, pad_y = rng.randint(2, 10), rng.randint(2, 8)
    img = Image.new("RGB", (r - l + 2 * pad_x, b - t + 2 * pad_y), bg)
    ImageDraw.Draw(img).text((pad_x - l, pad_y - t), text, font=font, fill=fg)
    return img


def _to_bgr_chw(img) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32)[:, :, ::-1]  # rapidocr reads with OpenCV: BGR
    return a.transpose(2, 0, 1)


def _line_tensor(img, height: int, width: int) -> np.ndarray:
    """rapidocr's rec/cls resize_norm_img: height fixed, ratio kept (capped at width), zero-padded right."""
    from PIL import Image
    w, h = img.size
    rw = min(width, int(np.ceil(height * w / h)))
    img = img.resize((rw, height), Image.BILINEAR)
    x = (_to_bgr_chw(img) / 255.0 - 0.5) / 0.5
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :rw] = x
    return out


def rec_data(n: int, seed: int, alphabet: str):
    rng = random.Random(seed)
    texts = [_text(rng, alphabet) for _ in range(n)]
    return np.stack([_line_tensor(render_line(t, rng), 48, 320) for t in texts]), texts


def cls_data(n: int, seed: int, alphabet: str):
    rng = random.Random(seed)
    xs, labels = [], []
    for i in range(n):
        img = render_line(_text(rng, alphabet, 3, 8), rng)
        rot = i % 2  # half rotated by 180 degrees
        if rot:
            img = img.rotate(180)
        xs.append(_line_tensor(img, 48, 192))
        labels.append(rot)
    return np.stack(xs), np.array(labels)


def det_data(n: int, seed: int, alphabet: str, size: tuple[int, int] = (320, 320)):
    """Pages (h, w multiples of 32) with several text lines; the truth is the union of the lines' ink boxes."""
    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    h, w = size
    xs, masks = [], []
    for _ in range(n):
        bg, _ = _colours(rng)
        page = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(page)
        mask = np.zeros((h, w), bool)
        y = rng.randint(4, 20)
        while True:
            font = _font(rng.randint(16, 32), rng)
            text = _text(rng, alphabet, 3, 10)
            l, t, r, b = font.getbbox(text)
            if y + (b - t) > h - 4:
                break
            x = rng.randint(4, max(5, w // 3))
            if x + (r - l) > w - 4:
                text = text[: max(1, len(text) * (w - 8 - x) // (r - l))]
                l, t, r, b = font.getbbox(text)
            fg = tuple(rng.randint(0, 80) for _ in range(3))
            if sum(bg) < 300:
                fg = tuple(255 - c for c in fg)
            draw.text((x - l, y - t), text, font=font, fill=fg)
            mask[y: y + (b - t), x: x + (r - l)] = True
            y += (b - t) + rng.randint(8, 30)
        xs.append((_to_bgr_chw(page) / 255.0 - 0.5) / 0.5)  # rapidocr det config: mean 0.5, std 0.5
        masks.append(mask)
    return np.stack(xs).astype(np.float32), np.stack(masks)


def ctc_decode(probs: np.ndarray, chars: list[str]) -> list[str]:
    idx = probs.argmax(-1)
    out = []
    for row in idx:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        out.append("".join(chars[i] for i in row[keep]))
    return out


def _run(model: onnx.ModelProto, x: np.ndarray, batch: int = 16) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i: i + batch]})[0] for i in range(0, len(x), batch)])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 100.0 * np.logical_and(a, b).sum() / union if union else 100.0


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))


def user_metric(kind: str, out: np.ndarray, ref: np.ndarray, truth, chars) -> str:
    if kind == "rec":
        got, base = ctc_decode(out, chars), ctc_decode(ref, chars)
        vs_truth = 100.0 * np.mean([g == t for g, t in zip(got, truth)])
        vs_fp32 = 100.0 * np.mean([g == b for g, b in zip(got, base)])
        steps = 100.0 * np.mean(out.argmax(-1) == ref.argmax(-1))
        return f"exact {vs_truth:.1f}% vs truth, {vs_fp32:.1f}% vs fp32; per step {steps:.1f}%"
    if kind == "det":
        m, r = out[:, 0] > DET_THRESHOLD, ref[:, 0] > DET_THRESHOLD
        return f"map IoU {_iou(m, r):.1f}% vs fp32, {_iou(m, truth):.1f}% vs truth"
    pred, base = out.argmax(-1), ref.argmax(-1)
    return f"accuracy {100.0 * np.mean(pred == truth):.1f}%, agreement {100.0 * np.mean(pred == base):.1f}%"


def _variants():
    from onnxcompress.passes import ClusterWeights, Distill, FoldBatchNorm, PruneChannels, PruneWeights
    return [("fold-bn", lambda: [FoldBatchNorm()]),
            ("cluster-weights (4-bit)", lambda: [ClusterWeights()]),
            ("cluster-weights (4-bit) + distill", lambda: [ClusterWeights(), Distill()]),
            ("prune-weights", lambda: [PruneWeights()]),
            ("prune-channels (ratio 0.3, recovery)", lambda: [PruneChannels()]),
            ("prune-weights(0.5) + distill", lambda: [PruneWeights(sparsity=0.5), Distill()]),
            ("prune-weights(0.5, wanda) + distill", lambda: [PruneWeights(sparsity=0.5, criterion="wanda"), Distill()]),
            ("prune-weights(0.5, sparsegpt) + distill",
             lambda: [PruneWeights(sparsity=0.5, criterion="sparsegpt"), Distill()])]


def _compress_child(conn, model_bytes: bytes, label: str, calib_x: np.ndarray, eval_x: np.ndarray) -> None:
    try:
        from onnxcompress import Dataset, LatencyConfig, PassManager
        make = dict(_variants())[label]
        t0 = time.perf_counter()
        result = PassManager(make(), calib=Dataset({"x": calib_x}), eval_data=Dataset({"x": eval_x}),
                             max_drop=None, latency=LatencyConfig(enabled=False)).run(onnx.load_from_string(model_bytes))
        seconds = time.perf_counter() - t0
        steps = result.report.steps
        status = ", ".join(f"{s.pass_}: {s.status}" for s in steps[1:])
        conn.send(("ok", result.model.SerializeToString(), seconds, status,
                   {"params": steps[-1].params, "macs": steps[-1].macs, "base_params": steps[0].params,
                    "base_macs": steps[0].macs}))
    except Exception as e:  # reported in the table, not hidden
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _compress(model: onnx.ModelProto, label: str, calib_x, eval_x):
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_compress_child, args=(child, model.SerializeToString(), label, calib_x, eval_x))
    proc.start()
    child.close()
    if parent.poll(SKIP_AFTER_S):
        msg = parent.recv()
        proc.join()
        return msg
    proc.kill()
    proc.join()
    return ("timeout",)


def _dur(s: float) -> str:
    return f"{s / 60:g} min" if s % 60 == 0 else f"{s:.0f} s"


def _packed(model: onnx.ModelProto) -> int:
    from onnxcompress import container
    return len(container.pack(model)[0])


def _gzip(model: onnx.ModelProto) -> int:
    return len(zlib.compress(model.SerializeToString(), 6))


OCR_PASS_MODELS = [("ch_PP-OCRv4_rec_infer.onnx", "rec"), ("ch_ppocr_mobile_v2.0_cls_infer.onnx", "cls"),
                   ("ch_PP-OCRv4_det_infer.onnx", "det")]
METRIC_HEADER = {"rec": "exact match (vs truth, vs fp32); per-step top-1 vs fp32", "det": "map IoU @0.3 (vs fp32, vs truth boxes)",
                 "cls": "accuracy (vs labels), agreement (vs fp32)"}


def ocr_passes_section() -> str:
    from onnxcompress.report import human_count, markdown_table
    folder = models_dir()
    rec_model = onnx.load(str(folder / "ch_PP-OCRv4_rec_infer.onnx"))
    chars = rec_characters(rec_model)
    vocab = set(chars[1:-1])
    alphabet = "".join(c for c in string.digits + string.ascii_letters if c in vocab)
    t_all = time.perf_counter()
    parts = []
    for file, kind in OCR_PASS_MODELS:
        print(f"PP-OCR {kind} ({file}): rendering data ...", flush=True)
        model = onnx.load(str(folder / file))
        if kind == "rec":
            calib_x, _ = rec_data(32, 1, alphabet)
            eval_x, truth = rec_data(128, 2, alphabet)
        elif kind == "cls":
            calib_x, _ = cls_data(32, 1, alphabet)
            eval_x, truth = cls_data(128, 2, alphabet)
        else:
            calib_x, _ = det_data(32, 1, alphabet, DET_PAGE)
            eval_x, truth = det_data(16, 2, alphabet, DET_PAGE)
        ref = _run(model, eval_x)
        base_gzip, base_bytes = _gzip(model), len(model.SerializeToString())
        rows = [["fp32 original", user_metric(kind, ref, ref, truth, chars), "1.0000", None, "1.00x", "1.00x",
                 f"{base_bytes / _packed(model):.1f}x", "-", "-"]]
        base_params = None
        for label, _ in _variants():
            print(f"  {kind}: {label} ...", flush=True)
            msg = _compress(model, label, calib_x, eval_x)
            if msg[0] == "timeout":
                rows.append([label, f"skipped: recovery takes > {_dur(SKIP_AFTER_S)} on this model "
                             "(see issue 8)", "-", "-", "-", "-", "-", f"> {SKIP_AFTER_S:.0f}s", "skipped"])
                print(f"    skipped after {SKIP_AFTER_S:.0f}s", flush=True)
                continue
            if msg[0] == "error":
                rows.append([label, f"failed: {msg[1]}"[:200], "-", "-", "-", "-", "-", "-", "error"])
                print(f"    failed: {msg[1]}", flush=True)
                continue
            _, data, seconds, status, info = msg
            out_model = onnx.load_from_string(data)
            out = _run(out_model, eval_x)
            base_params = info["base_params"]
            rows.append([label, user_metric(kind, out, ref, truth, chars), f"{_cosine(out, ref):.4f}",
                         human_count(info["params"]), f"{info['macs'] / info['base_macs']:.2f}x",
                         f"{_gzip(out_model) / base_gzip:.2f}x", f"{base_bytes / _packed(out_model):.1f}x",
                         f"{seconds:.1f}s", status])
            print(f"    {rows[-1][1]}; cosine {rows[-1][2]}; {seconds:.1f}s; {status}", flush=True)
        rows[0][3] = human_count(base_params) if base_params else "-"
        header = ["variant", METRIC_HEADER[kind], "cosine vs fp32", "params", "MACs ratio", "gzip ratio",
                  "container (x smaller)", "compress time", "status"]
        shape = "x".join(str(d) for d in eval_x.shape[1:])
        parts.append(f"### {file} ({kind}, input {shape})\n\n" + markdown_table(header, rows))
    total = time.perf_counter() - t_all
    print(f"PP-OCR passes section: {total:.0f}s", flush=True)
    return SECTION_TEXT.format(date=time.strftime("%Y-%m-%d"), skip=_dur(SKIP_AFTER_S), total=total / 60,
                               alphabet_len=len(alphabet)) + "\n\n".join(parts) + "\n"


SECTION_TEXT = SECTION_TITLE + """

Written by `python benchmarks/run.py --only ocr-passes` on {date} (about {total:.0f} minutes on this
machine). Models: the three ONNX files shipped in rapidocr-onnxruntime 1.4.4. Each pass runs through
`PassManager` with its default options (`FoldBatchNorm()`, `ClusterWeights()`: 4-bit per-tensor
codebooks, alone and followed by `Distill()`, `PruneWeights()`, `PruneChannels()`: ratio 0.3 with
recovery after the cut), then the pruning-with-recovery pipelines of issue 8:
`PruneWeights(sparsity=0.5)` with the magnitude, Wanda or SparseGPT criterion, each followed by
`Distill()`; `max_drop=None` (nothing rolled back), latency disabled.

Data (`benchmarks/ocr.py`): text rendered with Pillow in DejaVu fonts (sans, bold, serif, mono,
condensed; 16-40 px), random strings of the {alphabet_len} digits and ASCII letters that the rec
model's own dictionary (its `character` metadata) contains, varied text/background colours (a
fifth light-on-dark), ground truth kept. Preprocessing follows rapidocr: BGR channel order, rec lines
resized to height 48 keeping the ratio and zero-padded to 48x320, cls lines to 48x192, both
`(x/255-0.5)/0.5`; det pages 480x640 (multiples of 32) with several lines each, normalized with
rapidocr's det mean/std (0.5, 0.5 in its config.yaml; not ImageNet's). Calibration: 32 rendered
samples (det: 32 pages); evaluation on other rendered samples (rec 128 lines, cls 128 lines, half
of them rotated 180 degrees, det 16 pages).

Scoring: rec decodes greedily as rapidocr does (argmax, merge repeats, drop blank 0, id i -> the
dictionary's line i-1) and counts exact string matches against the truth and against the fp32
model's strings, and the share of time steps whose top-1 class equals fp32's; det thresholds the probability map at 0.3 and reports IoU with the fp32 model's
map and with the union of the rendered lines' ink boxes; cls reports accuracy against the known
rotation and agreement with fp32. "cosine" is the mean per-sample cosine of the raw output with
fp32's. Params and MACs are onnxcompress's counts; "gzip ratio" is zlib size over the original's;
"container" is the original .onnx size over the `onnxcompress pack` container of the result.
"compress time" includes the PassManager's own measurements. A variant still running after
{skip} is stopped and listed as skipped.

"""


PASS_ROW_MODELS = (("ch_PP-OCRv4_rec_infer.onnx", "rec"), ("ch_ppocr_mobile_v2.0_cls_infer.onnx", "cls"),
                   ("ch_PP-OCRv4_det_infer.onnx", "det"))
PASS_ROW_LATENCY = {"rec": (1, 32), "cls": (1, 32), "det": (1, 4)}


def pass_rows(variants, stat_header: str, stat, run, kinds=("rec", "cls", "det")) -> str:
    """One table per PP-OCR model: fp32 and each (label, pass factory) compressed by `run(model,
    calib, [pass])` -> (model, seconds, notes, stats) on 32 rendered samples (det: 8 pages), scored on
    128 others (det: 16 pages) by the user metric, MACs, `stat(stats)`, one-thread latency ratios in
    turns (each model and the original run by run in turn) and the compress time. A variant that raises is listed with its error."""
    from benchmarks.run import median_latency
    from onnxcompress import Dataset, LatencyConfig
    from onnxcompress.metrics import total_macs
    from onnxcompress.report import markdown_table

    folder = models_dir()
    chars = rec_characters(onnx.load(str(folder / "ch_PP-OCRv4_rec_infer.onnx")))
    alphabet = "".join(c for c in string.digits + string.ascii_letters if c in set(chars[1:-1]))
    out = []
    for file, kind in PASS_ROW_MODELS:
        if kind not in kinds:
            continue
        print(f"  PP-OCR {kind} ...", flush=True)
        model = onnx.load(str(folder / file))
        if kind == "det":
            (calib_x, _), (eval_x, truth) = det_data(8, 1, alphabet, DET_PAGE), det_data(16, 2, alphabet, DET_PAGE)
        else:
            make = rec_data if kind == "rec" else cls_data
            (calib_x, _), (eval_x, truth) = make(32, 1, alphabet), make(128, 2, alphabet)
        shapes = {"x": [1, *calib_x.shape[1:]]}
        calib = Dataset({"x": calib_x})
        ref = _run(model, eval_x)
        made, rows = [("fp32 original", model, 0.0, [], {})], []
        for label, factory in variants:
            try:
                made.append((label, *run(model, calib, [factory()])))
            except Exception as e:          # reported in the table, not hidden
                rows.append([label, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}"] + ["-"] * 6)
            print(f"    {label}: made", flush=True)
        batches = PASS_ROW_LATENCY[kind]
        lat = median_latency([m for _, m, *_ in made], Dataset({"x": eval_x[:max(batches)]}),
                             LatencyConfig(batch_sizes=batches, runs=10, warmup=2, threads=1), 3)
        base = total_macs(model, shapes)
        for (label, m, secs, notes, stats), ms in zip(made, lat):
            got = _run(m, eval_x)
            rows.append([label, user_metric(kind, got, ref, truth, chars), f"{total_macs(m, shapes) / base:.2f}x",
                         str(stat(stats))] + [f"{ms[b] / lat[0][b]:.2f}x" for b in batches]
                        + [f"{secs:.1f}s" if secs else "-"])
            print(f"    {rows[-1][:3]}", flush=True)
        out.append(f"### {file} ({kind})\n\n" + markdown_table(
            ["variant", METRIC_HEADER[kind], "MACs", stat_header] + [f"latency b{b}" for b in batches]
            + ["compress time"], rows))
    return "\n\n".join(out)


def replace_section(text: str, section: str, title: str = SECTION_TITLE) -> str:
    """Replace the section titled `title` (up to the next '## ' heading) or append it."""
    start = text.find("\n" + title + "\n") + 1             # a heading at the start of a line
    if start <= 0:                                            # a new section goes before the closing notes
        notes = text.find("\n## Reading these numbers")
        if notes < 0:
            return text.rstrip("\n") + "\n\n" + section
        return text[:notes + 1] + section.rstrip("\n") + "\n\n" + text[notes + 1:]
    nxt = text.find("\n## ", start + len(title))
    end = len(text) if nxt < 0 else nxt + 1
    return text[:start] + section.rstrip("\n") + "\n" + ("\n" if nxt >= 0 else "") + text[end:]
