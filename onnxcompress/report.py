"""The run report: one step for the original model, then one per pass; a console table and JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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
    sparsity: float = 0.0
    macs: int = 0
    latency_ms: dict[int, float] = field(default_factory=dict)  # batch size -> median ms
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

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


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"
    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(r) for r in rows])


def render(report: Report) -> str:
    """A readable console table of the steps (latency per measured batch size), then the notes."""
    base = report.steps[0]
    batches = sorted({b for s in report.steps for b in s.latency_ms})
    header = ["step", "status", "accuracy", "size", "gzip", "params", "sparsity", "MACs"]
    header += [f"latency b{b}" for b in batches] + ["fidelity", "time"]
    rows = []
    for s in report.steps:
        row = [s.pass_, s.status, "-" if s.accuracy is None else f"{s.accuracy:.2f}%",
               f"{human_bytes(s.size_bytes)} ({s.size_bytes / base.size_bytes:.2f}x)", human_bytes(s.gzip_bytes),
               human_count(s.params), f"{s.sparsity * 100:.1f}%",
               f"{human_count(s.macs)} ({s.macs / base.macs:.2f}x)" if base.macs else human_count(s.macs)]
        for b in batches:
            lat, ref = s.latency_ms.get(b), base.latency_ms.get(b)
            row.append("-" if lat is None else f"{lat:.3f} ms" + (f" ({lat / ref:.2f}x)" if ref else ""))
        rows.append(row + [_fid(s), f"{s.seconds:.1f}s"])
    out = [f"onnxcompress {__version__}: {report.model}", format_table(rows, header)]
    for s in report.steps:
        for note in s.notes:
            out.append(f"  [{s.pass_}] {note}")
    return "\n".join(out)
