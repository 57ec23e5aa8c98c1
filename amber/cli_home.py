"""What every `amber` command shares: AMBER_HOME read from the environment, and the console.

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
                  shared_path=Path(shared).expanduser() if shared else None)
