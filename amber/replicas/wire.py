"""What crosses between the API process and an engine replica, besides the engine's own types
(GenerationRequest in, token events and RequestOutput out, all plain dataclasses).

A refusal travels as a value rather than as a raised exception, so that the API side can tell an
answer from the replica (a full queue: 429; too big: 400) from the replica being gone (503).
"""
from __future__ import annotations

from dataclasses import dataclass

from amber.engine.engine import ContextTooLong, EngineUnavailable, QueueFull
from amber.engine.lora import AdapterError
from amber.engine.types import RequestOutput
from amber.serving import ModelUnavailable

@dataclass(frozen=True)
class Admitted:
    """A stream's first item: the request is queued in the replica's engine."""
    adapter_held: bool | None  # its custom model was already held there (routing hit); None: base model


@dataclass(frozen=True)
class Generated:
    """A whole request's answer."""
    output: RequestOutput
    adapter_held: bool | None


@dataclass(frozen=True)
class Refusal:
    kind: str                 # one of KINDS
    message: str
    drain_seconds: float = 0.0  # QueueFull's estimate, for Retry-After


KINDS = {"queue_full": QueueFull, "too_long": ContextTooLong, "adapter": AdapterError,
         "model": ModelUnavailable, "gone": EngineUnavailable}


def refusal(exc: BaseException) -> Refusal | None:
    """The refusal an engine exception travels as; None for anything else (a bug: it is raised)."""
    for kind, cls in KINDS.items():
        if isinstance(exc, cls):
            return Refusal(kind, str(exc), getattr(exc, "drain_seconds", 0.0))
    return None


def as_exception(r: Refusal) -> BaseException:
    """The exception the API layer maps to its HTTP answer, as a local engine would have raised it."""
    if r.kind == "queue_full":
        return QueueFull(r.message, r.drain_seconds)
    return KINDS[r.kind](r.message)
