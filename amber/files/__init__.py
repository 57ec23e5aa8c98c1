"""Shared files: datasets, adapters and training epochs, where every replica reads them.

`storage.py` is the interface (keys, whole directories written at once), `local.py` the shared
directory behind it by default, `layout.py` names the keys, `adapter_cache.py` keeps a replica's
local copies of the adapters it serves. Nothing here knows the database or the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

from amber.config import Config
from amber.files.adapter_cache import AdapterCache
from amber.files.local import LocalStorage
from amber.files.storage import Storage


def open_storage(config: Config) -> Storage:
    """The storage `config` names: the directory AMBER_SHARED_DIR, else AMBER_HOME."""
    return LocalStorage(config.shared_dir)


@dataclass
class SharedFiles:
    """What a server holds: the storage, and this replica's cache of adapters from it."""
    storage: Storage
    adapters: AdapterCache

    @classmethod
    def open(cls, config: Config) -> SharedFiles:
        storage = open_storage(config)
        return cls(storage, AdapterCache(storage, config.adapter_cache_dir))
