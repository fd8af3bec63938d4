"""How many ranged GETs a stream keeps in flight per Hub parent.

CDNs limit each connection's rate, so one GET per parent reaches a fraction of the link; too many
cost requests and memory for nothing once the link is full. ``method.connections`` fixes the count
(1–64), or with ``auto`` (the default) it is found by measuring, as TCP's slow start does: the
stream starts with :data:`AUTO_START` GETs per parent and measures the bytes per second of both
parents together over windows of :data:`WINDOW_ROUNDS` rounds of pieces and at least
:data:`WINDOW_SECONDS` with a GET in flight (waits for disk budget do not count). It doubles the
count while a window gains at least :data:`GAIN` over the best so far and its GETs filled the
count (a doubling cannot help a fetch that has fewer pieces at once than the count allows), and
otherwise settles on the count that measured best. A 429 (too many requests) halves the count,
which then stays settled.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

log = logging.getLogger(__name__)

#: GETs in flight per parent when ``method.connections=auto`` starts
AUTO_START = 4
#: the most GETs per parent ``auto`` goes to
AUTO_MOST = 32
#: a doubling is kept when the rate gains at least this factor over the best rate so far
GAIN = 1.15
#: a measuring window: this many rounds of pieces at the current count ...
WINDOW_ROUNDS = 3
#: ... and at least this many seconds
WINDOW_SECONDS = 2.0


class Connections:
    """The GETs in flight per parent, shared by every fetch of one run (both parents, every
    shard), so what ``auto`` measured on one shard holds for the next.

    Args:
        setting: a fixed count (1–64), or ``"auto"``.
        piece_bytes: the bytes of one GET (a measuring window spans :data:`WINDOW_ROUNDS` rounds).
        start: the first count of ``auto`` (default :data:`AUTO_START`).
        most: the highest count ``auto`` tries (default :data:`AUTO_MOST`).
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, setting: int | Literal["auto"], piece_bytes: int, *, start: int = AUTO_START,
                 most: int = AUTO_MOST, clock: Callable[[], float] = time.monotonic) -> None:
        self.auto = setting == "auto"
        self.level = start if self.auto else int(setting)
        self.most = most if self.auto else int(setting)
        self.settled = not self.auto
        self.piece_bytes = piece_bytes
        self.best_rate = 0.0
        self._best_level = self.level
        self._clock = clock
        self._cond = threading.Condition()
        self._in_flight: dict[str, int] = {}
        self._window_busy = 0.0  # seconds of the window with a GET in flight, up to _busy_since
        self._busy_since: float | None = None
        self._window_bytes = 0
        self._window_peak = 0  # the most GETs of one parent in flight during the window

    def acquire(self, role: str, stop: Callable[[], bool] = lambda: False) -> bool:
        """Wait until ``role`` may start one more GET; False when ``stop()`` became true meanwhile."""
        with self._cond:
            while self._in_flight.get(role, 0) >= self.level:
                if stop():
                    return False
                self._cond.wait(0.1)
            if not any(self._in_flight.values()):
                self._busy_since = self._clock()
            self._in_flight[role] = self._in_flight.get(role, 0) + 1
            self._window_peak = max(self._window_peak, self._in_flight[role])
            return True

    def release(self, role: str, nbytes: int) -> None:
        """One GET of ``role`` ended after ``nbytes``; with ``auto`` the count may change."""
        with self._cond:
            self._in_flight[role] -= 1
            if not any(self._in_flight.values()) and self._busy_since is not None:
                self._window_busy += self._clock() - self._busy_since
                self._busy_since = None
            if not self.settled:
                self._window_bytes += nbytes
                self._maybe_step()
            self._cond.notify_all()

    def throttled(self) -> None:
        """The Hub answered a GET with 429 (too many requests): with ``auto``, halve the count and
        keep it."""
        with self._cond:
            if self.auto and self.level > 1:
                self.level = max(1, self.level // 2)
                log.info("the Hub asked for fewer requests (429): fetching over %d connection(s) per "
                         "parent from now on", self.level)
            self.settled = True

    def _maybe_step(self) -> None:
        now = self._clock()
        elapsed = self._window_busy + (now - self._busy_since if self._busy_since is not None else 0.0)
        if self._window_bytes < WINDOW_ROUNDS * self.level * self.piece_bytes or elapsed < WINDOW_SECONDS:
            return
        rate = self._window_bytes / elapsed
        filled = self._window_peak >= self.level
        if rate >= GAIN * self.best_rate and self.level < self.most and filled:
            self.best_rate, self._best_level = rate, self.level
            self.level = min(self.most, self.level * 2)
            log.info("%.1f MB/s over %d connection(s) per parent: trying %d", rate / 1e6,
                     self._best_level, self.level)
        else:
            if rate >= self.best_rate:
                self.best_rate, self._best_level = rate, self.level
            self.level, self.settled = self._best_level, True
            log.info("fetching over %d connection(s) per parent (%.1f MB/s measured)", self.level,
                     self.best_rate / 1e6)
        self._window_busy, self._window_bytes, self._window_peak = 0.0, 0, 0
        if self._busy_since is not None:
            self._busy_since = now
