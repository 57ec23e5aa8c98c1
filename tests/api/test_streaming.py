"""Text deltas of a streamed sample, with the real tokenizer: whole characters only, nothing a stop
sequence may still cut, and at the finish exactly the engine's final text."""
from __future__ import annotations

import pytest

from amber.api.streaming import TextStream
from amber.engine.stops import settled_length
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import CompletionOutput, FinishKind, FinishReason, TokenLogprob
from tests.api.sse import is_whole_utf8


@pytest.fixture(scope="module")
def tok(default_checkpoint) -> Tokenizer:
    return Tokenizer.from_pretrained(default_checkpoint)


def tokens(tok: Tokenizer, text: str) -> list[TokenLogprob]:
    return [TokenLogprob(i, -1.0, -1.0) for i in tok.encode(text)]


def stream(tok: Tokenizer, text: str, stops: tuple[str, ...] = ()) -> tuple[TextStream, list[str]]:
    s, deltas = TextStream(tok, stops), []
    for t in tokens(tok, text):
        s.push(t)
        delta, _ = s.take()
        deltas.append(delta)
    return s, deltas


def test_deltas_never_split_a_character(tok):
    text = "Sea 🌊🐚 and 海 — naïve café 👩‍👩‍👧"
    ids = tok.encode(text)
    assert len(ids) > len(text.split()) + 6, "the text should hold characters split across tokens"
    assert any(not is_whole_utf8(tok.token_bytes(i)) for i in ids)
    _, deltas = stream(tok, text)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some tokens ended mid-character and had to wait


def test_text_a_stop_sequence_may_cut_is_held_back(tok):
    stops = ("\n\nQ:", "END")
    s, deltas = stream(tok, "Paris is the capital.\n\nQ", stops)
    sent = "".join(deltas)
    assert sent == "Paris is the capital."  # "\n\nQ" may still become "\n\nQ:"
    cut = CompletionOutput(0, tokens(tok, "Paris is the capital.\n\nQ:"), "Paris is the capital.",
                           FinishReason(FinishKind.STOP, sequence="\n\nQ:"))
    rest, _ = s.finish(cut)
    assert rest == "" and sent + rest == cut.text


def test_held_back_text_is_released_once_it_cannot_become_a_stop(tok):
    _, deltas = stream(tok, "We meet at the ENTRANCE today", ("END",))
    assert "".join(deltas) == "We meet at the ENTRANCE today"


def test_tokens_travel_with_their_text_and_the_finish_hands_over_the_rest(tok):
    s = TextStream(tok, ("##",))
    handed: list[TokenLogprob] = []
    for t in tokens(tok, "one two #"):
        s.push(t)
        handed += s.take()[1]
    final = CompletionOutput(0, tokens(tok, "one two #"), "one two #", FinishReason(FinishKind.LENGTH, length=4))
    text, rest = s.finish(final)
    assert text == "#"  # held back until the finish: it might have become "##"
    assert handed + rest == final.tokens


@pytest.mark.parametrize("text,stops,start,expected", [
    ("abc", ("x",), 0, 3),
    ("abc##", ("##",), 0, 3),        # a whole stop sequence
    ("abc#", ("##",), 0, 3),         # the start of one
    ("abc##x", ("##",), 2, 3),
    ("abcE", ("END", "EX"), 0, 3),
    ("abcEN", ("END",), 0, 3),
    ("abcENX", ("END",), 0, 6),
    ("", ("END",), 0, 0),
])
def test_settled_length(text, stops, start, expected):
    assert settled_length(text, stops, start) == expected
