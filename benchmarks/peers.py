"""Other tools' compressors, run in-process so benchmarks compare against them in the same run."""
from __future__ import annotations

import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from onnxcompress import io
from onnxcompress.data import Dataset

__all__ = ["ort_quantize_static", "ort_quantize_dynamic"]


class _Reader(CalibrationDataReader):
    def __init__(self, data: Dataset, batch_size: int):
        self._batches = iter(list(data.batches(batch_size)))

    def get_next(self):
        return next(self._batches, None)


def ort_quantize_static(model: onnx.ModelProto, calib: Dataset, per_channel: bool = True,
                        batch_size: int = 32) -> onnx.ModelProto:
    """onnxruntime's own static quantizer: QDQ, int8 weights (per channel) and activations, MinMax calibration."""
    with io.scratch_dir() as d:  # quantize_static insists on writing a file
        out = d / "quantized.onnx"
        own = onnx.ModelProto()
        own.CopyFrom(model)  # quantize_static moves the weights of the proto it is given to external data
        quantize_static(own, out, _Reader(calib, batch_size), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        return io.load_model(out)


def ort_quantize_dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's dynamic quantizer with its defaults (int8 weights, activations ranged at run time)."""
    with io.scratch_dir() as d:
        src, out = d / "model.onnx", d / "quantized.onnx"
        io.save_model(model, src)
        quantize_dynamic(src, out, weight_type=QuantType.QInt8)
        return io.load_model(out)
