"""The scheduler alone: admission, prefill groups, slot bookkeeping and the queue limit, on stand-in
requests (no model, no torch). The engine tests show the same decisions produce the naive loop's
outputs."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from amber.engine.scheduler import QueueFull, Scheduler


def state(name: str, prompt_len: int, n: int = 1):
    params = SimpleNamespace(num_results=n)
    request = SimpleNamespace(request_id=name, prompt_ids=(5,) * prompt_len, params=params)
    return SimpleNamespace(request=request, aborted=False, samples=[], resuming=None, rows_needed=n)


def sample(length: int):
    return SimpleNamespace(slot=-1, length=length, finish=None)


def names(states) -> list[str]:
    return [s.request.request_id for s in states]


def test_short_prompts_share_a_chunk_and_the_batch():
    sched = Scheduler(max_batch=4, max_context=256, max_queue=8, chunk_size=16)
    for s in [state("a", 5), state("b", 6), state("c", 7), state("d", 1)]:  # 6 + 7 + 8 > 16
        sched.add(s)
    assert names(sched.schedule()) == ["a", "b"]
    assert names(sched.schedule()) == ["c", "d"]
    assert sched.prefilling is None and not sched.waiting


def test_a_group_stops_at_the_batch_and_a_long_prompt_waits_its_turn():
    sched = Scheduler(max_batch=4, max_context=256, max_queue=8, chunk_size=16)
    sched.add(state("wide", 2, n=3))
    sched.add(state("two", 2, n=2))
    assert names(sched.schedule()) == ["wide"]   # "two" would make five samples
    for _ in range(3):
        sched.seat(sample(3))
    sched.add(state("long", 40))
    assert sched.schedule() == [] and sched.prefilling is None   # "two" still does not fit
    sched.free_slot(sched.rows[0])
    assert names(sched.schedule()) == ["two"]
    assert sched.schedule() == [] and sched.prefilling.request.request_id == "long"
    sched.prefill_done()
    assert sched.prefilling is None


def test_padding_must_fit_the_slot():
    sched = Scheduler(max_batch=4, max_context=24, max_queue=8, chunk_size=16)
    sched.add(state("a", 10))  # 11 + 16 > 24: prefilled alone, in chunks
    assert sched.schedule() == [] and sched.prefilling.request.request_id == "a"


def test_first_slots_leave_room_for_every_sample():
    sched = Scheduler(max_batch=8, max_context=256, max_queue=8, chunk_size=64)
    sched.seat(sample(3))
    assert sched.first_slots([state("a", 1, n=3), state("b", 1, n=2), state("c", 1)]) == [1, 4, 6]


def test_freeing_a_slot_moves_the_last_row_down():
    sched = Scheduler(max_batch=4, max_context=256, max_queue=8, chunk_size=16)
    a, b, c = sample(5), sample(6), sample(7)
    assert [sched.seat(s) for s in (a, b, c)] == [0, 1, 2]
    assert sched.free_slot(a) == (2, 0)          # c's blocks move from slot 2 to slot 0
    assert sched.rows == [c, b] and (a.slot, b.slot, c.slot) == (-1, 1, 0)
    assert sched.free_slot(a) is None            # already out
    assert sched.free_slot(b) is None            # the last row: nothing to move
    assert sched.rows == [c]


def test_finish_forgets_the_request_once_its_slots_are_freed():
    sched = Scheduler(max_batch=4, max_context=256, max_queue=8, chunk_size=16)
    first, other = state("first", 1, n=2), state("other", 1)
    first.samples = [sample(2), sample(2)]
    other.samples = [sample(9)]
    for s in (first, other):
        sched.start(s)
        for x in s.samples:
            sched.seat(x)
    assert [sched.free_slot(s) for s in first.samples] == [(2, 0), None]  # the engine frees, then finishes
    sched.finish(first)
    assert sched.running == [other] and sched.rows == other.samples and other.samples[0].slot == 0
    assert len(sched.finished_at) == 1 and sched.busy


def test_admission_waits_for_kv_blocks_and_a_preempted_request_resumes_first():
    free = {"blocks": 5}
    sched = Scheduler(max_batch=8, max_context=256, max_queue=8, chunk_size=64,
                      room=lambda: free["blocks"], needs=lambda s: len(s.request.prompt_ids))
    sched.add(state("small", 3))
    sched.add(state("big", 4))
    assert names(sched.schedule()) == ["small"]      # 3 + 4 blocks > 5: "big" waits
    free["blocks"] = 4
    assert names(sched.schedule()) == ["big"]
    early, late = state("early", 1), state("late", 1, n=2)
    early.samples, late.samples = [sample(5)], [sample(5), sample(5)]
    for s in (early, late):
        sched.start(s)
        for x in s.samples:
            sched.seat(x)
    late.samples[1].finish = "stop"
    assert sched.victim() is late                    # the one that started last
    for x in late.samples:
        sched.free_slot(x)
    sched.preempt(late)
    assert sched.running == [early] and sched.waiting[0] is late and late.resuming == [late.samples[0]]
    late.rows_needed = 1
    assert sched.schedule() == [] and sched.prefilling is late  # resumed alone, never in a group


def test_aborted_requests_leave_the_queue_first():
    sched = Scheduler(max_batch=4, max_context=256, max_queue=8, chunk_size=16)
    waiting, running = state("w", 1), state("r", 1)
    sched.add(waiting)
    sched.start(running)
    sched.abort("r")
    sched.abort("w")
    assert names(sched.take_aborted()) == ["w", "r"]
    assert not sched.waiting and sched.running == [running]  # the engine's finish takes it out


def test_a_full_queue_refuses_with_its_drain_time():
    sched = Scheduler(max_batch=2, max_context=256, max_queue=2, chunk_size=16)
    sched.add(state("1", 1))
    sched.add(state("2", 1))
    with pytest.raises(QueueFull) as refused:
        sched.add(state("3", 1))
    assert refused.value.drain_seconds == 1.0
    sched.finished_at.extend([10.0, 12.5, 15.0])
    assert sched.drain_seconds() == pytest.approx(5.0)


def test_an_abort_reaches_a_request_while_its_group_is_being_prefilled():
    """Between schedule() taking a group out of the queue and the engine starting it, the request
    is neither waiting nor running: an abort then still marks it, so it leaves at the next step
    (it was lost before, and the request decoded on with no one to read it)."""
    sched = Scheduler(max_batch=4, max_context=256, max_queue=8, chunk_size=16)
    a, b = state("a", 3), state("b", 3)
    sched.add(a)
    sched.add(b)
    assert names(sched.schedule()) == ["a", "b"]
    sched.abort("b")
    assert b.aborted and not a.aborted
    sched.start(b)
    assert names(sched.take_aborted()) == ["b"]
