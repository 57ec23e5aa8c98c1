"""What crosses between the API and an engine replica: a refusal travels as a value and comes back
as the exception a local engine raises (so the API answers alike: 429, 400, 500, 503), and a Ray
error that means "the replica is gone" becomes the retryable EngineUnavailable while a bug in
replica code stays itself."""
from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError

from amber.engine.engine import ContextTooLong, EngineUnavailable
from amber.engine.lora import AdapterError
from amber.engine.scheduler import QueueFull
from amber.replicas.remote import _unavailable
from amber.replicas.wire import Refusal, as_exception, refusal
from amber.serving import ModelUnavailable


@pytest.mark.parametrize("exc", [QueueFull("full", 7.5), ContextTooLong("too long"), AdapterError("bad files"),
                                 ModelUnavailable("cannot load"), EngineUnavailable("gone")])
def test_engine_refusals_travel_as_values_and_come_back_as_the_same_exception(exc):
    r = refusal(exc)
    assert isinstance(r, Refusal) and r.message == str(exc)
    back = as_exception(r)
    assert type(back) is type(exc) and str(back) == str(exc)
    assert getattr(back, "drain_seconds", None) == getattr(exc, "drain_seconds", None)


def test_anything_else_is_no_refusal():
    assert refusal(KeyError("x")) is None and refusal(RuntimeError("bug")) is None


def test_a_dead_replica_is_retryable_and_a_bug_is_not():
    assert isinstance(_unavailable(ActorDiedError()), EngineUnavailable)
    full = _unavailable(BackPressureError(num_queued_requests=3, max_queued_requests=3))
    assert isinstance(full, QueueFull) and full.drain_seconds > 0
    bug = RayTaskError("generate", "Traceback ...", ValueError("boom"))
    assert _unavailable(bug) is bug
