"""The limiter alone, on a fake clock: a sliding minute, atomic admission, tokens reserved then settled."""
from __future__ import annotations

import threading

import pytest

from amber.config import RateLimits
from amber.ratelimit import Limiter, RateLimited


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_slide_out_of_the_minute():
    clock = Clock()
    limiter = Limiter(clock)
    for _ in range(3):
        limiter.admit(1, RateLimits(rpm=3), [1])
        clock.now += 10
    with pytest.raises(RateLimited) as refused:
        limiter.admit(1, RateLimits(rpm=3), [1])
    assert refused.value.state.retry_after_s == pytest.approx(30)  # the first one leaves at 60 s
    clock.now += 30
    _, state = limiter.admit(1, RateLimits(rpm=3), [1])
    assert state.requests_left == 0
    limiter.admit(2, RateLimits(rpm=3), [1])  # another account has its own window


def test_racing_threads_admit_exactly_the_limit():
    limiter, admitted = Limiter(), []
    barrier = threading.Barrier(50)

    def one():
        barrier.wait()
        try:
            admitted.append(limiter.admit(1, RateLimits(rpm=10), [1]))
        except RateLimited:
            pass

    threads = [threading.Thread(target=one) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 10


def test_tokens_are_reserved_then_settled_to_what_was_used():
    clock = Clock()
    limiter = Limiter(clock)
    reservation, state = limiter.admit(1, RateLimits(tpm=100), [60, 40])
    assert state.tokens_left == 0
    with pytest.raises(RateLimited):
        limiter.admit(1, RateLimits(tpm=100), [1])
    reservation.settle(0, 10)
    reservation.settle(1, None)  # unknown (cancelled): its reservation stands
    _, state = limiter.admit(1, RateLimits(tpm=100), [5])
    assert state.tokens_left == 100 - 50 - 5


def test_unlimited_counts_nothing():
    reservation, state = Limiter().admit(1, RateLimits(), [10])
    assert state is None
    reservation.settle(0, 10)
