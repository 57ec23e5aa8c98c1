"""Training examples -> token ids laid out exactly as serving will see them, and padded batches.

Owns: the `Example` type, chat rendering, the id layout `[bos] + encode(prompt) + encode(completion)
+ [eos]` with the index where the loss starts, validation a user can act on (`TrainingError`), and
length-bucketed batches. Knows nothing of the model, PEFT or the optimizer.

Why this layout: Amber's engine prepends BOS to the prompt ids and then generates token by token,
so at serve time the adapter sees `encode(prompt)` followed by whatever it generates. Tokenizing
prompt and completion separately (not `encode(prompt + completion)`) trains exactly that boundary.
The loss covers the completion and the EOS, so a custom model learns to stop by itself.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from amber.engine.chat_template import NoChatTemplate, load_chat_tokenizer
from amber.engine.models import family_for
from amber.engine.tokenizer import Tokenizer


class TrainingError(Exception):
    """Something about the training request the user can fix (empty data, an example too long)."""


@dataclass(frozen=True)
class Example:
    """One training row: a prompt and the completion to learn, or a chat. When `messages` is set
    (a sequence of {"role", "content"} ending with the assistant's reply), prompt and completion
    are ignored and come from the checkpoint's chat template (or its family's) instead."""
    prompt: str = ""
    completion: str = ""
    messages: tuple[Mapping[str, str], ...] | None = None


@dataclass(frozen=True)
class TokenizedExample:
    ids: tuple[int, ...]
    start: int  # index in `ids` of the first completion token; the loss covers ids[start:]


@dataclass
class Batch:
    """Right-padded ids and, for every loss token, where its prediction is read and what it is."""
    input_ids: torch.Tensor       # (batch, seq)
    attention_mask: torch.Tensor  # (batch, seq), 1 for real tokens
    rows: torch.Tensor            # (targets,) batch row of each loss token
    positions: torch.Tensor       # (targets,) position whose hidden state predicts it
    targets: torch.Tensor         # (targets,) the token id to predict


class ExampleEncoder:
    """Tokenizes examples for one checkpoint, with serving's BOS and the model's EOS."""

    def __init__(self, checkpoint: Path, max_length: int | None = None):
        checkpoint = Path(checkpoint)
        config = json.loads((checkpoint / "config.json").read_text())
        self.tokenizer = Tokenizer.from_pretrained(checkpoint)
        self.checkpoint = checkpoint
        # Same choice as the engine: config.json's bos_token_id first, the tokenizer's as fallback.
        bos = config.get("bos_token_id")
        self.bos_id = bos if bos is not None else self.tokenizer.bos_id
        eos = config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        self.eos_id = eos if eos is not None else min(self.tokenizer.eos_ids)
        try:  # the model family reads its own context limit (GPT-J spells it n_positions)
            context = family_for(config.get("model_type")).config(config).max_position_embeddings
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
        limits = [x for x in (max_length, context) if x]
        self.max_length = min(limits) if limits else None
        self._chat = None  # transformers tokenizer, loaded only when a chat row appears

    def encode_all(self, examples: Sequence[Example], split: str) -> list[TokenizedExample]:
        return [self.encode(example, f"{split} example {i + 1}") for i, example in enumerate(examples)]

    def encode(self, example: Example, where: str = "example") -> TokenizedExample:
        prompt, completion = (self.render_chat(example.messages, where) if example.messages is not None
                              else (example.prompt, example.completion))
        if not completion:
            raise TrainingError(f"{where}: the completion is empty")
        head = [self.bos_id, *self.tokenizer.encode(prompt)]
        ids = (*head, *self.tokenizer.encode(completion), self.eos_id)
        if self.max_length and len(ids) > self.max_length:
            raise TrainingError(f"{where} is {len(ids)} tokens long; the limit is {self.max_length}")
        return TokenizedExample(ids, len(head))

    def render_chat(self, messages: Sequence[Mapping[str, str]], where: str = "example") -> tuple[str, str]:
        """(prompt, completion) of a chat: the template up to the last message with the generation
        prompt, and the last (assistant) message's content; its end token is the EOS added after."""
        if not messages or messages[-1].get("role") != "assistant":
            raise TrainingError(f"{where}: messages must end with an assistant message")
        if any(not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str) for m in messages):
            raise TrainingError(f"{where}: every message needs a string role and content")
        if self._chat is None:  # slow to load; plain prompt/completion rows never pay it
            try:
                self._chat = load_chat_tokenizer(self.checkpoint)
            except NoChatTemplate:
                raise TrainingError("this model has no chat template, so chat examples cannot be used") from None
        prompt = self._chat.apply_chat_template([dict(m) for m in messages[:-1]], tokenize=False,
                                                add_generation_prompt=True)
        # Serving prepends BOS itself; a template that opens with the BOS text (SmolLM2's opens with
        # <|im_start|>, which is its BOS) would otherwise give it twice.
        bos_text = self.tokenizer.decode([self.bos_id]) if self.bos_id is not None else ""
        if bos_text and prompt.startswith(bos_text):
            prompt = prompt[len(bos_text):]
        return prompt, messages[-1]["content"]


def fingerprint(examples: Sequence[TokenizedExample]) -> str:
    """Identifies a tokenized data set, so a resumed run can refuse data that changed under it."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.start, ex.ids]).encode())
    return digest.hexdigest()


def bucketed_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar lengths: shuffle, sort windows of a few batches by length, cut
    into batches, shuffle the batches. Padding costs forward FLOPs on CPU, so neighbours should
    match in length; the windows keep batch composition random from epoch to epoch."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 8
    order = [i for w in range(0, len(order), window)
             for i in sorted(order[w:w + window], key=lambda i: lengths[i])]
    batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> Batch:
    """Right padding with an attention mask; positions count from 0 in every row, as in serving."""
    width = max(len(ex.ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    rows, positions, targets = [], [], []
    for row, ex in enumerate(examples):
        input_ids[row, :len(ex.ids)] = torch.tensor(ex.ids)
        attention_mask[row, :len(ex.ids)] = 1
        span = range(ex.start, len(ex.ids))
        rows += [row] * len(span)
        positions += [t - 1 for t in span]  # the hidden state at t-1 predicts token t
        targets += [ex.ids[t] for t in span]
    return Batch(input_ids, attention_mask, torch.tensor(rows), torch.tensor(positions), torch.tensor(targets))
