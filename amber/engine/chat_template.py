"""A model's chat template: messages -> prompt token ids, rendered by transformers'
`apply_chat_template` on the checkpoint's own tokenizer files, so a conversation reads exactly as
the model was trained to read it.

Owns loading that tokenizer (once, lazily: it costs a few seconds that a server serving only the
J2 API never pays) and the one rendering call. Knows nothing of HTTP or of any API's message shape:
messages arrive as `{"role", "content"}` dicts with string content.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path


class NoChatTemplate(Exception):
    """The model's checkpoint has no chat template, so it cannot be chatted with."""


class ChatTemplate:
    def __init__(self, checkpoint: Path, bos_id: int | None):
        self.checkpoint = Path(checkpoint)
        self.bos_id = bos_id
        self._tokenizer = None
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        """Whether the checkpoint has a template, without loading anything."""
        if (self.checkpoint / "chat_template.jinja").exists() or (self.checkpoint / "chat_template.json").exists():
            return True
        config = self.checkpoint / "tokenizer_config.json"
        return config.exists() and bool(json.loads(config.read_text()).get("chat_template"))

    def load(self) -> None:
        """Load the tokenizer now (idempotent; a server warms this after the model loads)."""
        with self._lock:
            if self._tokenizer is None:
                if not self.available:
                    raise NoChatTemplate(f"{self.checkpoint} has no chat template")
                from transformers import AutoTokenizer  # seconds to import: only for chat
                self._tokenizer = AutoTokenizer.from_pretrained(self.checkpoint, local_files_only=True)

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids for the assistant's next message, without a leading BOS (the engine puts its
        own BOS before every prompt, so a template that starts with one would get two).

        Control tokens written inside a message (`<|im_end|>` in user text) are encoded as plain
        text, so a message cannot end its turn or forge another role's."""
        self.load()
        ids = self._tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                  sanitize_control_tokens=True, return_dict=False)
        return ids[1:] if ids and ids[0] == self.bos_id else list(ids)
