"""Dataset uploads for custom-model training: a CSV, TSV or JSONL file in, checked rows with a
train/validation split out.

Owns AI21 Studio's upload rules: which columns are prompt and completion, chat rows, empty and
duplicate rows, one prompt/completion separator for every row, rows over the model's length, a
minimum size, and a split that the same file always gets. Knows nothing of HTTP, the store or a
tokenizer: the caller passes `count_tokens` (token counts of a list of texts, asked for in batches
so that a tokenizer can count them without holding the GIL) and `max_tokens`, and answers a
DatasetError with a 422 on its `field`.

Row numbers, in messages and in the report, are 1-based data rows as a user counts them: the line
number in JSONL; in CSV/TSV the record after the header (the header is not a row, and a quoted field
that spans lines still makes one row).

Memory stays bounded by the row cap, not the file: the file is read twice, never whole (once in
chunks for its digest, UTF-8 check and kind; once a line at a time for its rows), and reading stops
at the first row past `max_rows` (blank rows count, so a file of empty lines stops there too).
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import BinaryIO, Callable, Literal

ROLES = ("system", "user", "assistant")
SELECTED_FORMS = '{"prompt": "<column>", "completion": "<column>"} or "<prompt column>,<completion column>"'
Records = list[tuple[int, dict | None]]  # (row number, the row's fields, or None for a blank line)
MAX_ROWS = 100_000  # rows one upload may hold (README "Limits")
_CHUNK = 1 << 20
_TOKEN_BATCH = 1024  # texts per count_tokens call


class DatasetError(Exception):
    """A problem the uploader must fix; `field` is the form field to look at."""

    def __init__(self, field: str, message: str, rows: list[int] | tuple[int, ...] = ()):
        super().__init__(message)
        self.field, self.message, self.rows = field, message, list(rows)  # rows: every one at fault


@dataclass(frozen=True)
class Row:
    index: int  # 1-based row number in the uploaded file
    prompt: str  # "" for chat rows
    completion: str  # "" for chat rows
    messages: tuple[dict[str, str], ...] | None = None  # chat rows only: {"role", "content"} dicts
    split: Literal["train", "validation"] = "train"


@dataclass(frozen=True)
class Report:
    """Row numbers of what parsing dropped or changed."""
    duplicates: list[int]
    empty_rows: list[int]
    whitespace_corrected: list[int]
    deleted_long_rows: list[int]


@dataclass(frozen=True)
class ParsedDataset:
    rows: list[Row]  # in file order
    format: Literal["prompt_completion", "chat"]
    report: Report
    kind: Literal["jsonl", "csv", "tsv"] = "jsonl"  # how the file was read

    @property
    def train(self) -> list[Row]:
        return [r for r in self.rows if r.split == "train"]

    @property
    def validation(self) -> list[Row]:
        return [r for r in self.rows if r.split == "validation"]


@dataclass(frozen=True)
class _Scan:
    """What one pass over the file's bytes tells before any row is read."""
    digest: bytes  # sha256 of the file, which seeds the split
    first_char: str  # the first non-whitespace character; "" for a blank file
    header: str  # the first line


def parse_dataset(source: BinaryIO | bytes, filename: str, *, selected_columns: str | None = None,
                  approve_whitespace_correction: bool = False, delete_long_rows: bool = False,
                  split_ratio: float = 0.1, count_tokens: Callable[[list[str]], list[int]], max_tokens: int,
                  min_examples: int = 50, max_rows: int = MAX_ROWS) -> ParsedDataset:
    """Read, check and split an upload; raise DatasetError on anything the user must fix.

    `source` is a seekable binary file (read from the start, left open) or the bytes themselves.
    Empty rows are skipped, the separator checked (and corrected when approved), duplicates dropped
    (compared after correction), long rows rejected or deleted, the size checked, the rest split.
    `selected_columns` "" or None means the `prompt` and `completion` columns."""
    if not 0 <= split_ratio <= 0.5:  # also rejects NaN
        raise DatasetError("split_ratio", f"split_ratio must be between 0 and 0.5, got {split_ratio}")
    source = io.BytesIO(source) if isinstance(source, bytes) else source
    source.seek(0)
    scan = _scan(source)
    kind = _kind(scan, filename)
    source.seek(0)
    read = _read_jsonl if kind == "jsonl" else lambda f, cap: _read_delimited(f, kind, cap)
    columns, records = read(source, max_rows)
    selected = (selected_columns or "").strip()
    if kind == "jsonl" and _is_chat(records):
        if selected:
            raise DatasetError("selected_columns", "this file holds chat messages; selected_columns is "
                                                   "for prompt/completion files")
        fmt, (rows, empty) = "chat", _chat_rows(records)
    else:
        fmt, (rows, empty) = "prompt_completion", _prompt_completion_rows(records, _columns(selected, columns))
    rows, corrected = _fix_whitespace(rows, approve_whitespace_correction)
    rows, duplicates = _drop_duplicates(rows)
    rows, long_rows = _drop_long(rows, count_tokens, max_tokens, delete_long_rows)
    report = Report(duplicates, empty, corrected, long_rows)
    if len(rows) < min_examples:
        removed = [_count(len(rs), noun) for rs, noun in
                   ((duplicates, "duplicate"), (empty, "empty row"), (long_rows, "long row")) if rs]
        after = f" after removing {', '.join(removed)}" if removed else ""
        raise DatasetError("dataset_file", f"{_count(len(rows), 'example')}{after}; "
                                           f"at least {min_examples} are needed")
    return ParsedDataset(_split(rows, split_ratio, scan.digest), fmt, report, kind)


def _scan(source: BinaryIO) -> _Scan:
    """One pass in chunks: the digest, a UTF-8 check that names the byte, and what `_kind` reads."""
    digest, decoder = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")()
    offset, first_char, header, header_done, started = 0, "", [], False, False
    while True:
        chunk = source.read(_CHUNK)
        pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            raise DatasetError("dataset_file", f"the file is not UTF-8 text (bad byte at offset "
                                               f"{offset - pending + e.start})") from None
        if text and not started:
            text, started = text.removeprefix("\ufeff"), True  # a BOM is no text
        if not first_char and text.strip():
            first_char = text.lstrip()[0]
        if not header_done:
            line, newline, _ = text.partition("\n")
            header.append(line)
            header_done = bool(newline)
        digest.update(chunk)
        offset += len(chunk)
        if not chunk:
            break
    if not first_char:
        raise DatasetError("dataset_file", "the file is empty")
    return _Scan(digest.digest(), first_char, "".join(header))


def _kind(scan: _Scan, filename: str) -> str:
    """'jsonl', 'csv' or 'tsv'. A file opening with '{' is JSONL whatever its name, since no CSV
    header starts that way; otherwise the extension decides, then the header line."""
    suffix = PurePath(filename or "").suffix.lower()
    if scan.first_char == "{" or suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    return "tsv" if scan.header.count("\t") > scan.header.count(",") else "csv"


def _too_many(max_rows: int) -> DatasetError:
    return DatasetError("dataset_file", f"the file has more than {max_rows:,} rows, the most a dataset may hold")


def _read_jsonl(source: BinaryIO, max_rows: int) -> tuple[list[str], Records]:
    """(keys seen in any row, records), one JSON object per line."""
    # Lines end at "\n" only, not as splitlines() has it: U+2028 may stand unescaped inside a JSON string.
    lines = io.TextIOWrapper(source, encoding="utf-8-sig", newline="\n")
    records: Records = []
    try:
        for number, line in enumerate(lines, 1):
            if not line.endswith("\n") and not line.strip():
                break  # blanks after the last newline start no row
            if number > max_rows:
                raise _too_many(max_rows)
            line = line.removesuffix("\n")
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError as e:
                raise DatasetError("dataset_file", f"line {number} is not valid JSON ({e.msg} at column "
                                                   f"{e.colno}); expected one JSON object per line", [number]) from None
            if record is not None and not isinstance(record, dict):
                raise DatasetError("dataset_file", f"line {number} is not a JSON object; expected one per line", [number])
            records.append((number, record))
    finally:
        lines.detach()  # the caller's file stays open
    return list(dict.fromkeys(k for _, r in records if r for k in r)), records


def _read_delimited(source: BinaryIO, kind: str, max_rows: int) -> tuple[list[str], Records]:
    """(header columns, records) of a CSV or TSV file."""
    lines = io.TextIOWrapper(source, encoding="utf-8-sig", newline="")
    reader = csv.reader(lines, delimiter="\t" if kind == "tsv" else ",")
    records: Records = []
    try:
        columns = [c.strip() for c in next(reader)]
        for number, fields in enumerate(reader, 1):
            if number > max_rows:
                raise _too_many(max_rows)
            blank = not any(f.strip() for f in fields)
            if not blank and len(fields) != len(columns):
                raise DatasetError("dataset_file", f"row {number} has {_count(len(fields), 'field')} but the header "
                                                   f"has {len(columns)}; quote values that hold the separator", [number])
            records.append((number, None if blank else dict(zip(columns, fields))))
    except csv.Error as e:
        raise DatasetError("dataset_file", f"row {len(records) + 1} is not valid {kind.upper()}: {e}") from None
    finally:
        lines.detach()
    return columns, records


def _columns(selected: str, columns: list[str]) -> dict[str, str]:
    """{"prompt": file column, "completion": file column}, from `selected_columns` or the defaults."""
    mapping = {"prompt": "prompt", "completion": "completion", **(_parse_selected(selected) if selected else {})}
    for target, name in mapping.items():
        if name not in columns:
            hint = "" if selected else "; selected_columns can name other columns"
            raise DatasetError("selected_columns" if selected else "dataset_file",
                               f"no column {name!r} for the {target}; the file's columns are "
                               f"{', '.join(map(repr, columns)) or 'none'}{hint}")
        if columns.count(name) > 1:
            raise DatasetError("dataset_file", f"column {name!r} appears more than once in the header")
    return mapping


def _parse_selected(selected: str) -> dict[str, str]:
    """The SDK sends a string: a JSON object, a JSON list of two, or "prompt column,completion column"."""
    try:
        value = json.loads(selected) if selected[0] in "{[" else [n.strip() for n in selected.split(",")]
    except json.JSONDecodeError:
        value = None
    if isinstance(value, list) and len(value) == 2:
        value = dict(zip(("prompt", "completion"), value))
    if not (isinstance(value, dict) and value and set(value) <= {"prompt", "completion"}
            and all(isinstance(v, str) and v for v in value.values())):
        raise DatasetError("selected_columns", f"selected_columns must be {SELECTED_FORMS}, got {selected!r}")
    return value


def _is_chat(records: Records) -> bool:
    """Whether rows carry `messages`, as the first row decides; a file never mixes the two shapes."""
    shapes = [(number, "messages" in r) for number, r in records if r is not None]
    if not shapes:
        return False
    (first, chat), odd = shapes[0], [number for number, c in shapes if c != shapes[0][1]]
    if odd:
        raise DatasetError("dataset_file", f"{_cite(odd)} differ in shape from row {first} ("
                           f"{'chat' if chat else 'prompt/completion'}); a file is all prompt/completion or all chat", odd)
    return chat


def _prompt_completion_rows(records: Records, mapping: dict[str, str]) -> tuple[list[Row], list[int]]:
    rows, empty, half_empty = [], [], []
    for number, record in records:
        values = ["" if record is None else record.get(mapping[t]) for t in ("prompt", "completion")]
        for column, value in zip(mapping.values(), values):
            if not isinstance(value, str):
                problem = "has no" if column not in record else "has a non-string"
                raise DatasetError("dataset_file", f"row {number} {problem} {column!r} value", [number])
        blank = [not v.strip() for v in values]
        if all(blank):
            empty.append(number)
        else:
            half_empty += [number] if any(blank) else []
            rows.append(Row(number, *values))
    if half_empty:
        raise DatasetError("dataset_file", f"{_cite(half_empty)}: a row needs both a prompt and a completion "
                                           "(a row with neither is skipped)", half_empty)
    return rows, empty


def _chat_rows(records: Records) -> tuple[list[Row], list[int]]:
    rows = [Row(n, "", "", _chat_messages(n, r["messages"])) for n, r in records if r is not None]
    return rows, [n for n, r in records if r is None]


def _chat_messages(number: int, messages) -> tuple[dict[str, str], ...]:
    def bad(problem: str) -> DatasetError:
        return DatasetError("dataset_file", f"row {number}: {problem}", [number])

    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list")
    for position, message in enumerate(messages, 1):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad(f"message {position} needs a role of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise bad(f"message {position} needs a string 'content'")
        if message["role"] == "system" and position > 1:
            raise bad(f"message {position} is a system message; only the first may be")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise bad("the last message must be a non-empty one from the assistant")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def _fix_whitespace(rows: list[Row], approved: bool) -> tuple[list[Row], list[int]]:
    """Make every row split prompt and completion the way most rows do.

    A row's boundary is (the prompt's trailing whitespace, the completion's leading whitespace).
    When all rows share one, nothing changes. Correcting a row gives it the most common boundary
    (ties go to the earliest row) and changes nothing else, so rows that already match keep every
    character; whitespace ending a completion is text to learn and stays as written. Chat rows are
    skipped: the chat template places their separators."""
    if not rows or rows[0].messages is not None:
        return rows, []
    boundaries = [(r.prompt[len(r.prompt.rstrip()):], r.completion[:len(r.completion) - len(r.completion.lstrip())])
                  for r in rows]  # (prompt's trailing, completion's leading) whitespace
    trailing, leading = majority = Counter(boundaries).most_common(1)[0][0]
    odd = [r.index for r, b in zip(rows, boundaries) if b != majority]
    if odd and not approved:
        raise DatasetError("approve_whitespace_correction", f"most rows end the prompt with {trailing!r} and start "
                           f"the completion with {leading!r}, but {_cite(odd)} differ; "
                           "approve_whitespace_correction=true makes them match")
    fixed = [r if b == majority else
             replace(r, prompt=r.prompt.rstrip() + trailing, completion=leading + r.completion.lstrip())
             for r, b in zip(rows, boundaries)]
    return fixed, odd


def _drop_duplicates(rows: list[Row]) -> tuple[list[Row], list[int]]:
    """Keep the first of each exact (prompt, completion) pair or message list."""
    seen, kept, duplicates = set(), [], []
    for row in rows:
        key = (row.prompt, row.completion, tuple((m["role"], m["content"]) for m in row.messages or ()))
        (duplicates if key in seen else kept).append(row)
        seen.add(key)
    return kept, [r.index for r in duplicates]


def _drop_long(rows: list[Row], count_tokens: Callable[[list[str]], list[int]], max_tokens: int,
               delete: bool) -> tuple[list[Row], list[int]]:
    """Rows whose prompt + completion (for chat, every content joined by newlines) exceed max_tokens."""
    def text(row: Row) -> str:
        return "\n".join(m["content"] for m in row.messages) if row.messages else row.prompt + row.completion

    long_rows = set()
    for start in range(0, len(rows), _TOKEN_BATCH):
        batch = rows[start:start + _TOKEN_BATCH]
        long_rows.update(r.index for r, n in zip(batch, count_tokens([text(r) for r in batch])) if n > max_tokens)
    if long_rows and not delete:
        raise DatasetError("delete_long_rows", f"{_cite(sorted(long_rows))} exceed the model's limit of "
                                               f"{max_tokens} tokens; delete_long_rows=true removes them", sorted(long_rows))
    return [r for r in rows if r.index not in long_rows], sorted(long_rows)


def _split(rows: list[Row], ratio: float, digest: bytes) -> list[Row]:
    """Mark round(n * ratio) rows as validation: at least 1 when ratio > 0, never every row.

    Rows are ranked by a hash of the file's sha256 `digest` and their row number, so the same file
    always gets the same split, whatever Python's random module does across versions."""
    n = len(rows)
    n_validation = min(max(1, round(n * ratio)), n - 1) if ratio > 0 else 0
    ranked = sorted(rows, key=lambda r: hashlib.sha256(digest + r.index.to_bytes(8, "little")).digest())
    validation = {r.index for r in ranked[:n_validation]}
    return [replace(r, split="validation") if r.index in validation else r for r in rows]


def _cite(numbers: list[int], limit: int = 10) -> str:
    """'row 3', 'rows 3, 8', or the first `limit` and how many in all."""
    if len(numbers) == 1:
        return f"row {numbers[0]}"
    shown = ", ".join(map(str, numbers[:limit]))
    return f"rows {shown}" if len(numbers) <= limit else f"rows {shown}, ... ({len(numbers)} in all)"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
