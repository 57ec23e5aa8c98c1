"""The FastAPI application: routers, state and the default model's start-up."""
from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from amber.api.ai21.routes import router as ai21_router
from amber.api.studio.custom_models import router as custom_models_router
from amber.api.studio.datasets import router as datasets_router
from amber.api.errors import validation_error
from amber.serving import ModelPool
from amber.store.repo import Store

log = logging.getLogger(__name__)


def create_app(pool: ModelPool, store: Store) -> FastAPI:
    """The app serves at once; /health answers 503 until the default model has loaded."""
    load_error: list[BaseException] = []

    def load_default() -> None:
        try:
            pool.get(pool.registry.default)
        except BaseException as exc:  # reported by /health; the server stays up to say so
            log.exception("loading the default model failed")
            load_error.append(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load_default, name="amber-load", daemon=True).start()
        yield
        pool.close()

    app = FastAPI(title="Amber", version="0.1.0", lifespan=lifespan)
    app.state.pool, app.state.store = pool, store
    app.include_router(datasets_router)      # before ai21's /{model}/complete-style paths
    app.include_router(custom_models_router)
    app.include_router(ai21_router)
    app.add_exception_handler(RequestValidationError, validation_error)

    @app.get("/health")
    def health():
        default = pool.registry.default
        if pool.is_loaded(default):
            return {"status": "ok", "model": default, "engines": pool.stats()}
        if load_error:
            return JSONResponse({"status": "error", "detail": str(load_error[0])}, status_code=503)
        return JSONResponse({"status": "loading", "model": default}, status_code=503)

    return app
