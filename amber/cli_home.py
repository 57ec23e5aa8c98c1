"""What every `amber` command shares: AMBER_HOME and AMBER_DATABASE_URL read from the environment,
the store opened (or a refusal in one sentence), and the console.

Its own module so that `cli.py` and the command groups beside it (`cli_custom.py`) both import it
rather than each other. Builds Config's home part only; `cli.py` adds server options.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console

from amber.config import Config

# Piped output (scripts, tests) gets full-width lines rather than a table wrapped at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)


def home_config() -> Config:
    """AMBER_HOME (keys' hashes, datasets, adapters), private to its owner: the directory is made
    0700, or made so if it exists, and this process (with the worker it starts, which inherits it)
    creates files 0600 and directories 0700 (umask 077). Every command comes through here."""
    home = Path(os.environ.get("AMBER_HOME", "~/.amber")).expanduser()
    os.umask(0o077)
    home.mkdir(parents=True, exist_ok=True)
    try:
        home.chmod(0o700)
    except PermissionError as exc:  # not ours: say so rather than refuse to run
        print(f"warning: could not make {home} private to its owner: {exc}", file=sys.stderr)
    kernels = os.environ.get("AMBER_KERNELS")  # a kernels cache shared by several homes (tests do)
    shared = os.environ.get("AMBER_SHARED_DIR")  # datasets and adapters, shared by every replica
    return Config(home=home, kernels_path=Path(kernels).expanduser() if kernels else None,
                  database=os.environ.get("AMBER_DATABASE_URL") or None,
                  shared_path=Path(shared).expanduser() if shared else None)


def open_store(config: Config):
    """The store at `config.database_url`, its schema checked (amber/store/migrate.py). A database
    this Amber may not use as it is (behind on a shared server, or migrated by a newer Amber) is
    one sentence on stderr, naming the revisions and what to run, and exit status 1."""
    import typer

    from amber.store.migrate import SchemaMismatch
    from amber.store.repo import Store
    try:
        return Store.open(config.database_url)
    except SchemaMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
