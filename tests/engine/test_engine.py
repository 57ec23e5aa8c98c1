"""The batched engine against the obvious slow loop: a Hugging Face model, one sequence at a time,
recomputing the whole sequence for every token (no cache)."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from amber.engine.engine import Engine, QueueFull
from amber.engine.loader import load_model
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import FinishKind, GenerationRequest, Penalty, SamplingParams

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    engine = Engine(model, tokenizer, max_batch=8, max_context=256, prefill_chunk=7).start()
    yield engine, tokenizer, reference
    engine.stop()


def run(engine: Engine, requests: list[GenerationRequest]):
    """Submit all at once (they join the running batch one by one) and wait for every result."""
    results, done = {}, threading.Event()

    def on_done_for(rid):
        def on_done(out):
            results[rid] = out
            if len(results) == len(requests):
                done.set()
        return on_done

    for r in requests:
        engine.submit(r, on_done_for(r.request_id))
    assert done.wait(120), "engine did not finish"
    return [results[r.request_id] for r in requests]


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], steps: int, adjust=None):
    """Token ids and (raw, adjusted) logprobs, recomputing everything each step."""
    seq, out = [BOS, *prompt], []
    for _ in range(steps):
        logits = model(torch.tensor([seq])).logits[0, -1].float()
        adjusted = adjust(logits, seq[1:]) if adjust else logits
        token = int(adjusted.argmax())
        out.append((token, float(logits.log_softmax(-1)[token]), float(adjusted.log_softmax(-1)[token])))
        seq.append(token)
    return out


def req(rid, prompt, **kw):
    return GenerationRequest(rid, tuple(prompt), SamplingParams(**{"temperature": 0.0, **kw}))


@pytest.mark.supports("llama", "complete", "batching")
def test_batched_greedy_equals_the_naive_loop(tiny):
    engine, tok, ref = tiny
    prompts = [tok.encode(t) for t in ["Hello there", "The quick brown fox jumps over the lazy dog. " * 3,
                                       "1 2 3", "A", "Once upon a time, in a land far away"]]
    outs = run(engine, [req(f"g{i}", p, max_tokens=12 + i) for i, p in enumerate(prompts)])
    for i, (p, out) in enumerate(zip(prompts, outs)):
        expected = reference_greedy(ref, p, 12 + i)
        got = out.completions[0].tokens
        assert [t.token_id for t in got] == [e[0] for e in expected]
        for t, (_, raw, _) in zip(got, expected):
            assert t.raw_logprob == pytest.approx(raw, abs=1e-4)
            assert t.logprob == pytest.approx(raw, abs=1e-4)  # no penalties: the same distribution
        assert out.completions[0].finish.kind is FinishKind.LENGTH


@pytest.mark.supports("llama", "prompt logprobs")
def test_prompt_scores_equal_the_reference_forward(tiny):
    engine, tok, ref = tiny
    prompt = tok.encode("Scoring every prompt token, the first one too, across several chunks.")
    (out,) = run(engine, [req("s", prompt, max_tokens=0, top_k_return=3)])
    with torch.inference_mode():
        lp = ref(torch.tensor([[BOS, *prompt]])).logits[0].float().log_softmax(-1)
    assert [t.token_id for t in out.prompt] == prompt
    for i, t in enumerate(out.prompt):
        assert t.logprob == pytest.approx(float(lp[i, prompt[i]]), abs=1e-4)
        assert t.raw_logprob == t.logprob
        assert [a for a, _ in t.top] == lp[i].topk(3).indices.tolist()
    assert out.completions[0].tokens == [] and out.completions[0].finish.length == 0


def test_num_results_share_the_prompt_and_match_a_single_run(tiny):
    engine, tok, _ = tiny
    prompt = tok.encode("Three greedy samples of one prompt")
    single, multi = run(engine, [req("one", prompt, max_tokens=8), req("three", prompt, max_tokens=8, num_results=3)])
    ids = [t.token_id for t in single.completions[0].tokens]
    assert len(multi.completions) == 3
    for c in multi.completions:
        assert [t.token_id for t in c.tokens] == ids


def test_count_and_presence_penalties_match_an_independent_loop(tiny):
    engine, tok, ref = tiny
    prompt = tok.encode("repeat repeat repeat")
    cats = tok.category_masks()

    def adjust(logits, seen):
        counts = torch.bincount(torch.tensor(seen), minlength=logits.shape[0]).float()
        exempt = cats[0]  # whitespace exempt from the count penalty below
        pen = 0.7 * (counts > 0).float() + 0.4 * counts * (~exempt).float() + 3.0 * counts / len(seen)
        return logits - pen

    params = dict(max_tokens=10, presence_penalty=Penalty(0.7),
                  count_penalty=Penalty(0.4, (False, True, True, True, True)), frequency_penalty=Penalty(3.0))
    (out,) = run(engine, [req("p", prompt, **params)])
    expected = reference_greedy(ref, prompt, 10, adjust)
    got = out.completions[0].tokens
    assert [t.token_id for t in got] == [e[0] for e in expected]
    for t, (_, raw, adj) in zip(got, expected):
        assert t.raw_logprob == pytest.approx(raw, abs=1e-4)
        assert t.logprob == pytest.approx(adj, abs=1e-4)


def test_end_of_text_and_min_tokens(tiny):
    engine, tok, _ = tiny
    prompt = tok.encode("Stop now")
    force_eos = ((EOS, 100.0),)
    eos_now, eos_later = run(engine, [req("e1", prompt, max_tokens=10, logit_bias=force_eos),
                                      req("e2", prompt, max_tokens=10, min_tokens=3, logit_bias=force_eos)])
    c = eos_now.completions[0]
    assert c.finish.kind is FinishKind.END_OF_TEXT and [t.token_id for t in c.tokens] == [EOS] and c.text == ""
    c = eos_later.completions[0]
    assert c.finish.kind is FinishKind.END_OF_TEXT and len(c.tokens) == 4
    assert EOS not in [t.token_id for t in c.tokens[:3]] and c.tokens[3].token_id == EOS


def test_stop_sequence_cuts_the_text(tiny):
    engine, tok, ref = tiny
    prompt = tok.encode("Some prompt text")
    (free,) = run(engine, [req("free", prompt, max_tokens=12)])
    text = free.completions[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), "the random model produced whitespace only; pick another prompt"
    (cut,) = run(engine, [req("cut", prompt, max_tokens=12, stop_sequences=("zzzz-never", stop))])
    c = cut.completions[0]
    assert c.finish.kind is FinishKind.STOP and c.finish.sequence == stop
    assert c.text == text[:text.index(stop)]
    assert stop not in c.text


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(tiny):
    engine, tok, _ = tiny
    prompt = tok.encode("Random but reproducible")
    seeded = lambda rid: req(rid, prompt, max_tokens=10, temperature=1.0, seed=42, num_results=2)
    (alone,) = run(engine, [seeded("a")])
    crowd = run(engine, [req("x", prompt, max_tokens=15, temperature=1.0), seeded("b"),
                         req("y", tok.encode("other"), max_tokens=5, temperature=0.9)])
    ids = lambda out: [[t.token_id for t in c.tokens] for c in out.completions]
    assert ids(alone) == ids(crowd[1])
    assert ids(alone)[0] != ids(alone)[1]


def test_abort_frees_the_slots(tiny):
    engine, tok, _ = tiny
    got, done = [], threading.Event()
    engine.submit(req("long", tok.encode("go on"), max_tokens=200, num_results=4),
                  lambda out: (got.append(out), done.set()))
    engine.abort("long")
    assert done.wait(30)
    assert isinstance(got[0], BaseException)
    (after,) = run(engine, [req("next", tok.encode("hi"), max_tokens=2, num_results=8)])  # needs every slot
    assert len(after.completions) == 8


def test_a_full_queue_refuses(tiny_checkpoint):
    engine = Engine(load_model(tiny_checkpoint), Tokenizer.from_pretrained(tiny_checkpoint),
                    max_batch=2, max_context=64, max_queue=2)  # not started: nothing drains the queue
    noop = lambda out: None
    engine.submit(req("1", [5], max_tokens=1), noop)
    engine.submit(req("2", [5], max_tokens=1), noop)
    with pytest.raises(QueueFull) as refused:
        engine.submit(req("3", [5], max_tokens=1), noop)
    assert refused.value.drain_seconds == 1.0  # no history yet: a second per batch of waiting requests
    engine.scheduler.finished_at.extend([10.0, 12.5, 15.0])  # one request finished every 2.5 s lately
    with pytest.raises(QueueFull) as refused:
        engine.submit(req("3", [5], max_tokens=1), noop)
    assert refused.value.drain_seconds == pytest.approx(5.0)  # 2 waiting x 2.5 s


@pytest.mark.supports("llama", "prefix cache")
def test_prefix_cache_reuses_blocks_and_changes_nothing(tiny):
    engine, tok, ref = tiny
    shared = tok.encode("A long few-shot preamble that many requests share. " * 8)
    first = shared + tok.encode(" First question?")
    second = shared + tok.encode(" Second, different question?")
    before = len(engine.prefixes)
    (a,) = run(engine, [req("pa", first, max_tokens=6, top_k_return=2)])
    assert len(engine.prefixes) > before  # its full blocks were kept
    b, a2 = run(engine, [req("pb", second, max_tokens=6, top_k_return=2), req("pa2", first, max_tokens=6, top_k_return=2)])
    reused = engine.prefixes.block_size * (len(first) // engine.prefixes.block_size)
    assert a2.prompt[:reused] == a.prompt[:reused]  # copied from the cache: identical
    for x, y in zip(a2.prompt, a.prompt):  # recomputed in other chunks: equal up to rounding
        assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
        assert [i for i, _ in x.top] == [i for i, _ in y.top]
    assert [t.token_id for t in a2.completions[0].tokens] == [t.token_id for t in a.completions[0].tokens]
    with torch.inference_mode():  # the reused part of `second` still scores as the model says
        lp = ref(torch.tensor([[BOS, *second]])).logits[0].float().log_softmax(-1)
    for i, t in enumerate(b.prompt):
        assert t.logprob == pytest.approx(float(lp[i, second[i]]), abs=1e-4)
    expected = reference_greedy(ref, second, 6)
    assert [t.token_id for t in b.completions[0].tokens] == [e[0] for e in expected]


@pytest.mark.supports("llama", "prefix cache")
def test_a_repeated_prompt_computes_nothing_and_answers_the_same_bit_for_bit(tiny):
    """The prompt's last, partial block is kept too (prefix_cache's tails), with the logits after
    it: asked again, a prompt runs no position through the model and gets the same answer, bit for
    bit; one that parts ways inside the tail computes from there."""
    engine, tok, _ = tiny
    prompt = tok.encode("The same short question, asked twice in a row, with a few more words to it?")
    assert len(prompt) + 1 > engine.prefixes.block_size  # a full block and a tail
    runner, computed = engine.runner, []  # positions run through the model, per prefill call
    rows, chunk = runner.prefill_rows, runner.prefill_chunk
    runner.prefill_rows = lambda jobs: (computed.append(sum(len(j[0]) - j[1] for j in jobs)), rows(jobs))[1]
    runner.prefill_chunk = lambda ids, start, *rest: (computed.append(min(runner.chunk_size, len(ids) - start)),
                                                      chunk(ids, start, *rest))[1]
    try:
        (a,) = run(engine, [req("again-1", prompt, max_tokens=6, top_k_return=2)])
        first = sum(computed)
        (b,) = run(engine, [req("again-2", prompt, max_tokens=6, top_k_return=2)])
        second = sum(computed) - first
        (c,) = run(engine, [req("again-3", prompt[:-2] + tok.encode(" otherwise?"), max_tokens=6, top_k_return=2)])
    finally:
        runner.prefill_rows, runner.prefill_chunk = rows, chunk
    assert first == len(prompt) + 1 and second == 0
    assert b.prompt == a.prompt and b.completions == a.completions
    assert 0 < sum(computed) - first < len(c.prompt) + 1 - engine.prefixes.block_size


def test_prefix_blocks_scored_with_fewer_alternatives_are_not_reused_for_more(tiny):
    engine, tok, ref = tiny
    prompt = tok.encode("Top alternatives must be complete even when a prefix is cached. " * 5)
    run(engine, [req("k0", prompt, max_tokens=1, top_k_return=0)])
    (out,) = run(engine, [req("k5", prompt, max_tokens=1, top_k_return=5)])
    assert all(len(t.top) == 5 for t in out.prompt)


def test_short_prompts_prefill_together_and_match_the_naive_loop(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    engine = Engine(model, tok, max_batch=12, max_context=256, prefill_chunk=64)
    group_sizes = []
    real = engine.runner.prefill_rows
    engine.runner.prefill_rows = lambda jobs: (group_sizes.append(len(jobs)), real(jobs))[1]
    engine.start()
    try:
        texts = ["Short one", "A somewhat longer prompt, with commas, and more words in it", "x",
                 "Short one", "Numbers 1 2 3 4", "Last"]
        prompts = [tok.encode(t) for t in texts]
        reqs = [req(f"s{i}", p, max_tokens=[5, 9, 1, 7, 0, 6][i], num_results=1 + (i == 1), top_k_return=2)
                for i, p in enumerate(prompts)]
        outs = run(engine, reqs)
    finally:
        engine.stop()
    assert max(group_sizes) > 1, "no prompts were prefilled together"
    with torch.inference_mode():
        for p, r, out in zip(prompts, reqs, outs):
            lp = ref(torch.tensor([[BOS, *p]])).logits[0].float().log_softmax(-1)
            for i, t in enumerate(out.prompt):
                assert t.logprob == pytest.approx(float(lp[i, p[i]]), abs=1e-4)
            expected = [e[0] for e in reference_greedy(ref, p, r.params.max_tokens)]
            assert len(out.completions) == r.params.num_results
            for c in out.completions:
                assert [t.token_id for t in c.tokens] == expected


def test_a_full_pool_preempts_and_every_answer_still_equals_the_naive_loop(tiny_checkpoint, tiny):
    """A pool far smaller than the batch needs (16 blocks of 16 positions; 8 requests of ~60
    positions want ~32): requests are preempted and recomputed, and each answer (greedy, seeded
    sampling, several results) is what the request gets alone."""
    _, tok, ref = tiny
    engine = Engine(load_model(tiny_checkpoint), tok, max_batch=8, max_context=64, prefill_chunk=7,
                    kv_memory_mb=0).start()
    try:
        assert engine.cache.num_blocks == 2 * 4 + 8  # the floor: two sequences at max_context, a block per row
        prompts = [tok.encode(f"Request number {i} asks for a long answer") for i in range(8)]
        sampled = dict(temperature=0.8, top_p=0.9, seed=7, num_results=2)
        requests = [req(f"p{i}", p, max_tokens=44, min_tokens=44, **(sampled if i == 5 else {}))
                    for i, p in enumerate(prompts)]
        outs = run(engine, requests)
        assert engine.preemptions > 0 and engine.cache.free_blocks() + engine.prefixes.evictable() == 16
        alone = run(engine, [requests[5]])[0]  # the sampled one, alone: nothing to preempt it
    finally:
        engine.stop()
    for i in (0, 3, 7):
        assert [t.token_id for t in outs[i].completions[0].tokens] == [e[0] for e in reference_greedy(ref, prompts[i], 44)]
    assert [[t.token_id for t in c.tokens] for c in outs[5].completions] == \
        [[t.token_id for t in c.tokens] for c in alone.completions]


def test_samples_and_prefix_hits_share_blocks_instead_of_copying(tiny):
    engine, tok, _ = tiny
    prompt = tok.encode("A prompt long enough for several blocks of the pool, shared by every sample. " * 3)
    blocks = engine.cache.blocks_for(1 + len(prompt))
    full = (1 + len(prompt) - 1) // engine.cache.block_size  # full blocks with a token after them
    in_use = engine.cache.num_blocks - engine.cache.free_blocks()
    engine.cache.high_water = in_use  # the engine is idle: measure this test's peak alone
    seen = []
    (out,) = run(engine, [req("six", prompt, max_tokens=3, num_results=6)])
    engine.submit(req("watch", prompt, max_tokens=30), lambda out: seen.append(out),
                  on_tokens=lambda tokens: seen.append(list(engine.cache.slot_blocks[0])) if len(seen) < 1 else None)
    # while "watch" decodes, its first `full` blocks are the prefix cache's own (a hit, no copy)
    deadline = time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    table = seen[0]
    kept = {b.block for b in engine.prefixes._blocks.values()}
    assert set(table[:full]) <= kept and len(out.completions) == 6
    # six samples held the prompt's blocks once, plus one copied last block each (less the last holder)
    assert engine.cache.high_water <= in_use + blocks + 6 + 1


def test_a_launched_engine_has_warmed_up_and_left_nothing_behind(tiny, tiny_checkpoint):
    """Engine.launch runs a one-row and a two-row request before it returns (TorchScript compiles
    the decode steps then, not in the first client's request); they leave no blocks, no prefix
    entries and no step times, and the first real answer is the reference's."""
    _, tok, reference = tiny
    engine = Engine.launch(lambda: (load_model(tiny_checkpoint), tok), max_batch=8, max_context=256)
    try:
        assert engine._steps >= 2 and not engine.step_times and not engine.busy
        assert engine.cache.free_blocks() + engine.prefixes.evictable() == engine.cache.num_blocks
        prompt = tok.encode("The warm-up came first")
        (out,) = run(engine, [req("first", prompt, max_tokens=6)])
        assert [t.token_id for t in out.completions[0].tokens] == [t for t, _, _ in reference_greedy(reference, prompt, 6)]
    finally:
        engine.stop()
    one_row = Engine.launch(lambda: (load_model(tiny_checkpoint), tok), max_batch=1, max_context=256)
    one_row.stop()  # a batch of one row warms up with the one-row request alone
