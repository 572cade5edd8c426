"""Recovery on shifted copies of the calibration images: fixed prune-channels cuts recovered with
`shifts=0` and the default 2, at three recovery seeds, scored on the test digits."""
from __future__ import annotations

import time

import numpy as np

from benchmarks.run import ROOT
from onnxcompress import LatencyConfig, PassManager, io
from onnxcompress.passes import PruneChannels
from onnxcompress.report import markdown_table
from onnxcompress.sensitivity import Scorer

SECTION_TITLE = "## Recovery on shifted copies"
SEEDS = (0, 1, 2)
# The cuts the latency=0.5 targets took in earlier runs (ResNet: every group at 45%; MobileNet: the
# progressive search's) and VGG's uniform rival, with the multiples of 8 a latency target uses, ThiNet.
CUTS = {
    "resnet": dict(ratio=0.45, criterion="thinet"),
    "vgg": dict(ratio=0.4, criterion="thinet"),
    "mobilenet": dict(ratio=0.0, criterion="thinet", ratios={
        "/features/features.16/features.16.0/Conv": 0.625, "/features/features.20/features.20.0/Conv": 0.625,
        "/features/features.4/features.4.0/Conv": 0.375, "/features/features.8/features.8.0/Conv": 0.5,
        "/features/features.12/features.12.0/Conv": 0.125}),
}


def shifts_section(calib, test) -> str:
    rows = []
    for name, cut in CUTS.items():
        model = io.load_model(ROOT / "models" / f"{name}.onnx")
        accuracy, kl = (Scorer(model, test, ("CPUExecutionProvider",), score) for score in ("accuracy", "kl"))
        for shifts in (0, 2):
            accs, kls, secs = [], [], []
            for seed in SEEDS:
                t0 = time.perf_counter()
                p = PruneChannels(round_to=8, steps=1, shifts=shifts, seed=seed, **cut)
                pruned = PassManager([p], calib=calib, max_drop=None, latency=LatencyConfig(enabled=False)).run(model).model
                secs.append(time.perf_counter() - t0)
                accs.append(accuracy(pruned))
                kls.append(-kl(pruned) / 100)         # the scorer gives -100 x KL
            rows.append([name, str(shifts), " / ".join(f"{a:.1f}%" for a in accs), f"{np.mean(accs):.2f}%",
                         f"{np.mean(kls):.4f}", f"{np.median(secs):.1f}s"])
    cuts = "; ".join(f"{n}: " + (f"every group at {c['ratio']:g}" if c["ratio"] else "the progressive search's "
                                 + ", ".join(f"{k.split('/')[-2]} {v:g}" for k, v in c["ratios"].items()))
                     + f", {c['criterion']}" for n, c in CUTS.items())
    return (f"{SECTION_TITLE}\n\nOne cut per model, recovered on the 1,000 calibration digits alone (`shifts=0`) and "
            "with two copies of each moved by up to 2 pixels (`shifts=2`, the default), at recovery seeds "
            f"{', '.join(map(str, SEEDS))}; accuracy on the 1,000 test digits and the mean KL divergence of the pruned "
            "model's softmax from the original's there. Multiples of 8, one cut, "
            f"{cuts}.\n\n"
            + markdown_table(["model", "shifts", "test accuracy (seeds)", "mean", "KL from the original", "pass time"], rows))
