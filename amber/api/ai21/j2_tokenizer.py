"""AI21's own J2 tokenizer (SentencePiece, 262,144 pieces, from the `ai21-tokenizer` package), for
the tokenize endpoint's `"tokenizer": "j2"`. No J2 model runs here: this only splits text as J2 did.

Owns the character ranges, which the package gets wrong for our purpose: its offsets index its own
decoded text, which differs from the input once SentencePiece normalises (NFKC, tabs, "\\r") or falls
back to bytes. We map every piece back onto the input through SentencePiece's normaliser instead.
"""
from __future__ import annotations

from bisect import bisect_right
from functools import cache
from itertools import accumulate

from ai21_tokenizer import PreTrainedTokenizers
from ai21_tokenizer import Tokenizer as TokenizerFactory
from ai21_tokenizer.jurassic_tokenizer import JurassicTokenizer

from amber.api.ai21.token_strings import NEWLINE


@cache
def _j2() -> JurassicTokenizer:
    """Loaded on first use (about 0.7 s); works offline from the model bundled in the package."""
    return TokenizerFactory.get_tokenizer(PreTrainedTokenizers.J2_TOKENIZER)


def j2_tokenize(text: str) -> list[tuple[str, tuple[int, int]]]:
    """J2's pieces for `text` ("▁Barack▁Obama", "<|newline|>") with each one's range in `text`.

    J2 encodes line by line, joined by one newline piece, and gives each line a dummy leading
    space that is nobody's text: a line's first piece starts where the line does.
    """
    j2 = _j2()
    groups = _split_lines(j2.convert_ids_to_tokens(j2.encode(text)))
    lines = text.split("\n")
    assert len(groups) == len(lines), (len(groups), len(lines))
    result, start = [], 0
    for i, (line, pieces) in enumerate(zip(lines, groups)):
        if i:
            result.append((NEWLINE, (start - 1, start)))
        result += _line_ranges(j2, line, start, pieces)
        start += len(line) + 1
    return result


def _split_lines(pieces: list[str]) -> list[list[str]]:
    groups = [[]]
    for piece in pieces:
        if piece == NEWLINE:
            groups.append([])
        else:
            groups[-1].append(piece)
    return groups


def _line_ranges(j2: JurassicTokenizer, line: str, offset: int,
                 pieces: list[str]) -> list[tuple[str, tuple[int, int]]]:
    """Ranges of one line's pieces. J2 encoded " " + line with tabs as spaces; the normaliser says
    which input char each normalised char came from. A byte piece's char belongs to the piece that
    completes it, so earlier bytes of a split character get empty ranges."""
    # The package exposes no normaliser; its SentencePiece processor is the one that encoded.
    normal, origin = j2._sp.Normalize(" " + line.replace("\t", " "), with_offsets=True)
    char_ends = list(accumulate(len(ch.encode()) for ch in normal))  # in bytes, as pieces count
    result, done, start = [], 0, offset
    for piece in pieces:
        done += _piece_bytes(piece)
        chars = bisect_right(char_ends, done)  # normalised chars completed so far
        end = max(offset + origin[chars] - 1, start)  # -1: the dummy space is not in `line`
        result.append((piece, (start, end)))
        start = end
    return result


def _piece_bytes(piece: str) -> int:
    """Bytes a piece covers of the normalised line: "<0xNN>" one, any other its UTF-8 length
    (the normaliser writes spaces as "▁", as the pieces do)."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return 1
    return len(piece.encode())
