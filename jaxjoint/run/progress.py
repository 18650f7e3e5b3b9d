"""Progress of a run on stderr: a tqdm bar on a terminal, a plain line every 30 s otherwise."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

_FORMAT = "pairs {n_fmt}/{total_fmt}  {rate_noinv_fmt}  ETA {remaining}"


class _Lines:
    """A stream for tqdm that turns each redraw into one line: logs and files get
    ``pairs 3/300  0.42 pairs/s  ETA 11:48`` lines, not carriage returns."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, done: int, *, enabled: bool = True, stream: TextIO | None = None) -> tqdm:
    """A bar over ``total`` pairs of which ``done`` were finished before this run
    started (the rate counts only this run's); call ``update()`` per pair, ``close()``
    at the end. Disabled, it prints nothing."""
    stream = sys.stderr if stream is None else stream
    tty = stream.isatty()
    return tqdm(total=total, initial=done, disable=not enabled, file=stream if tty else _Lines(stream),
                bar_format=_FORMAT, unit=" pairs", mininterval=0.2 if tty else 30.0, dynamic_ncols=tty)
