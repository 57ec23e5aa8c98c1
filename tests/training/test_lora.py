"""LoRA training on the tiny random model: token layout, the completion-only loss, the files written,
and resuming after an interruption to the same final adapter."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amber.engine.tokenizer import Tokenizer
from amber.training import epochs, lora
from amber.training.data import ExampleEncoder, collate
from amber.training.lora import (Example, TrainConfig, TrainingError, completion_nll, load_model, target_modules,
                                 train_lora)

TRAIN = [Example(f"Review: {text}\nSentiment:", f" {label}") for text, label in [
    ("a gorgeous, witty film", "positive"), ("dull and far too long", "negative"),
    ("the best thing I saw this year", "positive"), ("a mess from start to finish", "negative"),
    ("warm, funny and sharp", "positive"), ("I walked out", "negative"),
]]
VALIDATION = [Example("Review: smart and moving\nSentiment:", " positive")]
FAST = TrainConfig(rank=4, alpha=8, batch_size=4, epochs=3, dropout=0.1, learning_rate=1e-2)


@pytest.fixture
def chat_checkpoint(tiny_checkpoint: Path, default_checkpoint: Path, tmp_path: Path) -> Path:
    """The tiny model plus the real model's chat template (transformers 5 keeps it in its own file)."""
    directory = tmp_path / "tiny-chat"
    shutil.copytree(tiny_checkpoint, directory)
    shutil.copy(default_checkpoint / "chat_template.jinja", directory)
    return directory


def test_ids_are_bos_prompt_completion_eos_as_served(tiny_checkpoint):
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    example = TRAIN[0]
    encoded = ExampleEncoder(tiny_checkpoint).encode(example)
    prompt_ids = [1, *tokenizer.encode(example.prompt)]  # what the engine prefills: BOS, then the prompt
    assert list(encoded.ids) == [*prompt_ids, *tokenizer.encode(" positive"), 2]
    assert encoded.start == len(prompt_ids)


def test_chat_rows_render_with_the_template_and_a_single_bos(chat_checkpoint):
    from transformers import AutoTokenizer
    messages = ({"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there!"})
    encoder = ExampleEncoder(chat_checkpoint)
    prompt, completion = encoder.render_chat(messages)
    assert prompt.endswith("<|im_start|>assistant\n") and not prompt.startswith("<|im_start|>")
    assert completion == "Hi there!"
    encoded = encoder.encode(Example(messages=messages))
    hf = AutoTokenizer.from_pretrained(chat_checkpoint)
    expected_prompt = hf.apply_chat_template(list(messages[:1]), tokenize=True, add_generation_prompt=True,
                                             return_dict=False)
    assert list(encoded.ids[:encoded.start]) == list(expected_prompt)  # BOS once, as the template intends
    assert list(encoded.ids[encoded.start:]) == [*encoder.tokenizer.encode("Hi there!"), encoder.eos_id]


@pytest.mark.parametrize("messages", [(), ({"role": "user", "content": "hi"},),
                                      ({"role": "assistant", "content": None},)])
def test_bad_chat_rows_are_training_errors(chat_checkpoint, messages):
    with pytest.raises(TrainingError, match="training example 1"):
        ExampleEncoder(chat_checkpoint).encode_all([Example(messages=messages)], "training")


def test_loss_covers_completion_and_eos_only(tiny_checkpoint):
    model = load_model(tiny_checkpoint, replace(FAST, base_dtype="float32")).get_base_model().eval()
    encoder = ExampleEncoder(tiny_checkpoint)
    encoded = encoder.encode(TRAIN[0])
    with torch.no_grad():
        logprobs = model(torch.tensor([encoded.ids])).logits[0].log_softmax(-1)  # full logits, by hand
        by_hand = -sum(logprobs[t - 1, encoded.ids[t]] for t in range(encoded.start, len(encoded.ids)))
        ours = completion_nll(model, collate([encoded], encoder.eos_id))
        # Another prompt changes the loss only through the context; its own tokens carry no loss.
        assert len(collate([encoded], 0).targets) == len(encoded.ids) - encoded.start == 2
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-5)


def test_padded_batch_loss_is_the_sum_of_single_losses(tiny_checkpoint):
    model = load_model(tiny_checkpoint, replace(FAST, base_dtype="float32")).get_base_model().eval()
    encoder = ExampleEncoder(tiny_checkpoint)
    encoded = encoder.encode_all(TRAIN, "training")
    with torch.no_grad():
        batched = completion_nll(model, collate(encoded, encoder.eos_id))
        single = sum(completion_nll(model, collate([ex], encoder.eos_id)) for ex in encoded)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


def test_sdpa_for_big_batches_gives_the_eager_loss(tiny_checkpoint, monkeypatch):
    model = load_model(tiny_checkpoint, replace(FAST, base_dtype="float32")).get_base_model().eval()
    encoder = ExampleEncoder(tiny_checkpoint)
    batch = collate(encoder.encode_all(TRAIN, "training"), encoder.eos_id)
    with torch.no_grad():
        eager = completion_nll(model, batch)
        assert model.config._attn_implementation == "eager"
        monkeypatch.setattr(lora, "EAGER_ATTENTION_BYTES", 0)
        sdpa = completion_nll(model, batch)
        assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-5)


def test_user_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(TrainingError, match="no training examples"):
        train_lora(tiny_checkpoint, [], [], FAST, tmp_path)
    with pytest.raises(TrainingError, match="validation example 1 is .* tokens long; the limit is 5"):
        train_lora(tiny_checkpoint, [Example("a", "b")], [Example("a long prompt", " indeed")],
                   replace(FAST, max_length=5), tmp_path)
    with pytest.raises(TrainingError, match="training example 2: the completion is empty"):
        train_lora(tiny_checkpoint, [Example("a", "b"), Example("a", "")], [], FAST, tmp_path)


def test_writes_standard_peft_adapters_each_epoch(tiny_checkpoint, tmp_path):
    seen = []
    results = train_lora(tiny_checkpoint, TRAIN, VALIDATION, FAST, tmp_path, on_progress=seen.append)
    assert [r.epoch for r in results] == [1, 2, 3]
    assert [p.step for p in seen] == list(range(1, 7)) and seen[-1].eta_seconds == 0
    assert results[-1].train_loss < results[0].train_loss and results[-1].validation_loss is not None
    config = json.loads((tmp_path / results[-1].key / "adapter_config.json").read_text())
    targets = target_modules(tiny_checkpoint)  # the Llama family's q, k, v, o, gate, up, down
    assert len(targets) == 7
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 8, sorted(targets))
    assert not config["use_dora"] and not config["use_rslora"]
    weights = load_file(tmp_path / results[-1].key / "adapter_model.safetensors")
    assert len(weights) == 2 * 2 * len(targets)  # A and B, two layers
    a = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.dtype == torch.float32 and a.shape == (4, 64) and b.shape == (64, 4) and b.abs().sum() > 0
    # Only the newest epoch keeps optimizer state; every epoch stays a servable adapter.
    assert [(tmp_path / r.key / epochs.STATE).exists() for r in results] == [False, False, True]
    assert not train_lora(tiny_checkpoint, TRAIN, [], replace(FAST, epochs=1), tmp_path / "x")[0].validation_loss


def test_interrupted_run_resumes_to_the_same_adapter(tiny_checkpoint, tmp_path):
    whole = train_lora(tiny_checkpoint, TRAIN, VALIDATION, FAST, tmp_path / "whole")

    def stop_after_first(result):
        if result.epoch == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_lora(tiny_checkpoint, TRAIN, VALIDATION, FAST, tmp_path / "cut", on_epoch=stop_after_first)
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["epoch-1"]
    resumed = train_lora(tiny_checkpoint, TRAIN, VALIDATION, FAST, tmp_path / "cut")

    assert [r.train_loss for r in resumed] == [r.train_loss for r in whole]
    final, expected = (load_file(tmp_path / run / r[-1].key / "adapter_model.safetensors")
                       for run, r in (("cut", resumed), ("whole", whole)))
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)


def test_a_crash_while_saving_leaves_no_epoch(tiny_checkpoint, tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise SystemExit("killed mid-save")
    monkeypatch.setattr(epochs.torch, "save", killed)
    with pytest.raises(SystemExit):
        train_lora(tiny_checkpoint, TRAIN, [], replace(FAST, epochs=1), tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []
    monkeypatch.undo()
    assert (tmp_path / train_lora(tiny_checkpoint, TRAIN, [], replace(FAST, epochs=1), tmp_path)[0].key).is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-1"]  # the half-written temp dir is gone


def test_resuming_with_other_settings_is_refused(tiny_checkpoint, tmp_path):
    train_lora(tiny_checkpoint, TRAIN, [], replace(FAST, epochs=1), tmp_path)
    with pytest.raises(TrainingError, match="different training run"):
        train_lora(tiny_checkpoint, TRAIN, [], replace(FAST, epochs=1, rank=8), tmp_path)


@pytest.mark.slow
@pytest.mark.supports("llama", "custom models")
def test_real_model_adapter_loads_with_peft_and_lowers_the_loss(default_checkpoint, tmp_path):
    """bfloat16 base in training, float32 base when loaded back, as serving will: the adapter must
    still carry what it learned."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    rows = [json.loads(line) for line in (Path(__file__).parent.parent / "data/sst2/train.jsonl").open()][:8]
    examples = [Example(**row) for row in rows]
    result = train_lora(default_checkpoint, examples, [], TrainConfig(epochs=1, learning_rate=2e-3), tmp_path)
    encoder = ExampleEncoder(default_checkpoint)
    batch = collate(encoder.encode_all(examples, "training"), encoder.eos_id)
    base = LlamaForCausalLM.from_pretrained(default_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        before = completion_nll(base, batch)
        after = completion_nll(PeftModel.from_pretrained(base, tmp_path / result[0].key).get_base_model(), batch)
    assert after < 0.7 * before
