"""Tokenizer: round trips, AI21 token strings and their inverse, offsets, category masks, and the
J2 tokenizer's ranges. Uses the real default model's vocabulary (SmolLM2, byte-level BPE) plus a toy
SentencePiece-style vocabulary built in place."""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers

from amber.engine.j2_tokenizer import j2_tokenize
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


def strings(tok: Tokenizer, text: str) -> list[str]:
    return [tok.token_string(i) for i in tok.encode(text)]


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
    assert tok.token_bytes(1) == b"<|im_start|>" and tok.token_string(2) == "<|im_end|>"
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert 1 not in tok.encode("im_start user")


def test_token_strings(tok):
    assert tok.encode(" Paris") == [7042]
    assert strings(tok, "The capital is Paris.\n") == [
        "The", "▁capital", "▁is", "▁Paris", ".", "<|newline|>"]
    assert strings(tok, "A  b") == ["A", "▁", "▁b"]
    # An emoji split across three tokens: no piece is valid UTF-8 alone.
    assert strings(tok, "😀") == ["<0xF0><0x9F>", "<0x98>", "<0x80>"]
    assert strings(tok, "x 😀") == ["x", "▁<0xF0><0x9F><0x98>", "<0x80>"]
    assert strings(tok, " 🙂") == ["▁🙂"]


def test_id_for_string_inverts_token_string(tok):
    counts = Counter(tok.token_string(i) for i in range(tok.vocab_size))
    unique = [i for i in range(tok.vocab_size) if counts[tok.token_string(i)] == 1]
    assert len(unique) >= 0.999 * tok.vocab_size
    assert all(tok.id_for_string(tok.token_string(i)) == i for i in unique)


def test_id_for_string_accepts_raw_vocab_spelling(tok):
    assert tok.id_for_string("▁Paris") == 7042
    assert tok.id_for_string("ĠParis") == 7042          # the model's own spelling
    assert tok.id_for_string("Ċ") == tok.id_for_string("<|newline|>") == 198
    assert tok.id_for_string("▁no-such-token-anywhere") is None


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
    assert [tok.token_string(i) for i in ids] == ["a", "▁<0xF0><0x9F><0x98>", "<0x80>", "▁b"]
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

    one = {s: tok.id_for_string(s) for s in [",", "▁the", "▁", "<|newline|>", "▁(", "▁🙂", "▁Paris",
                                               "Paris", "▁The", "▁world"]}
    assert cats(one[","]) == cats(one["▁("]) == {Category.PUNCTUATION}
    assert cats(one["▁the"]) == cats(one["▁The"]) == {Category.STOPWORD}
    assert cats(one["▁"]) == cats(one["<|newline|>"]) == {Category.WHITESPACE}
    assert cats(one["▁🙂"]) == {Category.EMOJI}
    assert cats(one["▁Paris"]) == cats(one["Paris"]) == cats(one["▁world"]) == set()
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


@pytest.fixture(scope="module")
def sp_tok() -> Tokenizer:
    """A SentencePiece-style vocabulary (▁ for spaces, <0xNN> byte fallback, dummy prefix)."""
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(f"<0x{b:02X}>", -10.0) for b in range(256)]
    vocab += [("▁", -2.0), ("▁Paris", -1.0), ("▁is", -1.0), ("\n", -1.0), ("a", -3.0), ("▁a", -2.5),
              ("<|newline|>", -5.0)]  # literal text that clashes with the spelling of "\n"
    backend = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in ("<s>", "</s>", "###")])
    return Tokenizer(backend, bos_id=1, eos_ids=frozenset({2}))


def test_sentencepiece_style_vocab(sp_tok):
    ids = sp_tok.encode("Paris is 😀")
    assert [sp_tok.token_string(i) for i in ids] == [
        "▁Paris", "▁is", "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert sp_tok.token_bytes(ids[0]) == b" Paris" and sp_tok.token_bytes(ids[3]) == b"\xf0"
    assert sp_tok.decode(ids) == " Paris is 😀"                  # the dummy prefix stays
    hashes = sp_tok.id_for_string("###")
    assert sp_tok.id_for_string("<0xF0>") == ids[3] and sp_tok.special_ids == {1, 2, hashes}
    # Special tokens are in no category, even one spelled in punctuation only.
    assert categories(b"###") == [Category.PUNCTUATION] and not sp_tok.category_masks()[:, hashes].any()
    # The "\n" piece and the <0x0A> byte piece both mean a newline: spellings stay distinct.
    newline, a = sp_tok.id_for_string("\n"), sp_tok.id_for_string("a")
    assert sp_tok.token_string(newline) == "<|newline|>" and sp_tok.token_string(3 + 0x0A) == "<0x0A>"
    assert sp_tok.token_bytes(a) == b"a"
    spellings = Counter(sp_tok.token_string(i) for i in range(sp_tok.vocab_size))
    assert [s for s, n in spellings.items() if n > 1] == ["<|newline|>"]
    assert sp_tok.id_for_string("<|newline|>") == newline                  # the lower id wins


def test_sentencepiece_offsets_fall_back_to_backend(sp_tok):
    # decode adds the dummy-prefix space, so ranges come from the backend, indexing the input.
    ids, ranges = sp_tok.encode_with_offsets("Paris is 😀")
    assert ranges[:3] == [(0, 5), (5, 8), (8, 9)] and set(ranges[3:]) == {(9, 10)}
    assert sp_tok.offsets(ids)[3:] == [(10, 10), (10, 10), (10, 10), (10, 11)]


J2_TEXT = "Barack Obama was president.\nHello  world"


def test_j2_tokenize():
    tokens = j2_tokenize(J2_TEXT)
    assert tokens == [
        ("▁Barack▁Obama", (0, 12)), ("▁was", (12, 16)), ("▁president", (16, 26)), (".", (26, 27)),
        ("<|newline|>", (27, 28)), ("▁Hello", (28, 33)), ("▁", (33, 34)), ("▁world", (34, 40))]
    assert [J2_TEXT[s:e] for _, (s, e) in tokens] == [
        "Barack Obama", " was", " president", ".", "\n", "Hello", " ", " world"]


def test_j2_ranges_follow_the_input_through_normalisation():
    text = " ﬁne\t🫠"        # leading space, NFKC ligature, tab, byte-fallback emoji
    tokens = j2_tokenize(text)
    assert [piece for piece, _ in tokens] == [
        "▁", "▁fine", "▁", "<0xF0>", "<0x9F>", "<0xAB>", "<0xA0>"]
    assert [text[s:e] for _, (s, e) in tokens] == ["", " ﬁne", "\t", "", "", "", "🫠"]
