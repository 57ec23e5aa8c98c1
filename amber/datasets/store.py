"""A parsed upload kept for good: rows in the store, the file byte for byte under AMBER_HOME.

Shared by the API and the CLI, so both apply the same rules and leave the same traces."""
from __future__ import annotations

import json
from pathlib import Path, PurePath

from amber.config import Config
from amber.datasets.parse import ParsedDataset, parse_dataset
from amber.engine.tokenizer import Tokenizer
from amber.store.custom_models import DatasetInfo, ExampleRow
from amber.store.repo import Store


def save_dataset(store: Store, config: Config, account_id: int, name: str, file_name: str, data: bytes,
                 tokenizer: Tokenizer, max_tokens: int, *, selected_columns: str | None = None,
                 approve_whitespace_correction: bool = False, delete_long_rows: bool = False,
                 split_ratio: float = 0.1) -> DatasetInfo:
    """Parse (DatasetError on bad input), store (NameTaken on a used name) and file the upload."""
    file_name = PurePath(file_name).name or "dataset"
    parsed = parse_dataset(data, file_name, selected_columns=selected_columns,
                           approve_whitespace_correction=approve_whitespace_correction,
                           delete_long_rows=delete_long_rows, split_ratio=split_ratio,
                           count_tokens=lambda text: len(tokenizer.encode(text)), max_tokens=max_tokens)
    rows = [ExampleRow(r.index, r.split, r.prompt, r.completion,
                       [dict(m) for m in r.messages] if r.messages else None) for r in parsed.rows]
    info = store.datasets.create(account_id, name, file_name, len(data), parsed.format, rows, _report(parsed))
    try:
        _write_files(config.dataset_dir(info.id), file_name, data, rows)
    except OSError:
        store.datasets.delete(account_id, info.id)
        raise
    return info


def _report(parsed: ParsedDataset) -> dict:
    r = parsed.report
    return {"duplicates": r.duplicates, "emptyRows": r.empty_rows,
            "whitespaceCorrected": r.whitespace_corrected, "deletedLongRows": r.deleted_long_rows}


def _write_files(directory: Path, file_name: str, data: bytes, rows: list[ExampleRow]) -> None:
    """The upload unchanged, and the rows as parsed (also in the store; this copy is for people)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / file_name).write_bytes(data)
    with open(directory / "rows.jsonl", "w", encoding="utf-8") as out:
        for r in rows:
            out.write(json.dumps({"row": r.source_row, "split": r.split, "prompt": r.prompt,
                                  "completion": r.completion, "messages": r.messages}, ensure_ascii=False) + "\n")
