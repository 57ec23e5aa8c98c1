"""Text <-> token ids for one model.

Owns: encode/decode, the raw bytes behind each id, character offsets of tokens, and the vocabulary
masks that penalties use to exempt whitespace, punctuation, numbers, stopwords and emojis. Wraps a
Hugging Face fast tokenizer; knows nothing of the model, sampling, HTTP or how any API spells a
token (AI21's spelling lives in amber/api/ai21/). Everything per-vocabulary is computed once, so
per-request work is list lookups.
"""
from __future__ import annotations

import copy
import json
import re
import unicodedata
from bisect import bisect_left
from collections.abc import Iterable
from functools import cached_property
from itertools import accumulate
from pathlib import Path

import tokenizers
import torch

from amber.engine.types import Category

SPACE = "▁"  # SentencePiece's word-boundary mark, a space in the text
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# NLTK's English stopword list (nltk_data corpora/stopwords/english, the classic 179 words).
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves
he him his himself she she's her hers herself it it's its itself they them their theirs themselves
what which who whom this that that'll these those am is are was were be been being have has had
having do does did doing a an the and but if or because as until while of at by for with about
against between into through during before after above below to from up down in out on off over
under again further then once here there when where why how all any both each few more most other
some such no nor not only own same so than too very s t can will just don don't should should've
now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn
hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn
shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
""".split())

# Emoji blocks, plus the joiners and selectors that glue emoji sequences together.
_EMOJI_RANGES = ((0x1F000, 0x1FAFF), (0x2600, 0x27BF), (0x2B00, 0x2BFF), (0xFE0F, 0xFE0F),
                 (0x200D, 0x200D), (0xE0020, 0xE007F), (0x1FC00, 0x1FFFF))


def _gpt2_alphabet() -> dict[int, int]:
    """GPT-2's byte-level alphabet as {code point of the stand-in char: the byte it stands for}."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: b for b in printable}
    shifted = [b for b in range(256) if b not in table]
    table.update({256 + i: b for i, b in enumerate(shifted)})
    return table


_GPT2 = _gpt2_alphabet()
_GPT2_TO_LATIN1 = {ch: chr(b) for ch, b in _GPT2.items()}  # for str.translate, then .encode("latin-1")


def char_spans(data: bytes) -> list[tuple[int, int, bool]]:
    """Byte span of each char of `data.decode(errors="replace")`; False marks a U+FFFD (Python
    replaces each maximal ill-formed subsequence with one, which is what UnicodeDecodeError spans)."""
    spans, pos = [], 0
    while pos < len(data):
        try:
            text, bad = data[pos:].decode(), None
        except UnicodeDecodeError as e:
            text, bad = data[pos:pos + e.start].decode(), (pos + e.start, pos + e.end)
        for ch in text:
            width = len(ch.encode())
            spans.append((pos, pos + width, True))
            pos += width
        if bad:
            spans.append((*bad, False))
            pos = bad[1]
    return spans


def _is_emoji(ch: str) -> bool:
    return any(lo <= ord(ch) <= hi for lo, hi in _EMOJI_RANGES)


def _is_number(s: str) -> bool:
    """Digits (Unicode N*: "7", "½", "²"), with "." or "," between two of them ("1,000", "3.14").
    Not str.isnumeric, which would count CJK ideographs such as "参" that merely have a value."""
    digit = [unicodedata.category(ch)[0] == "N" for ch in s]
    return bool(s) and all(d or (ch in ".," and 0 < i < len(s) - 1 and digit[i - 1] and digit[i + 1])
                           for i, (ch, d) in enumerate(zip(s, digit)))


def categories(data: bytes) -> list[Category]:
    """The penalty categories of a token with these bytes (special tokens are never asked)."""
    # Stray bytes of a split character decode to U+FFFD, which is no class's member: a fragment is
    # never whitespace, punctuation, a number or a stopword; it is an emoji if it carries the emoji
    # planes' lead bytes.
    text = data.decode(errors="replace")
    word = text.strip()
    found = []
    if text and text.isspace():
        found.append(Category.WHITESPACE)
    if word and all(unicodedata.category(ch)[0] in "PS" and ch != "\ufffd" and not _is_emoji(ch)
                    for ch in word):
        found.append(Category.PUNCTUATION)
    if _is_number(word):
        found.append(Category.NUMBER)
    if word.lower() in STOPWORDS:
        found.append(Category.STOPWORD)
    if any(_is_emoji(ch) for ch in text) or ("\ufffd" in text and b"\xf0\x9f" in data):
        found.append(Category.EMOJI)
    return found


class Tokenizer:
    """One model's vocabulary. Ids are the model's; nothing here adds BOS or EOS on its own."""

    def __init__(self, backend: tokenizers.Tokenizer, bos_id: int | None = None,
                 eos_ids: frozenset[int] = frozenset()):
        self._backend = backend
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        vocab = backend.get_vocab(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self.vocab_size = max(vocab.values()) + 1
        self.special_ids = frozenset(i for i, tok in added.items() if tok.special)
        contents = {i: tok.content for i, tok in added.items()}
        self._bytes, byte_pieces = _vocab_bytes(vocab, contents, self.vocab_size)
        self.byte_fallback_ids = frozenset(byte_pieces)  # SentencePiece's "<0xNN>" pieces
        self._pieces = vocab

    @classmethod
    def from_pretrained(cls, directory: Path) -> Tokenizer:
        """Load tokenizer.json (or let transformers convert what else is there) plus the BOS/EOS
        tokens named in tokenizer_config.json and the EOS ids in config.json/generation_config.json."""
        directory = Path(directory)
        if (directory / "tokenizer.json").exists():
            backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        else:  # a SentencePiece-only checkpoint; slow, so only when needed
            from transformers import AutoTokenizer
            backend = AutoTokenizer.from_pretrained(directory).backend_tokenizer
        configs = [_read_json(directory / name) for name in
                   ("tokenizer_config.json", "config.json", "generation_config.json")]
        bos = _token_id(backend, configs[0].get("bos_token"))
        eos = {_token_id(backend, configs[0].get("eos_token"))}
        for config in configs[1:]:
            value = config.get("eos_token_id")
            eos.update(value if isinstance(value, list) else [value])
            bos = config.get("bos_token_id") if bos is None else bos
        return cls(backend, bos, frozenset(i for i in eos if i is not None))

    def with_eos(self, tokens: Iterable[str]) -> Tokenizer:
        """This vocabulary with `tokens` (those it has) also ending generation, such as a model
        family's end-of-turn token that the checkpoint's own files do not list as an EOS."""
        ids = {self._pieces[t] for t in tokens if t in self._pieces}
        if ids <= self.eos_ids:
            return self
        extended = copy.copy(self)
        extended.eos_ids = self.eos_ids | ids
        return extended

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def count_tokens(self, texts: list[str]) -> list[int]:
        """len(encode(t)) for each; the backend runs without the GIL, so other threads keep running."""
        return [len(e) for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def decode(self, ids: list[int]) -> str:
        return b"".join(self._bytes[i] for i in ids).decode(errors="replace")

    def pieces(self) -> dict[str, int]:
        """The vocabulary as the model spells it ("ĠParis", "Ċ"): piece -> id, added tokens included."""
        return self._pieces

    def offsets(self, ids: list[int]) -> list[tuple[int, int]]:
        """Character range of each token in decode(ids); a character belongs to the token holding
        its last byte, so the earlier pieces of a split emoji get empty ranges."""
        ends = list(accumulate(len(self._bytes[i]) for i in ids))
        last_bytes = [end - 1 for _, end, _ in char_spans(b"".join(self._bytes[i] for i in ids))]
        ranges, start = [], 0
        for end in ends:
            stop = bisect_left(last_bytes, end)
            ranges.append((start, stop))
            start = stop
        return ranges

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` and each one's character range in `text` itself."""
        encoding = self._backend.encode(text, add_special_tokens=False)
        if self.decode(encoding.ids) == text:
            return encoding.ids, self.offsets(encoding.ids)
        # Normalisation or a dummy prefix changed the text: trust the backend's own alignment.
        return encoding.ids, [tuple(o) for o in encoding.offsets]

    def category_masks(self) -> torch.Tensor:
        """(len(Category), vocab_size) bool; row c marks the ids in category c. Cached."""
        return self._masks

    @cached_property
    def _masks(self) -> torch.Tensor:
        rows = [[False] * self.vocab_size for _ in Category]
        for i, data in enumerate(self._bytes):
            for category in () if i in self.special_ids else categories(data):
                rows[category][i] = True
        return torch.tensor(rows, dtype=torch.bool)


def _vocab_bytes(vocab: dict[str, int], added: dict[int, str],
                 size: int) -> tuple[list[bytes], set[int]]:
    """Raw bytes of every id, and the ids of SentencePiece byte-fallback pieces ("<0xF0>").
    The vocabulary's own alphabet says whether it is byte-level (GPT-2 style) or SentencePiece."""
    pieces = {i: p for p, i in vocab.items() if i not in added}
    table, byte_pieces = [b""] * size, set()
    if set("".join(pieces.values())) <= {chr(c) for c in _GPT2}:
        for i, piece in pieces.items():
            table[i] = piece.translate(_GPT2_TO_LATIN1).encode("latin-1")
    else:
        for i, piece in pieces.items():
            if byte := _BYTE_PIECE.fullmatch(piece):
                table[i] = bytes([int(byte[1], 16)])
                byte_pieces.add(i)
            else:
                table[i] = piece.replace(SPACE, " ").encode()
    for i, content in added.items():
        table[i] = content.encode()
    return table, byte_pieces


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_id(backend: tokenizers.Tokenizer, token: str | dict | None) -> int | None:
    """tokenizer_config.json names a token as a string or as {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return backend.token_to_id(token) if token else None
