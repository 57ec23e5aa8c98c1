"""Tokenizer: round trips, token bytes, offsets and category masks. Uses the real default model's
vocabulary (SmolLM2, byte-level BPE) plus a toy SentencePiece-style vocabulary (tests/conftest.py).
How the AI21 API spells tokens is tests/api/test_ai21_token_strings.py's."""
from __future__ import annotations

import json
import shutil
import time

import pytest

from amber.engine.tokenizer import STOPWORDS, Tokenizer, categories
from amber.engine.types import Category

TEXTS = [
    "Hello, world!",
    "The capital of France is Paris.\n\nIt has 2,148,000 people (3.14%).",
    "emoji 😀 🫠 👍🏽 ❤️ 🇫🇷 done",
    "中文字符测试 龘 日本語のテキスト",
    "tabs\tand   multiple    spaces \n  indented\r\nline",
    "Ünïcödé — “quotes” … ½ ² ₂",
    "",
]


@pytest.fixture(scope="module")
def tok(default_checkpoint) -> Tokenizer:
    return Tokenizer.from_pretrained(default_checkpoint)


def one_id(tok: Tokenizer, text: str) -> int:
    (token_id,) = tok.encode(text)
    return token_id


def test_construction_is_fast_and_reads_special_ids(default_checkpoint):
    start = time.perf_counter()
    tok = Tokenizer.from_pretrained(default_checkpoint)
    assert time.perf_counter() - start < 2.0
    assert tok.vocab_size == 49152
    assert tok.bos_id == 1 and tok.eos_ids == {2}
    assert {0, 1, 2} <= tok.special_ids and 7042 not in tok.special_ids


def test_eos_ids_include_config_list(default_checkpoint, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_checkpoint / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    assert Tokenizer.from_pretrained(tmp_path).eos_ids == {0, 2}


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()


def test_special_tokens_encode_from_literal_text(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.token_bytes(1) == b"<|im_start|>" and tok.token_bytes(2) == b"<|im_end|>"
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert 1 not in tok.encode("im_start user")


def test_pieces_are_the_models_own_spelling(tok):
    assert tok.pieces()["ĠParis"] == 7042 and tok.pieces()["Ċ"] == 198
    assert tok.pieces()["<|im_end|>"] == 2 and tok.byte_fallback_ids == frozenset()


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_cover_text(tok, text):
    ids, ranges = tok.encode_with_offsets(text)
    assert ids == tok.encode(text) and len(ranges) == len(ids)
    assert ranges == tok.offsets(ids)
    ends = [0] + [end for _, end in ranges]
    assert [start for start, _ in ranges] == ends[:-1]      # contiguous, no overlap, no gap
    assert ends[-1] == len(text) and all(s <= e for s, e in ranges)


def test_split_character_belongs_to_completing_token(tok):
    text = "a 😀 b"
    ids, ranges = tok.encode_with_offsets(text)
    assert [tok.token_bytes(i) for i in ids] == [b"a", b" \xf0\x9f\x98", b"\x80", b" b"]
    assert ranges == [(0, 1), (1, 2), (2, 3), (3, 5)]
    assert [text[s:e] for s, e in ranges] == ["a", " ", "😀", " b"]


def test_invalid_bytes_map_to_their_replacement_char(tok):
    lead = tok.encode("😀")[0]                               # b"\xf0\x9f", never completed
    ids = [lead, tok.encode("x")[0], lead]
    assert tok.decode(ids) == "\ufffdx\ufffd"
    assert tok.offsets(ids) == [(0, 1), (1, 2), (2, 3)]


def test_category_examples(tok):
    masks = tok.category_masks()
    assert masks.shape == (len(Category), tok.vocab_size) and tok.category_masks() is masks

    def cats(token_id: int) -> set[Category]:
        return {c for c in Category if masks[c, token_id]}

    one = {s: one_id(tok, s) for s in [",", " the", " ", "\n", " (", " 🙂", " Paris", "Paris", " The", " world"]}
    assert cats(one[","]) == cats(one[" ("]) == {Category.PUNCTUATION}
    assert cats(one[" the"]) == cats(one[" The"]) == {Category.STOPWORD}
    assert cats(one[" "]) == cats(one["\n"]) == {Category.WHITESPACE}
    assert cats(one[" 🙂"]) == {Category.EMOJI}
    assert cats(one[" Paris"]) == cats(one["Paris"]) == cats(one[" world"]) == set()
    assert all(cats(i) == {Category.NUMBER} for i in tok.encode(" 123")[1:])
    assert cats(tok.encode("😀")[0]) == {Category.EMOJI}          # b"\xf0\x9f" fragment
    assert cats(tok.encode("😀")[1]) == set()                     # a bare continuation byte
    assert not masks[:, sorted(tok.special_ids)].any()


def test_categories_of_bytes():
    assert categories(b" 1,000") == categories(b"3.14") == categories("½".encode()) == [Category.NUMBER]
    assert categories(b"1,") == [] and categories("参".encode()) == []
    assert categories(b"\n  ") == [Category.WHITESPACE] and categories(b"") == []
    assert categories(" —".encode()) == categories(b"+=") == [Category.PUNCTUATION]
    assert categories("✅".encode()) == categories(b" \xf0\x9f\x98") == [Category.EMOJI]
    assert categories(b" Isn't") == [Category.STOPWORD]
    assert len(STOPWORDS) == 179


def test_sentencepiece_style_vocab(sp_tok):
    ids = sp_tok.encode("Paris is 😀")
    assert [sp_tok.token_bytes(i) for i in ids] == [b" Paris", b" is", b" ", b"\xf0", b"\x9f", b"\x98", b"\x80"]
    assert sp_tok.decode(ids) == " Paris is 😀"                  # the dummy prefix stays
    hashes = sp_tok.pieces()["###"]
    assert sp_tok.pieces()["<0xF0>"] == ids[3] and sp_tok.special_ids == {1, 2, hashes}
    assert sp_tok.byte_fallback_ids == frozenset(range(3, 3 + 256))
    # Special tokens are in no category, even one spelled in punctuation only.
    assert categories(b"###") == [Category.PUNCTUATION] and not sp_tok.category_masks()[:, hashes].any()
    # The "\n" piece and the <0x0A> byte piece both mean a newline.
    newline, a = sp_tok.pieces()["\n"], sp_tok.pieces()["a"]
    assert sp_tok.token_bytes(newline) == sp_tok.token_bytes(3 + 0x0A) == b"\n"
    assert sp_tok.token_bytes(a) == b"a"


def test_sentencepiece_offsets_fall_back_to_backend(sp_tok):
    # decode adds the dummy-prefix space, so ranges come from the backend, indexing the input.
    ids, ranges = sp_tok.encode_with_offsets("Paris is 😀")
    assert ranges[:3] == [(0, 5), (5, 8), (8, 9)] and set(ranges[3:]) == {(9, 10)}
    assert sp_tok.offsets(ids)[3:] == [(10, 10), (10, 10), (10, 10), (10, 11)]
