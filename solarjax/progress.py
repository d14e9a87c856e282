"""One progress-bar factory for every verb: a tqdm bar on a terminal, plain lines in a log.

A tqdm bar redraws itself with ``\\r``; written to a file or a pipe that is a wall of half lines.
:func:`progress_bar` therefore looks at the stream it writes to: a terminal gets tqdm, anything
else gets :class:`LineProgress`, which prints one whole line each time another tenth of the work
is done or :data:`LINE_EVERY_S` seconds have passed, and a last one when it closes. Disabled
(``--no-progress``, or a process other than 0), it is a silent tqdm.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, TextIO

LINE_EVERY_S = 30.0  # at most this long between two plain progress lines while work advances
LINE_FRACTION = 0.1  # and one line each time this share of the total is done


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (a closed or odd stream counts as not one)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True, initial: float = 0, unit_scale: bool = False, file: TextIO | None = None):
    """A progress bar over ``iterable`` (or updated by hand up to ``total``) that suits where it writes.

    ``file`` defaults to ``sys.stderr`` as it is at the call. Every bar offers what the call sites
    use of tqdm: iteration, ``update``, ``set_postfix_str``, ``write``, ``close`` and ``with``.
    """
    from tqdm import tqdm

    file = file if file is not None else sys.stderr
    options = dict(total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale, file=file)
    if not enabled:
        return tqdm(iterable, disable=True, **options)
    if is_terminal(file):
        return tqdm(iterable, **options)
    return LineProgress(iterable, **options)


class LineProgress:
    """Progress as whole lines (tqdm's own meter text, without the bar), for logs and pipes."""

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", initial: float = 0, unit_scale: bool = False, file: TextIO | None = None):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit, self.unit_scale = iterable, total, desc, unit, unit_scale
        self.file = file if file is not None else sys.stderr
        self.n = self.initial = initial
        self.postfix = ""
        self.start = self.last_line = time.monotonic()
        self.last_tenth, self.shown_n = self._tenth(), initial
        self.closed = False

    def _tenth(self) -> int:
        return int(self.n / self.total / LINE_FRACTION) if self.total else 0

    def __iter__(self):
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now, tenth = time.monotonic(), self._tenth()
        if tenth > self.last_tenth or now - self.last_line >= LINE_EVERY_S:
            self._line(now, tenth)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def write(self, s: str, file: TextIO | None = None, end: str = "\n") -> None:
        """A message between progress lines (tqdm.write's signature); to the bar's stream by default."""
        (file or self.file).write(s + end)
        (file or self.file).flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.n != self.shown_n:  # the final state, unless the last line showed it
            self._line(time.monotonic(), self._tenth())

    def _line(self, now: float, tenth: int) -> None:
        from tqdm import tqdm

        meter = tqdm.format_meter(self.n, self.total, now - self.start, prefix=self.desc, unit=self.unit,
                                  unit_scale=self.unit_scale, postfix=self.postfix or None, initial=self.initial,
                                  bar_format="{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} "
                                  "[{elapsed}<{remaining}, {rate_fmt}{postfix}]" if self.total else None)
        self.write(meter)
        self.last_line, self.last_tenth, self.shown_n = now, tenth, self.n
