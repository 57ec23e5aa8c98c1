"""`GET /studio/v1/custom-model/{id}/export`: one trained epoch of a custom model as a zip holding a
standard PEFT adapter (adapter_config.json + adapter_model.safetensors), as `amber models export`
writes it to a directory."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from amber.api import docs
from amber.api.deps import Account, Pool, Store
from amber.api.errors import invalid
from amber.api.routing import TextRoute
from amber.api.studio.custom_models import owned_model

router = APIRouter(prefix="/studio/v1", route_class=TextRoute, responses=docs.ai21(401))
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_ZIP = {200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
              "description": "The adapter's files, zipped"}}


def _zip(directory: Path) -> bytes:
    """Stored, not deflated: safetensors weights barely compress."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name in ADAPTER_FILES:
            archive.write(directory / name, name)
    return buffer.getvalue()


@router.get("/custom-model/{model_id}/export", response_class=Response,
            responses={**_ZIP, **docs.ai21(404, 409, 422)})
async def export_custom_model(model_id: str, account: Account, pool: Pool, store: Store,
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
    directory = pool.config.adapter_dir(model.id, epoch)
    if not all((directory / name).is_file() for name in ADAPTER_FILES):
        raise HTTPException(409, f"epoch {epoch} of {model.name!r} has no adapter files on this server")
    content = await run_in_threadpool(_zip, directory)
    return Response(content, media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{model.name}-epoch{epoch}.zip"'})
