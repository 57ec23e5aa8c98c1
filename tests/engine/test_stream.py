"""Streaming out of the engine (`Engine.stream`, the per-step token callback) and the two
OpenAI-flavoured sampling options: penalties over generated tokens only, alternatives from the
model's own distribution."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from amber.engine.engine import Engine
from amber.engine.loader import load_model
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import Penalty, RequestOutput
from tests.engine.test_engine import BOS, reference_greedy, req, run


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    engine = Engine(load_model(tiny_checkpoint), tokenizer, max_batch=8, max_context=256, prefill_chunk=7).start()
    yield engine, tokenizer, reference
    engine.stop()


async def collect(engine: Engine, request, stop_after: int | None = None) -> list:
    events = []
    async for event in engine.stream(request):
        events.append(event)
        if stop_after is not None and len(events) == stop_after:
            break
    return events


def test_a_stream_gives_every_steps_tokens_then_the_output(tiny):
    engine, tok, _ = tiny
    request = req("s", tok.encode("Streaming, token by token"), max_tokens=6, num_results=2, temperature=0.9, seed=5)
    events = asyncio.run(collect(engine, request))
    *steps, out = events
    assert isinstance(out, RequestOutput) and len(steps) == 6
    for c in out.completions:
        streamed = [t for step in steps for index, t in step if index == c.index]
        assert streamed == c.tokens
    (again,) = run(engine, [req("g", request.prompt_ids, max_tokens=6, num_results=2, temperature=0.9, seed=5)])
    assert [c.tokens for c in again.completions] == [c.tokens for c in out.completions]


def test_leaving_a_stream_aborts_its_request(tiny):
    engine, tok, _ = tiny
    events = asyncio.run(collect(engine, req("gone", tok.encode("go on and on"), max_tokens=200, num_results=3),
                                 stop_after=2))
    assert len(events) == 2
    deadline = time.monotonic() + 5
    while engine.busy:
        assert time.monotonic() < deadline, "the abandoned stream kept its place in the batch"
        time.sleep(0.01)
    assert engine.stats()["running_samples"] == 0


def test_penalties_over_generated_tokens_only(tiny):
    """OpenAI's frequency and presence penalties ignore the prompt."""
    engine, tok, ref = tiny
    prompt = tok.encode("repeat repeat repeat repeat")

    def adjust(logits, seen):
        generated = seen[len(prompt):]
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[0]).float()
        return logits - 0.8 * (counts > 0).float() - 0.5 * counts

    (out,) = run(engine, [req("o", prompt, max_tokens=10, presence_penalty=Penalty(0.8),
                              count_penalty=Penalty(0.5), penalize_prompt=False)])
    expected = reference_greedy(ref, prompt, 10, adjust)
    assert [t.token_id for t in out.completions[0].tokens] == [e[0] for e in expected]


@torch.inference_mode()
def test_alternatives_from_the_raw_distribution(tiny):
    """At temperature 0.5 the sampled distribution is sharper; `top_from_raw` ranks and scores the
    alternatives by the model's own one, as OpenAI reports them."""
    engine, tok, ref = tiny
    prompt = tok.encode("Alternatives, please")
    (out,) = run(engine, [req("r", prompt, max_tokens=5, temperature=0.5, seed=1, top_k_return=3, top_from_raw=True)])
    seq = [BOS, *prompt]
    for t in out.completions[0].tokens:
        raw = ref(torch.tensor([seq])).logits[0, -1].float().log_softmax(-1)
        values, ids = raw.topk(3)
        assert [i for i, _ in t.top] == ids.tolist()
        assert [lp for _, lp in t.top] == pytest.approx(values.tolist(), abs=1e-4)
        assert t.raw_logprob == pytest.approx(float(raw[t.token_id]), abs=1e-4)
        seq.append(t.token_id)
