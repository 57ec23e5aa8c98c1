"""Batch tensors in, model forward, sampling out. Knows tensors and samples, not requests' text.

Prefill runs a prompt in chunks and scores every prompt token; decode runs one token for every
running sample at once, by the model family's fast decode path where it has one (`forward_rows`,
`forward_one`), else by its forward. Any family's model (models/) serves; none is named here.
"""
from __future__ import annotations

import torch
from torch import nn

from amber.engine.kv_cache import KVCache
from amber.engine.lora import AdapterSlots
from amber.engine.sampling import SamplingBatch, sample, top_alternatives
from amber.engine.sequence import RequestState, Sample
from amber.engine.types import TokenLogprob


SCORE_ROWS = 64  # prompt positions turned into logprobs at once


class ModelRunner:
    def __init__(self, model: nn.Module, cache: KVCache, adapters: AdapterSlots,
                 eos_ids: frozenset[int], prefill_chunk: int, device: torch.device):
        self.model, self.cache, self.adapters, self.device = model, cache, adapters, device
        self.eos_ids = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
        self.chunk_size = prefill_chunk
        self.vocab_size = model.config.vocab_size
        self.fast_decode = hasattr(model, "forward_rows") and hasattr(model, "forward_one")

    def prefill_chunk(self, ids: list[int], start: int, slot: int, score: bool, top_k: int,
                      adapter: int = 0) -> tuple[list[TokenLogprob], torch.Tensor]:
        """Run ids[start : start + chunk] (ids has BOS first) into `slot`, whose positions before
        `start` are already filled, with adapter slot `adapter` (0: none). Returns the scores of the chunk's next tokens that lie inside
        `ids`, and fp32 logits (vocab,) for whatever follows the chunk's last token."""
        chunk = ids[start:start + self.chunk_size]
        hidden = self.model(torch.tensor([chunk], device=self.device),
                            torch.arange(start, start + len(chunk), device=self.device).unsqueeze(0),
                            self.cache, slice(slot, slot + 1),
                            self.adapters.batch([adapter], len(chunk)))[0]  # (chunk, hidden)
        return self._prompt_scores(hidden, ids[start + 1:start + 1 + len(chunk)], score, top_k)

    def prefill_rows(self, jobs: list[tuple[list[int], int, int, bool, int, int]]
                     ) -> list[tuple[list[TokenLogprob], torch.Tensor]]:
        """Several whole prompts in one forward pass, right-padded to the longest.

        Each job is (ids, start, slot, score, top_k, adapter): run ids[start:] into `slot`. Padding writes
        keys/values past a prompt's end, where its samples' own tokens overwrite them before any
        query can see them. A recurrent state has no positions to mask: padding would run it past
        the prompt's end, so a family with recurrent layers (Jamba) runs its rows one at a time.
        Returns, per job, what `prefill_chunk` returns."""
        if self.cache.recurrent is not None and len(jobs) > 1:
            return [result for job in jobs for result in self.prefill_rows([job])]
        width = max(len(ids) - start for ids, start, *_ in jobs)
        tokens = torch.zeros(len(jobs), width, dtype=torch.long)
        for row, (ids, start, *_) in enumerate(jobs):
            tokens[row, :len(ids) - start] = torch.tensor(ids[start:])
        positions = torch.tensor([[start + i for i in range(width)] for _, start, *_ in jobs])
        slots = torch.tensor([slot for _, _, slot, *_ in jobs])
        lora = self.adapters.batch([job[5] for job in jobs], width)
        hidden = self.model(tokens.to(self.device), positions.to(self.device), self.cache, slots.to(self.device), lora)
        return [self._prompt_scores(hidden[row, :len(ids) - start], ids[start + 1:], score, top_k)
                for row, (ids, start, _, score, top_k, _) in enumerate(jobs)]

    def _prompt_scores(self, hidden: torch.Tensor, targets: list[int], score: bool, top_k: int
                       ) -> tuple[list[TokenLogprob], torch.Tensor]:
        """hidden (n, hidden) of consecutive prompt positions; targets: the tokens that follow them
        inside the prompt (n, or n - 1 at its end). Scores, and logits for what follows the last."""
        if not score:
            return [], self.model.logits(hidden[-1:])[0]
        # a piece of positions at a time: a 500-token prompt's fp32 logits and logprobs would
        # otherwise take ~200 MB at once (49k vocabulary), paid in the server's peak memory
        scores, last = [], None
        for start in range(0, hidden.shape[0], SCORE_ROWS):
            logprobs = self.model.logits(hidden[start:start + SCORE_ROWS]).log_softmax(-1)  # (rows, vocab)
            if piece := targets[start:start + SCORE_ROWS]:
                scores += self._score(logprobs[:len(piece)], piece, top_k)
            last = logprobs[-1]
        # log_softmax is a valid logits vector for what follows: sampling is shift-invariant
        return scores, last

    @staticmethod
    def _score(logprobs: torch.Tensor, targets: list[int], top_k: int) -> list[TokenLogprob]:
        picked = logprobs.gather(-1, torch.tensor(targets, device=logprobs.device).unsqueeze(-1))
        tops = top_alternatives(logprobs, top_k)
        return [TokenLogprob(t, lp, lp, top) for t, lp, top in zip(targets, picked.flatten().tolist(), tops)]

    def decode(self, samples: list[Sample]) -> torch.Tensor:
        """One forward step for every sample, which sit in slots 0..n-1 in order; fp32 logits
        (batch, vocab) for each one's next token."""
        assert all(s.slot == i for i, s in enumerate(samples)), "decode rows must fill slots 0..n-1"
        if self.fast_decode and len(samples) == 1 and samples[0].owner.adapter_slot == 0:  # single-stream decode
            return self.model.logits(self.model.forward_one(samples[0].last_token, samples[0].length - 1, 0, self.cache))
        tokens, positions = [s.last_token for s in samples], [s.length - 1 for s in samples]
        lora = self.adapters.batch([s.owner.adapter_slot for s in samples], 1)
        if self.fast_decode:
            hidden = self.model.forward_rows(tokens, positions, self.cache, lora)
        else:  # the family's forward, one new token per row in slots 0..n-1
            hidden = self.model(torch.tensor(tokens, device=self.device).unsqueeze(1),
                                torch.tensor(positions, device=self.device).unsqueeze(1),
                                self.cache, slice(0, len(samples)), lora)[:, 0]  # (batch, hidden)
        return self.model.logits(hidden)

    def sample(self, logits: torch.Tensor, rows: list[tuple[RequestState, Sample]]) -> list[TokenLogprob]:
        """Pick each row's next token; logits (batch, vocab) fp32."""
        batch = self._sampling_batch(rows)
        counts = None if batch.penalty_scales is None else torch.stack([s.counts for _, s in rows])
        lengths = torch.tensor([s.length - 1 for _, s in rows], device=self.device)  # BOS not counted
        out = sample(logits, batch, counts, lengths, [s.generator for _, s in rows])
        ids = out.token_ids.tolist()
        chosen = out.logprobs.gather(-1, out.token_ids.unsqueeze(-1)).flatten().tolist()
        raw = out.raw_logprobs.gather(-1, out.token_ids.unsqueeze(-1)).flatten().tolist()
        top_k = max(r.request.params.top_k_return for r, _ in rows)
        ranked = out.logprobs
        if top_k and any(r.request.params.top_from_raw for r, _ in rows):
            raw_rows = torch.tensor([r.request.params.top_from_raw for r, _ in rows], device=self.device)
            ranked = torch.where(raw_rows.unsqueeze(-1), out.raw_logprobs, out.logprobs)
        tops = top_alternatives(ranked, top_k)
        return [TokenLogprob(i, lp, rlp, top[:r.request.params.top_k_return])
                for i, lp, rlp, top, (r, _) in zip(ids, chosen, raw, tops, rows)]

    def _sampling_batch(self, rows: list[tuple[RequestState, Sample]]) -> SamplingBatch:
        params = [r.request.params for r, _ in rows]
        f32 = dict(dtype=torch.float32, device=self.device)
        scales = masks = None
        if any(p.presence_penalty.scale or p.count_penalty.scale or p.frequency_penalty.scale for p in params):
            scales = torch.tensor([[p.presence_penalty.scale, p.count_penalty.scale, p.frequency_penalty.scale]
                                   for p in params], **f32)
            ones = torch.ones(3, self.vocab_size, **f32)
            masks = torch.stack([r.penalty_masks if r.penalty_masks is not None else ones for r, _ in rows])
        bias = None
        if any(r.bias is not None for r, _ in rows):
            zeros = torch.zeros(self.vocab_size, **f32)
            bias = torch.stack([r.bias if r.bias is not None else zeros for r, _ in rows])
        banned = None
        early = [b for b, (r, s) in enumerate(rows) if len(s.tokens) < r.request.params.min_tokens]
        if early:  # end-of-text is forbidden before minTokens: (row, token) pairs
            row_ids = torch.tensor(early, dtype=torch.long, device=self.device).repeat_interleave(len(self.eos_ids))
            banned = torch.stack([row_ids, self.eos_ids.repeat(len(early))])
        return SamplingBatch(
            temperature=torch.tensor([p.temperature for p in params], **f32),
            top_p=torch.tensor([p.top_p for p in params], **f32),
            penalty_scales=scales, penalty_masks=masks, bias=bias, banned=banned)
