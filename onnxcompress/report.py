"""The run report: one step for the original model, then one per pass; a console table and JSON."""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ._version import __version__

__all__ = ["Step", "Report", "format_table", "markdown_table", "human_bytes", "human_count"]


@dataclass
class Step:
    pass_: str                       # "original" for the first step
    status: str                      # original | applied | unchanged | rolled back
    options: dict[str, Any] = field(default_factory=dict)
    accuracy: float | None = None    # percent, when labels are given
    size_bytes: int = 0
    gzip_bytes: int = 0
    params: int = 0
    sparsity: float = 0.0            # zero weights among the layers' decoded weights
    bits_per_weight: float = 0.0     # stored bits per layer weight (codes, scales, codebooks included)
    weight_bytes: dict[str, int] = field(default_factory=dict)  # layer weight bytes by storage kind
    macs: int = 0                    # at batch 1; an If counts its expected (or costlier) branch
    branch_macs: dict[str, dict[str, int]] = field(default_factory=dict)  # If/Loop/Scan id -> MACs per body
    latency_ms: dict[int, float] = field(default_factory=dict)  # batch size -> median ms
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_mb: float | None = None     # the tool's peak resident memory during this step (onnxcompress.resources)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        d["latency_ms"] = {str(k): v for k, v in self.latency_ms.items()}
        return d


@dataclass
class Report:
    model: str
    steps: list[Step] = field(default_factory=list)
    budget: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"tool": "onnxcompress", "version": __version__, "model": self.model,
                "budget": self.budget, "steps": [s.to_dict() for s in self.steps]}

    def final(self) -> Step:
        kept = [s for s in self.steps if s.status != "rolled back"]
        return kept[-1]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _fid(step: Step) -> str:
    if not step.fidelity:
        return "-"
    first = next(iter(step.fidelity.values()))
    if "top1_agreement" in first:
        return f"agree {first['top1_agreement']:.1f}%"
    return f"cos {first['cosine']:.4f}"


# Columns apart, a line of dashes under the header and nothing else: plain ASCII, readable in a pipe or a log.
_PLAIN = box.Box("    \n"
                 "    \n"
                 " -  \n"
                 "    \n"
                 "    \n"
                 "    \n"
                 "    \n"
                 "    \n", ascii=True)


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """A plain-text console table (rich, no colour or markup): the first column left-aligned, the rest right."""
    table = Table(box=_PLAIN, show_edge=False, pad_edge=False, padding=(0, 1), header_style="", highlight=False)
    for i, name in enumerate(header):
        table.add_column(Text(str(name)), justify="right" if i else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(Text(str(c)) for c in row))
    out = io.StringIO()
    Console(file=out, width=100_000, color_system=None, markup=False, emoji=False, highlight=False,
            force_terminal=False, legacy_windows=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"
    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(r) for r in rows])


def render(report: Report) -> str:
    """A readable console table of the steps (latency per measured batch size), then the notes."""
    base = report.steps[0]
    batches = sorted({b for s in report.steps for b in s.latency_ms})
    header = ["step", "status", "accuracy", "size", "gzip", "params", "sparsity", "bits/w", "MACs"]
    header += [f"latency b{b}" for b in batches] + ["fidelity", "time", "peak RSS"]
    rows = []
    for s in report.steps:
        row = [s.pass_, s.status, "-" if s.accuracy is None else f"{s.accuracy:.2f}%",
               f"{human_bytes(s.size_bytes)} ({s.size_bytes / base.size_bytes:.2f}x)", human_bytes(s.gzip_bytes),
               human_count(s.params), f"{s.sparsity * 100:.1f}%", f"{s.bits_per_weight:.1f}",
               f"{human_count(s.macs)} ({s.macs / base.macs:.2f}x)" if base.macs else human_count(s.macs)]
        for b in batches:
            lat, ref = s.latency_ms.get(b), base.latency_ms.get(b)
            row.append("-" if lat is None else f"{lat:.3f} ms" + (f" ({lat / ref:.2f}x)" if ref else ""))
        rows.append(row + [_fid(s), f"{s.seconds:.1f}s", "-" if s.peak_mb is None else f"{s.peak_mb:.0f} MB"])
    out = [f"onnxcompress {__version__}: {report.model}", format_table(rows, header)]
    if report.budget.get("metric"):
        limit = report.budget.get("max_drop")
        out.append(f"budget: {report.budget['metric']}, " + ("no limit" if limit is None else f"at most {limit:g} points below the original"))
    for s in report.steps:
        for note in s.notes:
            out.append(f"  [{s.pass_}] {note}")
    return "\n".join(out)
