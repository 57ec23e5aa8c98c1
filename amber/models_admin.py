"""`amber models add` and `amber models remove` without the CLI: check a model, then add or remove
its [models.NAME] table in AMBER_HOME/models.toml, and the checkpoint Amber converted for it.

A refusal raises `Refused` (one sentence) and leaves models.toml byte for byte as it was and no
converted checkpoint behind. A new registry file replaces the old one atomically: a temporary file
beside it, loaded as the server loads it, then renamed over it. The read, edit and rename hold an
exclusive lock on a file beside it (.models.toml.lock), so two `amber models add|remove` run at once
each see the other's edit instead of the later rename dropping the earlier one's table. Knows files, the registry and the
store's custom models; nothing of argv. A running server reads the registry when it starts.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Callable

from amber.config import DTYPES, Config, ModelSpec, Registry, load_registry
from amber.model_check import Checked, check_model, convert, source_fields
from amber.registry_edit import Refused, append_table, check_new_names, remove_table

DEFAULT_CONTEXT = 2048  # max_context when --max-context is not given (less if the model has fewer positions)


@dataclass(frozen=True)
class Added:
    spec: ModelSpec
    checked: Checked


@dataclass(frozen=True)
class Removed:
    spec: ModelSpec
    checkpoint: Path | None  # the converted checkpoint deleted with it, if Amber had made one


def add_model(config: Config, name: str, source: str, dtype: str = "float32",
              aliases: tuple[str, ...] = (), max_context: int | None = None) -> Added:
    """Check the model at `source` (see model_check.source_fields for the spellings), then
    register it as `name`."""
    registry = _registry(config.registry_path)
    check_new_names(registry, name, aliases)
    if dtype not in DTYPES:
        raise Refused(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    fields = source_fields(source)
    spec = ModelSpec(name=name, aliases=aliases, dtype=dtype, max_context=max_context or DEFAULT_CONTEXT, **fields)
    if spec.path:  # refuse a too-long context before loading anything
        _context(max_context, json.loads((Path(spec.path) / "config.json").read_text()).get("max_position_embeddings"))
        return _register(config, spec, check_model(spec, Path(spec.path)), max_context)
    target = _converted_dir(config, registry, name)
    if target is None:
        raise Refused(f"{config.checkpoints_dir / name} holds another model's own checkpoint (its path), "
                      f"where Amber would convert this GGUF; choose another name than {name!r}.")
    shutil.rmtree(target, ignore_errors=True)  # a leftover of a removed model: no entry of this name uses it
    partials = set(config.checkpoints_dir.glob(f"{name}.partial-*"))
    try:
        return _register(config, spec, check_model(spec, convert(spec, source, config.checkpoints_dir)),
                         max_context)
    except BaseException:  # nothing converted for a model that was not added stays behind
        shutil.rmtree(target, ignore_errors=True)
        for partial in set(config.checkpoints_dir.glob(f"{name}.partial-*")) - partials:
            shutil.rmtree(partial, ignore_errors=True)
        raise


def remove_model(config: Config, store, name: str) -> Removed:
    """Take model `name` out of the registry, with its converted checkpoint; `store` (a
    store.repo.Store) says which custom models are trained on it."""
    path = config.registry_path
    registry = _registry(path)
    spec = registry.models.get(name)
    if spec is None:
        owner = registry.resolve(name)
        if owner is not None:
            raise Refused(f"{name!r} is an alias of {owner.name!r}, not a model: remove {owner.name!r}, "
                          f"or take the alias out of its aliases in {path}.")
        raise Refused(f"there is no model {name!r} in {path}.")
    if name == registry.default:
        raise Refused(f"{name!r} is the default model; point `default = ...` in {path} at another "
                      "model first.")
    dependents = store.custom_models.on_base(name)
    if dependents:
        listed = ", ".join(f"{m.name!r} (id {m.id}, account {account!r}, {m.status})" for account, m in dependents)
        raise Refused(f"custom models are trained on {name!r}: {listed}; delete them first "
                      "(DELETE /studio/v1/custom-model/ID).")
    target = None if spec.path else _converted_dir(config, registry, name)
    _rewrite(path, lambda text: remove_table(text, name))
    if target is not None and target.exists():
        shutil.rmtree(target)
    else:
        target = None
    return Removed(spec, target)


def _register(config: Config, spec: ModelSpec, checked: Checked, max_context: int | None) -> Added:
    spec = replace(spec, max_context=_context(max_context, checked.positions))
    fields = {"aliases": spec.aliases} if spec.aliases else {}
    for key in ("path", "gguf_path", "gguf_package", "gguf_file"):
        if getattr(spec, key):
            fields[key] = getattr(spec, key)
    fields.update(dtype=spec.dtype, max_context=spec.max_context)
    f = checked.fidelity
    comment = (f"added by `amber models add` on {date.today()}: " +
               (f"{spec.dtype} logprobs vs transformers' fp32, max |diff| {f.max_diff:.2g}, "
                f"mean {f.mean_diff:.2g} nats over {f.tokens} tokens" if f else
                f"logprobs not compared (transformers has no {checked.model_type!r} model)"))

    def edit(text: str) -> str:
        check_new_names(_registry(config.registry_path), spec.name, spec.aliases)  # an add that ran meanwhile
        return append_table(text, spec.name, fields, comment)

    _rewrite(config.registry_path, edit)
    return Added(spec, checked)


def _context(asked: int | None, positions: int | None) -> int:
    """The max_context to register: as asked, within the positions the model has."""
    if asked is None:
        return min(DEFAULT_CONTEXT, positions or DEFAULT_CONTEXT)
    if positions and asked > positions:
        raise Refused(f"--max-context {asked} is more than the model's {positions} positions "
                      "(max_position_embeddings in its config.json).")
    return asked


def _converted_dir(config: Config, registry: Registry, name: str) -> Path | None:
    """AMBER_HOME/checkpoints/NAME, where Amber converts NAME's GGUF; None if some model's own
    `path` lies there (a directory Amber must never delete)."""
    target = config.checkpoints_dir / name
    resolved = target.resolve()
    for spec in registry.models.values():
        if spec.path:
            own = Path(spec.path).expanduser().resolve()
            if own == resolved or resolved in own.parents or own in resolved.parents:
                return None
    return target


def _registry(path: Path) -> Registry:
    try:
        return load_registry(path)
    except (ValueError, TypeError) as exc:
        raise Refused(f"{path} does not load ({exc}); fix it first.") from exc


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock for editing the registry at `path`: on a file beside it, which is never
    replaced (the registry itself is, by rename, so a lock on it would guard the old inode)."""
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def _rewrite(path: Path, edit: Callable[[str], str]) -> None:
    """Replace the registry file by edit(its text), atomically, once the result loads; the read,
    edit and rename under _locked, so edits made at once apply one after the other."""
    with _locked(path):
        new = edit(path.read_text())
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(new)
            tmp.chmod(path.stat().st_mode & 0o777)
            try:
                load_registry(tmp)
            except (ValueError, TypeError) as exc:
                raise Refused(f"the edited registry would not load ({exc}), so {path} is left as it was.") from exc
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
