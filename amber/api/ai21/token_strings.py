"""AI21's spelling of tokens, for any model's vocabulary: SentencePiece pieces as J2 wrote them
("▁Paris", "<|newline|>", "<0xF0>") in `tokens`, `topTokens` and /tokenize, and the way back from
a `logitBias` key to an id.

The engine's tokenizer knows each id's bytes; this turns them into strings and back. Built once per
tokenizer (one pass over its vocabulary, on first use), so a request's work is lookups.
"""
from __future__ import annotations

import weakref

from amber.engine.tokenizer import Tokenizer, char_spans

NEWLINE = "<|newline|>"
SPACE = "▁"


def spelling(data: bytes) -> str:
    """SentencePiece spelling: valid text as is, stray bytes as <0xNN>, then ▁ and <|newline|>."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        text = "".join(data[a:b].decode() if ok else "".join(f"<0x{x:02X}>" for x in data[a:b])
                       for a, b, ok in char_spans(data))
    return text.replace(" ", SPACE).replace("\n", NEWLINE)


class TokenStrings:
    """One vocabulary's AI21 spellings. Holds no reference to its tokenizer (see `token_strings`)."""

    def __init__(self, tokenizer: Tokenizer):
        special, byte_pieces = tokenizer.special_ids, tokenizer.byte_fallback_ids
        data = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        # A byte-fallback piece keeps its <0xNN> spelling even where the byte is valid text
        # ("<0x41>" beside "A"): that is how SentencePiece writes it, and it keeps spellings unique.
        self._strings = [b.decode() if i in special else f"<0x{b[0]:02X}>" if i in byte_pieces else spelling(b)
                         for i, b in enumerate(data)]
        # Our spelling first, the model's own ("ĠParis") where ours has no such string; the lowest
        # id wins a (rare) clash, so the inverse is a function.
        self._ids = dict(tokenizer.pieces())
        self._ids.update({s: i for i, s in reversed(list(enumerate(self._strings))) if s})

    def string(self, token_id: int) -> str:
        return self._strings[token_id]

    def token_id(self, s: str) -> int | None:
        """The id a `logitBias` key names, in AI21's spelling or the model's own; None if none."""
        return self._ids.get(s)


_built: weakref.WeakKeyDictionary[Tokenizer, TokenStrings] = weakref.WeakKeyDictionary()


def token_strings(tokenizer: Tokenizer) -> TokenStrings:
    """`tokenizer`'s spellings, built on first use and kept while the tokenizer lives."""
    found = _built.get(tokenizer)
    if found is None:
        found = _built[tokenizer] = TokenStrings(tokenizer)
    return found
