"""Logprobs of the real general models against an independent forward pass of the same weights
(Hugging Face transformers' own implementation, fp32, one pass over the whole sequence): SmolLM2
(Llama) and Gemma 3 270M, whose prompt here runs past its sliding window of 512 positions."""
from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from amber.engine.engine import Engine
from amber.engine.loader import load_model
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import GenerationRequest, SamplingParams
from tests.conftest import REPO

PROMPT = ("Review: a stirring, funny and finally transporting re-imagining of beauty and the beast.\n"
          "Sentiment: positive\n\nQuestion: What is the capital of France?\nAnswer:")


@pytest.mark.slow
@pytest.mark.parametrize("which, preamble", [("default_checkpoint", 0), ("gemma_checkpoint", 3200)])
def test_real_model_logprobs_match_transformers(request, which, preamble):
    """`preamble`: characters of SST-2 text before the prompt (Gemma: past its 512-position window)."""
    checkpoint = request.getfixturevalue(which)
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    text = (REPO / "tests/data/sst2/dev.tsv").read_text()[:preamble] + PROMPT if preamble else PROMPT
    prefill_chunk = 16 if not preamble else 200  # several prefill chunks on purpose
    engine = Engine(load_model(checkpoint), tokenizer, max_batch=2, max_context=1024,
                    prefill_chunk=prefill_chunk).start()
    prompt = tokenizer.encode(text)
    if preamble:
        assert len(prompt) > 512 + prefill_chunk
    done, box = threading.Event(), []
    engine.submit(GenerationRequest("f", tuple(prompt), SamplingParams(temperature=0, max_tokens=24)),
                  lambda out: (box.append(out), done.set()))
    assert done.wait(120)
    engine.stop()
    out = box[0]
    completion = [t.token_id for t in out.completions[0].tokens]
    ours = [t.raw_logprob for t in out.prompt] + [t.raw_logprob for t in out.completions[0].tokens]

    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    seq = [engine.bos_id, *prompt, *completion]
    with torch.inference_mode():
        lp = reference(torch.tensor([seq])).logits[0].float().log_softmax(-1)
    theirs = [float(lp[i, seq[i + 1]]) for i in range(len(seq) - 1)]
    # greedy: every completion token is the reference's argmax at its position
    for i, token in enumerate(completion):
        assert int(lp[len(prompt) + i].argmax()) == token
    diff = torch.tensor(ours) - torch.tensor(theirs)
    print(f"logprob fidelity over {len(ours)} tokens: mean |diff| {diff.abs().mean():.2e} nats, "
          f"max {diff.abs().max():.2e}")
    assert diff.abs().mean() < 1e-3
    assert out.completions[0].text.strip(), "the model said nothing"
