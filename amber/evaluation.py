"""Does the custom model beat prompt engineering? Scores it against the base model prompted with k
training examples (k-shot), on held-out examples, through Amber's own engine as it serves them.

Both sides decode greedily and are judged by exact match after whitespace normalisation. Latency
is per request, each request alone (as a user calling the API one at a time sees it), after one
warm-up request each, on the calling thread (`Engine.run_until_idle`).
"""
from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from amber.engine.engine import Engine
from amber.engine.types import AdapterRef, GenerationRequest, RequestOutput, SamplingParams

DEFAULT_SHOTS = 8


@dataclass(frozen=True)
class Example:
    prompt: str        # the text the model is given (a chat already rendered by its template)
    completion: str    # what it should answer


def normalise(text: str) -> str:
    return " ".join(text.split())


def few_shot_prompt(shots: list[Example], prompt: str, separator: str) -> str:
    """k examples written out as prompt + completion, then the question: classic prompt engineering."""
    return "".join(s.prompt + s.completion + separator for s in shots) + prompt


def separator_for(examples: list[Example]) -> str:
    """Blank-line separated shots, or single lines when no completion spans lines (the common case
    for classification, and the stop sequence that then ends each answer)."""
    return "\n\n" if any("\n" in e.completion.strip() for e in examples) else "\n"


def fit_shots(encode: Callable[[str], list[int]], train: list[Example], prompts: list[str], separator: str,
              max_tokens: int, max_context: int, shots: int = DEFAULT_SHOTS) -> int:
    """How many of the first `shots` training examples to put before each prompt: the most for which
    every k-shot prompt, with BOS and `max_tokens`, fits `max_context` (0 if even none fits)."""
    shots = min(shots, len(train))
    while shots and max(1 + len(encode(few_shot_prompt(train[:shots], p, separator)))
                        for p in prompts) + max_tokens > max_context:
        shots -= 1
    return shots


def _run_one(engine: Engine, prompt: str, max_tokens: int, stop: str, adapter: AdapterRef | None
             ) -> tuple[str, float]:
    ids = engine.tokenizer.encode(prompt)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_sequences=(stop,))
    result: list[RequestOutput | BaseException] = []
    started = time.perf_counter()
    engine.submit(GenerationRequest(str(uuid.uuid4()), tuple(ids), params, score_prompt=False,
                                    adapter=adapter), result.append)
    engine.run_until_idle()
    seconds = time.perf_counter() - started
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0].completions[0].text, seconds


def _score(engine: Engine, prompts: list[str], answers: list[str], max_tokens: int, stop: str,
           adapter: AdapterRef | None) -> dict:
    _run_one(engine, prompts[0], max_tokens, stop, adapter)  # warm-up: first-use costs are not latency
    correct, latencies = 0, []
    for prompt, answer in zip(prompts, answers):
        text, seconds = _run_one(engine, prompt, max_tokens, stop, adapter)
        correct += normalise(text) == normalise(answer)
        latencies.append(seconds)
    return {"accuracy": correct / len(prompts), "correct": correct,
            "mean_latency_s": statistics.fmean(latencies), "median_latency_s": statistics.median(latencies)}


def evaluate(engine: Engine, adapter: AdapterRef, train: list[Example], held_out: list[Example],
             shots: int = DEFAULT_SHOTS) -> dict:
    """Accuracy and latency of the custom model and of the k-shot base model on `held_out`.

    `engine` must be idle and not running on a thread of its own. The k shots are the first k
    training examples, fewer if the longest k-shot prompt would not fit the model's context."""
    tokenizer = engine.tokenizer
    separator = separator_for(train + held_out)
    longest = max(len(tokenizer.encode(e.completion)) for e in train + held_out)
    max_tokens = longest + 4  # room to be wrong by a little, not to ramble
    shots = fit_shots(tokenizer.encode, train, [e.prompt for e in held_out], separator, max_tokens,
                      engine.max_context, shots)
    answers = [e.completion for e in held_out]
    custom = _score(engine, [e.prompt for e in held_out], answers, max_tokens, separator, adapter)
    few_shot = _score(engine, [few_shot_prompt(train[:shots], e.prompt, separator) for e in held_out],
                      answers, max_tokens, separator, None)
    return {"metric": "exact_match", "examples": len(held_out), "shots": shots,
            "custom_model": custom, "few_shot": few_shot,
            "accuracy_gain": custom["accuracy"] - few_shot["accuracy"],
            "speedup": few_shot["mean_latency_s"] / custom["mean_latency_s"]}
