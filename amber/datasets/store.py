"""A parsed upload kept for good: rows in the store, the file byte for byte in shared storage.

Shared by the API and the CLI, so both apply the same rules and leave the same traces. A dataset's
directory in storage (`datasets/ID`, amber/files/layout.py) holds files whose names Amber chooses:
`upload.jsonl` (or .csv, .tsv: the uploaded file, unchanged) and `rows.jsonl` (the rows as parsed,
for people). The name the client gave is metadata only, cleaned for display. The row and the
directory appear together or not at all: the files are written to a local staging directory under
AMBER_HOME/uploads first, which is put into storage (at once) inside the transaction that creates
the row. A staging directory that a killed process left behind is removed by a later upload.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path, PurePath
from typing import BinaryIO

from amber.config import Config
from amber.datasets.parse import ParsedDataset, parse_dataset
from amber.engine.tokenizer import Tokenizer
from amber.files import layout, open_storage
from amber.files.local import remove_stale
from amber.store.custom_models import DatasetInfo, ExampleRow
from amber.store.repo import Store

MAX_FILE_NAME = 128  # characters of the client's file name kept for display
STAGING = ".dataset-"


def display_name(file_name: str | None) -> str:
    """The client's file name as shown back: its last path part, printable characters only,
    at most MAX_FILE_NAME (keeping the extension). Never used as a path."""
    name = (file_name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if name in ("", ".", ".."):
        return "dataset"
    if len(name) > MAX_FILE_NAME:
        suffix = PurePath(name).suffix[:16]
        name = name[:MAX_FILE_NAME - len(suffix) - 1] + "…" + suffix
    return name


def save_dataset(store: Store, config: Config, account_id: int, name: str, file_name: str | None,
                 upload: BinaryIO, tokenizer: Tokenizer, max_tokens: int, *, selected_columns: str | None = None,
                 approve_whitespace_correction: bool = False, delete_long_rows: bool = False,
                 split_ratio: float = 0.1) -> DatasetInfo:
    """Parse the seekable file `upload` (DatasetError on bad input), then keep it (NameTaken on a
    used name). Blocking: the API calls it in a worker thread."""
    shown = display_name(file_name)
    parsed = parse_dataset(upload, shown, selected_columns=selected_columns,
                           approve_whitespace_correction=approve_whitespace_correction,
                           delete_long_rows=delete_long_rows, split_ratio=split_ratio,
                           count_tokens=tokenizer.count_tokens, max_tokens=max_tokens)
    rows = [ExampleRow(r.index, r.split, r.prompt, r.completion,
                       [dict(m) for m in r.messages] if r.messages else None) for r in parsed.rows]
    storage = open_storage(config)
    config.uploads_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(config.uploads_dir, STAGING)
    staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=config.uploads_dir))
    placed: list[str] = []

    def place(dataset_id: int) -> None:
        """Runs inside the row's transaction: the row commits only once the directory is in place.
        One already there is a leftover of a crash between putting it and the commit (an id being
        created now was never committed, and ids are never reused): `put_dir` replaces it."""
        storage.put_dir(layout.dataset(dataset_id), staging)
        placed.append(layout.dataset(dataset_id))

    try:
        size = _write_files(staging, upload, parsed.kind, rows)
        return store.datasets.create(account_id, name, shown, size, parsed.format, rows, _report(parsed),
                                     then=place)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for key in placed:
            storage.delete(key)
        raise


def _report(parsed: ParsedDataset) -> dict:
    r = parsed.report
    return {"duplicates": r.duplicates, "emptyRows": r.empty_rows,
            "whitespaceCorrected": r.whitespace_corrected, "deletedLongRows": r.deleted_long_rows}


def _write_files(directory: Path, upload: BinaryIO, kind: str, rows: list[ExampleRow]) -> int:
    """The upload unchanged, and the rows as parsed (also in the store; this copy is for people).
    Returns the upload's size in bytes."""
    upload.seek(0)
    with open(directory / f"upload.{kind}", "wb") as out:
        shutil.copyfileobj(upload, out, 1 << 20)
        size = out.tell()
    with open(directory / "rows.jsonl", "w", encoding="utf-8") as out:
        for r in rows:
            out.write(json.dumps({"row": r.source_row, "split": r.split, "prompt": r.prompt,
                                  "completion": r.completion, "messages": r.messages}, ensure_ascii=False) + "\n")
    return size
