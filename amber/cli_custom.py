"""`amber datasets ...` and `amber models train|show|export`: custom models from the command line.

They act on the local AMBER_HOME directly (like `amber keys`), for the account named by --account
(default: $AMBER_ACCOUNT, else "local"), which is created if missing. Training runs in a worker
process: `amber serve` starts one; `models train` starts its own if no worker takes the job.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from amber.cli_home import console, home_config, open_store
from amber.config import load_registry

datasets_app = typer.Typer(help="Training datasets.", no_args_is_help=True)
AccountOpt = Annotated[str, typer.Option("--account", envvar="AMBER_ACCOUNT", help="the account acting")]


def _context(account: str):
    config = home_config()
    store = open_store(config)
    try:
        return config, store, store.ensure_account(account)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--account") from exc


@datasets_app.command("upload")
def datasets_upload(file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="CSV, TSV or JSONL")],
                    name: Annotated[str, typer.Option(help="dataset name, unique in the account")],
                    account: AccountOpt = "local",
                    selected_columns: Annotated[Optional[str], typer.Option(help='e.g. "text,label"')] = None,
                    approve_whitespace_correction: bool = False, delete_long_rows: bool = False,
                    split_ratio: Annotated[float, typer.Option(help="validation share")] = 0.1) -> None:
    """Upload a dataset: the same checks as POST /studio/v1/dataset."""
    from amber.datasets.parse import DatasetError
    from amber.datasets.store import save_dataset
    from amber.engine.checkpoint import ensure_checkpoint
    from amber.engine.tokenizer import Tokenizer
    from amber.store.custom_models import NameTaken

    config, store, who = _context(account)
    registry = load_registry(config.registry_path)
    spec = registry.models[registry.default]
    tokenizer = Tokenizer.from_pretrained(ensure_checkpoint(spec, config.checkpoints_dir))
    try:
        with open(file, "rb") as upload:
            info = save_dataset(store, config, who.id, name, file.name, upload, tokenizer,
                                spec.max_context - 1, selected_columns=selected_columns,
                                approve_whitespace_correction=approve_whitespace_correction,
                                delete_long_rows=delete_long_rows, split_ratio=split_ratio)
    except DatasetError as exc:
        raise typer.BadParameter(str(exc), param_hint=f"--{exc.field.replace('_', '-')}"
                                 if exc.field != "dataset_file" else "FILE") from exc
    except NameTaken as exc:
        raise typer.BadParameter(str(exc), param_hint="--name") from exc
    console.print(f"dataset {info.name!r}: id {info.id}, {info.num_examples} examples "
                  f"({info.train_examples} train, {info.validation_examples} validation)", highlight=False)
    for what, rows in info.report.items():
        if rows:
            console.print(f"  {what}: rows {rows[:10]}{' ...' if len(rows) > 10 else ''}", highlight=False)


@datasets_app.command("list")
def datasets_list(account: AccountOpt = "local") -> None:
    _, store, who = _context(account)
    table = Table("id", "name", "examples", "train", "validation", "models", "created")
    for d in store.datasets.list(who.id):
        table.add_row(str(d.id), d.name, str(d.num_examples), str(d.train_examples),
                      str(d.validation_examples), str(d.num_models_used), f"{d.created_at:%Y-%m-%d %H:%M}")
    console.print(table)


def register_model_commands(models_app: typer.Typer) -> None:
    """Adds train/show/export to the `amber models` group that cli.py owns."""

    @models_app.command("train")
    def models_train(dataset: Annotated[str, typer.Argument(help="dataset id or name")],
                     name: Annotated[str, typer.Option(help="the custom model's name")],
                     base: Annotated[Optional[str], typer.Option(help="base model (default: the default)")] = None,
                     epochs: Annotated[Optional[int], typer.Option(min=1, max=20)] = None,
                     learning_rate: Annotated[Optional[float], typer.Option(min=0, max=1)] = None,
                     account: AccountOpt = "local",
                     follow: Annotated[bool, typer.Option(help="show live progress until it ends")] = True) -> None:
        """Queue a training job and follow it live."""
        from amber.store.custom_models import NameTaken
        from amber.training.defaults import DEFAULT_EPOCHS, DEFAULT_LEARNING_RATE

        config, store, who = _context(account)
        registry = load_registry(config.registry_path)
        spec = registry.resolve(base or registry.default)
        if spec is None:
            raise typer.BadParameter(f"no model {base!r} in the registry", param_hint="--base")
        info = store.datasets.find(who.id, dataset)
        if info is None:
            raise typer.BadParameter(f"no dataset {dataset!r} in account {account!r}", param_hint="DATASET")
        try:
            model = store.custom_models.create(who.id, name, spec.name, base or spec.name, info,
                                               learning_rate or DEFAULT_LEARNING_RATE, epochs or DEFAULT_EPOCHS, {})
        except NameTaken as exc:
            raise typer.BadParameter(str(exc), param_hint="--name") from exc
        console.print(f"custom model {name!r} (id {model.id}) queued on {spec.name}", highlight=False)
        if follow:
            _follow(store, who.id, model.id)

    @models_app.command("show")
    def models_show(name: str, account: AccountOpt = "local",
                    as_json: Annotated[bool, typer.Option("--json", help="the API's JSON object")] = False) -> None:
        """A custom model: status, epochs, and how it compares with k-shot prompting."""
        from amber.api.studio.custom_models import custom_model_json

        _, store, who = _context(account)
        model = store.custom_models.find(who.id, name)
        if model is None:
            raise typer.BadParameter(f"no custom model {name!r} in account {account!r}", param_hint="NAME")
        if as_json:
            print(json.dumps(custom_model_json(model), indent=2))
            return
        console.print(f"[bold]{model.name}[/] (id {model.id}) on {model.base_model}: {model.status}"
                      + (f" — {model.failure}" if model.failure else ""))
        console.print(f"trained on dataset {model.dataset_name!r} (id {model.dataset_id}"
                      f"{', since deleted' if model.dataset_deleted else ''})", highlight=False)
        epochs = Table("epoch", "train loss", "validation loss", "seconds")
        for e in model.epochs:
            mark = " *" if e["epoch"] == model.default_epoch else ""
            val = e["validation_loss"]
            epochs.add_row(f"{e['epoch']}{mark}", f"{e['train_loss']:.4f}", "-" if val is None else f"{val:.4f}",
                           str(e["seconds"]))
        console.print(epochs)
        _print_evaluation(model.evaluation)

    @models_app.command("export")
    def models_export(name: str, directory: Annotated[Path, typer.Argument(file_okay=False)],
                      epoch: Annotated[Optional[int], typer.Option(help="default: the model's default epoch")] = None,
                      account: AccountOpt = "local") -> None:
        """Write a standard PEFT adapter (adapter_config.json + adapter_model.safetensors)."""
        config, store, who = _context(account)
        model = store.custom_models.find(who.id, name)
        if model is None:
            raise typer.BadParameter(f"no custom model {name!r} in account {account!r}", param_hint="NAME")
        epoch = epoch or model.default_epoch
        if epoch is None or epoch > (model.current_epoch or 0):
            raise typer.BadParameter(f"{name!r} has no trained epoch {epoch} ({model.status})", param_hint="--epoch")
        from amber.files import layout, open_storage
        from amber.files.storage import fetch

        directory.mkdir(parents=True, exist_ok=True)
        fetch(open_storage(config), layout.adapter(model.id, epoch), directory, layout.ADAPTER_FILES)
        console.print(f"exported {name!r} epoch {epoch} to {directory} (load it with "
                      f"peft.PeftModel.from_pretrained onto {model.base_model})", highlight=False)


def _print_evaluation(evaluation: dict | None) -> None:
    if not evaluation or "custom_model" not in evaluation:
        console.print("no evaluation (the dataset has no validation rows)" if evaluation is not None else "")
        return
    table = Table("", "exact match", "mean latency")
    for label, key in (("custom model", "custom_model"), (f"{evaluation['shots']}-shot base model", "few_shot")):
        r = evaluation[key]
        table.add_row(label, f"{r['accuracy']:.1%} ({r['correct']}/{evaluation['examples']})",
                      f"{r['mean_latency_s'] * 1000:.0f} ms")
    console.print(table)
    console.print(f"accuracy {evaluation['accuracy_gain']:+.1%}, {evaluation['speedup']:.2f}x faster than "
                  f"prompting with {evaluation['shots']} examples (epoch {evaluation['epoch']}, validation split)")


def _follow(store, account_id: int, model_id: int) -> None:
    """A live progress bar until the job ends; starts a worker if none takes the job."""
    worker, started = None, time.monotonic()
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn()]
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("queued", total=None, detail="")
            while True:
                model = store.custom_models.get(account_id, model_id)
                if model is None or model.status in ("COMPLETED", "FAILED"):
                    break
                if model.status == "QUEUED" and worker is None and time.monotonic() - started > 3:
                    worker = subprocess.Popen([sys.executable, "-m", "amber.cli", "worker", "--once"])
                    bar.update(task, description="queued (started a worker)")
                p = model.progress or {}
                if p.get("phase") == "training":
                    bar.update(task, description=f"epoch {p['epoch']}/{p['epochs']}", total=p["totalSteps"],
                               completed=p["step"], detail=f"loss {p['loss']:.3f}  eta {p['etaSeconds']:.0f}s")
                elif p.get("phase") == "evaluating":
                    bar.update(task, description="evaluating against k-shot prompting", detail="")
                time.sleep(0.5)
    finally:
        if worker is not None:
            worker.wait()
    if model is None:
        raise typer.Exit(1)
    console.print(f"{model.name}: {model.status}" + (f" — {model.failure}" if model.failure else ""))
    _print_evaluation(model.evaluation)
    if model.status == "FAILED":
        raise typer.Exit(1)


from amber.cli_datagen import register_datagen_commands  # noqa: E402  (generate/generated: their own module)

register_datagen_commands(datasets_app, _context)
