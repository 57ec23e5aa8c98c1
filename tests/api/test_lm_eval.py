"""lm-evaluation-harness, unchanged, from its own venv: its `local-completions` model scores a
small multiple-choice task (tests/data/lm_eval/) through /v1/completions with token-id prompts, and
every choice's loglikelihood and is_greedy must be what Amber says when asked directly.

lm-eval asks for one generated token and sums `token_logprobs[ctxlen:-1]`; where that token is
end-of-text and Amber left it out of logprobs, the continuation's last token was dropped instead.
Some choices here are the model's own answer, after which it ends the turn, so that case is covered."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.api.sdk import REPO, VENVS

pytestmark = pytest.mark.slow

TASK = REPO / "tests/data/lm_eval/amber_mc.yaml"
BATCH = 8  # prompts per request: lm-eval sends a list of token-id lists


def lm_eval_python() -> Path:
    variable = os.environ.get("AMBER_CLIENT_LM_EVAL")
    if variable:
        return Path(variable)
    python = VENVS / "lm-eval-0.4.13/bin/python"
    if not python.exists():
        pytest.skip("AMBER_CLIENT_LM_EVAL is unset and .venv-clients/lm-eval-0.4.13 is not built: "
                    "run `make clients` (make test does)")
    return python


def run_lm_eval(server, tokenizer: Path) -> dict:
    python = lm_eval_python()
    assert python.exists(), f"{python} is missing: run `make clients` (make test does)"
    script = REPO / "tests/clients/lm_eval_loglikelihood.py"
    out = subprocess.run([python, script, server.url, server.key, tokenizer, TASK, str(BATCH)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def completions(server, prompts: list[list[int]], **params) -> list[dict]:
    """Choices for each prompt, in order, at most 16 prompts a request."""
    out = []
    for i in range(0, len(prompts), 16):
        body = {"model": "j2-light", "prompt": prompts[i:i + 16], "temperature": 0, **params}
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=120)
        assert r.status_code == 200, r.text
        out += sorted(r.json()["choices"], key=lambda c: c["index"])
    return out


def scored(server, choices: list[dict]) -> list[tuple[float, bool]]:
    """Amber's own (loglikelihood, is_greedy) of each continuation: the prompt's logprobs, nothing generated."""
    prompts = [c["context_ids"] + c["continuation_ids"] for c in choices]
    out = []
    for c, done in zip(choices, completions(server, prompts, max_tokens=0, echo=True, logprobs=1)):
        start = len(c["context_ids"])
        chosen, top = done["logprobs"]["token_logprobs"][start:], done["logprobs"]["top_logprobs"][start:]
        assert len(chosen) == len(c["continuation_ids"])
        out.append((sum(chosen), all(lp >= max(alternatives.values()) for lp, alternatives in zip(chosen, top))))
    return out


def ends_turn(server, choices: list[dict]) -> list[bool]:
    """Whether the greedy token after each context + continuation is end-of-text (no text, stopped)."""
    prompts = [c["context_ids"] + c["continuation_ids"] for c in choices]
    return [c["finish_reason"] == "stop" and c["text"] == "" for c in completions(server, prompts, max_tokens=1)]


def test_lm_eval_loglikelihoods_match_amber(server, default_checkpoint):
    choices = run_lm_eval(server, default_checkpoint)["choices"]
    assert len({c["doc"] for c in choices}) == 10 and len(choices) == 29
    assert any(ends_turn(server, choices)), "no choice is followed by end-of-text: the task no longer covers it"
    wrong = [f"doc {c['doc']} {c['continuation']!r}: lm-eval {c['loglikelihood']:.5f} {c['is_greedy']}, "
             f"Amber {loglikelihood:.5f} {is_greedy}"
             for c, (loglikelihood, is_greedy) in zip(choices, scored(server, choices))
             if abs(c["loglikelihood"] - loglikelihood) > 1e-4 or c["is_greedy"] != is_greedy]
    assert not wrong, "\n".join(wrong)
