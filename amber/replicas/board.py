"""The replicas' notice board: a small Ray actor holding each engine replica's latest counters.

Ray Serve routes a handle's call to one replica of its choosing, so the API side cannot ask each
replica in turn; instead every replica posts its stats here twice a second, and the API reads them
all (/health, /metrics). A replica that stops posting (dead, being replaced) drops off after
STALE_S.
"""
from __future__ import annotations

import time

NAME, NAMESPACE = "amber-board", "amber"
STALE_S = 3.0
POST_EVERY_S = 0.5


class Board:
    def __init__(self):
        self._latest: dict[str, tuple[float, dict]] = {}

    def post(self, replica: str, stats: dict) -> None:
        self._latest[replica] = (time.monotonic(), stats)

    def read(self) -> dict[str, dict]:
        """Replica id -> its latest stats, for replicas heard from within STALE_S."""
        now = time.monotonic()
        self._latest = {r: (t, s) for r, (t, s) in self._latest.items() if now - t < STALE_S}
        return {r: s for r, (_, s) in self._latest.items()}


def open_board():
    """The board of this Ray cluster, made if missing (the `amber serve --ray` process owns it)."""
    import ray
    return ray.remote(Board).options(name=NAME, namespace=NAMESPACE, get_if_exists=True, num_cpus=0).remote()
