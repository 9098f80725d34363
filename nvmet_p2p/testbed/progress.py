"""The bench's progress: one plain line per run, always, and a tqdm bar on a terminal.

The run matrix prints `[ i/n] transport target job #r: figures (eta N s)` for every run;
those lines are what logs, pipes and CI keep, so they never change.  When the output is
a terminal, a tqdm bar (runs done, elapsed, rate, ETA) stays under them.  The matrix
runs inside the VM, whose output reaches the host as a stream of text chunks, so
`Progress` is also a text stream: it cuts what it is given into lines and moves the
host's bar along with the `[ i/n]` lines it sees.  Without tqdm (a `pip install .`
without the bench extra) or without a terminal, the lines are all there is.
"""

from __future__ import annotations

import re
from types import TracebackType
from typing import Any, Self, TextIO

PROGRESS_LINE = re.compile(r"^\[\s*(\d+)/(\d+)\] ")


def progress_line(i: int, total: int, text: str) -> str:
    return f"[{i:2d}/{total}] {text}"


def _isatty(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _bar(file: TextIO) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=None, desc="bench", unit="run", file=file, dynamic_ncols=True,
                leave=True)


class Progress:
    """Lines through to `file`; a tqdm bar below them when `tty` (default: file.isatty())."""

    def __init__(self, file: TextIO, *, tty: bool | None = None) -> None:
        self.file = file
        self.bar = _bar(file) if (_isatty(file) if tty is None else tty) else None
        self._partial = ""

    # -- one line at a time (the matrix on this machine) ----------------------------------
    def line(self, text: str) -> None:
        if self.bar is None:
            self.file.write(text + "\n")
            self.file.flush()
            return
        self.bar.write(text, file=self.file)
        m = PROGRESS_LINE.match(text)
        if m:
            done, total = int(m[1]), int(m[2])
            if done < self.bar.n or self.bar.total != total:  # the next transport's matrix
                self.bar.reset(total=total)
            self.bar.update(done - self.bar.n)

    # -- a text stream (the VM's relayed output) ------------------------------------------
    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for ln in lines:
            self.line(ln)
        return len(text)

    def flush(self) -> None:
        if self.bar is None:
            self.file.flush()

    def isatty(self) -> bool:
        return False  # what is written here is lines, whatever the file is

    def close(self) -> None:
        if self._partial:
            self.line(self._partial)
            self._partial = ""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
