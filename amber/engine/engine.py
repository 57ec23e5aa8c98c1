"""The engine: one background thread that owns the model, the KV cache and the running batch.

Callers `submit` token-id requests from any thread (or `await generate(...)` from asyncio) and get
a RequestOutput back through a callback, or `stream(...)` them and get each step's new tokens as
they come; the HTTP event loop never runs a forward pass. Each step:

    schedule    -> the scheduler admits waiting requests: short prompts to prefill together in
                   one forward pass, or the next long one to prefill a chunk per step
    run         -> prefill them (from the prefix cache where it can), then decode one token for
                   every running sample (runner.py)
    postprocess -> append the new tokens, stream them, retire what finished, hand back results

so requests join and leave the batch at every step. What runs when, and in which cache slot, is the
scheduler's to say; this module runs it on its one thread and hands results back through callbacks.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable

import torch
from torch import nn

from amber.engine.kv_cache import BLOCK_SIZE, KVCache, PoolExhausted
from amber.engine.lora import AdapterError, AdapterSlots
from amber.engine.models import family_of
from amber.engine.prefix_cache import PrefixCache
from amber.engine.runner import ModelRunner
from amber.engine.sampling import make_generator, penalty_mask
from amber.engine.scheduler import QueueFull, Scheduler  # noqa: F401 (QueueFull: part of this API)
from amber.engine.sequence import RequestState, Sample, length_finish
from amber.engine.stops import check_finish, completion_output
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import GenerationRequest, RequestOutput, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)


class RequestAborted(Exception):
    """The request was aborted (its client went away) before it finished."""


class ContextTooLong(ValueError):
    """A request whose BOS + prompt + max_tokens would not fit a cache slot (max_context); raised by
    `submit`, before anything is queued. The API checks this first and answers 400."""


class EngineUnavailable(RuntimeError):
    """The engine that held a request is gone (a replica process died, amber/replicas) before it
    finished; nothing was committed for it, so the client may safely retry. The API answers 503."""


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Tokenizer, *, max_batch: int = 16,
                 max_context: int = 2048, prefill_chunk: int = 512, max_queue: int = 256,
                 prefix_blocks: int = 512, kv_memory_mb: int | None = None, resident_adapters: int = 128,
                 threads: Callable[[], int] | None = None):
        """`kv_memory_mb`: the KV pool's size (None: room for every row at max_context, as offline
        work wants), never less than two sequences at max_context plus a block per row.
        `prefix_blocks`: pool blocks the prefix cache may keep (0 turns it off).
        `threads`, if given, is asked at the start of every step how many torch threads to use
        (a budget that shrinks while a training job shares the cores: amber/threads.py)."""
        cfg = model.config
        self.device = model.model.embed_tokens.weight.device
        family = family_of(model)
        # the family's end-of-turn tokens (Gemma's <end_of_turn>) end generation as EOS does
        self.model, self.tokenizer = model, tokenizer.with_eos(family.end_tokens)
        self.max_batch, self.max_context, self.max_queue = max_batch, max_context, max_queue
        self.threads, self._own_threads = threads, torch.get_num_threads()
        self.bos_id = cfg.bos_token_id if cfg.bos_token_id is not None else tokenizer.bos_id
        states, kv_dtype = family.layer_states(cfg), model.kv_dtype or model.activation_dtype
        self.cache = KVCache.for_layers(states, max_batch, max_context, kv_dtype, self.device,
                                        blocks=_pool_blocks(states, kv_dtype, max_batch, max_context, kv_memory_mb))
        # recurrent states exist only after a whole prefix, not per block: no prefix cache for them
        self.prefixes = PrefixCache(self.cache, max_blocks=0 if self.cache.recurrent is not None else prefix_blocks)
        # a lane more than the batch: every running request's adapter and the next one's fit;
        # 128 more adapters stay in host memory, read by their own thread (lora.py)
        self.adapters = AdapterSlots(model, capacity=max_batch + 1, resident=resident_adapters)
        self.runner = ModelRunner(model, self.cache, self.adapters, self.tokenizer.eos_ids, prefill_chunk, self.device)
        masks = tokenizer.category_masks().to(self.device)
        self.category_masks = torch.zeros(masks.shape[0], cfg.vocab_size, dtype=torch.bool, device=self.device)
        self.category_masks[:, :masks.shape[1]] = masks[:, :cfg.vocab_size]
        self.scheduler = Scheduler(max_batch, max_context, max_queue, prefill_chunk,
                                   room=lambda: self.cache.free_blocks() + self.prefixes.evictable(),
                                   needs=self._blocks_needed, ready=self._adapter_ready)
        self._wake = threading.Condition()  # guards the scheduler against submit/abort on other threads
        self._stopping = False
        self._steps = self.preemptions = 0
        # (seconds, whether it prefilled) of recent steps that ran something: benchmarks read it
        self.step_times: collections.deque[tuple[float, bool]] = collections.deque(maxlen=8192)
        self._thread = threading.Thread(target=self._loop, name="amber-engine", daemon=True)

    # ---- public API, any thread ----
    @classmethod
    def launch(cls, build: Callable[[], tuple[nn.Module, Tokenizer]], **options) -> Engine:
        """Build the model and serve it on one new thread, and return once it is ready.

        All of a model's torch work must stay on one thread: on this machine an OpenMP parallel
        region runs ~2.5x slower in any thread while another thread that has run one is alive
        (measured: a 576x3072 int8 matmul takes 51 us alone, 134 us beside an idle loaded thread)."""
        ready: queue.Queue = queue.Queue()

        def main() -> None:
            try:
                engine = cls(*build(), **options)
            except BaseException as exc:
                ready.put(exc)
                return
            engine._thread = threading.current_thread()
            engine._warm_up()
            ready.put(engine)
            engine._loop()

        threading.Thread(target=main, name="amber-engine", daemon=True).start()
        result = ready.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def start(self) -> Engine:
        """Serve on a new thread a model built on the caller's (tests; `launch` is faster)."""
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()
        self.adapters.close()

    def submit(self, request: GenerationRequest, on_done: Callable[[RequestOutput | BaseException], None],
               on_tokens: Callable[[list[tuple[int, TokenLogprob]]], None] | None = None) -> None:
        """Queue a request. `on_done` gets its RequestOutput (or the exception that ended it);
        `on_tokens`, if given, gets each step's new tokens as (sample index, token) before that.
        Raises ContextTooLong, before queueing, for a request that would not fit max_context."""
        assert 1 <= request.params.num_results <= self.max_batch, "numResults exceeds the batch"
        if (needed := 1 + len(request.prompt_ids) + request.params.max_tokens) > self.max_context:
            raise ContextTooLong(f"request {request.request_id!r} needs {needed} positions (BOS, a "
                                 f"{len(request.prompt_ids)}-token prompt, max_tokens {request.params.max_tokens}); "
                                 f"the context is {self.max_context}")
        if (blocks := request.params.num_results * self.cache.blocks_for(needed)) > self.cache.num_blocks:
            raise ContextTooLong(f"numResults {request.params.num_results} x {needed} positions (BOS, prompt, "
                                 f"max tokens) need up to {blocks} KV blocks of {self.cache.block_size}; this "
                                 f"server's pool has {self.cache.num_blocks} (--kv-memory-mb): ask for fewer "
                                 f"results or fewer tokens")
        with self._wake:
            self.scheduler.add(RequestState(request, on_done, on_tokens))  # QueueFull when full
            self._wake.notify()

    def abort(self, request_id: str) -> None:
        """Drop a request (its client went away); it leaves the batch at the next step."""
        with self._wake:
            self.scheduler.abort(request_id)

    async def generate(self, request: GenerationRequest) -> RequestOutput:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RequestOutput] = loop.create_future()

        def on_done(result: RequestOutput | BaseException) -> None:
            setter = future.set_exception if isinstance(result, BaseException) else future.set_result
            loop.call_soon_threadsafe(lambda: future.done() or setter(result))

        self.submit(request, on_done)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self.abort(request.request_id)
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it now
            raise

    def stream(self, request: GenerationRequest
               ) -> AsyncIterator[list[tuple[int, TokenLogprob]] | RequestOutput]:
        """Submit now (QueueFull is raised here, before any response starts) and return the
        request's events: after each step its new tokens as (sample index, token), last the
        RequestOutput. Leaving the iteration early (cancelled, closed) aborts the request."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        self.submit(request, put, put)
        return self._events(request.request_id, events)

    async def open_stream(self, request: GenerationRequest
                          ) -> AsyncIterator[list[tuple[int, TokenLogprob]] | RequestOutput]:
        """`stream`, awaitable: the API's one way in, shared with engines in other processes
        (amber/replicas/remote.py), whose admission (or QueueFull) takes a round trip."""
        return self.stream(request)

    async def _events(self, request_id: str, events: asyncio.Queue):
        finished = False
        try:
            while not finished:
                item = await events.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = isinstance(item, RequestOutput)
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def forget_adapter(self, key: str) -> None:
        """Drop adapter `key` (its custom model was deleted) from host memory. Any thread."""
        self.adapters.forget(key)

    def drain_seconds(self) -> float:
        """Seconds the waiting requests would take to finish at the engine's recent pace."""
        return self.scheduler.drain_seconds()

    def stats(self) -> dict[str, int]:
        scheduler = self.scheduler
        return {"waiting": len(scheduler.waiting), "prefilling": int(scheduler.prefilling is not None),
                "running_samples": len(scheduler.rows), "prefix_blocks": len(self.prefixes),
                "steps": self._steps, "adapters_loaded": self.adapters.loaded(),
                "kv_blocks": self.cache.num_blocks, "kv_blocks_free": self.cache.free_blocks(),
                "kv_blocks_high_water": self.cache.high_water, "preemptions": self.preemptions,
                "adapters_in_use": self.adapters.in_use()}

    @property
    def alive(self) -> bool:
        """Whether the engine thread still runs (a replica's health check)."""
        return self._thread.is_alive()

    @property
    def busy(self) -> bool:
        return self.scheduler.busy

    # ---- the engine thread ----
    def run_until_idle(self) -> None:
        """Serve on the calling thread until nothing is left to do (offline work such as the
        worker's evaluation: no second thread, so no OpenMP slowdown; see `launch`). Only for an
        engine that was neither started nor launched."""
        assert not self._thread.is_alive(), "the engine already runs on its own thread"
        with torch.inference_mode():
            while self.busy:
                if not self._step():
                    time.sleep(0.005)

    def _warm_up(self) -> None:
        """Before the first client's request: a short request of one row, then one of two (where
        the batch takes two), on the engine thread. The first decode steps compile TorchScript's
        decode functions (~3 s on SmolLM2), which the first request would otherwise wait for."""
        ids = tuple(self.tokenizer.encode("Hello"))[:8] or (self.bos_id,)
        with torch.inference_mode():
            for results in range(1, min(2, self.max_batch) + 1):
                params = SamplingParams(max_tokens=4, temperature=0.0, num_results=results)
                self.submit(GenerationRequest(f"warm-up-{results}", ids, params, score_prompt=False), lambda out: None)
                while self.busy:
                    self._step()
        self.step_times.clear()

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self.busy:
                        self._wake.wait()
                    if self._stopping:
                        return
                if not self._step():  # waiting requests, none of them ready (adapters being read)
                    with self._wake:
                        self._wake.wait(0.005)

    def _step(self) -> bool:
        """schedule -> run -> postprocess (`_accept`, from the prefill and decode steps). Returns
        whether there was anything to run."""
        # the thread count is set anew when it changed: by a training job's share (`threads`), or
        # by the adapter reader's one thread, which torch may apply process-wide
        wanted = self.threads() if self.threads is not None else self._own_threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)  # this thread's OpenMP team, from its next op on
        scheduler = self.scheduler
        with self._wake:
            self._steps += 1
            for state in scheduler.take_aborted():
                self._finish(state, RequestAborted(state.request.request_id))
            group = scheduler.schedule()
        worked = bool(group or scheduler.prefilling or scheduler.rows)
        prefilled, began = bool(group or scheduler.prefilling), time.perf_counter()
        try:
            if group:
                self._prefill_group(group)
            elif scheduler.prefilling is not None:
                self._prefill_step(scheduler.prefilling)
            if scheduler.rows:
                self._decode_step()
        except Exception as exc:  # a broken step fails its requests, never the engine
            log.exception("engine step failed")
            for state in [*scheduler.running, *filter(None, [scheduler.prefilling]), *group]:
                self._finish(state, exc)
        if worked:
            self.step_times.append((time.perf_counter() - began, prefilled))
        return worked

    def _prefill_group(self, group: list[RequestState]) -> None:
        """Prefill short prompts together; each goes into the slot its first sample will take."""
        group = [state for state in group if self._use_adapter(state)]
        if not group:
            return
        slots = self.scheduler.first_slots(group)
        for state, slot in zip(group, slots):
            self._begin_prefill(state, slot)
        computed = [s for s in group if s.cached_logits is None]  # the others were kept whole (prefix cache)
        width = max((len(s.ids) - s.filled for s in computed), default=0)
        for state, slot in zip(group, slots):  # the padded width: rows are right-padded to the longest
            if state.cached_logits is None:
                self._reserve(state, slot, state.filled, state.filled + width)
        computed = [state for state in computed if state.prefill_slot >= 0]  # not failed for want of memory
        jobs = [(s.ids, s.filled, s.prefill_slot, s.request.score_prompt, s.request.params.top_k_return,
                 s.adapter_slot) for s in computed]
        results = dict(zip(map(id, computed), self.runner.prefill_rows(jobs))) if jobs else {}
        for state in group:  # in the group's order: each takes the slots first_slots planned
            if state.cached_logits is not None:
                logits, state.cached_logits = state.cached_logits, None
            elif id(state) in results:
                scores, logits = results[id(state)]
                state.prompt += scores
            else:
                continue
            self._end_prefill(state, state.prefill_slot, logits)

    def _prefill_step(self, state: RequestState) -> None:
        """One chunk of a long prompt (or of a preempted sample's recomputation), in the staging slot."""
        if state.resuming is not None:
            return self._resume_step(state)
        req, staging = state.request, self.cache.staging
        if state.ids is None:
            if not self._use_adapter(state):
                return
            self._begin_prefill(state, staging)
            if state.cached_logits is not None:  # kept whole by the prefix cache: nothing to compute
                logits, state.cached_logits = state.cached_logits, None
                self.scheduler.prefill_done()
                return self._end_prefill(state, staging, logits)
        stop = min(len(state.ids), state.filled + self.runner.chunk_size)
        if not self._reserve(state, staging, state.filled, stop):
            return
        scores, logits = self.runner.prefill_chunk(state.ids, state.filled, staging, req.score_prompt,
                                                   req.params.top_k_return, state.adapter_slot)
        state.prompt += scores
        state.filled = stop
        if state.filled == len(state.ids):
            self.scheduler.prefill_done()
            self._end_prefill(state, staging, logits)

    def _resume_step(self, state: RequestState) -> None:
        """Recompute a chunk of a preempted request's next sample (BOS + prompt + its tokens but
        the last, which the next decode step feeds), in the staging slot; once done, the sample
        takes a batch slot and decodes on."""
        req, staging, sample = state.request, self.cache.staging, state.resuming[0]
        if state.resume_ids is None:
            state.resume_ids = [*state.ids, *(t.token_id for t in sample.tokens[:-1])]
            state.prefill_slot = staging
            state.filled, _, _ = self.prefixes.load(state.resume_ids, staging, False, 0, _adapter_key(req))
        ids, stop = state.resume_ids, min(len(state.resume_ids), state.filled + self.runner.chunk_size)
        if state.filled < stop:  # (a prefix-cache hit may have filled every position)
            if not self._reserve(state, staging, state.filled, stop):
                return
            self.runner.prefill_chunk(ids, state.filled, staging, False, 0, state.adapter_slot)
            state.filled = stop
        if state.filled < len(ids):
            return
        state.resuming.pop(0)
        state.resume_ids, state.prefill_slot = None, -1
        self.cache.move(staging, self.scheduler.seat(sample))
        if not state.resuming:
            state.resuming = None
            self.scheduler.prefill_done()
            self.scheduler.start(state)

    def _blocks_needed(self, state: RequestState) -> int:
        """KV blocks a waiting request needs to start: its prompt's, and one more per sample
        (the block its first tokens go to, or its copy of the prompt's last)."""
        if state.resuming is not None:
            return sum(self.cache.blocks_for(s.length) + 1 for s in state.resuming)
        return self.cache.blocks_for(1 + len(state.request.prompt_ids)) + state.request.params.num_results

    def _reserve(self, state: RequestState, slot: int, start: int, stop: int) -> bool:
        """Blocks for positions [start, stop) of `slot`, preempting the request that started last
        while the pool is out of blocks. False when `state` itself was preempted, or failed
        because nothing else was left to preempt."""
        while True:
            try:
                self.cache.prepare(slot, start, stop)
                return True
            except PoolExhausted as exc:
                victim = self.scheduler.victim()
                if victim is None or (victim is state and len(self.scheduler.running) == 1):
                    self._finish(state, exc)
                    return False
                self._preempt(victim)
                if victim is state:
                    return False

    def _preempt(self, state: RequestState) -> None:
        """Take a running request out of the batch and give its blocks back (scheduler.preempt)."""
        for sample in state.samples:
            self._free_slot(sample)
        self.scheduler.preempt(state)
        self.preemptions += 1
        log.info("KV pool full: request %s preempted, to be recomputed", state.request.request_id)

    def _adapter_ready(self, state: RequestState) -> bool:
        """Whether the request's adapter is in memory with a lane for it; a miss starts its read on
        the adapters' own thread, so the engine never waits for a file. A failed read is kept for
        `_use_adapter` to fail the request with."""
        if state.adapter_slot or state.adapter_error is not None:
            return True
        try:
            return self.adapters.can_acquire(state.request.adapter)
        except AdapterError as exc:
            state.adapter_error = exc
            return True

    def _use_adapter(self, state: RequestState) -> bool:
        """Pin the request's adapter (read on first use if it is not in memory yet); False, with
        the request failed, when it cannot be read."""
        if state.adapter_error is not None:
            self._finish(state, state.adapter_error)
            return False
        try:
            state.adapter_slot = self.adapters.acquire(state.request.adapter)
        except AdapterError as exc:
            self._finish(state, exc)
            return False
        return True

    def _begin_prefill(self, state: RequestState, slot: int) -> None:
        """BOS + prompt, with whatever the prefix cache already has attached to the empty `slot`."""
        req = state.request
        state.ids, state.prefill_slot = [self.bos_id, *req.prompt_ids], slot
        state.filled, state.prompt, state.cached_logits = self.prefixes.load(
            state.ids, slot, req.score_prompt, req.params.top_k_return, _adapter_key(req))

    def _end_prefill(self, state: RequestState, slot: int, logits: torch.Tensor) -> None:
        """Keep the prompt's blocks for later requests, then start its samples from `slot`."""
        req = state.request
        self.prefixes.store(state.ids, slot, state.prompt if req.score_prompt else None,
                            req.params.top_k_return, _adapter_key(req), logits)
        self._start_samples(state, logits, slot)

    def _start_samples(self, state: RequestState, logits: torch.Tensor, source: int) -> None:
        """Give each of numResults samples its slot, sharing the prompt's blocks of slot `source`
        (unless it is that slot), and its first token."""
        req, params = state.request, state.request.params
        self._prepare_sampling(state)
        counts = torch.bincount(torch.tensor(req.prompt_ids if params.penalize_prompt else [], dtype=torch.long),
                                minlength=self.model.config.vocab_size).float().to(self.device)
        state.samples = [Sample(i, -1, len(state.ids), counts.clone(), make_generator(params.seed, i, self.device),
                                owner=state) for i in range(params.num_results)]
        self.scheduler.start(state)
        if params.max_tokens == 0:
            for s in state.samples:
                s.finish = length_finish(0)
            self._complete(state)
            return
        for s in state.samples:
            if self.scheduler.seat(s) != source:
                self.cache.fork(source, s.slot, len(state.ids))
        if all(s.slot != source for s in state.samples):  # the staging slot, or a slot a preemption left
            self.cache.free(source)
        state.prefill_slot = -1
        rows = [(state, s) for s in state.samples]
        self._accept(rows, self.runner.sample(logits.unsqueeze(0).expand(len(rows), -1), rows))

    def _prepare_sampling(self, state: RequestState) -> None:
        params = state.request.params
        penalties = (params.presence_penalty, params.count_penalty, params.frequency_penalty)
        if any(p.active for p in penalties):
            state.penalty_masks = torch.stack([penalty_mask(p, self.category_masks) for p in penalties])
        if params.logit_bias:
            state.bias = torch.zeros(self.model.config.vocab_size, device=self.device)
            for token_id, value in params.logit_bias:
                state.bias[token_id] += value

    def _decode_step(self) -> None:
        for sample in list(self.scheduler.rows):  # each row's next position, preempting if need be
            if sample.slot >= 0:
                self._reserve(sample.owner, sample.slot, sample.length - 1, sample.length)
        samples = self.scheduler.rows
        if not samples:
            return
        rows = [(s.owner, s) for s in samples]
        logits = self.runner.decode(samples)
        self._accept(rows, self.runner.sample(logits, rows))

    def _accept(self, rows, chosen) -> None:
        """Append each row's new token, tell streaming callers, then retire what ended and hand
        back what is complete."""
        new: dict[RequestState, list[tuple[int, TokenLogprob]]] = {}
        for (state, sample), token in zip(rows, chosen):
            sample.tokens.append(token)
            sample.length += 1
            sample.counts[token.token_id] += 1
            check_finish(state.request.params, sample, self.tokenizer)
            new.setdefault(state, []).append((sample.index, token))
        for state, tokens in new.items():
            if state.on_tokens is not None:
                try:
                    state.on_tokens(tokens)
                except Exception:
                    log.exception("token callback failed")
            for s in state.samples:
                if s.finish is not None:
                    self._free_slot(s)
            if state.finished:
                self._complete(state)

    def _free_slot(self, sample: Sample) -> None:
        """Take a sample out of the batch, giving back its blocks, and move the last row into its slot."""
        slot = sample.slot
        if slot < 0:
            return
        self.cache.free(slot)
        if (move := self.scheduler.free_slot(sample)) is not None:
            self.cache.move(*move)

    def _complete(self, state: RequestState) -> None:
        self._finish(state, state.output([completion_output(s, self.tokenizer) for s in state.samples]))

    def _finish(self, state: RequestState, result: RequestOutput | BaseException) -> None:
        for sample in state.samples:
            self._free_slot(sample)
        if state.prefill_slot >= 0:  # its prompt's blocks, before any sample took them
            self.cache.free(state.prefill_slot)
            state.prefill_slot = -1
        self.scheduler.finish(state)
        self.adapters.release(state.adapter_slot)
        state.adapter_slot = 0
        try:
            state.on_done(result)
        except Exception:
            log.exception("result callback failed")


def _pool_blocks(states: list, dtype: torch.dtype, max_batch: int, max_context: int, memory_mb: int | None) -> int:
    """The KV pool's blocks: `memory_mb` worth, or room for every row and the staging slot at
    max_context; never fewer than two sequences at max_context and a block per row."""
    per_block = KVCache.bytes_per_token(states, dtype) * BLOCK_SIZE
    per_sequence = -(-max_context // BLOCK_SIZE)
    wanted = (max_batch + 1) * per_sequence if memory_mb is None else memory_mb * 2 ** 20 // max(per_block, 1)
    return max(wanted, 2 * per_sequence + max_batch)


def _adapter_key(request: GenerationRequest) -> str | None:
    """Prefix-cache namespace: keys and values depend on the adapter that computed them."""
    return request.adapter.key if request.adapter else None
