"""`GET /studio/v1/custom-model/{id}/export`: one trained epoch of a custom model as a zip holding a
standard PEFT adapter (adapter_config.json + adapter_model.safetensors), as `amber models export`
writes it to a directory."""
from __future__ import annotations

import io
import shutil
import zipfile
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from amber.api import docs
from amber.api.deps import Account, Files, Store
from amber.api.errors import invalid
from amber.api.routing import TextRoute
from amber.api.studio.custom_models import owned_model
from amber.files import layout
from amber.files.storage import Storage

router = APIRouter(prefix="/studio/v1", route_class=TextRoute, responses=docs.ai21(401))
_ZIP = {200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
              "description": "The adapter's files, zipped"}}


def _zip(storage: Storage, key: str) -> bytes:
    """Stored, not deflated: safetensors weights barely compress."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name in layout.ADAPTER_FILES:
            with storage.open(f"{key}/{name}") as source, archive.open(name, "w") as out:
                shutil.copyfileobj(source, out, 1 << 20)
    return buffer.getvalue()


@router.get("/custom-model/{model_id}/export", response_class=Response,
            responses={**_ZIP, **docs.ai21(404, 409, 422)})
async def export_custom_model(model_id: str, account: Account, store: Store, files: Files,
                              epoch: Annotated[int | None, Query(ge=1)] = None) -> Response:
    """The adapter of `epoch` (default: the model's default epoch, else its latest trained one), to
    load with peft.PeftModel.from_pretrained onto the base model."""
    model = owned_model(store, account, model_id)
    done = model.current_epoch or 0
    if not done:
        raise HTTPException(409, f"custom model {model.name!r} has no trained epoch yet ({model.status})")
    if epoch is not None and epoch > done:
        raise invalid(("query", "epoch"), f"epoch must be a trained epoch, 1..{done}")
    epoch = epoch or model.default_epoch or done
    key = layout.adapter(model.id, epoch)
    held = await run_in_threadpool(files.storage.list, key)
    if not all(name in held for name in layout.ADAPTER_FILES):
        raise HTTPException(409, f"epoch {epoch} of {model.name!r} has no adapter files in storage")
    content = await run_in_threadpool(_zip, files.storage, key)
    return Response(content, media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{model.name}-epoch{epoch}.zip"'})
