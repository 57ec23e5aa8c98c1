"""`amber serve --ray`: the Amber API as a Ray Serve application.

An ingress deployment runs the same FastAPI app as `amber serve` (create_app), with a RemotePool
in place of the local ModelPool; N engine replicas (replica.py) each run their own continuous
batching. Ray Serve's proxy takes HTTP on --host/--port and replaces a replica that dies.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import replace
from typing import Any

from amber.config import Config, Registry
from amber.replicas.replica import EngineReplica

log = logging.getLogger(__name__)
APP_NAME = "amber"
ADAPTER_SLOTS = 8  # custom models a replica is known to hold, for routing (its engine keeps more)


class Ingress:
    """The API's process: HTTP, keys, the store, usage; generation goes to the engine replicas."""

    def __init__(self, config: Config, registry: Registry, engines: Any):
        from amber.replicas.board import open_board
        from amber.replicas.remote import RemotePool
        from amber.store.repo import Store
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.pool = RemotePool(config, registry, engines, open_board())
        self.store = Store.open(config.database_url)

    def __serve_build_asgi_app__(self):
        from amber.api.app import create_app
        from amber.files import SharedFiles
        return create_app(self.pool, self.store, SharedFiles.open(self.pool.config))


def application(config: Config, registry: Registry, replicas: int, cpus: int, adapter_slots: int = ADAPTER_SLOTS):
    """The bound application: one ingress in front of `replicas` engine replicas of `cpus` cores."""
    from ray import serve
    engine_config = replace(config, engine=replace(config.engine, threads=config.engine.threads or cpus))
    engines = serve.deployment(
        EngineReplica, name="engine", num_replicas=replicas,
        # past this Ray would queue requests itself; below it the engine's own queue answers 429
        max_ongoing_requests=config.engine.max_queue + config.engine.max_batch,
        ray_actor_options=replica_options(cpus), health_check_period_s=2, health_check_timeout_s=60,
        graceful_shutdown_timeout_s=5,
    ).bind(engine_config, registry, adapter_slots)
    ingress = serve.deployment(serve.ingress()(Ingress), name="api", num_replicas=1, max_ongoing_requests=100_000,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(config, registry, engines)


def replica_options(cpus: int) -> dict:
    """An engine replica's Ray actor options: its cores, and `amber serve`'s caps (oneDNN's primitive
    cache, malloc arenas) set before its process starts, also where it joins a cluster that
    `ray start` began elsewhere (its workers would not inherit them from this process)."""
    from amber.engine.cpu import serving_env
    return {"num_cpus": cpus, "runtime_env": {"env_vars": serving_env()}}


def ray_missing() -> str | None:
    """What to install, if Ray Serve is not importable here."""
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        return f"needs Ray Serve, which is not installed ({exc}): pip install 'amber[ray]'"
    return None


def cores_per_replica(replicas: int) -> int:
    """An even share of the largest node's cores (a replica runs on one node), at least one."""
    import ray
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
    total = ray.cluster_resources().get("CPU", 1)
    return max(1, int(min(largest, total // replicas)))


def serve_on_ray(config: Config, registry: Registry, *, address: str | None, replicas: int,
                 keep_alive: int, adapter_slots: int = ADAPTER_SLOTS) -> None:
    """Start (or join, with `address`) a Ray cluster, run the application, block until SIGINT or
    SIGTERM, then take the application down (and the cluster, if this process started it)."""
    import ray
    from ray import serve
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network at run time
    ray.init(address=address, include_dashboard=False, namespace="amber",
             **({} if address else {"object_store_memory": 256 << 20}))
    try:
        serve.start(http_options={"host": config.host, "port": config.port, "keep_alive_timeout_s": keep_alive})
        cpus = cores_per_replica(replicas)
        log.info("starting %d engine replicas of %d cores each", replicas, cpus)
        serve.run(application(config, registry, replicas, cpus, adapter_slots), name=APP_NAME, route_prefix="/")
        log.info("Amber on Ray Serve at http://%s:%d", config.host, config.port)
        _wait_for_signal()
    finally:
        try:
            serve.delete(APP_NAME) if address else serve.shutdown()
        finally:
            ray.shutdown()


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
