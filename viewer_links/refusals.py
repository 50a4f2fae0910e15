"""Refusals of links that do not even verify: counted per source address, limited, and written
to the access trail as one entry per address and window.

A ``/view/<token>`` whose token names no known key, or whose signature does not match, or that
is no signed token at all, concerns no patient and no link: recorded one by one, a script
sending garbage wrote a permanent trail row per request (2,000 in 4 s). Instead:

1. each such refusal is counted in memory for its source address, in a window that opens at
   the address's first refusal and lasts ``refusal_window`` seconds;
2. once an address has ``max_unverified_refusals`` in its window, its further ``/view``
   requests are answered ``429 Too Many Requests`` (``Retry-After``: the rest of the window)
   without being verified, and counted too;
3. when the window has ended (checked every few seconds, and at shutdown), one trail entry is
   written for the address: how many were refused, why, and how many got the 429.

Per node: the counts live in the memory of the process that served the requests, so behind a
load balancer each node limits on its own (an address may get ``max_unverified_refusals`` per
node) and a node that crashes loses the counts of its open windows. Refusals of links that do
verify (expired, revoked, used up, the rules) name a link and a patient and are still recorded
one by one, at once. At most :data:`MAX_ADDRESSES` addresses are tracked; beyond that, further
addresses share one bucket (``*``), so memory stays bounded under an address-spraying flood.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

MAX_ADDRESSES = 10_000
OVERFLOW = "*"


@dataclass
class Window:
    """The unverified refusals of one address since ``started`` (monotonic and wall clock)."""

    started: float
    started_wall: float
    reasons: Counter[str] = field(default_factory=Counter)
    limited: int = 0

    @property
    def count(self) -> int:
        return sum(self.reasons.values()) + self.limited


@dataclass(frozen=True)
class Aggregate:
    """One closed window, as it goes to the trail."""

    address: str
    started_wall: float
    ended_wall: float
    reasons: dict[str, int]
    limited: int

    @property
    def count(self) -> int:
        return sum(self.reasons.values()) + self.limited

    @property
    def detail(self) -> str:
        why = ", ".join(f"{reason} x{n}" for reason, n in sorted(self.reasons.items()))
        text = (f"{self.count} links that do not verify refused from this address in "
                f"{max(1, round(self.ended_wall - self.started_wall))} s ({why or 'none'})")
        if self.limited:
            text += f"; {self.limited} of them answered 429 unverified"
        return text


class UnverifiedRefusals:
    """Counts, limits and aggregates refusals of unverifiable links, per source address.

    Thread-safe: the landing verifies links on worker threads.

    Parameters
    ----------
    window
        Seconds a window lasts (``[links] refusal_window``).
    limit
        Unverified refusals an address may have in a window before it gets 429
        (``[links] max_unverified_refusals``).
    """

    def __init__(self, window: float, limit: int) -> None:
        self.window = window
        self.limit = limit
        self._windows: dict[str, Window] = {}
        self._closed: list[Aggregate] = []
        self._lock = threading.Lock()

    def _window(self, address: str, now: float) -> Window:
        """The open window of ``address`` (closing an ended one); call with the lock held."""
        key = address or "unknown"
        if key not in self._windows and len(self._windows) >= MAX_ADDRESSES:
            key = OVERFLOW
        current = self._windows.get(key)
        if current is not None and now - current.started >= self.window:
            self._close(key, current, now)
            current = None
        if current is None:
            current = self._windows[key] = Window(now, time.time())
        return current

    def _close(self, key: str, window: Window, now: float) -> None:
        del self._windows[key]
        ended = window.started_wall + min(now - window.started, self.window)
        self._closed.append(Aggregate(key, window.started_wall, ended, dict(window.reasons),
                                      window.limited))

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may try again if it is over its limit, else ``None``.

        An answer counts as one more (limited) refusal in the address's window.
        """
        now = time.monotonic()
        with self._lock:
            current = self._windows.get(address or "unknown")
            if current is None or now - current.started >= self.window:
                return None
            if sum(current.reasons.values()) < self.limit:
                return None
            current.limited += 1
            return max(1, int(current.started + self.window - now + 0.999))

    def note(self, address: str, reason: str) -> None:
        """Count one refusal of a link that did not verify, for ``reason``."""
        now = time.monotonic()
        with self._lock:
            self._window(address, now).reasons[reason] += 1

    def drain(self, *, everything: bool = False) -> list[Aggregate]:
        """The windows that have ended (all of them when ``everything``), removed."""
        now = time.monotonic()
        with self._lock:
            for key, current in list(self._windows.items()):
                if everything or now - current.started >= self.window:
                    self._close(key, current, now)
            closed, self._closed = self._closed, []
        return closed


__all__ = ["Aggregate", "MAX_ADDRESSES", "UnverifiedRefusals"]
