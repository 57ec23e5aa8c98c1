"""The AI21 spelling of tokens ("▁Paris", "<|newline|>", "<0xF0>") and its inverse for `logitBias`
keys, on the real default model's vocabulary (SmolLM2, byte-level BPE) and a toy SentencePiece-style
one (tests/conftest.py); and the J2 tokenizer's pieces and ranges."""
from __future__ import annotations

import gc
import time
import weakref
from collections import Counter

import pytest

from amber.api.ai21.j2_tokenizer import j2_tokenize
from amber.api.ai21.token_strings import TokenStrings, token_strings
from amber.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(default_checkpoint) -> Tokenizer:
    return Tokenizer.from_pretrained(default_checkpoint)


@pytest.fixture(scope="module")
def ts(tok) -> TokenStrings:
    return token_strings(tok)


def strings(tok: Tokenizer, text: str) -> list[str]:
    return [token_strings(tok).string(i) for i in tok.encode(text)]


def test_built_once_per_tokenizer_and_fast(tok, default_checkpoint):
    assert token_strings(tok) is token_strings(tok)
    other = Tokenizer.from_pretrained(default_checkpoint)
    start = time.perf_counter()
    assert token_strings(other) is not token_strings(tok)
    assert time.perf_counter() - start < 2.0
    gone = weakref.ref(other)
    del other
    gc.collect()
    assert gone() is None  # the cache does not keep a tokenizer alive


def test_token_strings(tok, ts):
    assert tok.encode(" Paris") == [7042]
    assert strings(tok, "The capital is Paris.\n") == [
        "The", "▁capital", "▁is", "▁Paris", ".", "<|newline|>"]
    assert strings(tok, "A  b") == ["A", "▁", "▁b"]
    # An emoji split across three tokens: no piece is valid UTF-8 alone.
    assert strings(tok, "😀") == ["<0xF0><0x9F>", "<0x98>", "<0x80>"]
    assert strings(tok, "x 😀") == ["x", "▁<0xF0><0x9F><0x98>", "<0x80>"]
    assert strings(tok, " 🙂") == ["▁🙂"]
    assert ts.string(2) == "<|im_end|>"


def test_token_id_inverts_string(tok, ts):
    counts = Counter(ts.string(i) for i in range(tok.vocab_size))
    unique = [i for i in range(tok.vocab_size) if counts[ts.string(i)] == 1]
    assert len(unique) >= 0.999 * tok.vocab_size
    assert all(ts.token_id(ts.string(i)) == i for i in unique)


def test_token_id_accepts_raw_vocab_spelling(ts):
    assert ts.token_id("▁Paris") == 7042
    assert ts.token_id("ĠParis") == 7042          # the model's own spelling
    assert ts.token_id("Ċ") == ts.token_id("<|newline|>") == 198
    assert ts.token_id("▁no-such-token-anywhere") is None


def test_sentencepiece_style_vocab(sp_tok):
    ts = token_strings(sp_tok)
    ids = sp_tok.encode("Paris is 😀")
    assert [ts.string(i) for i in ids] == ["▁Paris", "▁is", "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    hashes = ts.token_id("###")
    assert ts.token_id("<0xF0>") == ids[3] and hashes in sp_tok.special_ids
    # The "\n" piece and the <0x0A> byte piece both mean a newline: spellings stay distinct.
    newline = ts.token_id("\n")
    assert ts.string(newline) == "<|newline|>" and ts.string(3 + 0x0A) == "<0x0A>"
    spellings = Counter(ts.string(i) for i in range(sp_tok.vocab_size))
    assert [s for s, n in spellings.items() if n > 1] == ["<|newline|>"]
    assert ts.token_id("<|newline|>") == newline                  # the lower id wins


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
