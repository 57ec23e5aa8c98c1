"""Edits to the registry file's text: whether a name or alias is free, a [models.NAME] table
appended, one removed.

Works on the text rather than re-serialising a parse, so the file's comments and layout survive;
every edit is parsed back and compared with the intended change, and refused if they differ
(a table written in a shape these edits do not know, say). Pure functions: no files, no engine.
"""
from __future__ import annotations

import json
import re
import tomllib

from amber.config import Registry

# what a model name or alias may be: it appears in URLs (/studio/v1/NAME/complete) and TOML keys
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class Refused(Exception):
    """`amber models add|remove` will not do it; the message is one sentence saying why."""


def check_new_names(registry: Registry, name: str, aliases: tuple[str, ...]) -> None:
    """Refuse a name or alias that is malformed, repeated, or already a model's name or alias."""
    for label, value in (("model name", name), *(("alias", a) for a in aliases)):
        if not NAME.fullmatch(value):
            raise Refused(f"{label} {value!r} is not allowed: use at most 128 letters, digits, "
                          "'.', '_' and '-', starting with a letter or digit.")
    names = (name, *aliases)
    for value in names:
        if names.count(value) > 1:
            raise Refused(f"{value!r} is given more than once as the name or an alias.")
        owner = registry.resolve(value)
        if owner is not None:
            taken = "a model in the registry" if owner.name == value else f"an alias of {owner.name!r}"
            raise Refused(f"{value!r} is already {taken}; choose another name.")


def append_table(text: str, name: str, fields: dict, comment: str = "") -> str:
    """`text` with a [models.NAME] table holding `fields` (str, int or tuple values) at the end."""
    lines = [f"# {comment}"] if comment else []
    lines += [f"[models.{_key(name)}]", *(f"{k} = {_value(v)}" for k, v in fields.items())]
    new = text + ("\n" if text and not text.endswith("\n") else "") + "\n" + "\n".join(lines) + "\n"
    expected = tomllib.loads(text)
    expected.setdefault("models", {})[name] = {k: list(v) if isinstance(v, tuple) else v
                                               for k, v in fields.items()}
    if tomllib.loads(new) != expected:
        raise Refused(f"appending a [models.{name}] table to models.toml would not add just that "
                      "model (the file's last lines may be unfinished); edit it by hand.")
    return new


def remove_table(text: str, name: str) -> str:
    """`text` without the [models.NAME] table, the comment lines directly above its header, and the
    blank lines that separated it from what comes before."""
    lines = text.splitlines(keepends=True)
    headers = [(i, path) for i, line in enumerate(lines) if (path := _header(line)) is not None]
    starts = [i for i, path in headers if path == ("models", name)]
    if len(starts) != 1:
        raise Refused(f"models.toml does not define {name!r} as one [models.{name}] table, so it "
                      "cannot be removed line by line; edit the file by hand.")
    start = starts[0]
    end = next((i for i, _ in headers if i > start), len(lines))
    first = start
    while first > 0 and lines[first - 1].lstrip().startswith("#"):
        first -= 1
    while first > 0 and not lines[first - 1].strip():
        first -= 1
    last = end
    if end < len(lines):  # the next table's own comments, and the blank lines before them, stay
        while last > start + 1 and (not lines[last - 1].strip() or lines[last - 1].lstrip().startswith("#")):
            last -= 1
    new = "".join(lines[:first] + lines[last:])
    expected = tomllib.loads(text)
    expected["models"] = {k: v for k, v in expected["models"].items() if k != name}
    if tomllib.loads(new) != expected:
        raise Refused(f"removing the lines of [models.{name}] from models.toml would change more than "
                      "that model; edit the file by hand.")
    return new


def _header(line: str) -> tuple[str, ...] | None:
    """A table header line's key path (`[models."a.b"]` -> ("models", "a.b")); () for an array
    table or a header this cannot read; None for any other line."""
    stripped = line.lstrip()
    if not stripped.startswith("["):
        return None
    if stripped.startswith("[["):
        return ()
    try:
        parsed = tomllib.loads(line)
    except tomllib.TOMLDecodeError:
        return ()
    path = []
    while isinstance(parsed, dict) and len(parsed) == 1:
        key, parsed = next(iter(parsed.items()))
        path.append(key)
    return tuple(path)


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def _value(value: str | int | tuple) -> str:
    """A TOML value: JSON's string escapes are TOML's (ensure_ascii=False: no surrogate pairs)."""
    if isinstance(value, tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    assert isinstance(value, int) and not isinstance(value, bool), value
    return str(value)
