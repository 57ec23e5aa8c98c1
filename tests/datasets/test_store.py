"""save_dataset on a real store under tmp_path: what lands in shared storage (AMBER_HOME by default,
AMBER_SHARED_DIR when set), and that a failure at any step leaves neither a row nor a directory."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from amber.config import Config
from amber.datasets.parse import DatasetError
from amber.datasets.store import display_name, save_dataset
from amber.store.custom_models import NameTaken
from amber.store.repo import Store

SST2 = (Path(__file__).resolve().parent.parent / "data" / "sst2" / "train.jsonl").read_bytes()


class WordTokenizer:
    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(text.split()) for text in texts]


@pytest.fixture
def home(tmp_path):
    config = Config(home=tmp_path / "home")
    store = Store.open(config.database_url)
    yield config, store, store.ensure_account("alice").id
    store.close()


def save(home, name: str, data: bytes = SST2, file_name: str | None = "train.jsonl"):
    config, store, account = home
    return save_dataset(store, config, account, name, file_name, io.BytesIO(data), WordTokenizer(), 2047)


def datasets_dir(config: Config) -> Path:
    return config.shared_dir / "datasets"  # LocalStorage under AMBER_HOME: where they always were


def dataset_dir(config: Config, dataset_id: int) -> Path:
    return datasets_dir(config) / str(dataset_id)


def leftovers(config: Config) -> list[str]:
    return sorted(p.name for p in datasets_dir(config).iterdir()) if datasets_dir(config).exists() else []


@pytest.mark.parametrize("given, shown", [
    ("train.jsonl", "train.jsonl"), ("rows.jsonl", "rows.jsonl"), ("a/b/../c.csv", "c.csv"),
    ("..", "dataset"), (".", "dataset"), ("", "dataset"), (None, "dataset"), ("dir\\x.tsv", "x.tsv"),
    ("nul\x00.jsonl", "nul.jsonl"), ("  spaced.csv  ", "spaced.csv"), ("ünïcode ✓.jsonl", "ünïcode ✓.jsonl"),
])
def test_display_names(given, shown):
    assert display_name(given) == shown


def test_long_names_keep_their_extension():
    shown = display_name("n" * 300 + ".jsonl")
    assert len(shown) == 128 and shown.endswith("….jsonl")


def test_the_upload_and_the_rows_are_kept_under_names_amber_chooses(home):
    config, store, account = home
    info = save(home, "sst2", file_name="rows.jsonl")
    directory = dataset_dir(config, info.id)
    assert sorted(p.name for p in directory.iterdir()) == ["rows.jsonl", "upload.jsonl"]
    assert (directory / "upload.jsonl").read_bytes() == SST2
    kept = [json.loads(line) for line in (directory / "rows.jsonl").read_text().splitlines()]
    assert [r["row"] for r in kept] == list(range(1, 101))
    assert (info.file_name, info.size_bytes, info.num_examples) == ("rows.jsonl", len(SST2), 100)
    assert len(store.datasets.rows(info.id)) == 100
    assert leftovers(config) == [str(info.id)]


def test_a_csv_upload_is_kept_as_upload_csv(home):
    config, _, _ = home
    data = b"prompt,completion\n" + b"".join(f"Q{i}:, a{i}\n".encode() for i in range(60))
    info = save(home, "csv", data, "whatever.txt")
    assert (dataset_dir(config, info.id) / "upload.csv").read_bytes() == data


def test_bad_input_and_a_taken_name_leave_nothing(home):
    config, store, account = home
    first = save(home, "sst2")
    with pytest.raises(DatasetError):
        save(home, "bad", b"not, enough\n")
    with pytest.raises(NameTaken):
        save(home, "sst2")
    assert [d.name for d in store.datasets.list(account)] == ["sst2"]
    assert leftovers(config) == [str(first.id)]


def test_a_failure_placing_the_files_leaves_no_row_and_no_directory(home):
    config, store, account = home
    datasets_dir(config).mkdir(parents=True)
    (datasets_dir(config) / "1").write_text("in the way")  # the first dataset's directory cannot be made
    with pytest.raises(OSError):
        save(home, "sst2")
    assert store.datasets.list(account) == [] and store.datasets.rows(1) == []
    assert leftovers(config) == ["1"]
    (datasets_dir(config) / "1").unlink()
    assert save(home, "sst2").id == 1  # the name and the id were never taken


def test_a_failure_after_the_files_are_placed_removes_them(home, monkeypatch):
    config, store, account = home

    def create(*args, then, **kwargs):
        then(7)
        raise RuntimeError("the commit failed")

    monkeypatch.setattr(store.datasets, "create", create)
    with pytest.raises(RuntimeError):
        save(home, "sst2")
    assert leftovers(config) == []


def test_a_crash_leftover_at_the_new_id_is_replaced(home):
    config, _, _ = home
    stale = dataset_dir(config, 1)
    stale.mkdir(parents=True)
    (stale / "upload.jsonl").write_text("from a process killed before its commit")
    info = save(home, "sst2")
    assert info.id == 1 and (stale / "upload.jsonl").read_bytes() == SST2


def test_staging_left_by_a_killed_process_is_swept_by_the_next_upload(home):
    import os
    import time

    config, _, _ = home
    old, fresh = datasets_dir(config) / ".incoming-old", datasets_dir(config) / ".incoming-fresh"
    local = config.uploads_dir / ".dataset-old"  # a killed upload's files before they went to storage
    for directory in (old, fresh, local):
        directory.mkdir(parents=True)
        (directory / "upload.jsonl").write_text("half written")
        os.utime(directory, (time.time() - 7200, time.time() - 7200) if directory != fresh else None)
    info = save(home, "sst2")
    assert leftovers(config) == [".incoming-fresh", str(info.id)]  # a fresh one may be another upload's
    assert list(config.uploads_dir.iterdir()) == []


def test_datasets_go_to_the_shared_directory_when_there_is_one(tmp_path):
    config = Config(home=tmp_path / "home", shared_path=tmp_path / "shared")
    store = Store.open(config.database_url)
    try:
        info = save((config, store, store.ensure_account("alice").id), "sst2")
    finally:
        store.close()
    assert (tmp_path / "shared" / "datasets" / str(info.id) / "upload.jsonl").read_bytes() == SST2
    assert not (tmp_path / "home" / "datasets").exists()


def test_the_tokenizers_batch_count_is_what_encode_gives(default_checkpoint):
    from amber.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(default_checkpoint)
    texts = ["Review: fine\nSentiment:", " positive", "", "é😀 x\n\ny", "a" * 5000]
    assert tokenizer.count_tokens(texts) == [len(tokenizer.encode(t)) for t in texts]
