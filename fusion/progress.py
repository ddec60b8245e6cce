"""Progress of the offline pipeline: tqdm bars on a terminal, plain lines everywhere else.

A tqdm bar redraws itself with carriage returns and escape codes; written to a log file or a pipe
(`make serve > build.log`, CI), every redraw of every nested bar stays in the text: hundreds of lines
for one build. So bars are drawn only when the stream is a terminal. Elsewhere an inner loop
(`leave=False`, e.g. the epochs of one member) prints nothing and an outer loop or a `stage` prints one
line when it finishes:

    zoo: 8 members in 41.3 s
    build: members exported in 6.2 s
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TextIO

from tqdm.auto import tqdm


def on_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Lines:
    """The off-terminal stand-in for a tqdm bar: iterates, keeps the last postfix, and writes one line
    when the loop ends or is closed (`leave=True` only). `set_postfix` and `close` as in tqdm."""

    def __init__(self, iterable: Iterable, desc: str, unit: str, leave: bool, stream: TextIO):
        self.iterable, self.desc, self.unit, self.leave, self.stream = iterable, desc, unit, leave, stream
        self.n, self.postfix, self.closed, self.start = 0, {}, False, time.perf_counter()

    def __iter__(self) -> Iterator:
        self.start = time.perf_counter()
        for item in self.iterable:
            self.n += 1
            yield item
        self.close()

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave:
            post = "".join(f", {k}={v}" for k, v in self.postfix.items())
            units = self.unit if self.n == 1 else f"{self.unit}s"
            line = f"{self.desc}: {self.n} {units} in {time.perf_counter() - self.start:.1f} s{post}"
            print(line, file=self.stream, flush=True)


def progress(iterable: Iterable, *, desc: str, unit: str, leave: bool = True, disable: bool = False,
             stream: TextIO | None = None):
    """`tqdm(iterable, ...)` on a terminal; a `Lines` (one line at the end, none for `leave=False`) elsewhere."""
    stream = sys.stderr if stream is None else stream
    if disable:
        return Lines(iterable, desc, unit, leave=False, stream=stream)
    if on_terminal(stream):
        return tqdm(iterable, desc=desc, unit=unit, leave=leave, file=stream)
    return Lines(iterable, desc, unit, leave=leave, stream=stream)


@contextmanager
def stage(name: str, stream: TextIO | None = None):
    """One line when a pipeline stage finishes ("build: ensemble exported in 2.1 s"), on a terminal too:
    its bars are gone by then (`leave=False`), and the line says where the time went."""
    start = time.perf_counter()
    yield
    print(f"{name} in {time.perf_counter() - start:.1f} s", file=sys.stderr if stream is None else stream, flush=True)
