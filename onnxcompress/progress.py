"""Progress bars on stderr (rich), shown only when stderr is a terminal: CI logs and pipes stay quiet."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["progress"]

T = TypeVar("T")

_CONSOLE = Console(stderr=True)  # one console, so a loop inside another shows as a second line of one display
_depth = 0                       # bars showing now; inner ones disappear when their loop ends


def progress(items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """Yield `items`, with a bar (done/total, elapsed time) on stderr when it is a terminal."""
    if not sys.stderr.isatty():
        yield from items
        return
    global _depth
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # stdout is not redirected: what a loop prints there must still reach a pipe, not the terminal.
    with Progress(*columns, console=_CONSOLE, transient=_depth > 0, redirect_stdout=False) as bar:
        _depth += 1
        try:
            yield from bar.track(items, total=total, description=desc)
        finally:
            _depth -= 1
