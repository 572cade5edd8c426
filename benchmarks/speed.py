"""The tool's own speed and memory at 25M parameters (`python benchmarks/run.py --only speed`):
`models/big.py` builds a ResNet-50-shaped CNN and an 8-layer Transformer encoder (random weights,
256 calibration samples each) in a temporary folder; each pass then runs alone through the CLI,
in a fresh process, without a budget and without latency measurement, and the section records its
wall time and the process's peak RSS beside issue 13's budget (2 minutes; 3x the model file plus
the calibration data plus 500 MB). Then the same for a CNN over 2 GB with external data (fold-bn,
prune-weights, prune-channels without recovery, saved with --external-data) against issue 13's
budget of 2.5x the model."""
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


def _run(model: Path, calib: Path, passes: str, folder: Path, *extra: str) -> tuple[str, float, float, float, float]:
    """(status, the process's wall seconds, the pass's own seconds, the largest of the report's
    per-step peaks in MiB, the process's own max RSS in MiB) of one CLI run in its own process."""
    report = folder / "report.json"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "onnxcompress.cli", "compress", str(model), "-o", str(folder / "out.onnx"),
           "--passes", passes, "--calib", str(calib), "--no-latency", "--max-drop", "none", "--report", str(report),
           *extra]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        try:
            _, code, usage = _wait(child, t0)
        except subprocess.TimeoutExpired:
            return f"stopped after {LIMIT_S} s", time.perf_counter() - t0, 0.0, 0.0, 0.0
        err.seek(0)
        status = "ok" if code == 0 else f"exit {code}: {err.read().decode(errors='replace').strip()[-200:]}"
    seconds = time.perf_counter() - t0
    steps = json.loads(report.read_text())["steps"] if report.exists() else []
    own = sum(s["seconds"] for s in steps[1:])
    return status, seconds, own, max((s.get("peak_mb") or 0 for s in steps), default=0.0), usage.ru_maxrss / 1024


def _wait(child: subprocess.Popen, t0: float):
    """os.wait4 on one child: its exit code and its own resource usage (max RSS), not the sum of
    every child's as RUSAGE_CHILDREN would give."""
    while time.perf_counter() - t0 < LIMIT_S:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return pid, child.returncode, usage
        time.sleep(0.2)
    child.kill()
    os.wait4(child.pid, 0)
    raise subprocess.TimeoutExpired(child.args, LIMIT_S)


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
                status, seconds, own, peak, _ = _run(model, calib, p, folder)
                peak_bytes = peak * 2 ** 20
                rows.append([label, p, status, f"{own:.0f} s", f"{seconds:.0f} s", "yes" if own <= 120 else "no",
                             human_bytes(peak_bytes) if peak else "-", human_bytes(budget),
                             "yes" if peak and peak_bytes <= budget else "no"])
    return SECTION_TITLE + "\n\n" + INTRO + "\n\n" + markdown_table(
        ["model", "pass", "status", "pass time", "process time", "pass <= 2 min", "peak RSS", "memory budget",
         "within"], rows) + "\n\n" + huge_rows()


HUGE_PASSES = ("fold-bn", "prune-weights(criterion='magnitude', scope='layer')", "prune-channels(recover=False, criterion='l1')")


def huge_rows() -> str:
    """The > 2 GB CNN (built, run and removed in a temporary folder: 2.3 GB for the model, as much
    again for each output, deleted after each run)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "models" / "big.py"), tmp, "huge"], check=True, capture_output=True)
        model, calib = folder / "huge.onnx", folder / "huge_calib.npz"
        size = model.stat().st_size + (folder / "huge.onnx.data").stat().st_size
        budget = 2.5 * size
        for p in HUGE_PASSES:
            print(f"  speed huge {p} ...", flush=True)
            status, seconds, own, peak, maxrss = _run(model, calib, p, folder, "--external-data")
            for f in folder.glob("out.onnx*"):
                f.unlink()
            rows.append([p, status, f"{own:.0f} s", f"{seconds:.0f} s", human_bytes(peak * 2 ** 20) if peak else "-",
                         human_bytes(maxrss * 2 ** 20), human_bytes(budget), f"{maxrss * 2 ** 20 / size:.2f}x",
                         "yes" if status == "ok" and maxrss * 2 ** 20 <= budget else "no"])
    return HUGE_INTRO.format(size=human_bytes(size)) + "\n\n" + markdown_table(
        ["pass", "status", "pass time", "process time", "peak RSS (report)", "max RSS (process)", "budget 2.5x",
         "max RSS / model", "within"], rows)


INTRO = """Each pass alone with its default options on 256 calibration samples, through the CLI in its own
process (`--no-latency --max-drop none`). "Pass time" is the pass's step in the run's JSON report;
"process time" adds loading, the report's measurements of the original and the result, and
saving. Peak RSS is the largest of the report's per-step peaks (the whole process, reset before
each step). The models come from `models/big.py` with random weights, so accuracy means nothing
here; the memory budget is issue 13's (3x the model file plus the calibration data plus 500 MB)."""


HUGE_INTRO = """### A model over 2 GB

`models/big.py huge`: a stem Conv and 60 blocks of Conv 3x3 1024->1024 + BatchNorm + ReLU on 8x8
maps, a Gemm head; {size} of float32 weights in `huge.onnx.data` (32 calibration samples). Each pass
alone through the CLI in its own process (`--no-latency --max-drop none --external-data`): load,
validate, measure the original, run the pass, validate and measure the result, save. A model over
the protobuf limit keeps its weights on disk: the loader leaves them in their file and passes read
them tensor by tensor, weights a pass computes are moved to a scratch file when the graph is
exported, and onnxruntime sessions load from a file with external data. "Max RSS" is the process's
own peak (`os.wait4`); the report's figure is the largest per-step peak. The compressed size in such
a model's report is estimated from 1 MiB in every 16 MiB of each weight (zlib runs at ~30 MB/s)."""


if __name__ == "__main__":
    os.chdir(ROOT)
    print(speed_section())
