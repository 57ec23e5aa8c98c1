"""The FastAPI application: routers, state and the default model's start-up.

The AI21 API lives under /studio/v1; the OpenAI-compatible one is its own sub-application at /v1,
so that its errors take OpenAI's shape while the AI21 API keeps FastAPI's. /openapi.json describes
both (docs.py merges the sub-application's document in); /v1/openapi.json the OpenAI one alone.
"""
from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from amber import web
from amber.api import docs, rate_limits
from amber.api.ai21.chat_routes import router as ai21_chat_router
from amber.api.ai21.routes import router as ai21_router
from amber.api.studio.custom_models import router as custom_models_router
from amber.api.studio.datasets import router as datasets_router
from amber.api.studio.generate import router as generate_router
from amber.api.studio.few_shot import router as few_shot_router
from amber.api.studio.export import router as export_router
from amber.api.studio.jobs import router as jobs_router
from amber.api.studio.keys import router as keys_router
from amber.api.studio.usage import router as usage_router
from amber.api.metering import Metering, Metrics
from amber.api.errors import unavailable, validation_error
from amber.api.openai import errors as openai_errors
from amber.api.openai.routes import router as openai_router
from amber.files import SharedFiles
from amber.ratelimit import Limiter
from amber.serving import ModelPool, ModelUnavailable
from amber.store.repo import Store

log = logging.getLogger(__name__)


def create_app(pool: ModelPool, store: Store, files: SharedFiles) -> FastAPI:
    """The app serves at once; /health answers 503 until the default model has loaded. `files`: the
    shared datasets and adapters, and this replica's adapter cache."""
    load_error: list[BaseException] = []

    def load_default() -> None:
        try:
            loaded = pool.get(pool.registry.default)
        except BaseException as exc:  # reported by /health; the server stays up to say so
            log.exception("loading the default model failed")
            load_error.append(exc)
            return
        if loaded.chat.available:  # after /health turns 200: chat's first request need not pay for it
            try:
                loaded.chat.load()
            except Exception:
                log.exception("loading the default model's chat template failed")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        interrupted = store.usage.interrupt_running()  # rows a crash left open: before any request
        if interrupted:
            log.warning("%d usage records of requests cut off by a previous stop marked interrupted", interrupted)
        threading.Thread(target=load_default, name="amber-load", daemon=True).start()
        yield
        pool.close()

    # No /docs or /redoc: FastAPI's pages fetch Swagger UI and ReDoc from a CDN, which an offline
    # server cannot reach; /openapi.json describes both APIs, and the studio's pages are at /.
    app = FastAPI(title="Amber", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.pool, app.state.store, app.state.files = pool, store, files
    app.state.limiter = Limiter()  # one for both APIs: an account's limits span them
    app.include_router(generate_router)      # before datasets': /dataset/generate is no dataset id
    app.include_router(datasets_router)      # before ai21's /{model}/complete-style paths
    app.include_router(custom_models_router)
    app.include_router(jobs_router)
    app.include_router(export_router)
    app.include_router(few_shot_router)
    app.include_router(keys_router)
    app.include_router(usage_router)
    app.include_router(ai21_chat_router)
    app.include_router(ai21_router)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ModelUnavailable, unavailable)
    v1 = openai_app(pool, store, files)
    v1.state.limiter = app.state.limiter
    app.mount("/v1", v1)
    app.add_middleware(rate_limits.HeadersMiddleware)
    docs.install(app, mount=("/v1", v1, "OpenAI"))  # one document for both APIs
    metrics = Metrics(pool)
    app.add_middleware(Metering, store=store, metrics=metrics)  # sees /v1 too: wraps the mount

    @app.get("/metrics", include_in_schema=False)
    def prometheus():  # unauthenticated, like /health: counts and timings, no account's data
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", responses=docs.UNHEALTHY)
    def health():
        default = pool.registry.default
        if pool.is_loaded(default):
            replicas = {"replicas": pool.replicas()} if hasattr(pool, "replicas") else {}  # amber serve --ray
            return {"status": "ok", "model": default, "engines": pool.stats(), "kernels": pool.kernels(), **replicas}
        if load_error:
            return JSONResponse({"status": "error", "detail": str(load_error[0])}, status_code=503)
        return JSONResponse({"status": "loading", "model": default}, status_code=503)

    web.install(app)  # the studio's pages at / (amber/web: static files on the APIs above)
    return app


def openai_app(pool: ModelPool, store: Store, files: SharedFiles) -> FastAPI:
    """The OpenAI-compatible API, mounted at /v1 (same keys, same models)."""
    v1 = FastAPI(title="Amber (OpenAI-compatible)", version="0.1.0", docs_url=None, redoc_url=None)
    v1.state.pool, v1.state.store, v1.state.files = pool, store, files
    v1.include_router(openai_router)
    openai_errors.install(v1)
    docs.install(v1)
    return v1
