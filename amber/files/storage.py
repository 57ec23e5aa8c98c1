"""The interface to shared files: datasets, adapters and training epochs, by key.

A key is a relative path with `/` between its parts (`datasets/12`, `custom-models/7/epoch-3`);
`layout.py` names them. Every replica reads and writes through a `Storage`, so a dataset uploaded
to one server is trained by a worker elsewhere and served by a third. The default is a directory
(`local.LocalStorage`: AMBER_SHARED_DIR, else AMBER_HOME); the operations are few and coarse so an
object store can implement them too:

- files are written only as whole directories (`put_dir`), which appear complete or not at all: a
  directory is complete by existing (locally, a rename; in an object store, a marker written last);
- a directory, once there, is never rewritten, only deleted, except that one file in it may be
  deleted (an epoch's optimizer state once a newer epoch exists).

Knows nothing of datasets, training or the database.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import BinaryIO, Protocol


class Storage(Protocol):
    def put_dir(self, key: str, source: Path) -> None:
        """Make the files of local directory `source` (flat) the directory `key`, at once,
        replacing one already there. `source` is consumed: its files are moved, it is removed."""

    def open(self, key: str) -> BinaryIO:
        """The file `key`, for reading; FileNotFoundError when there is none."""

    def exists(self, key: str) -> bool:
        """Whether `key` is a file or a complete directory."""

    def list(self, key: str) -> dict[str, int | None]:
        """What directory `key` holds: name -> size in bytes (None for a directory); {} when
        there is no such directory. Never shows a directory being written."""

    def delete(self, key: str) -> None:
        """Remove the file `key`, or directory `key` and all under it; nothing there is fine."""

    def within(self, key: str) -> Storage:
        """The same storage with keys relative to `key` (a training run's directory, say)."""


def check_key(key: str) -> tuple[str, ...]:
    """The parts of `key`; ValueError for an empty one, `..`, `.` or a hidden part (names that
    start with `.` belong to the storage: directories being written)."""
    parts = tuple(key.split("/"))
    if not key or any(not part or part.startswith(".") or "\\" in part for part in parts):
        raise ValueError(f"not a storage key: {key!r}")
    return parts


def fetch(storage: Storage, key: str, target: Path, names: tuple[str, ...]) -> None:
    """Copy files `names` of storage directory `key` into local directory `target`."""
    for name in names:
        with storage.open(f"{key}/{name}") as source, open(Path(target) / name, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
