"""Official client SDKs, unchanged, each in its own venv (`make clients` builds them under
.venv-clients/, since their pins would bend ours): a test runs a script from tests/clients/ with
that venv's python against the live server, and checks the JSON the script prints."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENVS = REPO / ".venv-clients"

# name -> (environment variable that may point at its python, venv under .venv-clients)
CLIENTS = {
    "ai21-v2": ("AMBER_CLIENT_AI21_V2", "ai21-2.15.2"),
    "ai21-v4": ("AMBER_CLIENT_AI21_V4", "ai21-4.3.0"),
    "openai": ("AMBER_CLIENT_OPENAI", "openai-3.54.0"),
    "langchain": ("AMBER_CLIENT_LANGCHAIN", "langchain-openai-1.7.3"),
}


def run_client(client: str, script: str, server, *args) -> dict:
    """`args` follow the server's URL and key on the script's command line."""
    variable, venv = CLIENTS[client]
    python = Path(os.environ.get(variable, VENVS / venv / "bin/python"))
    assert python.exists(), f"{python} is missing: run `make clients` (make test does)"
    out = subprocess.run([python, REPO / "tests/clients" / script, server.url, server.key, *map(str, args)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
