"""The `amber` command: the only reader of argv and the environment. Builds Config, then dispatches.

    amber serve            serve the API (default http://127.0.0.1:8000), with a training worker
    amber worker           train queued custom models (what `serve` starts)
    amber models           list the registry's models; `models train|show|export` for custom ones
    amber datasets upload  upload a training set
    amber keys create A    make an API key for account A (printed as the last line)
    amber doctor           this machine as the engine sees it: CPU, torch, kernels chosen per layer
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from amber.cli_custom import datasets_app, register_model_commands
from amber.config import Config, EngineConfig, load_registry

app = typer.Typer(help="Amber: a self-hosted language-model studio (AI21 Studio's J2 API).",
                  no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
models_app = typer.Typer(help="General models (the registry) and custom models.", invoke_without_command=True)
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")
register_model_commands(models_app)
# Piped output (scripts, tests) gets full-width lines rather than a table wrapped at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)


def build_config(host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
                 max_batch: int = 16, max_queue: int = 256, prefix_blocks: int = 256) -> Config:
    from amber.serving import pick_device  # torch import only for commands that need it
    engine = replace(EngineConfig(), device=pick_device(device), max_batch=max_batch, max_queue=max_queue,
                     prefix_blocks=prefix_blocks)
    return replace(home_config(), host=host, port=port, engine=engine)


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
    return Config(home=home, kernels_path=Path(kernels).expanduser() if kernels else None)


@app.command()
def serve(host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="TCP port")] = 8000,
          device: Annotated[Optional[str], typer.Option(help="cpu or cuda; default: cuda if present")] = None,
          max_batch: Annotated[int, typer.Option(min=1, max=256, help="sequences decoded together")] = 16,
          max_queue: Annotated[int, typer.Option(min=1, help="waiting requests per model before 429")] = 256,
          prefix_cache_blocks: Annotated[int, typer.Option(min=0, help="32-token prompt blocks kept; 0: off")] = 256,
          log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
          worker: Annotated[bool, typer.Option(help="start a training worker process beside the server")] = True,
          keep_alive: Annotated[int, typer.Option(min=1, help="seconds an idle client connection stays open")] = 75
          ) -> None:
    """Serve the J2 API; the default model loads in the background (/health says when)."""

    import uvicorn

    from amber.api.app import create_app
    from amber.serving import ModelPool
    from amber.store.db import open_database
    from amber.store.repo import Store
    from amber.worker import WorkerProcess

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = build_config(host, port, device, max_batch, max_queue, prefix_cache_blocks)
    registry = load_registry(config.registry_path)
    store = Store(open_database(config.database_url))
    app_ = create_app(ModelPool(config, registry), store)
    # training runs in its own process, never in the API's
    trainer = WorkerProcess(log_level).start() if worker else None
    try:
        uvicorn.run(app_, host=config.host, port=config.port, log_level=log_level,
                    timeout_keep_alive=keep_alive)
    finally:
        if trainer is not None:
            trainer.stop()


@app.command("worker")
def run_worker(once: Annotated[bool, typer.Option(help="exit when no job is waiting")] = False,
               parent: Annotated[Optional[int], typer.Option(hidden=True, help="exit when this pid is gone")] = None,
               log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info") -> None:
    """Train queued custom models, one at a time; takes over jobs whose worker died."""
    from amber.store.repo import Store
    from amber.worker import Worker

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = home_config()
    Worker(config, load_registry(config.registry_path), Store.open(config.database_url)).run(
        once=once, parent=parent)


@app.command()
def doctor(model: Annotated[Optional[str], typer.Option(help="registry model or alias; default: the default model")] = None,
           retune: Annotated[bool, typer.Option(help="measure the kernels again, replacing this machine's cache")] = False,
           threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads (default: every core, as serve)")] = None
           ) -> None:
    """Show the CPU, torch, and which kernel each of a model's quantized layer shapes runs by row
    count, with the timings behind the choice (measured now if this machine has none cached)."""
    import torch

    from amber.engine import kernels
    from amber.engine.checkpoint import ensure_checkpoint
    from amber.engine.loader import load_model

    config = home_config()
    registry = load_registry(config.registry_path)
    spec = registry.resolve(model or registry.default)
    if spec is None:
        raise typer.BadParameter(f"no model or alias {model!r} in {config.registry_path}", param_hint="--model")
    if threads:
        torch.set_num_threads(threads)
    info = kernels.machine()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    flags = set(info["flags"].split())
    console.print(f"CPU      {info['cpu']}")
    console.print(f"flags    {' '.join(f for f in wanted if f in flags) or '(none of ' + ', '.join(wanted) + ')'}")
    console.print(f"torch    {info['torch']} (kernels for {info['capability']}), {info['threads']} threads")
    console.print(f"cache    {config.kernels_dir / (kernels.cache_key(info) + '.json')}")
    checkpoint = ensure_checkpoint(spec, config.checkpoints_dir)
    loaded = load_model(checkpoint, spec.dtype, "cpu", tune=False)
    if not kernels.quantized_layers(loaded):
        console.print(f"model    {spec.name} ({spec.dtype}): no quantized layers, nothing to choose")
        return
    choices = kernels.tune(loaded, config.kernels_dir, retune=retune)
    shapes = kernels.cached(config.kernels_dir)["shapes"]
    console.print(f"model    {spec.name} ({spec.dtype}): {kernels.summary(choices)}")
    table = Table("layer shape", "layers", "chosen", "rows", "fused ms", "bf16 ms", "fp32 ms")
    for shape, choice in choices.items():
        entry = shapes[shape]
        for i, rows in enumerate(entry["rows"]):
            table.add_row(shape if i == 0 else "", str(entry["layers"]) if i == 0 else "",
                          choice.describe() if i == 0 else "", str(rows),
                          *(f"{entry['ms'][path][i]:.3f}" for path in ("fused", "bf16", "fp32")))
    console.print(table)


@models_app.callback()
def list_models(ctx: typer.Context) -> None:
    """List the models in the registry (AMBER_HOME/models.toml)."""
    if ctx.invoked_subcommand is not None:
        return
    config = home_config()
    registry = load_registry(config.registry_path)
    table = Table("name", "aliases", "dtype", "context", "source")
    for spec in registry.models.values():
        source = spec.path or spec.gguf_path or f"{spec.gguf_package}/{spec.gguf_file}"
        default = " (default)" if spec.name == registry.default else ""
        table.add_row(spec.name + default, ", ".join(spec.aliases), spec.dtype, str(spec.max_context), source)
    console.print(table)


def _store():
    from amber.store.db import open_database
    from amber.store.repo import Store
    return Store(open_database(home_config().database_url))


@keys_app.command("create")
def keys_create(account: str) -> None:
    """Create an API key for ACCOUNT (created if new). The key is the last line printed."""
    try:
        key = _store().create_key(account)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="ACCOUNT") from exc
    console.print(f"API key for account {account!r} (shown once, stored hashed):", highlight=False)
    print(key)


@keys_app.command("list")
def keys_list(account: str) -> None:
    """List ACCOUNT's keys by prefix."""
    for info in _store().list_keys(account):
        print(f"{info.prefix}…  created {info.created_at:%Y-%m-%d %H:%M}  {'revoked' if info.revoked else 'active'}")


@keys_app.command("revoke")
def keys_revoke(prefix_or_key: str) -> None:
    """Revoke a key, given whole or by the prefix `keys list` shows."""
    try:
        ok = _store().revoke_key(prefix_or_key)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if not ok:
        raise typer.BadParameter("no active key matches", param_hint="PREFIX_OR_KEY")
    print("revoked")


if __name__ == "__main__":
    app()
