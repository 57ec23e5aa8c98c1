"""How `amber serve --ray` starts its engine replicas."""
from __future__ import annotations


def test_engine_replicas_start_with_the_serving_caps_and_the_users_own_values_win(monkeypatch):
    from amber.engine.cpu import SERVING_ENV
    from amber.replicas.app import replica_options
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    options = replica_options(3)
    assert options["num_cpus"] == 3
    assert options["runtime_env"]["env_vars"] == {**SERVING_ENV, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}
    assert SERVING_ENV["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "16" and SERVING_ENV["MALLOC_ARENA_MAX"] == "2"
