"""A minimal progress bar on stderr, shown only when stderr is a terminal."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    stream = sys.stderr
    if not stream.isatty():
        yield from items
        return
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    start = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last > 0.1 or done == total:
            last = now
            if total:
                filled = int(24 * done / total)
                bar = "#" * filled + "." * (24 - filled)
                stream.write(f"\r{desc} [{bar}] {done}/{total} {now - start:5.1f}s")
            else:
                stream.write(f"\r{desc} {done} {now - start:5.1f}s")
            stream.flush()
    if done:
        stream.write("\n")
