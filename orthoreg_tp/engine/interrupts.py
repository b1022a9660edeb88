"""SIGINT / SIGTERM during a recipe run: stop cleanly, never in the middle of writing a file.

Inside :func:`stop_on_signals` a SIGINT or SIGTERM raises :class:`RunInterrupted` where the program is, except
inside a :func:`critical_section` (the run's file writes), where it is held until the section ends. Every
file a run writes is either atomic or appended inside such a section, so the run folder stays consistent and
``--resume`` continues from its last checkpoint.

Example:
    >>> with stop_on_signals():
    ...     with critical_section():
    ...         pass  # a signal here would be raised only after the write
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
_state: dict = {"depth": 0, "pending": None}


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``exit_code`` is the shell's ``128 + signal number`` (130, 143).

    Example:
        >>> RunInterrupted(signal.SIGTERM).exit_code
        143
    """

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        super().__init__(self.name)

    @property
    def exit_code(self) -> int:
        """``128 + signum``."""
        return 128 + self.signum


def _handler(signum: int, frame) -> None:
    if _state["depth"] > 0:
        _state["pending"] = signum
        return
    raise RunInterrupted(signum)


@contextlib.contextmanager
def critical_section() -> Iterator[None]:
    """Hold SIGINT/SIGTERM (under :func:`stop_on_signals`) until the block ends, then raise them."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0 and _state["pending"] is not None:
            signum, _state["pending"] = _state["pending"], None
            raise RunInterrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`RunInterrupted` for the block (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _state["pending"] = None
