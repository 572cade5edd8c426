"""Progress bars: shown on a terminal, silent otherwise; console tables stay plain text."""
import io
import sys

from onnxcompress.progress import progress
from onnxcompress.report import format_table


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_quiet_when_stderr_is_not_a_terminal(capsys):
    assert list(progress(range(5), desc="work")) == [0, 1, 2, 3, 4]
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_bar_on_a_terminal_nested_loops_and_early_exit(monkeypatch):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    seen = [(i, j) for i in progress(range(2), desc="outer") for j in progress(iter(range(3)), total=3, desc="inner")]
    assert seen == [(i, j) for i in range(2) for j in range(3)]
    for k in progress([1, 2, 3], desc="cut short"):
        break
    text = term.getvalue()
    assert "outer" in text and "2/2" in text and "cut short" in text  # inner bars are transient: no line kept
    assert list(progress(range(2), desc="again")) == [0, 1]  # the display from the loop left early was closed


def test_format_table_is_plain_aligned_text():
    text = format_table([["a-long-name", "1.00x", "[bold]x[/]"], ["b", "12.50x", "y"]], ["name", "ratio", "note"])
    lines = text.splitlines()
    assert "\x1b" not in text and text.isascii()
    assert lines[0].split() == ["name", "ratio", "note"] and set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["a-long-name", "1.00x", "[bold]x[/]"]  # no markup interpreted
    assert lines[2].index("1.00x") + 5 == lines[3].index("12.50x") + 6  # numbers right-aligned
    assert lines[2].startswith("a-long-name") and lines[3].startswith("b ")
