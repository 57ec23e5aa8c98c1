"""`amber datasets generate` and `amber datasets generated`: data generation from the command line,
on the local AMBER_HOME for the account named by --account (as the other dataset commands). The
job runs in a worker (`amber serve` starts one; `generate` starts its own if none takes the job)."""
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

from amber.cli_home import console
from amber.config import load_registry

FileArg = Annotated[Path, typer.Option(exists=True, dir_okay=False)]


def read_examples(path: Path) -> list:
    """JSONL rows with prompt and completion."""
    from amber.evaluation import Example
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    try:
        return [Example(r["prompt"], r["completion"]) for r in rows]
    except (KeyError, TypeError) as exc:
        raise typer.BadParameter("each line must be a JSON object with prompt and completion",
                                 param_hint="--examples") from exc


def read_inputs(path: Path) -> list[str]:
    """JSONL (each line an object whose `prompt` is the input, or a JSON string), or plain text with
    one input per line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix not in (".jsonl", ".json"):
        return lines
    values = [json.loads(line) for line in lines]
    return [v["prompt"] if isinstance(v, dict) else str(v) for v in values]


def register_datagen_commands(datasets_app: typer.Typer, context) -> None:
    """Adds generate/generated to `amber datasets`; `context(account)` -> (config, store, account)."""

    @datasets_app.command("generate")
    def generate(mode: Annotated[str, typer.Option(help="inputs | examples")],
                 examples: FileArg,
                 model: Annotated[Optional[str], typer.Option(help="general or custom model (default: the default)")] = None,
                 inputs: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False,
                                                                help="inputs mode: JSONL (prompt) or text")] = None,
                 n: Annotated[Optional[int], typer.Option(help="examples mode: rows to write")] = None,
                 shots: Annotated[Optional[int], typer.Option(min=1, max=64)] = None,
                 samples: Annotated[int, typer.Option(min=1, max=8, help="inputs mode: draws per input")] = 1,
                 temperature: Annotated[Optional[float], typer.Option(min=0, max=5)] = None,
                 max_tokens: Annotated[int, typer.Option(min=1, max=512)] = 32,
                 seed: int = 0, account: Annotated[str, typer.Option(envvar="AMBER_ACCOUNT")] = "local",
                 follow: Annotated[bool, typer.Option(help="show live progress until it ends")] = True) -> None:
        """Queue a generation job (the same checks as POST /studio/v1/dataset/generate)."""
        from amber.datagen.generate import SpecError, build_spec, check_fits
        from amber.datagen.job import KIND, spec_json
        from amber.engine.checkpoint import ensure_checkpoint
        from amber.engine.tokenizer import Tokenizer
        from amber.files import layout

        config, store, who = context(account)
        registry = load_registry(config.registry_path)
        name = model or registry.default
        base, adapter = registry.resolve(name), None
        if base is None:
            custom = store.custom_models.find(who.id, name)
            if custom is None or not custom.current_epoch:
                raise typer.BadParameter(f"{name!r} is neither a general model nor a trained custom model of "
                                         f"{account!r}", param_hint="--model")
            base = registry.resolve(custom.base_model)
            adapter = {"key": layout.adapter(custom.id, custom.default_epoch or custom.current_epoch)}
        try:
            spec = build_spec(mode, read_examples(examples), inputs=read_inputs(inputs) if inputs else None, n=n,
                              shots=shots, samples=samples, temperature=temperature, max_tokens=max_tokens, seed=seed)
            tokenizer = Tokenizer.from_pretrained(ensure_checkpoint(base, config.checkpoints_dir))
            check_fits(spec, tokenizer.encode, base.max_context)
        except SpecError as exc:
            raise typer.BadParameter(str(exc), param_hint=f"--{exc.field.replace('_', '-')}") from exc
        job = store.jobs.create(who.id, KIND, spec_json(spec, name, base.name, adapter))
        console.print(f"generation job {job.id} queued: {spec.size} rows with {name}", highlight=False)
        if follow:
            _follow(store, who.id, job.id)

    @datasets_app.command("generated")
    def generated(job: int, view: Annotated[str, typer.Option(help="all|kept|flagged|approved|rejected")] = "flagged",
                  approve: Annotated[Optional[str], typer.Option(help="row numbers, e.g. 3,7")] = None,
                  reject: Annotated[Optional[str], typer.Option(help="row numbers")] = None,
                  save: Annotated[Optional[str], typer.Option(help="save the approved rows as this dataset")] = None,
                  limit: int = 50, account: Annotated[str, typer.Option(envvar="AMBER_ACCOUNT")] = "local") -> None:
        """Review a generation job's rows: list them with their flags, approve or reject some, save."""
        from amber.store.generated import APPROVED, REJECTED

        config, store, who = context(account)
        info = store.jobs.get(who.id, job)
        if info is None:
            raise typer.BadParameter(f"no generation job {job} in account {account!r}", param_hint="JOB")
        for numbers, decision in ((approve, APPROVED), (reject, REJECTED)):
            for number in filter(None, (numbers or "").split(",")):
                if store.generated.review(job, int(number), decision=decision) is None:
                    raise typer.BadParameter(f"job {job} has no row {number}")
        if save:
            _save(config, store, who, info, save)
            return
        rows, total = store.generated.page(job, view, 0, limit)
        table = Table("row", "input", "output", "flags", "confidence", "in")
        for r in rows:
            table.add_row(str(r.index), r.input[-60:], r.output[:40], "; ".join(r.details) or "-",
                          "-" if r.confidence is None else f"{r.confidence:.2f}", "yes" if r.included else "no")
        console.print(table)
        counts = store.generated.counts(job)
        console.print(f"{info.status}: {counts['all']} rows, {counts['kept']} unflagged, {counts['approved']} to be "
                      f"saved; showing {len(rows)} of {total} ({view})", highlight=False)


def _save(config, store, who, job, name: str) -> None:
    from amber.datagen.job import save_rows
    from amber.datasets.parse import DatasetError
    from amber.engine.checkpoint import ensure_checkpoint
    from amber.engine.tokenizer import Tokenizer
    from amber.store.custom_models import NameTaken

    rows = [r for r in store.generated.all(job.id) if r.included]
    if job.status not in ("COMPLETED", "CANCELLED") or not rows:
        raise typer.BadParameter(f"job {job.id} is {job.status} with {len(rows)} approved rows: nothing to save")
    spec = load_registry(config.registry_path).resolve(job.spec["baseModel"])
    tokenizer = Tokenizer.from_pretrained(ensure_checkpoint(spec, config.checkpoints_dir))
    try:
        info = save_rows(store, config, who.id, job, rows, name, tokenizer, spec.max_context - 1)
    except (DatasetError, NameTaken) as exc:
        raise typer.BadParameter(str(exc), param_hint="--save") from exc
    console.print(f"dataset {info.name!r}: id {info.id}, {info.num_examples} examples", highlight=False)


def _follow(store, account_id: int, job_id: int) -> None:
    """A live progress bar until the job ends; starts a worker if none takes the job."""
    worker, started = None, time.monotonic()
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rows"),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn()]
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("queued", total=None, detail="")
            while True:
                job = store.jobs.get(account_id, job_id)
                if job is None or job.status in ("COMPLETED", "FAILED", "CANCELLED"):
                    break
                if job.status == "QUEUED" and worker is None and time.monotonic() - started > 3:
                    worker = subprocess.Popen([sys.executable, "-m", "amber.cli", "worker", "--once"])
                    bar.update(task, description="queued (started a worker)")
                p = job.progress or {}
                if p.get("rowsTotal"):
                    kept = p.get("rowsKept")
                    eta = p.get("etaSeconds")
                    bar.update(task, description="generating", total=p["rowsTotal"], completed=p["rowsDone"],
                               detail=f"{kept if kept is not None else '-'} kept" + (f"  eta {eta:.0f}s" if eta else ""))
                time.sleep(0.5)
    finally:
        if worker is not None:
            worker.wait()
    if job is None:
        raise typer.Exit(1)
    console.print(f"generation job {job.id}: {job.status}" + (f" — {job.failure}" if job.failure else ""))
    if job.result:
        r = job.result
        console.print(f"{r['generated']} rows, {r['kept']} kept ({r['yield']:.0%}), {r['rowsPerMinute']} rows/min; "
                      f"flags: {r['reasons']}", highlight=False)
    if job.status != "COMPLETED":
        raise typer.Exit(1)
