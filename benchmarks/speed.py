"""The tool's own speed and memory at 25M parameters (`python benchmarks/run.py --only speed`):
`models/big.py` builds a ResNet-50-shaped CNN and an 8-layer Transformer encoder (random weights,
256 calibration samples each) in a temporary folder; each pass then runs alone through the CLI,
in a fresh process, without a budget and without latency measurement, and the section records its
wall time and the process's peak RSS beside issue 13's budget (2 minutes; 3x the model file plus
the calibration data plus 500 MB)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import ROOT
from onnxcompress.report import human_bytes, markdown_table

SECTION_TITLE = "## Tool speed and memory at 25M parameters"
PASSES = ("prune-channels", "cluster-weights", "quantize")
LIMIT_S = 900     # a pass still running after this is stopped and reported as such


def _run(model: Path, calib: Path, passes: str, folder: Path) -> tuple[str, float, float, float]:
    """(status, the process's wall seconds, the pass's own seconds, the run's peak RSS in MiB) of
    one CLI run in its own process; the pass's time and the peaks come from its JSON report."""
    report = folder / "report.json"
    cmd = [sys.executable, "-m", "onnxcompress.cli", "compress", str(model), "-o", str(folder / "out.onnx"),
           "--passes", passes, "--calib", str(calib), "--no-latency", "--max-drop", "none", "--report", str(report)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT_S)
        status = "ok" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-200:]}"
    except subprocess.TimeoutExpired:
        return f"stopped after {LIMIT_S} s", time.perf_counter() - t0, 0.0, 0.0
    seconds = time.perf_counter() - t0
    steps = json.loads(report.read_text())["steps"] if report.exists() else []
    own = sum(s["seconds"] for s in steps[1:])
    return status, seconds, own, max((s.get("peak_mb") or 0 for s in steps), default=0.0)


def speed_section() -> str:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "models" / "big.py"), tmp], check=True, capture_output=True)
        for name, label in (("cnn", "ResNet-50-shaped CNN, 25.6M parameters, input 3x64x64"),
                            ("tfm", "Transformer encoder, 8 layers, d 512, 25.7M parameters, input 64x512")):
            model, calib = folder / f"{name}.onnx", folder / f"{name}_calib.npz"
            budget = 3 * model.stat().st_size + calib.stat().st_size + 500 * 2 ** 20
            for p in PASSES:
                print(f"  speed {name} {p} ...", flush=True)
                status, seconds, own, peak = _run(model, calib, p, folder)
                peak_bytes = peak * 2 ** 20
                rows.append([label, p, status, f"{own:.0f} s", f"{seconds:.0f} s", "yes" if own <= 120 else "no",
                             human_bytes(peak_bytes) if peak else "-", human_bytes(budget),
                             "yes" if peak and peak_bytes <= budget else "no"])
    return SECTION_TITLE + "\n\n" + INTRO + "\n\n" + markdown_table(
        ["model", "pass", "status", "pass time", "process time", "pass <= 2 min", "peak RSS", "memory budget",
         "within"], rows)


INTRO = """Each pass alone with its default options on 256 calibration samples, through the CLI in its own
process (`--no-latency --max-drop none`). "Pass time" is the pass's step in the run's JSON report;
"process time" adds loading, the report's measurements of the original and the result, and
saving. Peak RSS is the largest of the report's per-step peaks (the whole process, reset before
each step). The models come from `models/big.py` with random weights, so accuracy means nothing
here; the memory budget is issue 13's (3x the model file plus the calibration data plus 500 MB)."""


if __name__ == "__main__":
    os.chdir(ROOT)
    print(speed_section())
