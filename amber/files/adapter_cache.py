"""A replica's local copies of adapters in shared storage, for the engine, which reads a directory.

`AMBER_HOME/cache/adapters/KEY/@VERSION/` holds the adapter files of storage directory KEY
(`custom-models/7/epoch-3`), copied the first time this replica serves it (into a hidden directory,
renamed into place: a copy is whole or absent) and read from here afterwards. VERSION tells apart
different files under one key (the API uses the model's creation time), since a copy is never
checked against storage again. `sweep` notices deletions made through any replica: a cached
adapter whose directory has gone from storage is dropped, and reported so that the engines can
forget it too. Knows nothing of models, engines or the database.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from amber.files.layout import ADAPTER_FILES
from amber.files.local import STAGING, remove_stale
from amber.files.storage import Storage, check_key, fetch

VERSION = "@"
SWEEP_EVERY_S = 5.0  # how stale a deletion may look to this replica's disk: one storage check per cached adapter


def engine_key(key: str, version: str) -> str:
    """The name an engine keeps the adapter of storage directory `key` at `version` under."""
    return f"{key}@{version}"


def split_engine_key(name: str) -> tuple[str, str]:
    key, _, version = name.rpartition("@")
    return key, version


class AdapterCache:
    def __init__(self, storage: Storage, root: Path, sweep_every_s: float = SWEEP_EVERY_S):
        self.storage, self.root, self.sweep_every_s = storage, Path(root), sweep_every_s
        self._swept = float("-inf")   # time.monotonic() of the last sweep
        self._sweeping = threading.Lock()

    def local(self, key: str, version: str) -> Path:
        """Storage directory `key`'s adapter files as a local directory, copied on first use.
        FileNotFoundError when storage has no such adapter. Blocking: call off the event loop."""
        (name,) = check_key(version)  # one plain name
        path = self.root.joinpath(*check_key(key), VERSION + name)
        if path.is_dir():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        incoming = Path(tempfile.mkdtemp(prefix=STAGING, dir=path.parent))
        try:
            fetch(self.storage, key, incoming, ADAPTER_FILES)
            os.rename(incoming, path)
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            if not path.is_dir():  # else another request's copy got there first: use it
                raise
        return path

    def sweep_due(self) -> bool:
        return time.monotonic() - self._swept >= self.sweep_every_s

    def sweep(self) -> list[tuple[str, str]]:
        """Drop the copies whose storage directory is gone; (key, version) of each dropped. One
        sweep at a time: a caller that finds one running returns [] at once."""
        if not self._sweeping.acquire(blocking=False):
            return []
        try:
            self._swept = time.monotonic()
            dropped = [(key, version) for key, version, path in self._cached() if self._drop_if_gone(key, path)]
            for directory in {p.parent for p in self.root.rglob(STAGING + "*")}:
                remove_stale(directory, STAGING)  # left by a copy killed half-way
            return dropped
        finally:
            self._sweeping.release()

    def _cached(self) -> list[tuple[str, str, Path]]:
        if not self.root.is_dir():
            return []
        return [(path.parent.relative_to(self.root).as_posix(), path.name[len(VERSION):], path)
                for path in self.root.rglob(VERSION + "*") if path.is_dir()]

    def _drop_if_gone(self, key: str, path: Path) -> bool:
        if self.storage.exists(key):
            return False
        shutil.rmtree(path, ignore_errors=True)
        for parent in path.parents:  # empty directories up to the root go too
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:  # not empty
                break
        return True
