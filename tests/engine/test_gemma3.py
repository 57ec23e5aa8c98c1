"""What only Gemma 3 has, on the tiny random Gemma of conftest.py (test_families.py runs the cases
every family shares on it): sliding-window attention over prompts longer than the window, in
prefill chunks shorter and longer than it and from the prefix cache; both config spellings; soft-
capping; the family's chat template and end-of-turn token for a checkpoint that carries neither."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from amber.engine.chat_template import ChatTemplate
from amber.engine.engine import Engine
from amber.engine.kv_cache import KVCache
from amber.engine.loader import load_model
from amber.engine.models import FullAttention, SlidingWindow
from amber.engine.models.gemma3 import Gemma3Config
from amber.engine.models.layers import attention_mask
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import FinishKind, GenerationRequest, SamplingParams
from amber.training.data import ExampleEncoder
from tests.tiny_models import END_OF_TURN_ID, GEMMA3_LAYERS
from tests.engine.test_engine import BOS, reference_greedy, run
from tests.engine.test_families import prompt_logprobs

WINDOW = 8
LONG = "A sliding window keeps only the last few positions in view, so this prompt runs well past it. " * 4


@pytest.fixture(scope="module")
def tokenizer(gemma3_checkpoint):
    return Tokenizer.from_pretrained(gemma3_checkpoint)


@pytest.fixture(scope="module")
def reference(gemma3_checkpoint):
    return AutoModelForCausalLM.from_pretrained(gemma3_checkpoint, dtype=torch.float32).eval()


def test_a_sliding_window_shows_a_query_the_last_window_keys_as_transformers_does():
    positions = torch.tensor([[5, 6, 7], [20, 21, 22]])
    mask = attention_mask(positions, 23, window=4)[:, 0]            # (batch, seq, context)
    keys = torch.arange(23)
    for b, t in [(0, 0), (0, 2), (1, 1)]:
        i = int(positions[b, t])
        assert mask[b, t].tolist() == ((keys > i - 4) & (keys <= i)).tolist()  # i - window < j <= i
    assert attention_mask(torch.tensor([[3]]), 4, window=4) is None  # one query, its whole context in view
    assert attention_mask(torch.tensor([[4]]), 5, window=4)[0, 0, 0].tolist() == [False, True, True, True, True]
    assert torch.equal(attention_mask(positions, 23), attention_mask(positions, 23, window=100))


def test_sliding_and_full_layers_share_one_cache_of_every_position():
    states = [SlidingWindow(2, 16, WINDOW), FullAttention(2, 16)]
    cache = KVCache.for_layers(states, slots=3, max_len=64, dtype=torch.float32)
    # both layers in one pool of 16-position blocks, room for 4 slots x 64: sliding layers keep every position
    assert cache.keys.shape == (2, 4 * 64, 2, 16) and cache.block_size == 16
    with pytest.raises(NotImplementedError, match="one shape"):
        KVCache.for_layers([SlidingWindow(2, 16, WINDOW), FullAttention(4, 16)], 3, 64, torch.float32)


def test_the_config_reads_transformers_4_and_5_spellings(gemma3_checkpoint):
    new = json.loads((gemma3_checkpoint / "config.json").read_text())
    cfg = Gemma3Config.from_hf(new)
    assert cfg.layer_types == GEMMA3_LAYERS and (cfg.rope_theta, cfg.rope_local_theta) == (1e6, 1e4)
    assert cfg.sliding_window == WINDOW and cfg.query_pre_attn_scalar == 24 and cfg.tie_word_embeddings
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=2, num_hidden_layers=4)
    assert Gemma3Config.from_hf(old).layer_types == ("sliding_attention", "full_attention") * 2
    assert Gemma3Config.from_hf({**old, "layer_types": list(GEMMA3_LAYERS)}) == cfg
    scaled = Gemma3Config.from_hf({**old, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert scaled.rope_scaling == 8.0 and cfg.rope_scaling == 1.0
    with pytest.raises(ValueError, match="yarn"):
        Gemma3Config.from_hf({**old, "rope_scaling": {"rope_type": "yarn", "factor": 8.0}})


@pytest.mark.parametrize("chunk", [3, 13])  # shorter and longer than the window
def test_long_prompts_in_chunks_and_from_the_prefix_cache_equal_transformers(gemma3_checkpoint, tokenizer,
                                                                             reference, chunk):
    first = tokenizer.encode(LONG)
    second = first + tokenizer.encode(" The second prompt goes on where the first stopped.")
    assert len(first) > 64 + WINDOW  # several prefix-cache blocks, and more than the window
    engine = Engine(load_model(gemma3_checkpoint), tokenizer, max_batch=4, max_context=256,
                    prefill_chunk=chunk).start()
    try:
        outs = [run(engine, [GenerationRequest(f"p{i}", tuple(p), SamplingParams(temperature=0, max_tokens=6))])[0]
                for i, p in enumerate([first, second])]  # the second starts from the first's blocks
        # the second prompt's full blocks: the first's, which it started from (and from the first's
        # partial last block, a tail), and its own; and a tail
        kept = list(engine.prefixes._blocks.values())
        assert sum(not b.tokens for b in kept) == len(second) // engine.cache.block_size
        assert any(b.tokens for b in kept)
    finally:
        engine.stop()
    for prompt, out in zip([first, second], outs):
        with torch.inference_mode():
            expected = reference(torch.tensor([[BOS, *prompt]])).logits[0].float().log_softmax(-1)
        assert [t.logprob for t in out.prompt] == pytest.approx(
            [float(expected[i, t]) for i, t in enumerate(prompt)], abs=1e-4)
        greedy = reference_greedy(reference, prompt, 6)
        assert [t.token_id for t in out.completions[0].tokens] == [e[0] for e in greedy]
        assert [t.logprob for t in out.completions[0].tokens] == pytest.approx([e[1] for e in greedy], abs=1e-4)


def test_final_softcapping_equals_transformers_which_never_caps_attention(gemma3_checkpoint, tokenizer, tmp_path):
    """A final cap low enough to bend this model's logits (up to ~20); an attention cap that
    transformers' Gemma 3 reads and ignores (its eager attention included), and so does Amber."""
    config = json.loads((gemma3_checkpoint / "config.json").read_text())
    config.update(attn_logit_softcapping=1.0, final_logit_softcapping=10.0)
    for path in gemma3_checkpoint.iterdir():
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = [BOS, *tokenizer.encode(LONG)]
    capped = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.inference_mode():
        expected = capped(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    ours = prompt_logprobs(load_model(tmp_path), ids)
    assert (ours - expected).abs().max() < 1e-4
    assert (ours - prompt_logprobs(load_model(gemma3_checkpoint), ids)).abs().max() > 0.1  # the cap bites


def test_a_checkpoint_without_a_chat_template_gets_gemmas(gemma3_checkpoint, gptj_checkpoint, tokenizer):
    assert not (gemma3_checkpoint / "chat_template.jinja").exists()
    assert not ChatTemplate(gptj_checkpoint, BOS).available  # a family without a default gets none
    chat = ChatTemplate(gemma3_checkpoint, BOS)
    assert chat.available
    ids = chat.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                       {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}])
    assert tokenizer.decode(ids) == ("<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
                                     "<start_of_turn>model\nHello.<end_of_turn>\n"
                                     "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert ids.count(END_OF_TURN_ID) == 3 and ids[0] != BOS  # the engine puts its own BOS first
    prompt, completion = ExampleEncoder(gemma3_checkpoint).render_chat(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    assert (prompt, completion) == ("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "Hello.")


def test_end_of_turn_ends_generation(gemma3_checkpoint, tokenizer):
    assert tokenizer.eos_ids == {2}  # the checkpoint's files name only <eos>...
    engine = Engine(load_model(gemma3_checkpoint), tokenizer, max_batch=2, max_context=64).start()
    try:
        assert engine.tokenizer.eos_ids == {2, END_OF_TURN_ID}  # ...the family adds its <end_of_turn>
        (out,) = run(engine, [GenerationRequest("e", tuple(tokenizer.encode("Stop")), SamplingParams(
            temperature=0, max_tokens=10, logit_bias=((END_OF_TURN_ID, 100.0),)))])
    finally:
        engine.stop()
    completion = out.completions[0]
    assert completion.finish.kind is FinishKind.END_OF_TEXT and completion.text == ""
    assert [t.token_id for t in completion.tokens] == [END_OF_TURN_ID]
