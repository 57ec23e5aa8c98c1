"""The engine: one background thread that owns the model, the KV cache and the running batch.

Callers `submit` token-id requests from any thread (or `await generate(...)` from asyncio) and get
a RequestOutput back through a callback; the HTTP event loop never runs a forward pass. Each loop
iteration admits at most one waiting request (prefill, prompt scoring, sharing the prompt's cache
with its sibling samples) and then runs one decode step for every running sample, so requests join
and leave the batch at every step.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
from typing import Callable

import torch

from amber.engine.kv_cache import KVCache
from amber.engine.model import LlamaForCausalLM
from amber.engine.runner import ModelRunner
from amber.engine.sampling import make_generator, penalty_mask
from amber.engine.sequence import RequestState, Sample, length_finish
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import (CompletionOutput, FinishKind, FinishReason, GenerationRequest,
                                RequestOutput)

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the engine accepts; try again later."""


class Engine:
    def __init__(self, model: LlamaForCausalLM, tokenizer: Tokenizer, *, max_batch: int = 16,
                 max_context: int = 2048, prefill_chunk: int = 512, max_queue: int = 256):
        cfg = model.config
        self.device = next(model.parameters()).device
        self.model, self.tokenizer = model, tokenizer
        self.max_context, self.max_queue = max_context, max_queue
        self.bos_id = cfg.bos_token_id if cfg.bos_token_id is not None else tokenizer.bos_id
        self.cache = KVCache(cfg.num_hidden_layers, max_batch, cfg.num_key_value_heads, max_context,
                             cfg.head_dim, next(model.parameters()).dtype, self.device)
        self.runner = ModelRunner(model, self.cache, tokenizer.eos_ids, prefill_chunk, self.device)
        masks = tokenizer.category_masks().to(self.device)
        self.category_masks = torch.zeros(masks.shape[0], cfg.vocab_size, dtype=torch.bool, device=self.device)
        self.category_masks[:, :masks.shape[1]] = masks[:, :cfg.vocab_size]
        self._waiting: collections.deque[RequestState] = collections.deque()
        self._running: list[RequestState] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="amber-engine", daemon=True)

    # ---- public API, any thread ----
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def submit(self, request: GenerationRequest,
               on_done: Callable[[RequestOutput | BaseException], None]) -> None:
        assert 1 <= request.params.num_results <= self.cache.keys.shape[1], "numResults exceeds the batch"
        assert 1 + len(request.prompt_ids) + request.params.max_tokens <= self.max_context, "too long"
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(RequestState(request, on_done))
            self._wake.notify()

    def abort(self, request_id: str) -> None:
        """Drop a request (its client went away); it leaves the batch at the next step."""
        with self._wake:
            for state in [*self._waiting, *self._running]:
                if state.request.request_id == request_id:
                    state.aborted = True

    async def generate(self, request: GenerationRequest) -> RequestOutput:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RequestOutput] = loop.create_future()

        def on_done(result: RequestOutput | BaseException) -> None:
            setter = future.set_exception if isinstance(result, BaseException) else future.set_result
            loop.call_soon_threadsafe(lambda: future.done() or setter(result))

        self.submit(request, on_done)
        try:
            return await future
        except asyncio.CancelledError:
            self.abort(request.request_id)
            raise

    # ---- the engine thread ----
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._running and not self._waiting:
                        self._wake.wait()
                    if self._stopping:
                        return
                    self._drop_aborted()
                    admitted = self._pop_admissible()
                try:
                    if admitted is not None:
                        self._prefill(admitted)
                    if self._running:
                        self._decode_step()
                except Exception as exc:  # a broken step fails its requests, never the engine
                    log.exception("engine step failed")
                    for state in [*self._running, *([admitted] if admitted else [])]:
                        self._finish(state, exc)

    def _pop_admissible(self) -> RequestState | None:
        if self._waiting and self._waiting[0].request.params.num_results <= self.cache.free_slots:
            return self._waiting.popleft()
        return None

    def _drop_aborted(self) -> None:
        for state in [s for s in self._waiting if s.aborted]:
            self._waiting.remove(state)
            self._finish(state, asyncio.CancelledError("request aborted"))
        for state in [s for s in self._running if s.aborted]:
            self._finish(state, asyncio.CancelledError("request aborted"))

    def _prefill(self, state: RequestState) -> None:
        req, params = state.request, state.request.params
        ids = [self.bos_id, *req.prompt_ids]
        slots = [self.cache.allocate() for _ in range(params.num_results)]
        self._running.append(state)
        state.prompt, logits = self.runner.prefill(ids, slots[0], req.score_prompt, params.top_k_return)
        for slot in slots[1:]:
            self.cache.copy(slots[0], slot, len(ids))
        self._prepare_sampling(state)
        counts = torch.bincount(torch.tensor(req.prompt_ids, dtype=torch.long),
                                minlength=self.model.config.vocab_size).float().to(self.device)
        state.samples = [Sample(i, slot, len(ids), counts.clone(),
                                make_generator(params.seed, i, self.device))
                         for i, slot in enumerate(slots)]
        if params.max_tokens == 0:
            for s in state.samples:
                s.finish = length_finish(0)
            self._complete(state)
            return
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
        rows = [(state, s) for state in self._running for s in state.samples if s.finish is None]
        logits = self.runner.decode([s for _, s in rows])
        self._accept(rows, self.runner.sample(logits, rows))

    def _accept(self, rows, chosen) -> None:
        """Append each row's new token, then finish what ended and hand back what is complete."""
        for (state, sample), token in zip(rows, chosen):
            sample.tokens.append(token)
            sample.length += 1
            sample.counts[token.token_id] += 1
            self._check_finish(state, sample)
        for state in {id(st): st for st, _ in rows}.values():
            for s in state.samples:
                if s.finish is not None and s.slot >= 0:
                    self.cache.release(s.slot)
                    s.slot = -1
            if state.finished:
                self._complete(state)

    def _check_finish(self, state: RequestState, sample: Sample) -> None:
        params, token = state.request.params, sample.tokens[-1].token_id
        generated = len(sample.tokens)
        may_stop = generated >= params.min_tokens
        if token in self.tokenizer.eos_ids and may_stop:
            sample.finish = FinishReason(FinishKind.END_OF_TEXT)
            return
        previous_chars = len(sample.text_bytes.decode("utf-8", errors="replace"))
        sample.text_bytes += self.tokenizer.token_bytes(token)
        if may_stop and params.stop_sequences:
            text = sample.text_bytes.decode("utf-8", errors="replace")
            match = first_stop(text, previous_chars, params.stop_sequences)
            if match is not None:
                sample.cut_at, sequence = match
                sample.finish = FinishReason(FinishKind.STOP, sequence=sequence)
                return
        if generated >= params.max_tokens:
            sample.finish = length_finish(params.max_tokens)

    def _complete(self, state: RequestState) -> None:
        self._finish(state, state.output([self._completion(s) for s in state.samples]))

    def _completion(self, sample: Sample) -> CompletionOutput:
        tokens = sample.tokens
        text_ids = [t.token_id for t in tokens]
        if sample.finish.kind is FinishKind.END_OF_TEXT:
            text_ids = text_ids[:-1]
        text = self.tokenizer.decode(text_ids)
        if sample.cut_at is not None:
            # Keep the tokens that begin before the stop sequence; the text ends where it starts.
            text = text[:sample.cut_at]
            starts = [start for start, _ in self.tokenizer.offsets(text_ids)]
            tokens = [t for t, start in zip(tokens, starts) if start < sample.cut_at]
        return CompletionOutput(sample.index, tokens, text, sample.finish)

    def _finish(self, state: RequestState, result: RequestOutput | BaseException) -> None:
        if state in self._running:
            self._running.remove(state)
        for s in state.samples:
            if s.slot >= 0:
                self.cache.release(s.slot)
                s.slot = -1
        try:
            state.on_done(result)
        except Exception:
            log.exception("result callback failed")


def first_stop(text: str, previous_chars: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """The earliest stop sequence completed by text added after `previous_chars`, as (start, seq)."""
    best = None
    for seq in stops:
        start = text.find(seq, max(0, previous_chars - len(seq) + 1))
        if start != -1 and (best is None or start < best[0]):
            best = (start, seq)
    return best
