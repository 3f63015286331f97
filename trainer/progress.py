"""Progress of a long loop, wherever the output goes.

On a terminal a tqdm bar; into a pipe or a log file (``cnn-pipeline`` relays its stages' output
line by line) a plain line every few seconds, since a bar's carriage returns would either flood
the log or show nothing until the loop ends; nothing under ``--quiet``.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

MODES = ("bar", "lines", "off")


def mode_for(quiet: bool, is_main: bool = True) -> str:
    """'off' when quiet or not the main process, 'bar' on a terminal, 'lines' otherwise."""
    if quiet or not is_main:
        return "off"
    return "bar" if sys.stderr.isatty() else "lines"


class Progress:
    """``total`` steps of one task; ``due()`` says when ``advance`` will show its ``info``."""

    def __init__(self, total: int, desc: str, mode: str, unit: str = "batch", every_s: float = 5.0) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode '{mode}' is not one of: {', '.join(MODES)}")
        self.total, self.desc, self.mode, self.unit, self.every_s = total, desc, mode, unit, every_s
        self.done = 0
        self.start = self.last_line = time.monotonic()
        self.bar = tqdm(total=total, desc=desc, leave=False, unit=unit) if mode == "bar" else None

    def due(self) -> bool:
        if self.mode == "bar":
            return self.done % 10 == 0 or self.done + 1 == self.total
        return self.mode == "lines" and time.monotonic() - self.last_line >= self.every_s

    def advance(self, n: int = 1, info: str = "") -> None:
        self.done += n
        if self.bar is not None:
            if info:
                self.bar.set_postfix_str(info, refresh=False)
            self.bar.update(n)
        elif self.mode == "lines" and time.monotonic() - self.last_line >= self.every_s:
            self.last_line = time.monotonic()
            elapsed = self.last_line - self.start
            line = f"  {self.desc}: {self.unit} {self.done}/{self.total} ({self.done / self.total:.0%}, {elapsed:.0f} s)"
            print(line + (f"  {info}" if info else ""), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
