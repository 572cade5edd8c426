"""AMD Quark's ONNX quantizer on PP-OCRv4 rec, as a peer on the quantization benchmark's data.

Not part of `benchmarks/run.py`: Quark needs torch, which onnxcompress does not install. Run it in
an environment of its own that sees this one's packages:

    python -m venv /tmp/quark --system-site-packages
    /tmp/quark/bin/pip install amd-quark==0.13 torch==2.13.0
    /tmp/quark/bin/python benchmarks/quark_peer.py [PRESET ...]

Each preset (default: U8S8_AAWS, the issue's "U8S8", and INT8_CNN_DEFAULT) is calibrated on the
same 32 rendered lines as every quantizer in BENCHMARKS.md's "Quantization" section and scored
on the same 512 other lines with the same metric (decoded strings against the truth and against
fp32), one sample per calibration batch.
"""
from __future__ import annotations

import os
import string
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import ocr                         # noqa: E402
from benchmarks.quant import OCR_EVAL              # noqa: E402

REC = "ch_PP-OCRv4_rec_infer.onnx"


def quark_quantize(src: str, out: str, calib: np.ndarray, preset: str) -> None:
    from onnxruntime.quantization import CalibrationDataReader
    from quark.onnx import ModelQuantizer
    from quark.onnx.quantization.config.config import QConfig

    name = onnx.load(src).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({name: calib[i:i + 1]} for i in range(len(calib)))

        def get_next(self):
            return next(self.it, None)

    ModelQuantizer(QConfig.get_default_config(preset)).quantize_model(src, out, Reader())


def main(presets: list[str]) -> None:
    src = str(ocr.models_dir() / REC)
    model = onnx.load(src)
    chars = ocr.rec_characters(model)
    alphabet = "".join(c for c in string.digits + string.ascii_letters if c in set(chars[1:-1]))
    (calib_x, _), (eval_x, truth) = ocr.rec_data(32, 1, alphabet), ocr.rec_data(OCR_EVAL, 2, alphabet)
    ref = ocr._run(model, eval_x)
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            out = str(Path(tmp) / f"{preset}.onnx")
            cwd = os.getcwd()
            os.chdir(tmp)                           # Quark writes quantized_info.csv where it runs
            try:
                quark_quantize(src, out, calib_x, preset)
            finally:
                os.chdir(cwd)
            got = ocr._run(onnx.load(out), eval_x)
            print(f"| Quark 0.13 {preset} | {ocr.user_metric('rec', got, ref, truth, chars)} | "
                  f"{ocr._cosine(got, ref):.4f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["U8S8_AAWS", "INT8_CNN_DEFAULT"])
