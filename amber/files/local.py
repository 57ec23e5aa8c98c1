"""`LocalStorage`: the shared files as a directory tree, keys as relative paths under `root`.

The default storage: root is AMBER_SHARED_DIR (a network file system every replica mounts), else
AMBER_HOME, where the files always lived. A directory is written under a hidden `.incoming-*` name
beside its place, its files fsynced, then renamed into place: readers see all of it or none, and a
process killed meanwhile leaves only a hidden directory, which a later write there removes once it
is an hour old (younger, it may be another process's write in progress).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from amber.files.storage import check_key

STAGING = ".incoming-"
STALE_AFTER_S = 3600


class LocalStorage:
    def __init__(self, root: Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def __str__(self) -> str:  # in messages: where the files are
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key))

    def put_dir(self, key: str, source: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target.parent, STAGING)
        stage = Path(tempfile.mkdtemp(prefix=STAGING, dir=target.parent))
        try:
            for file in sorted(Path(source).iterdir()):
                shutil.move(file, stage / file.name)  # a rename on the same file system
                fsync(stage / file.name)              # on disk before the rename shows it complete
            _replace(stage, target)
            fsync(target.parent)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(source, ignore_errors=True)

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, key: str) -> dict[str, int | None]:
        directory = self._path(key)
        if not directory.is_dir():
            return {}
        return {p.name: None if p.is_dir() else p.stat().st_size
                for p in directory.iterdir() if not p.name.startswith(".")}

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def within(self, key: str) -> LocalStorage:
        return LocalStorage(self._path(key))


def _replace(stage: Path, target: Path) -> None:
    """Rename `stage` to `target`; a directory already there (a crash's leftover) is moved aside
    first and removed after, so a complete one is in place at all times but between two renames.
    A file in the way is an error."""
    old = None
    if target.is_dir() and not target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=STAGING, dir=target.parent))
        os.rename(target, old / "old")
    os.rename(stage, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale(directory: Path, prefix: str, older_than_s: float = STALE_AFTER_S) -> None:
    """Remove `prefix*` entries of `directory` older than `older_than_s`: what killed writers left."""
    cutoff = time.time() - older_than_s
    for stale in directory.glob(f"{prefix}*"):
        try:
            if stale.stat().st_mtime < cutoff:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:  # another process's sweep got there first
            pass


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
