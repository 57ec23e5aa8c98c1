"""`amber models add|remove` run at once: each edit of models.toml reads, edits and renames under a
lock (models_admin._rewrite), so none is lost to another's rename. Real processes, a real file."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from amber.config import DEFAULT_REGISTRY

REPO = Path(__file__).resolve().parent.parent
# One editor: waits for the go file, then appends its table, slowly enough between reading the file
# and renaming the new one over it that, unlocked, every editor would read the same old text.
EDITOR = """
import sys, time
from pathlib import Path
from amber import models_admin
from amber.registry_edit import append_table
registry, name, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
(go.parent / f"ready-{name}").touch()
while not go.exists():
    time.sleep(0.01)
def edit(text):
    time.sleep(0.5)
    return append_table(text, name, {"gguf_path": f"/models/{name}.gguf"}, comment=f"added by {name}")
models_admin._rewrite(registry, edit)
"""


def test_edits_made_at_once_all_land(tmp_path):
    registry = tmp_path / "models.toml"
    registry.write_text(DEFAULT_REGISTRY)
    names = [f"m{i}" for i in range(4)]
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    editors = [subprocess.Popen([sys.executable, "-c", EDITOR, str(registry), name, str(go)], env=env,
                                stderr=subprocess.PIPE, text=True) for name in names]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{name}").exists() for name in names):
        assert time.monotonic() < deadline and all(e.poll() is None for e in editors), \
            [e.stderr.read() for e in editors if e.poll() is not None]
        time.sleep(0.01)
    go.touch()  # all four read the file within moments of each other
    for editor in editors:
        assert editor.wait(timeout=60) == 0, editor.stderr.read()
    models = tomllib.loads(registry.read_text())["models"]
    assert set(names) <= set(models), sorted(models)
    assert registry.read_text().startswith(DEFAULT_REGISTRY)  # every edit appended to the one before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
