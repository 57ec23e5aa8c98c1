"""Generation without HTTP: the prompts each mode writes, how a written example is split, the rules
that refuse a request before any job, and `generate` on a tiny real model: the rows it hands back,
in order, resumable from any row, equal to the same requests made one by one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from amber.datagen.generate import (MAX_ROWS, SpecError, build_spec, check_fits, examples_stop, generate,
                                    lead_and_cue, split_example)
from amber.engine.engine import Engine
from amber.engine.loader import load_model
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import GenerationRequest, SamplingParams
from amber.evaluation import Example, few_shot_prompt

REPO = Path(__file__).resolve().parents[2]
SST2 = [json.loads(line) for line in (REPO / "tests/data/sst2/train.jsonl").read_text().splitlines()]
SEEDS = [Example(r["prompt"], r["completion"]) for r in SST2[:8]]
INPUTS = [r["prompt"] for r in SST2[8:20]]


def test_the_lead_and_cue_of_sst2_prompts():
    assert lead_and_cue(tuple(SEEDS)) == ("Review:", "\nSentiment:")
    spec = build_spec("examples", SEEDS, n=5)
    assert examples_stop(spec) == ("\nReview:",)  # where the next example would start


@pytest.mark.parametrize("text, expected", [
    (" a fine film .\nSentiment: positive", ("Review: a fine film .\nSentiment:", " positive")),
    (" a fine film .\nSentiment: positive\nand more", ("Review: a fine film .\nSentiment:", " positive")),
    (" dull .\nSentiment:\n negative", ("Review: dull .\nSentiment:", "\n negative")),  # answer begun after a break
    (" a fine film with no cue", ("Review: a fine film with no cue", "")),
])
def test_a_written_example_splits_where_the_prompts_end(text, expected):
    assert split_example(text, "Review:", "\nSentiment:", "\n") == expected


@pytest.mark.parametrize("kwargs, field", [
    (dict(mode="inputs", seeds=[]), "examples"),
    (dict(mode="inputs", seeds=SEEDS), "inputs"),
    (dict(mode="examples", seeds=SEEDS), "n"),
    (dict(mode="examples", seeds=SEEDS, n=MAX_ROWS + 1), "n"),
    (dict(mode="inputs", seeds=SEEDS, inputs=["x"] * (MAX_ROWS + 1)), "inputs"),
    (dict(mode="examples", seeds=SEEDS, n=3, samples=3), "samples"),
    (dict(mode="nonsense", seeds=SEEDS), "mode"),
])
def test_requests_that_cannot_run_are_refused_naming_the_field(kwargs, field):
    mode, seeds = kwargs.pop("mode"), kwargs.pop("seeds")
    with pytest.raises(SpecError) as caught:
        build_spec(mode, seeds, **kwargs)
    assert caught.value.field == field


def test_examples_that_do_not_fit_the_context_are_refused():
    encode = lambda text: [0] * (len(text) // 4)  # noqa: E731  (4 characters a token)
    spec = build_spec("inputs", SEEDS, inputs=INPUTS, max_tokens=8)
    check_fits(spec, encode, 2048)
    with pytest.raises(SpecError) as caught:
        check_fits(spec, encode, 200)
    assert caught.value.field == "examples" and "do not fit" in str(caught.value)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine(load_model(tiny_checkpoint), Tokenizer.from_pretrained(tiny_checkpoint), max_batch=4,
                  max_context=1024)


def alone(engine, prompt: str, params: SamplingParams) -> list[str]:
    out = []
    engine.submit(GenerationRequest("one", tuple(engine.tokenizer.encode(prompt)), params, score_prompt=False),
                  out.append)
    engine.run_until_idle()
    return [c.text for c in out[0].completions]


def test_inputs_mode_writes_one_output_per_input_as_each_request_alone(engine):
    spec = build_spec("inputs", SEEDS, inputs=INPUTS, shots=3, max_tokens=4)
    chunks = []
    assert generate(engine, spec, 0, lambda rows: chunks.append(rows) or True, chunk=5) == len(INPUTS)
    rows = [r for chunk in chunks for r in chunk]
    assert [len(c) for c in chunks] == [5, 5, 2] and [r.index for r in rows] == list(range(1, 13))
    assert [r.input for r in rows] == INPUTS
    for r in rows[:3]:  # greedy: the same text as the k-shot prompt sent alone
        params = SamplingParams(temperature=0.0, max_tokens=4, stop_sequences=("\n",), seed=r.index)
        assert alone(engine, few_shot_prompt(SEEDS[:3], r.input, "\n"), params) == [r.output]


def test_generation_resumes_after_the_last_row_and_stops_when_told(engine):
    spec = build_spec("inputs", SEEDS, inputs=INPUTS, shots=2, max_tokens=3)
    full = []
    generate(engine, spec, 0, lambda rows: full.extend(rows) or True, chunk=4)
    resumed = []
    assert generate(engine, spec, 7, lambda rows: resumed.extend(rows) or True, chunk=4) == len(INPUTS)
    assert resumed == full[7:]
    stopped = []
    assert generate(engine, spec, 0, lambda rows: stopped.extend(rows) or False, chunk=4) == 4  # cancelled


def test_self_consistency_keeps_the_majority_of_the_samples(engine):
    spec = build_spec("inputs", SEEDS, inputs=INPUTS[:4], samples=4, temperature=1.0, max_tokens=2, shots=2)
    rows = []
    generate(engine, spec, 0, lambda chunk: rows.extend(chunk) or True)
    for r in rows:
        assert len(r.samples) == 4
        normal = [s.strip().lower() for s in r.samples]
        assert normal.count(r.output.strip().lower()) == max(normal.count(s) for s in normal)


def test_examples_mode_writes_n_rows_from_reshuffled_examples(engine):
    spec = build_spec("examples", SEEDS, n=6, max_tokens=12, temperature=1.0, shots=4)
    rows = []
    generate(engine, spec, 0, lambda chunk: rows.extend(chunk) or True)
    assert [r.index for r in rows] == list(range(1, 7))
    assert all(r.input.startswith("Review:") for r in rows)  # written after the examples' lead
    assert all(r.finish_reason in ("stop", "endoftext", "length") for r in rows)
