"""Who runs next: the waiting queue, admission into the batch, and which cache slot each running
sample holds. Plain Python bookkeeping: no torch, no model, no threads (the engine holds the lock
around every call that can race a submit). Each step the engine asks `schedule()` what to prefill,
runs it, and reports what started (`seat`) and what ended (`finish`, `free_slot`).

Admission: waiting requests, in order, whose prompts together fit one prefill chunk, whose samples
fit the batch and whose blocks fit the KV pool (`room`, the engine's count of free blocks) are
prefilled together in one forward pass; otherwise, while nothing else is prefilling, the next
waiting request starts prefilling a chunk per step (in the staging slot) once it fits. Running
samples sit in sequence slots 0..n-1 (`rows[i].slot == i`): a finished one's slot is filled by
moving the last row down, a move the engine applies to the cache (block tables, not keys and values).

Preemption: when the pool runs out during a step, the engine takes the request that started last
out of the batch (`preempt`, vLLM's choice) and puts it back at the head of the queue; its samples
keep their tokens, and when it is admitted again their keys and values are recomputed (a prefill
of prompt + tokens so far, one sample after another in the staging slot) before they decode on.
"""
from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from amber.engine.sequence import RequestState, Sample

SlotMove = tuple[int, int]  # (from slot, to slot): the block table (and recurrent state) to move


class QueueFull(Exception):
    """More requests are waiting than the engine accepts; try again later. `drain_seconds`: how
    long the requests now waiting would take to finish at the engine's recent pace."""

    def __init__(self, message: str, drain_seconds: float):
        super().__init__(message)
        self.drain_seconds = drain_seconds


class Scheduler:
    def __init__(self, max_batch: int, max_context: int, max_queue: int, chunk_size: int,
                 room: Callable[[], int] = lambda: 1 << 30, needs: Callable[[RequestState], int] = lambda s: 0,
                 ready: Callable[[RequestState], bool] = lambda s: True):
        """`room()`: KV blocks free now; `needs(state)`: the blocks a request needs to start;
        `ready(state)`: whether its adapter is in memory (a request whose adapter is still being
        read waits without holding up the requests behind it)."""
        self.max_batch, self.max_context, self.max_queue = max_batch, max_context, max_queue
        self.chunk_size, self.room, self.needs, self.ready = chunk_size, room, needs, ready
        self.waiting: collections.deque[RequestState] = collections.deque()
        self.prefilling: RequestState | None = None  # the long prompt prefilled a chunk per step
        self.running: list[RequestState] = []         # requests whose samples have started
        self.grouped: list[RequestState] = []         # this step's short prompts, being prefilled together
        self.rows: list[Sample] = []                  # running samples; rows[i] holds cache slot i
        self.finished_at: collections.deque[float] = collections.deque(maxlen=64)  # recent finishes

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def add(self, state: RequestState) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting", self.drain_seconds())
        self.waiting.append(state)

    def abort(self, request_id: str) -> None:
        # `grouped`: this step's short prompts, out of the queue and not yet running: marked
        # too, they leave at the next step like any running request
        for state in [*self.waiting, *self.running, *filter(None, [self.prefilling]), *self.grouped]:
            if state.request.request_id == request_id:
                state.aborted = True

    def take_aborted(self) -> Iterator[RequestState]:
        """Aborted requests, the waiting ones taken out of the queue; the engine finishes each
        (which takes a running one out of the batch) before asking for the next."""
        for state in [s for s in self.waiting if s.aborted]:
            self.waiting.remove(state)
            yield state
        yield from [s for s in [*self.running, self.prefilling] if s is not None and s.aborted]

    def schedule(self) -> list[RequestState]:
        """This step's short prompts, taken from the queue to be prefilled together; when there are
        none and nothing is prefilling, the next waiting request becomes `prefilling` if it fits."""
        group = self.grouped = self._take_short_prompts()
        if not group and self.prefilling is None:
            head = next((s for s in self.waiting if self.ready(s)), None)
            if head is not None and self._fits(head):
                self.waiting.remove(head)
                self.prefilling = head
        return group

    def _fits(self, state: RequestState) -> bool:
        return len(self.rows) + state.rows_needed <= self.max_batch and self.needs(state) <= self.room()

    def _take_short_prompts(self) -> list[RequestState]:
        """Waiting requests, in order, whose prompts together fit one prefill chunk and whose
        samples fit the batch: they are prefilled in one forward pass, straight into their slots."""
        group, budget, blocks = [], self.chunk_size, self.room()
        taken = len(self.rows) + (self.prefilling.rows_needed if self.prefilling else 0)
        for state in list(self.waiting):
            if not self.ready(state):
                continue
            req, length, needs = state.request, 1 + len(state.request.prompt_ids), self.needs(state)
            if (state.resuming is not None or length > budget or taken + req.params.num_results > self.max_batch
                    or length + self.chunk_size > self.max_context  # padding must stay in the slot
                    or needs > blocks):
                break
            self.waiting.remove(state)
            group.append(state)
            budget -= length
            taken += req.params.num_results
            blocks -= needs
        return group

    def first_slots(self, group: list[RequestState]) -> list[int]:
        """The slot each request of a prefill group fills: the one its first sample will take."""
        slots, slot = [], len(self.rows)
        for state in group:
            slots.append(slot)
            slot += state.request.params.num_results
        return slots

    def prefill_done(self) -> None:
        self.prefilling = None

    def start(self, state: RequestState) -> None:
        self.running.append(state)

    def seat(self, sample: Sample) -> int:
        """Put a sample into the batch, in the next slot; returns it."""
        sample.slot = len(self.rows)
        self.rows.append(sample)
        return sample.slot

    def free_slot(self, sample: Sample) -> SlotMove | None:
        """Take a finished sample out of the batch, moving the last row into its slot; returns the
        move the cache must make, if any."""
        if sample.slot < 0:
            return None
        slot, last = sample.slot, self.rows.pop()
        sample.slot = -1
        if last is sample:
            return None
        move = (last.slot, slot)
        last.slot = slot
        self.rows[slot] = last
        return move

    def finish(self, state: RequestState) -> None:
        """Forget a request that ended (done, failed or aborted); its samples' slots are freed
        first (`free_slot`)."""
        self.finished_at.append(time.monotonic())
        if state in self.running:
            self.running.remove(state)
        if state is self.prefilling:
            self.prefilling = None

    def victim(self) -> RequestState | None:
        """The request to preempt when the pool runs out: the one that started last."""
        return self.running[-1] if self.running else None

    def preempt(self, state: RequestState) -> None:
        """Put a running request (its samples' slots already freed) back at the head of the queue,
        to resume its unfinished samples when it fits again."""
        self.running.remove(state)
        state.resuming = [s for s in state.samples if s.finish is None]
        self.waiting.appendleft(state)

    def drain_seconds(self) -> float:
        """Seconds the waiting requests would take to finish at the pace the last 64 finished
        (the mean interval between finishes, batching included); with fewer than two finishes to
        go by, a second per batch of waiting requests."""
        waiting, times = len(self.waiting), list(self.finished_at)
        if len(times) >= 2 and times[-1] > times[0]:
            return waiting * (times[-1] - times[0]) / (len(times) - 1)
        return waiting / self.max_batch
