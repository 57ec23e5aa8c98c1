"""Datasets: `POST/GET /studio/v1/dataset`, `GET/DELETE /studio/v1/dataset/{id}`, and a page of a
dataset's rows, `GET /studio/v1/dataset/{id}/rows`.

Translates the multipart form into `save_dataset`'s arguments (the rules live in
`amber/datasets/parse.py`, the keeping in `amber/datasets/store.py`) and errors into 422s.

An upload is refused on its headers when it can be (the key is checked before the body is read; a
Content-Length over the limit is a 413 at once), and otherwise read as it arrives: the file part
goes straight to an unnamed temporary file under AMBER_HOME, and reading stops with a 413 at the
limit. Parsing runs in a worker thread, so the event loop keeps serving completions meanwhile.
"""
from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Annotated, BinaryIO, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from amber.api import docs
from amber.api.deps import Account, Files, Pool, Store
from amber.api.routing import TextRoute
from amber.api.errors import invalid, not_found
from amber.datasets.parse import DatasetError
from amber.datasets.store import save_dataset
from amber.files import layout
from amber.store.custom_models import DatasetInfo, NameTaken

log = logging.getLogger(__name__)
router = APIRouter(prefix="/studio/v1", route_class=TextRoute, responses=docs.ai21(401))
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
MAX_BODY_BYTES = MAX_UPLOAD_BYTES + 64 * 1024  # the file, the other fields and the parts' headers
MAX_FIELD_BYTES = 16 * 1024
FIELDS = ("dataset_name", "selected_columns", "approve_whitespace_correction", "delete_long_rows", "split_ratio")
_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["dataset_file", "dataset_name"],
    "properties": {"dataset_file": {"type": "string", "format": "binary"},
                   **{name: {"type": "string"} for name in FIELDS}}}}}}}


def dataset_json(d: DatasetInfo) -> dict:
    """AI21's dataset object (the SDK's DatasetResponse), plus what parsing did (`report`)."""
    return {"id": str(d.id), "datasetName": d.name, "sizeBytes": d.size_bytes,
            "creationDate": d.created_at.isoformat(), "numExamples": d.num_examples,
            "trainNumExamples": d.train_examples, "validationNumExamples": d.validation_examples,
            "numModelsUsed": d.num_models_used, "format": d.format, "fileName": d.file_name,
            "report": d.report}


def _flag(name: str, value: str | None) -> bool:
    """A form boolean; the SDK sends unset fields as "" (absent: false)."""
    text = (value or "").strip().lower()
    if text in ("", "false", "0", "no", "none", "null"):
        return False
    if text in ("true", "1", "yes"):
        return True
    raise invalid(("body", name), f"{name} must be true or false, not {value!r}")


def _ratio(value: str | None) -> float:
    if value is None or not value.strip() or value.strip().lower() in ("none", "null"):
        return 0.1
    try:
        ratio = float(value)
    except ValueError:
        raise invalid(("body", "split_ratio"), f"split_ratio must be a number, not {value!r}") from None
    if not math.isfinite(ratio):
        raise invalid(("body", "split_ratio"), "split_ratio must be a finite number")
    return ratio


def _too_large() -> HTTPException:
    return HTTPException(413, f"dataset_file is over {MAX_UPLOAD_BYTES // 2**20} MiB")


class _Form:
    """multipart/form-data, part by part: the text fields in FIELDS kept (each small), the
    `dataset_file` part written to `file`, an unnamed temporary file under `spool_dir` (it leaves
    no name behind, whatever happens to the process); other parts are skipped."""

    def __init__(self, spool_dir: Path):
        self.fields: dict[str, str] = {}
        self.file: BinaryIO | None = None
        self.filename: str | None = None
        self._spool_dir, self._headers, self._header = spool_dir, {}, [b"", b""]
        self._name, self._data, self._size = "", bytearray(), 0

    def parser(self, boundary: bytes) -> MultipartParser:
        return MultipartParser(boundary, {name: getattr(self, name) for name in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
            "on_part_data", "on_part_end")})

    def on_part_begin(self) -> None:
        self._headers, self._name, self._data = {}, "", bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header[0] += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header[1] += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header[0].lower()] = self._header[1]
        self._header = [b"", b""]

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._name == "dataset_file":
            if self.file is not None:
                raise invalid(("body", "dataset_file"), "send one dataset_file")
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self._spool_dir.mkdir(parents=True, exist_ok=True)
            self.file = tempfile.TemporaryFile(dir=self._spool_dir)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == "dataset_file":
            self._size += end - start
            if self._size > MAX_UPLOAD_BYTES:
                raise _too_large()
            self.file.write(data[start:end])
        elif self._name in FIELDS:
            self._data += data[start:end]
            if len(self._data) > MAX_FIELD_BYTES:
                raise invalid(("body", self._name), f"{self._name} is over {MAX_FIELD_BYTES // 1024} KiB")

    def on_part_end(self) -> None:
        if self._name in FIELDS:
            self.fields[self._name] = self._data.decode("utf-8", "replace")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _boundary(request: Request) -> bytes:
    """The multipart boundary; first a 413 for a declared length over the limit (no body read yet)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise _too_large()
    kind, options = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise invalid(("body", "dataset_file"), "send multipart/form-data with a dataset_file and a dataset_name")
    return options[b"boundary"]


async def _receive(request: Request, form: _Form) -> None:
    """The body into `form` as it arrives, each chunk parsed in a worker thread; a 413 at the
    limit, with or without a Content-Length."""
    parser, received = form.parser(_boundary(request)), 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > MAX_BODY_BYTES:
                raise _too_large()
            await run_in_threadpool(parser.write, chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise HTTPException(400, "the body is not valid multipart/form-data") from exc
    except ClientDisconnect as exc:
        raise HTTPException(400, "the upload was cut off") from exc
    except OSError as exc:  # its message names server paths: the log has it, the answer does not
        log.exception("receiving a dataset upload failed")
        raise HTTPException(500, "could not receive the upload (the server's log has the reason)") from exc


async def _create(form: _Form, account: Account, pool: Pool, store: Store) -> dict:
    name = form.fields.get("dataset_name", "").strip()
    if not name or len(name) > 128:
        raise invalid(("body", "dataset_name"), "dataset_name must be 1-128 characters")
    if form.file is None:
        raise invalid(("body", "dataset_file"), "dataset_file is required: a CSV, TSV or JSONL file")
    options = dict(selected_columns=form.fields.get("selected_columns") or None,
                   approve_whitespace_correction=_flag("approve_whitespace_correction",
                                                       form.fields.get("approve_whitespace_correction")),
                   delete_long_rows=_flag("delete_long_rows", form.fields.get("delete_long_rows")),
                   split_ratio=_ratio(form.fields.get("split_ratio")))
    loaded = await run_in_threadpool(pool.get, pool.registry.default)  # its tokenizer sets the length limit
    try:
        info = await run_in_threadpool(save_dataset, store, pool.config, account.id, name, form.filename, form.file,
                                       loaded.tokenizer, loaded.spec.max_context - 1, **options)
    except DatasetError as exc:
        raise invalid(("body", exc.field), str(exc), exc.rows) from exc
    except NameTaken as exc:
        raise invalid(("body", "dataset_name"), str(exc)) from exc
    except OSError as exc:  # its message names server paths: the log has it, the answer does not
        log.exception("storing dataset %r failed", name)
        raise HTTPException(500, "could not store the dataset (the server's log has the reason)") from exc
    return dataset_json(info)


async def create_dataset(request: Request, account: Account, pool: Pool, store: Store) -> dict:
    """Upload a training set: a CSV, TSV or JSONL `dataset_file` and a `dataset_name` (multipart)."""
    # The form is read here, not declared as parameters, which FastAPI would read whole before the
    # key is checked. 200, not 201: the SDK treats any other code as an error.
    form = _Form(pool.config.uploads_dir)
    try:
        await _receive(request, form)
        return await _create(form, account, pool, store)
    finally:
        form.close()


# A plain APIRoute: TextRoute's check reads a body without a Content-Type whole, and this one is never JSON.
router.add_api_route("/dataset", create_dataset, methods=["POST"], responses=docs.ai21(400, 413, 422, 500),
                     openapi_extra=_FORM, route_class_override=APIRoute)


@router.get("/dataset")
async def list_datasets(account: Account, store: Store) -> list[dict]:
    return [dataset_json(d) for d in store.datasets.list(account.id)]


def _id(dataset_id: str) -> int:
    if not dataset_id.isdigit():
        raise not_found(f"dataset {dataset_id!r} does not exist")
    return int(dataset_id)


@router.get("/dataset/{dataset_id}", responses=docs.ai21(404))
async def get_dataset(dataset_id: str, account: Account, store: Store) -> dict:
    info = store.datasets.get(account.id, _id(dataset_id))
    if info is None:
        raise not_found(f"dataset {dataset_id!r} does not exist")
    return dataset_json(info)


@router.get("/dataset/{dataset_id}/rows", responses=docs.ai21(404, 422))
async def dataset_rows(dataset_id: str, account: Account, store: Store,
                       split: Literal["train", "validation"] | None = None,
                       offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
                       limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict:
    """A page of the rows as parsed (both splits, in upload order, unless `split` names one);
    `row` is the row's place in the uploaded file, `total` the count of rows matching."""
    ident = _id(dataset_id)
    if store.datasets.get(account.id, ident) is None:
        raise not_found(f"dataset {dataset_id!r} does not exist")
    rows = store.datasets.rows(ident, split, offset, limit)
    return {"rows": [{"row": r.source_row, "split": r.split, "prompt": r.prompt, "completion": r.completion,
                      "messages": r.messages} for r in rows],
            "total": store.datasets.count_rows(ident, split)}


@router.delete("/dataset/{dataset_id}", responses=docs.ai21(404, 409))
async def delete_dataset(dataset_id: str, account: Account, store: Store, files: Files) -> dict:
    """Deletes the rows and the file. Custom models trained on it keep working (their adapters do
    not need it); one still waiting to train would fail, so that is refused."""
    ident = _id(dataset_id)
    if store.datasets.get(account.id, ident) is None:
        raise not_found(f"dataset {dataset_id!r} does not exist")
    pending = [m.name for m in store.custom_models.list(account.id)
               if m.dataset_id == ident and m.status in ("QUEUED", "TRAINING")]
    if pending:
        raise HTTPException(409, f"dataset {dataset_id} is in use by custom models still training: {pending}")
    store.datasets.delete(account.id, ident)
    await run_in_threadpool(files.storage.delete, layout.dataset(ident))
    return {"id": dataset_id, "deleted": True}
