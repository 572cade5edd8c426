"""onnxcompress: compress trained ONNX models with passes validated by onnxruntime."""
from __future__ import annotations

from ._version import __version__
from .data import Dataset, as_dataset, load_dataset  # noqa: E402
from .errors import BudgetError, CompressError, InputError, OptionError, PassError  # noqa: E402
from .io import load_model, save_model  # noqa: E402
from .manager import CompressResult, PassManager  # noqa: E402
from .metrics import LatencyConfig  # noqa: E402
from .pass_api import Context, Pass, PassResult, Registry, default_registry  # noqa: E402
from .pipeline import parse_pipeline, parse_recipe  # noqa: E402

__all__ = [
    "__version__", "Dataset", "as_dataset", "load_dataset", "CompressError", "InputError", "OptionError",
    "PassError", "BudgetError", "load_model", "save_model", "PassManager", "CompressResult",
    "LatencyConfig", "Context", "Pass", "PassResult", "Registry", "default_registry",
    "parse_pipeline", "parse_recipe",
]
