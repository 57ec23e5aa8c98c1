"""Usage records: one row per metered request, written so a crash can neither lose nor double it.

`start` inserts the row (status `running`) under the request's unique id when the request is
admitted; `finish` completes it with one UPDATE that only a `running` row matches, so finishing
twice changes nothing; `interrupt_running` (at server start-up) closes the rows a crash left open.
`summary` groups an account's rows by day, model and key. Knows no HTTP.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone

from sqlalchemy import Date, Integer, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from amber.store.tables import UsageRecord, utcnow

RUNNING, OK, ERROR, CANCELLED, INTERRUPTED = "running", "ok", "error", "cancelled", "interrupted"


@dataclass(frozen=True)
class UsageRow:
    id: str
    key_prefix: str
    api: str
    path: str
    model: str | None
    status: str
    http_status: int | None
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float | None
    first_token_ms: float | None
    started_at: datetime


@dataclass(frozen=True)
class UsageGroup:
    day: date
    model: str | None
    key_prefix: str
    requests: int
    failed: int                 # error, cancelled or interrupted
    prompt_tokens: int
    completion_tokens: int


def _bounds(start: date, end: date) -> tuple[datetime, datetime]:
    """[start 00:00, the day after end 00:00) in UTC: both dates included."""
    return (datetime.combine(start, time(), timezone.utc),
            datetime.combine(end + timedelta(days=1), time(), timezone.utc))


class UsageRepo:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def start(self, request_id: str, account_id: int, key_prefix: str, api: str, path: str) -> None:
        with self._sessions.begin() as session:
            session.add(UsageRecord(id=request_id, account_id=account_id, key_prefix=key_prefix, api=api,
                                    path=path, status=RUNNING, started_at=utcnow()))

    def finish(self, request_id: str, status: str, http_status: int | None, model: str | None,
               prompt_tokens: int, completion_tokens: int, latency_ms: float,
               first_token_ms: float | None) -> bool:
        """Complete a running row; False if it was already complete (nothing changes then)."""
        assert status != RUNNING
        statement = (update(UsageRecord).where(UsageRecord.id == request_id, UsageRecord.status == RUNNING)
                     .values(status=status, http_status=http_status, model=model, prompt_tokens=prompt_tokens,
                             completion_tokens=completion_tokens, latency_ms=latency_ms,
                             first_token_ms=first_token_ms, finished_at=utcnow())
                     .execution_options(synchronize_session=False))
        with self._sessions.begin() as session:
            return session.execute(statement).rowcount == 1

    def interrupt_running(self) -> int:
        """Mark every row still `running` as `interrupted`: called once at start-up, when no request
        of this server can be running yet. Returns how many."""
        statement = (update(UsageRecord).where(UsageRecord.status == RUNNING)
                     .values(status=INTERRUPTED, finished_at=utcnow()).execution_options(synchronize_session=False))
        with self._sessions.begin() as session:
            return session.execute(statement).rowcount

    def records(self, account_id: int, start: date, end: date) -> list[UsageRow]:
        """The account's rows started between `start` and `end` (UTC days, both included), oldest first."""
        lo, hi = _bounds(start, end)
        query = (select(UsageRecord).where(UsageRecord.account_id == account_id, UsageRecord.started_at >= lo,
                                           UsageRecord.started_at < hi).order_by(UsageRecord.started_at))
        with self._sessions() as session:
            return [UsageRow(r.id, r.key_prefix, r.api, r.path, r.model, r.status, r.http_status, r.prompt_tokens,
                             r.completion_tokens, r.latency_ms, r.first_token_ms, r.started_at)
                    for r in session.scalars(query)]

    def summary(self, account_id: int, start: date, end: date) -> list[UsageGroup]:
        """The account's rows between `start` and `end` (UTC days, both included), by day, model and key."""
        lo, hi = _bounds(start, end)
        # stored as naive UTC, so this is the UTC day; typed Date, so both databases give a date
        day = func.date(UsageRecord.started_at, type_=Date)
        query = (select(day.label("day"), UsageRecord.model, UsageRecord.key_prefix, func.count().label("requests"),
                        func.sum(UsageRecord.status.in_([ERROR, CANCELLED, INTERRUPTED]).cast(Integer)).label("failed"),
                        func.sum(UsageRecord.prompt_tokens).label("prompt"),
                        func.sum(UsageRecord.completion_tokens).label("completion"))
                 .where(UsageRecord.account_id == account_id, UsageRecord.started_at >= lo, UsageRecord.started_at < hi)
                 .group_by(day, UsageRecord.model, UsageRecord.key_prefix)
                 .order_by(day, UsageRecord.model, UsageRecord.key_prefix))
        with self._sessions() as session:
            rows = session.execute(query).all()
        return [UsageGroup(r.day, r.model, r.key_prefix, r.requests, r.failed or 0,
                           r.prompt or 0, r.completion or 0) for r in rows]
