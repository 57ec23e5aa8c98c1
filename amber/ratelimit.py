"""Per-account rate limits: requests and tokens per minute, over a sliding one-minute window.

Owns the windows (held in the server process) and admission. Knows accounts only by id, and no
HTTP, SQL or engine: the API turns a refusal into a 429 and a state into headers.

Admission is one check-and-count under a lock, so requests racing for the last slot cannot all
win: 50 concurrent requests against 10 per minute admit exactly 10. A request is admitted while
fewer than `rpm` requests and fewer than `tpm` tokens fall in the last 60 seconds. An admitted
request reserves its most tokens (prompt + max_tokens for every sample) and is corrected to what
it actually used when it ends; so a burst may pass the token limit by at most one request's tokens,
and a long request cannot be refused by its own reservation. 0 (or None) means unlimited.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from amber.config import RateLimits

WINDOW_S = 60.0


@dataclass
class _Entry:
    at: float      # monotonic seconds
    tokens: int    # reserved, then what the request used


@dataclass(frozen=True)
class WindowState:
    """What the headers say, right after an admission or a refusal."""
    limits: RateLimits
    requests_left: int
    tokens_left: int
    requests_reset_s: float   # until the window holds no request again
    tokens_reset_s: float     # until the window holds no token again
    retry_after_s: float = 0  # refusals: until a request would be admitted


class RateLimited(Exception):
    def __init__(self, reason: str, state: WindowState):
        super().__init__(reason)
        self.state = state


class Reservation:
    """An admitted request's tokens: reserved at admission, corrected once each part ends."""

    def __init__(self, limiter: Limiter, entry: _Entry | None, parts: int, reserved: list[int]):
        self._limiter, self._entry, self._reserved = limiter, entry, reserved
        self._open, self._used = parts, 0

    def settle(self, part: int, used: int | None) -> None:
        """Part `part` ended having used `used` tokens (None: unknown, so its reservation stands)."""
        self._used += self._reserved[part] if used is None else used
        self._open -= 1
        if self._open == 0 and self._entry is not None:
            self._limiter.correct(self._entry, self._used)


class Limiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[int, deque[_Entry]] = {}

    def admit(self, account_id: int | None, limits: RateLimits, reserve: list[int]
              ) -> tuple[Reservation, WindowState | None]:
        """Count one request reserving sum(reserve) tokens, or raise RateLimited. `reserve` has one
        figure per engine request, each settled on its own. No state when nothing is limited."""
        if not (limits.rpm or limits.tpm):
            return Reservation(self, None, len(reserve), reserve), None
        with self._lock:
            now = self._clock()
            window = self._window(account_id, now)
            used = sum(e.tokens for e in window)
            if limits.rpm and len(window) >= limits.rpm:
                raise RateLimited(f"rate limit reached: {limits.rpm} requests per minute",
                                  self._state(window, limits, now, window[0].at + WINDOW_S - now))
            if limits.tpm and used >= limits.tpm:
                raise RateLimited(f"rate limit reached: {limits.tpm} tokens per minute",
                                  self._state(window, limits, now, self._tokens_free_at(window, limits.tpm) - now))
            entry = _Entry(now, sum(reserve))
            window.append(entry)
            return Reservation(self, entry, len(reserve), reserve), self._state(window, limits, now)

    def _window(self, account_id: int, now: float) -> deque[_Entry]:
        window = self._windows.setdefault(account_id, deque())
        while window and window[0].at <= now - WINDOW_S:
            window.popleft()
        return window

    @staticmethod
    def _tokens_free_at(window: deque[_Entry], tpm: int) -> float:
        """When enough of the window's entries have aged out that it holds fewer than tpm tokens."""
        used = sum(e.tokens for e in window)
        for entry in window:
            used -= entry.tokens
            if used < tpm:
                return entry.at + WINDOW_S
        return window[-1].at + WINDOW_S

    @staticmethod
    def _state(window: deque[_Entry], limits: RateLimits, now: float, retry_after: float = 0) -> WindowState:
        reset = window[-1].at + WINDOW_S - now if window else 0.0
        used = sum(e.tokens for e in window)
        return WindowState(limits, max(0, limits.rpm - len(window)), max(0, limits.tpm - used),
                           reset, reset if used else 0.0, max(retry_after, 0.001))

    def correct(self, entry: _Entry, used: int) -> None:
        with self._lock:
            entry.tokens = used


def whole_seconds(s: float) -> int:
    """Retry-After's whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(s))
