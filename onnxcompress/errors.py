"""The exceptions onnxcompress raises; the CLI maps each to an exit code and a one-line message."""
from __future__ import annotations


class CompressError(Exception):
    """Base class: every error onnxcompress raises on purpose."""

    exit_code = 1


class InputError(CompressError):
    """Bad input from the user: a missing or invalid file, a bad option, an unknown provider (exit 2)."""

    exit_code = 2


class OptionError(InputError):
    """A pipeline, pass name or pass option that cannot be accepted."""


class PassError(CompressError):
    """A pass raised, or produced a model that fails validation. Names the pass and those before it."""

    def __init__(self, pass_name: str, message: str, previous: tuple[str, ...] = ()):
        self.pass_name = pass_name
        self.previous = previous
        after = f" (after {', '.join(previous)})" if previous else ""
        super().__init__(f"pass '{pass_name}'{after} failed: {message}")


class BudgetError(CompressError):
    """The accuracy budget could not be met (exit 1)."""
