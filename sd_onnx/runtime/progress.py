"""A terminal progress bar with step rate and ETA; silent when stderr is not a terminal or when asked."""

from __future__ import annotations

import sys
import time
from typing import TextIO


_open_line: list[TextIO] = []  # a stream whose bar has not ended its line yet


def end_line() -> None:
    """Ends a bar cut short (an interrupt), so the next message starts on a line of its own."""
    while _open_line:
        stream = _open_line.pop()
        try:
            stream.write("\n")
            stream.flush()
        except OSError:
            pass


class Progress:
    def __init__(self, label: str, enabled: bool | None = None, stream: TextIO | None = None, width: int = 28):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label, self.width = label, width
        self.start = time.perf_counter()

    def __call__(self, step: int, total: int) -> None:
        """Called after step `step` (0-based) of `total`."""
        if not self.enabled:
            return
        done = step + 1
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        filled = int(self.width * done / max(total, 1))
        speed = f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it" if rate > 0 else "-"
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {speed} ETA {_clock(eta)}  ")
        if self.stream not in _open_line:
            _open_line.append(self.stream)
        if done >= total:
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {speed} in {_clock(elapsed)}\n")
            _open_line.remove(self.stream)
        self.stream.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m:02d}:{s:02d}"
