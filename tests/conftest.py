"""Shared fixtures. The real default model is converted once into a cache that outlives the run
(`.amber-test/` in the repo, ignored by git), so only the first run on a machine pays for it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from amber.config import DEFAULT_MODEL, DEFAULT_REGISTRY, SECOND_MODEL, parse_registry
from amber.engine.checkpoint import ensure_checkpoint

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.support_matrix", "tests.tiny_models"]
TEST_CACHE = REPO / ".amber-test"
# Every `amber` process the tests start, whatever its AMBER_HOME, measures this machine's kernels
# once (engine/kernels.py) and shares the result, as servers on one machine would.
os.environ.setdefault("AMBER_KERNELS", str(TEST_CACHE / "kernels"))


def pytest_configure(config) -> None:
    """The paged attention kernel, built where `make setup` builds it (a no-op when it did), before
    any engine in this process decides between it and the torch fallback (engine/paged_ops.py)."""
    import shutil
    import subprocess

    from amber.engine import paged_ops
    if shutil.which("g++") is not None:
        try:
            paged_ops.build(paged_ops.default_dir())
        except subprocess.CalledProcessError as exc:  # the tests of the kernel then say so
            print(f"paged attention kernel failed to build:\n{exc.stderr}")


def general_checkpoint(name: str) -> Path:
    """The checkpoint of general model `name` in the test cache, converted from its GGUF if not yet
    (`make test` converts both ahead of the suite, beside the clients' installs)."""
    return ensure_checkpoint(parse_registry(DEFAULT_REGISTRY).models[name], TEST_CACHE / "checkpoints")


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    """Checkpoint directory of the real default model (SmolLM2-135M-Instruct, fp32)."""
    return general_checkpoint(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def gemma_checkpoint() -> Path:
    """Checkpoint directory of the second general model (Gemma 3 270M, fp32), converted from the GGUF
    its chunk packages assemble (about a minute, once per machine)."""
    return general_checkpoint(SECOND_MODEL)


@pytest.fixture(scope="session")
def sp_tok():
    """A toy SentencePiece-style vocabulary (▁ for spaces, <0xNN> byte fallback, dummy prefix)."""
    import tokenizers
    from tokenizers import decoders, models, normalizers

    from amber.engine.tokenizer import Tokenizer

    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(f"<0x{b:02X}>", -10.0) for b in range(256)]
    vocab += [("▁", -2.0), ("▁Paris", -1.0), ("▁is", -1.0), ("\n", -1.0), ("a", -3.0), ("▁a", -2.5),
              ("<|newline|>", -5.0)]  # literal text that clashes with AI21's spelling of "\n"
    backend = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in ("<s>", "</s>", "###")])
    return Tokenizer(backend, bos_id=1, eos_ids=frozenset({2}))


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the session (tests/postgres.py). Skipped where its binaries are
    missing, unless AMBER_POSTGRES_BIN names them (as `make test` does): then a failure is loud."""
    from tests import postgres
    bin_dir = postgres.find_bin()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        if os.environ.get("AMBER_POSTGRES_BIN"):
            pytest.fail(f"AMBER_POSTGRES_BIN={os.environ['AMBER_POSTGRES_BIN']} holds no pg_ctl")
        pytest.skip("no PostgreSQL binaries (/usr/lib/postgresql/*/bin); set AMBER_POSTGRES_BIN")
    server = postgres.start(bin_dir)
    yield server
    server.stop()
    postgres.remove(server)


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """A URL to a fresh, empty database of its own on the session's server."""
    import psycopg
    name = f"t{abs(hash(request.node.nodeid)):x}"[:40] + f"_{os.getpid()}"
    with psycopg.connect(f"host=127.0.0.1 port={postgres_server.port} user=postgres dbname=postgres",
                         autocommit=True) as db:
        db.execute(f'DROP DATABASE IF EXISTS "{name}"')
        db.execute(f'CREATE DATABASE "{name}"')
    return postgres_server.url(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """A URL to an empty database, once on SQLite (a file under tmp_path) and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'amber.db'}"
    return request.getfixturevalue("postgres_url")
