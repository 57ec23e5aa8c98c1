"""LocalStorage and AdapterCache on real directories: every operation, a directory seen whole or not
at all (a writer killed at any step), keys that cannot leave the root, and a replica's adapter copies
made once and dropped when storage loses them."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from amber.files import local
from amber.files.adapter_cache import AdapterCache
from amber.files.layout import ADAPTER_FILES
from amber.files.local import LocalStorage
from amber.files.storage import fetch


def staged(tmp_path: Path, files: dict[str, bytes], name: str = "src") -> Path:
    source = tmp_path / name
    source.mkdir()
    for file, data in files.items():
        (source / file).write_bytes(data)
    return source


def test_put_open_list_exists_delete(tmp_path):
    storage = LocalStorage(tmp_path / "shared")
    storage.put_dir("custom-models/7/epoch-1", staged(tmp_path, {"a.json": b"{}", "w.bin": b"12345"}))
    assert not (tmp_path / "src").exists()  # consumed
    assert storage.exists("custom-models/7/epoch-1") and storage.exists("custom-models/7/epoch-1/w.bin")
    assert storage.list("custom-models/7/epoch-1") == {"a.json": 2, "w.bin": 5}
    assert storage.list("custom-models/7") == {"epoch-1": None}
    assert storage.list("custom-models/8") == {} and not storage.exists("custom-models/8")
    with storage.open("custom-models/7/epoch-1/w.bin") as file:
        assert file.read() == b"12345"
    with pytest.raises(FileNotFoundError):
        storage.open("custom-models/7/epoch-1/missing")
    run = storage.within("custom-models/7")
    assert run.exists("epoch-1") and run.list("epoch-1") == storage.list("custom-models/7/epoch-1")
    run.delete("epoch-1/w.bin")  # one file of a directory
    assert storage.list("custom-models/7/epoch-1") == {"a.json": 2}
    storage.delete("custom-models/7")
    storage.delete("custom-models/7")  # nothing there is fine
    assert not storage.exists("custom-models/7/epoch-1") and storage.list("custom-models") == {}


def test_a_second_put_replaces_the_directory_whole(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.put_dir("datasets/1", staged(tmp_path, {"upload.jsonl": b"old", "stale": b"x"}, "one"))
    storage.put_dir("datasets/1", staged(tmp_path, {"upload.jsonl": b"new"}, "two"))
    assert storage.list("datasets/1") == {"upload.jsonl": 3}
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == ["1"]


@pytest.mark.parametrize("key", ["", "/etc", "a/../b", "../x", "a//b", ".incoming-1", "a/.hidden", "a\\b"])
def test_keys_stay_inside_the_root(tmp_path, key):
    with pytest.raises(ValueError):
        LocalStorage(tmp_path).exists(key)


def test_a_writer_killed_mid_put_leaves_no_directory(tmp_path, monkeypatch):
    """Killed after some files are in: readers never see the key; the next write there sweeps the
    hidden leftover once it is old (a young one may be a live writer's)."""
    storage = LocalStorage(tmp_path / "shared")
    moved, move = [], shutil.move

    def killed_after_one(src, dst):
        if moved:
            raise SystemExit("killed mid-put")
        moved.append(move(src, dst))
    monkeypatch.setattr(local.shutil, "move", killed_after_one)
    monkeypatch.setattr(local.shutil, "rmtree", lambda *a, **k: None)  # as if killed: no clean-up ran
    with pytest.raises(SystemExit):
        storage.put_dir("custom-models/1/epoch-2", staged(tmp_path, {"a": b"1", "b": b"2"}))
    monkeypatch.undo()
    assert not storage.exists("custom-models/1/epoch-2") and storage.list("custom-models/1") == {}
    (leftover,) = (tmp_path / "shared/custom-models/1").iterdir()
    assert leftover.name.startswith(".incoming-") and [p.name for p in leftover.iterdir()] == ["a"]
    storage.put_dir("custom-models/1/epoch-1", staged(tmp_path, {"a": b"1"}, "again"))
    assert leftover.exists()  # young: perhaps another writer's
    os.utime(leftover, (time.time() - 7200,) * 2)
    storage.put_dir("custom-models/1/epoch-2", staged(tmp_path, {"a": b"1"}, "later"))
    assert sorted(p.name for p in (tmp_path / "shared/custom-models/1").iterdir()) == ["epoch-1", "epoch-2"]


def test_a_failed_put_cleans_up_and_a_file_in_the_way_is_an_error(tmp_path):
    storage = LocalStorage(tmp_path / "shared")
    (tmp_path / "shared/datasets").mkdir(parents=True)
    (tmp_path / "shared/datasets/3").write_text("in the way")
    with pytest.raises(OSError):
        storage.put_dir("datasets/3", staged(tmp_path, {"upload.jsonl": b"x"}))
    assert sorted(p.name for p in (tmp_path / "shared/datasets").iterdir()) == ["3"]
    assert not (tmp_path / "src").exists()


def adapter(storage: LocalStorage, tmp_path: Path, key: str, weights: bytes) -> None:
    name = f"src-{len(list(tmp_path.iterdir()))}"
    storage.put_dir(key, staged(tmp_path, {"adapter_config.json": b"{}", "adapter_model.safetensors": weights,
                                           "trainer_state.pt": b"optimizer"}, name))


def test_the_cache_copies_an_adapter_once_and_only_its_adapter_files(tmp_path):
    storage = LocalStorage(tmp_path / "shared")
    adapter(storage, tmp_path, "custom-models/7/epoch-1", b"w1")
    cache = AdapterCache(storage, tmp_path / "home/cache/adapters")
    path = cache.local("custom-models/7/epoch-1", "100")
    assert path == tmp_path / "home/cache/adapters/custom-models/7/epoch-1/@100"
    assert sorted(p.name for p in path.iterdir()) == sorted(ADAPTER_FILES)
    inode = (path / "adapter_model.safetensors").stat().st_ino
    assert cache.local("custom-models/7/epoch-1", "100") == path
    assert (path / "adapter_model.safetensors").stat().st_ino == inode  # not copied again
    other = cache.local("custom-models/7/epoch-1", "200")  # a new model under the same key: its own copy
    assert other != path and other.is_dir()
    with pytest.raises(FileNotFoundError):
        cache.local("custom-models/8/epoch-1", "100")
    assert not list((tmp_path / "home/cache/adapters").glob("custom-models/8/epoch-1/*"))  # no half copy


def test_the_sweep_drops_copies_whose_adapter_left_storage(tmp_path):
    storage = LocalStorage(tmp_path / "shared")
    for key in ("custom-models/7/epoch-1", "custom-models/7/epoch-2", "custom-models/9/epoch-1"):
        adapter(storage, tmp_path, key, b"w")
    cache = AdapterCache(storage, tmp_path / "cache", sweep_every_s=3600)
    kept, *gone = [cache.local(key, "1") for key in ("custom-models/9/epoch-1", "custom-models/7/epoch-1",
                                                    "custom-models/7/epoch-2")]
    assert cache.sweep() == [] and not cache.sweep_due()
    storage.delete("custom-models/7")  # by another replica
    assert sorted(cache.sweep()) == [("custom-models/7/epoch-1", "1"), ("custom-models/7/epoch-2", "1")]
    assert kept.is_dir() and not any(p.exists() for p in gone)
    assert not (tmp_path / "cache/custom-models/7").exists()  # empty directories go too


def test_fetch_copies_named_files(tmp_path):
    storage = LocalStorage(tmp_path / "shared")
    adapter(storage, tmp_path, "custom-models/1/epoch-1", b"weights")
    (tmp_path / "out").mkdir()
    fetch(storage, "custom-models/1/epoch-1", tmp_path / "out", ADAPTER_FILES)
    assert (tmp_path / "out/adapter_model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(ADAPTER_FILES)
