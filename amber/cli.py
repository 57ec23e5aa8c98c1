"""The `amber` command: with `cli_home.py` (AMBER_HOME), the only reader of argv and the environment.
Builds Config, then dispatches.

    amber serve            serve the API (default http://127.0.0.1:8000), with a training worker
    amber worker           run queued jobs: custom-model training, ... (what `serve` starts)
    amber models           list the registry's models; `models add|remove` edit it;
                           `models train|show|export` for custom ones
    amber datasets upload  upload a training set
    amber keys create A    make an API key for account A (printed as the last line)
    amber accounts limits A  show or set account A's rate limits (requests and tokens per minute)
    amber db upgrade       bring the database (AMBER_DATABASE_URL, else SQLite in AMBER_HOME) to this Amber's schema
    amber doctor           this machine as the engine sees it: CPU, torch, kernels chosen per layer
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace
from typing import Annotated, Optional

import typer
from rich.table import Table

from amber.cli_custom import datasets_app, register_model_commands
from amber.cli_home import console, home_config, open_store
from amber.config import Config, EngineConfig, RateLimits, load_registry

app = typer.Typer(help="Amber: a self-hosted language-model studio (AI21 Studio's J2 API).",
                  no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
accounts_app = typer.Typer(help="Accounts: rate limits.", no_args_is_help=True)
app.add_typer(accounts_app, name="accounts")
models_app = typer.Typer(help="General models (the registry) and custom models.", invoke_without_command=True)
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")
db_app = typer.Typer(help="The database (AMBER_DATABASE_URL, else SQLite in AMBER_HOME): schema revisions.",
                     no_args_is_help=True)
app.add_typer(db_app, name="db")
register_model_commands(models_app)


def build_config(host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
                 max_batch: int = 32, max_queue: int = 256, prefix_blocks: int = 512,
                 rate_limits: RateLimits = RateLimits(), kv_memory_mb: int = 512,
                 threads: int | None = None) -> Config:
    from amber.serving import pick_device  # torch import only for commands that need it
    engine = replace(EngineConfig(), device=pick_device(device), max_batch=max_batch, max_queue=max_queue,
                     prefix_blocks=prefix_blocks, kv_memory_mb=kv_memory_mb, threads=threads)
    return replace(home_config(), host=host, port=port, engine=engine, rate_limits=rate_limits)


def _bounded_allocations() -> None:
    """cpu.SERVING_ENV in this process: at most two glibc malloc arenas (mallopt, as the threads'
    arenas are not made yet; elsewhere than glibc, nothing) and a bounded cache of oneDNN's GEMMs
    (the environment, which the processes started from here inherit as before: the training worker
    keeps glibc's arenas, never measured under the cap; Ray replicas get both, replicas/app.py).

    A fixed M_MMAP_THRESHOLD of 256 KB (every freed tensor back to the OS) was measured and left
    out: 16 concurrent 500-token requests peaked ~140 MB lower in process, but ran 1.7x slower
    (20 against 34 s), page faults on every activation of every prefill."""
    from amber.engine.cpu import serving_env
    env = serving_env()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-8, int(env["MALLOC_ARENA_MAX"]))  # M_ARENA_MAX
    except (OSError, AttributeError, ValueError):
        pass
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]


@app.command()
def serve(host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="TCP port")] = 8000,
          device: Annotated[Optional[str], typer.Option(help="cpu or cuda; default: cuda if present")] = None,
          max_batch: Annotated[int, typer.Option(min=1, max=256, help="sequences decoded together")] = 32,
          max_queue: Annotated[int, typer.Option(min=1, help="waiting requests per model before 429")] = 256,
          prefix_cache_blocks: Annotated[int, typer.Option(min=0, help="16-position KV blocks the prefix cache "
                                                           "may keep; 0: off")] = 512,
          kv_memory_mb: Annotated[int, typer.Option(min=1, help="MB of KV memory per model (a paged pool: "
                                                    "memory follows the tokens in use, up to this)")] = 512,
          threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads per engine (with --ray: per "
                                                         "replica); default: every core (with --ray: a share)")] = None,
          log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
          worker: Annotated[bool, typer.Option(help="start a worker process beside the server for training and "
                                               "other jobs; --no-worker: an API-only node, whose jobs workers "
                                               "elsewhere on the same database run (`amber worker`)")] = True,
          stale_after: Annotated[float, typer.Option(min=1, help="seconds without a heartbeat after which the "
                                                     "worker takes over another host's running job")] = 60,
          keep_alive: Annotated[int, typer.Option(min=1, help="seconds an idle client connection stays open")] = 75,
          rpm: Annotated[int, typer.Option(min=0, envvar="AMBER_RPM", help="default requests per minute per "
                                           "account; 0: unlimited")] = 0,
          tpm: Annotated[int, typer.Option(min=0, envvar="AMBER_TPM", help="default tokens per minute per "
                                           "account; 0: unlimited")] = 0,
          ray: Annotated[bool, typer.Option("--ray", help="run as a Ray Serve application: one API ingress "
                                            "in front of --replicas engine replicas (docs/deploy.md)")] = False,
          address: Annotated[Optional[str], typer.Option(help="with --ray: the Ray cluster to join (`auto`, or "
                                                         "HOST:6379); default: start one on this machine")] = None,
          replicas: Annotated[int, typer.Option(min=1, help="with --ray: engine replicas")] = 2,
          adapter_slots: Annotated[int, typer.Option(min=1, help="with --ray: custom models a replica holds "
                                                     "for routing (Ray Serve multiplexing)")] = 8
          ) -> None:
    """Serve the J2 API; the default model loads in the background (/health says when). With
    --no-worker, an API-only node: jobs are left to `amber worker` processes elsewhere."""

    import uvicorn

    from amber.api.app import create_app
    from amber.files import SharedFiles
    from amber.serving import ModelPool
    from amber.worker import WorkerProcess

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _bounded_allocations()
    config = build_config(host, port, device, max_batch, max_queue, prefix_cache_blocks, RateLimits(rpm, tpm),
                          kv_memory_mb, threads)
    registry = load_registry(config.registry_path)
    if (address is not None or replicas != 2) and not ray:
        raise typer.BadParameter("needs --ray", param_hint="--address/--replicas")
    store = open_store(config)  # checks (or creates) the schema before anything starts
    # training runs in its own process, never in the API's
    trainer = WorkerProcess(log_level, stale_after).start() if worker else None
    try:
        if ray:
            from amber.replicas.app import serve_on_ray, ray_missing
            if (missing := ray_missing()) is not None:
                raise typer.BadParameter(missing, param_hint="--ray")
            serve_on_ray(config, registry, address=address, replicas=replicas, keep_alive=keep_alive,
                         adapter_slots=adapter_slots)
        else:
            uvicorn.run(create_app(ModelPool(config, registry), store, SharedFiles.open(config)), host=config.host, port=config.port,
                        log_level=log_level, timeout_keep_alive=keep_alive)
    finally:
        if trainer is not None:
            trainer.stop()


@app.command("worker")
def run_worker(once: Annotated[bool, typer.Option(help="exit when no job is waiting")] = False,
               parent: Annotated[Optional[int], typer.Option(hidden=True, help="exit when this pid is gone")] = None,
               stale_after: Annotated[float, typer.Option(min=1, help="seconds without a heartbeat after which a "
                                                          "running job is taken over (a worker on this host "
                                                          "that died is seen at once)")] = 60,
               log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info") -> None:
    """Run queued jobs (training custom models, ...), one at a time, from this host or any other on
    the same database (AMBER_DATABASE_URL); takes over jobs whose worker died or went silent."""
    from datetime import timedelta

    from amber.worker import Worker

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = home_config()
    Worker(config, load_registry(config.registry_path), open_store(config), timedelta(seconds=stale_after)).run(
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
        source = spec.path or spec.gguf_path or f"{spec.gguf_package}:{spec.gguf_file}"
        default = " (default)" if spec.name == registry.default else ""
        table.add_row(spec.name + default, ", ".join(spec.aliases), spec.dtype, str(spec.max_context), source)
    console.print(table)


@models_app.command("add")
def models_add(name: Annotated[str, typer.Argument(help="the name requests will use")],
               source: Annotated[str, typer.Option("--from", help="a Hugging Face checkpoint directory, a GGUF "
                                                   "file, or package:path/inside/it.gguf")],
               dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | int8 | int8-bf16 | int4")] = "float32",
               alias: Annotated[Optional[list[str]], typer.Option(help="another name for it (repeatable)")] = None,
               max_context: Annotated[Optional[int], typer.Option(min=1, help="prompt + completion tokens "
                                                                  "(default: 2048, or the model's positions if fewer)")] = None
               ) -> None:
    """Check a model, then add it to the registry.

    The check loads it as the server does, generates one token, and compares its logprobs with
    transformers' own forward pass. A running server sees the model after a restart."""
    from amber.models_admin import add_model
    from amber.registry_edit import Refused

    _quiet()
    try:
        added = add_model(home_config(), name, source, dtype, tuple(alias or ()), max_context)
    except Refused as exc:
        _refuse(exc)
    spec, checked, f = added.spec, added.checked, added.checked.fidelity
    print(f"added {spec.name} ({checked.model_type}, {spec.dtype}, max_context {spec.max_context})"
          + (f", aliases {', '.join(spec.aliases)}" if spec.aliases else ""))
    print(f"one token after the check's text: {checked.next_token!r}")
    print(f"logprobs not compared: transformers has no {checked.model_type!r} model" if f is None else
          f"logprobs vs transformers' float32 forward over {f.tokens} tokens: max |diff| {f.max_diff:.2e} "
          f"nats, mean {f.mean_diff:.2e}")
    print("a running `amber serve` serves it once restarted")


@models_app.command("remove")
def models_remove(name: Annotated[str, typer.Argument(help="a registry model's name (not an alias)")]) -> None:
    """Remove a model from the registry, with the checkpoint Amber converted for it.

    Refused while custom models are trained on it, and for the default model."""
    from amber.models_admin import remove_model
    from amber.registry_edit import Refused

    config = home_config()
    try:
        removed = remove_model(config, _store(), name)
    except Refused as exc:
        _refuse(exc)
    print(f"removed {name}" + (f" and its converted checkpoint {removed.checkpoint}" if removed.checkpoint else ""))


def _refuse(exc: Exception):
    """One sentence on stderr and exit status 1."""
    print(f"error: {exc}", file=sys.stderr)
    raise typer.Exit(1)


def _quiet() -> None:
    """Keep transformers' warnings and progress bars, and the engine's logged tracebacks, off
    stderr, where a refusal is one sentence (which names the error)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion uses tqdm directly
    logging.getLogger("amber").setLevel(logging.CRITICAL)


def _store():
    return open_store(home_config())


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Bring the database to this Amber's schema (the newest revision it knows). Run once per
    upgrade of Amber on a shared database (PostgreSQL); a SQLite file is upgraded when opened."""
    from amber.store import migrate
    from amber.store.db import connect

    engine = connect(home_config().database_url)
    try:
        before, after = migrate.upgrade(engine)
    except migrate.SchemaMismatch as exc:
        _refuse(exc)
    finally:
        engine.dispose()
    print(f"the database is already at {after}" if before == after else
          f"upgraded the database from {before or '(no revision)'} to {after}")


@db_app.command("current")
def db_current() -> None:
    """Show the database's revision and this Amber's."""
    from amber.store import migrate
    from amber.store.db import connect, shown_url

    url = home_config().database_url
    engine = connect(url)
    try:
        revision = migrate.revision(engine)
    finally:
        engine.dispose()
    head = migrate.head()
    state = ("up to date" if revision == head else
             "none yet: `amber db upgrade`, or any command that opens it, makes it" if revision is None else
             "behind: run `amber db upgrade`" if migrate.known(revision) else "newer than this Amber: upgrade Amber")
    print(f"database    {shown_url(url)}\nrevision    {revision or '(none)'}\nthis Amber  {head}\n{state}")


@keys_app.command("create")
def keys_create(account: str,
                name: Annotated[Optional[str], typer.Option(help="a label for the key, shown by `keys list`")] = None
                ) -> None:
    """Create an API key for ACCOUNT (created if new). The key is the last line printed."""
    if name is not None and not (1 <= len(name.strip()) <= 64 and name.strip().isprintable()):
        raise typer.BadParameter("use 1-64 printable characters", param_hint="--name")
    try:
        key = _store().create_key(account, name.strip() if name else None)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="ACCOUNT") from exc
    console.print(f"API key for account {account!r} (shown once, stored hashed):", highlight=False)
    print(key)


@keys_app.command("list")
def keys_list(account: str) -> None:
    """List ACCOUNT's keys by prefix."""
    for info in _store().list_keys(account):
        print(f"{info.prefix}…  created {info.created_at:%Y-%m-%d %H:%M}  {'revoked' if info.revoked else 'active'}"
              + (f"  {info.name}" if info.name else ""))


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


@accounts_app.command("limits")
def accounts_limits(account: str,
                    rpm: Annotated[Optional[int], typer.Option(min=0, help="requests per minute; 0: unlimited")] = None,
                    tpm: Annotated[Optional[int], typer.Option(min=0, help="tokens per minute (prompt + "
                                                               "completion); 0: unlimited")] = None,
                    reset: Annotated[bool, typer.Option(help="back to the server's defaults "
                                                        "(amber serve --rpm/--tpm)")] = False) -> None:
    """Show ACCOUNT's rate limits, or set them; a running server applies them at the next request."""
    if reset and (rpm is not None or tpm is not None):
        raise typer.BadParameter("give --reset alone, or --rpm/--tpm", param_hint="--reset")
    store = _store()
    try:
        found = store.get_account(account)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="ACCOUNT") from exc
    if found is None:
        raise typer.BadParameter(f"no account {account!r} (`amber keys create {account}` makes it)",
                                 param_hint="ACCOUNT")
    if reset:
        store.reset_limits(found.id)
    own = store.set_limits(found.id, rpm, tpm)
    for name, value in (("requests per minute", own.rpm), ("tokens per minute", own.tpm)):
        print(f"{name}: " + ("server default" if value is None else "unlimited" if value == 0 else str(value)))


if __name__ == "__main__":
    app()
