"""A training set written by a general model, as AI21 advised its users to make one. Token ids in
and out through Amber's own engine; no HTTP, no SQL (the worker's job runner stores what this makes).

Two modes:
- `inputs`: the user's real inputs, each after k examples (the same k-shot prompt the evaluation
  uses: amber/evaluation.py); the model writes one output per input. With `samples` > 1 it draws
  several outputs per input (`numResults`), and the majority is the output, its share the confidence.
- `examples`: the k examples written out one after another in a fresh order per draw, then the text
  every example's prompt starts with (its *lead*, such as "Review:"); the model writes a whole new
  example, which is split into input and output where the examples' prompts end (their common
  *cue*, such as "\\nSentiment:"). It stops where the next example would start (separator + lead).
"""
from __future__ import annotations

import os
import random
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

from amber.datagen.filters import majority
from amber.engine.engine import Engine
from amber.engine.types import AdapterRef, GenerationRequest, RequestOutput, SamplingParams
from amber.evaluation import Example, few_shot_prompt, separator_for

MODES = ("inputs", "examples")
MAX_ROWS = 2_000          # examples mode's N, and inputs mode's number of inputs
MAX_SAMPLES = 8
DEFAULT_SHOTS = 8


@dataclass(frozen=True)
class GenerationSpec:
    """What a generation job does; stored as its job's JSON spec."""
    mode: str
    seeds: tuple[Example, ...]
    inputs: tuple[str, ...] = ()
    count: int = 0               # examples mode: how many rows to write
    shots: int = DEFAULT_SHOTS   # k: examples before each input (inputs) or per draw (examples)
    samples: int = 1             # inputs mode: outputs drawn per input, for self-consistency
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 32
    separator: str | None = None  # between examples; default: a blank line if a completion spans lines
    stop: tuple[str, ...] = ()    # default: the separator (inputs), separator + lead (examples)
    seed: int = 0

    def to_json(self) -> dict:
        return {**asdict(self), "seeds": [[e.prompt, e.completion] for e in self.seeds]}

    @classmethod
    def from_json(cls, data: dict) -> GenerationSpec:
        return cls(**{**data, "seeds": tuple(Example(*s) for s in data["seeds"]), "inputs": tuple(data["inputs"]),
                      "stop": tuple(data["stop"])})

    @property
    def size(self) -> int:
        return len(self.inputs) if self.mode == "inputs" else self.count

    def sep(self) -> str:
        return self.separator if self.separator is not None else separator_for(list(self.seeds))


@dataclass(frozen=True)
class Generated:
    index: int                   # 1-based row number in the generated set
    input: str
    output: str
    finish_reason: str           # the engine's: stop | endoftext | length
    samples: tuple[str, ...] = field(default=())


def _common_prefix(texts: list[str]) -> str:
    return os.path.commonprefix(texts)


def lead_and_cue(seeds: tuple[Example, ...]) -> tuple[str, str]:
    """What every seed prompt starts with (cut back to a whole word) and ends with (from its last
    line break, else a whole word): "Review:" and "\\nSentiment:" for SST-2's prompts."""
    prompts = [s.prompt for s in seeds]
    lead = _common_prefix(prompts)
    if len(seeds) > 1 and lead and not lead[-1].isspace():
        lead = lead[:max(lead.rfind(" "), lead.rfind("\n")) + 1]
    cue = _common_prefix([p[::-1] for p in prompts])[::-1]
    if "\n" in cue:
        cue = cue[cue.rfind("\n"):]
    elif len(seeds) > 1 and cue and not cue[0].isspace():
        cue = cue[cue.find(" ") + 1:] if " " in cue else cue
    return lead.rstrip(" "), cue


def examples_stop(spec: GenerationSpec) -> tuple[str, ...]:
    lead, _ = lead_and_cue(spec.seeds)
    return spec.stop or ((spec.sep() + lead,) if lead.strip() else (spec.sep() * 2,))


def split_example(text: str, lead: str, cue: str, separator: str) -> tuple[str, str]:
    """A written example as (input, output): the lead it was started with, up to and including the
    cue, then the rest up to the separator. No cue: the whole text as the input, no output."""
    full = lead + text
    at = full.find(cue) if cue else -1
    if at < 0:
        return full.strip(), ""
    rest = full[at + len(cue):]
    body = rest.lstrip()
    if separator and separator in body:  # the answer ends at the first separator once it has begun
        rest = rest[:len(rest) - len(body)] + body.split(separator)[0]
    return full[:at + len(cue)], rest.rstrip()


class SpecError(ValueError):
    """A generation request that cannot run; `field` names what to fix."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def build_spec(mode: str, seeds: list[Example], *, inputs: list[str] | None = None, n: int | None = None,
               shots: int | None = None, samples: int = 1, temperature: float | None = None, top_p: float = 1.0,
               max_tokens: int = 32, separator: str | None = None, stop: list[str] | None = None,
               seed: int = 0) -> GenerationSpec:
    """The spec a request describes, with every rule that spans fields (ranges are the caller's)."""
    if mode not in MODES:
        raise SpecError("mode", f"mode must be one of {list(MODES)}, not {mode!r}")
    if not seeds:
        raise SpecError("examples", "give at least 1 example (a prompt and its completion)")
    if mode == "inputs" and not inputs:
        raise SpecError("inputs", f"inputs mode needs a list of inputs (1 to {MAX_ROWS})")
    if len(inputs or ()) > MAX_ROWS:
        raise SpecError("inputs", f"at most {MAX_ROWS} inputs per job, not {len(inputs)}")
    if mode == "examples" and not n:
        raise SpecError("n", f"examples mode needs n, the number of rows to write (1 to {MAX_ROWS})")
    if (n or 0) > MAX_ROWS:
        raise SpecError("n", f"n is at most {MAX_ROWS}, not {n}")
    if samples > 1 and mode == "examples":
        raise SpecError("samples", "samples (self-consistency) applies to inputs mode only")
    default_t = 0.0 if mode == "inputs" and samples == 1 else 0.9
    return GenerationSpec(mode=mode, seeds=tuple(seeds), inputs=tuple(inputs or ()) if mode == "inputs" else (),
                          count=(n or 0) if mode == "examples" else 0, shots=min(shots or DEFAULT_SHOTS, len(seeds)),
                          samples=samples, temperature=default_t if temperature is None else temperature,
                          top_p=top_p, max_tokens=max_tokens, separator=separator, stop=tuple(stop or ()), seed=seed)


def check_fits(spec: GenerationSpec, encode: Callable[[str], list[int]], max_context: int) -> None:
    """SpecError when k examples, with the longest input (inputs mode) or the examples' lead
    (examples mode: the longest k examples) and max_tokens, overflow the model's context."""
    separator = spec.sep()
    if spec.mode == "inputs":
        prompt = few_shot_prompt(list(spec.seeds[:spec.shots]), max(spec.inputs, key=len), separator)
    else:
        longest = sorted(spec.seeds, key=lambda s: len(s.prompt + s.completion))[-spec.shots:]
        prompt = "".join(s.prompt + s.completion + separator for s in longest) + lead_and_cue(spec.seeds)[0]
    needed = 1 + len(encode(prompt)) + spec.max_tokens
    if needed > max_context:
        raise SpecError("examples", f"{spec.shots} examples do not fit the model's context: the longest prompt "
                                    f"needs {needed} tokens with maxTokens, the model has {max_context}; pass "
                                    "fewer shots, shorter examples or a smaller maxTokens")


def _params(spec: GenerationSpec, num_results: int, stop: tuple[str, ...], seed: int) -> SamplingParams:
    return SamplingParams(temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens,
                          num_results=num_results, stop_sequences=stop, seed=seed)


def _requests(spec: GenerationSpec, encode: Callable[[str], list[int]], adapter: AdapterRef | None,
              start: int, end: int) -> list[tuple[int, str, GenerationRequest]]:
    """(row index, prompt text, request) for rows start+1..end."""
    separator, out = spec.sep(), []
    lead, _ = lead_and_cue(spec.seeds)
    for index in range(start + 1, end + 1):
        if spec.mode == "inputs":
            prompt = few_shot_prompt(list(spec.seeds[:spec.shots]), spec.inputs[index - 1], separator)
            params = _params(spec, spec.samples, spec.stop or (separator,), spec.seed + index)
        else:
            shots = list(spec.seeds)
            random.Random(spec.seed * 1_000_003 + index).shuffle(shots)
            prompt = "".join(s.prompt + s.completion + separator for s in shots[:spec.shots]) + lead
            params = _params(spec, 1, examples_stop(spec), spec.seed + index)
        request = GenerationRequest(uuid.uuid4().hex, tuple(encode(prompt)), params, score_prompt=False,
                                    adapter=adapter)
        out.append((index, prompt, request))
    return out


def _row(spec: GenerationSpec, index: int, out: RequestOutput) -> Generated:
    finish = out.completions[0].finish.kind.value if out.completions[0].finish else "stop"
    if spec.mode == "inputs":
        texts = [c.text for c in out.completions]
        chosen, _ = majority(texts) if len(texts) > 1 else (texts[0], 1.0)
        pick = next(c for c in out.completions if c.text.strip().lower() == chosen.strip().lower()) \
            if len(texts) > 1 else out.completions[0]
        reason = pick.finish.kind.value if pick.finish else finish
        return Generated(index, spec.inputs[index - 1], pick.text, reason, tuple(texts) if len(texts) > 1 else ())
    lead, cue = lead_and_cue(spec.seeds)
    text = out.completions[0].text
    source, output = split_example(text, lead, cue, spec.sep())
    return Generated(index, source, output, finish)


def generate(engine: Engine, spec: GenerationSpec, start: int, on_rows: Callable[[list[Generated]], bool],
             adapter: AdapterRef | None = None, chunk: int | None = None) -> int:
    """Rows start+1..spec.size, handed to `on_rows` a chunk at a time (a few batches' worth), in
    order; `on_rows` returning False stops (the job was cancelled). Runs the engine on this thread.
    Returns the number of rows made in all (start included)."""
    chunk = chunk or 2 * engine.max_batch
    done = start
    while done < spec.size:
        batch = _requests(spec, engine.tokenizer.encode, adapter, done, min(done + chunk, spec.size))
        results: dict[int, RequestOutput | BaseException] = {}
        for index, _, request in batch:
            engine.submit(request, lambda r, i=index: results.__setitem__(i, r))
        engine.run_until_idle()
        rows = []
        for index, _, _ in batch:
            result = results[index]
            if isinstance(result, BaseException):
                raise result
            rows.append(_row(spec, index, result))
        done += len(rows)
        if not on_rows(rows):
            break
    return done
