"""A model's chat template: messages -> prompt token ids, rendered by transformers'
`apply_chat_template` on the checkpoint's own tokenizer files, so a conversation reads exactly as
the model was trained to read it. A checkpoint without a template (a GGUF conversion of a model
whose GGUF carries none) gets its model family's (models/, `chat_template`), when it has one.

Owns loading that tokenizer (once, lazily: it costs a few seconds that a server serving only the
J2 API never pays) and the one rendering call. Knows nothing of HTTP or of any API's message shape:
messages arrive as `{"role", "content"}` dicts with string content.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

from amber.engine.models import FAMILIES


class NoChatTemplate(Exception):
    """The model's checkpoint has no chat template, so it cannot be chatted with."""


def family_template(checkpoint: Path) -> str | None:
    """The chat template of the checkpoint's model family, for checkpoints that carry none."""
    config = Path(checkpoint) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.exists() else None
    return FAMILIES[model_type].chat_template if model_type in FAMILIES else None


def load_chat_tokenizer(checkpoint: Path):
    """transformers' tokenizer of `checkpoint` with a chat template: the checkpoint's own, else its
    family's; NoChatTemplate when there is neither. Seconds to import and load: only for chat."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    tokenizer.chat_template = tokenizer.chat_template or family_template(checkpoint)
    if not tokenizer.chat_template:
        raise NoChatTemplate(f"{checkpoint} has no chat template")
    return tokenizer


class ChatTemplate:
    def __init__(self, checkpoint: Path, bos_id: int | None):
        self.checkpoint = Path(checkpoint)
        self.bos_id = bos_id
        self._tokenizer = None
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        """Whether the checkpoint, or its family, has a template, without loading anything."""
        if (self.checkpoint / "chat_template.jinja").exists() or (self.checkpoint / "chat_template.json").exists():
            return True
        config = self.checkpoint / "tokenizer_config.json"
        if config.exists() and json.loads(config.read_text()).get("chat_template"):
            return True
        return family_template(self.checkpoint) is not None

    def load(self) -> None:
        """Load the tokenizer now (idempotent; a server warms this after the model loads)."""
        with self._lock:
            if self._tokenizer is None:
                if not self.available:
                    raise NoChatTemplate(f"{self.checkpoint} has no chat template")
                self._tokenizer = load_chat_tokenizer(self.checkpoint)

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids for the assistant's next message, without a leading BOS (the engine puts its
        own BOS before every prompt, so a template that starts with one would get two).

        Control tokens written inside a message (`<|im_end|>` in user text) are encoded as plain
        text, so a message cannot end its turn or forge another role's."""
        self.load()
        ids = self._tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                  sanitize_control_tokens=True, return_dict=False)
        return ids[1:] if ids and ids[0] == self.bos_id else list(ids)
