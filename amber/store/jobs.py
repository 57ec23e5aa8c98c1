"""Queries for jobs: one queue and one status vocabulary for every kind of background work.

The account's side (`create`, `get`, `list`, `cancel`) takes the caller's account id and treats
another account's job as missing. The worker's side (`claim`, `report_progress`, `complete`, `fail`)
takes the worker's name and does nothing to a job that is no longer that worker's (cancelled,
deleted, taken over): it answers False, and the worker stops. Every status change is one
conditional UPDATE, so two workers never take the same job, whichever host they run on; on
PostgreSQL a claim also locks the rows it looks at (FOR UPDATE SKIP LOCKED), so racing workers
neither wait on each other nor read a row another is taking. What a spec, progress or result
holds is the kind's business (`amber.worker` runs them); this module knows no kind.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Collection

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from amber.store.tables import Job, utcnow

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = "QUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"
ACTIVE = (QUEUED, RUNNING)


@dataclass(frozen=True)
class JobInfo:
    id: int
    account_id: int
    kind: str
    status: str
    spec: dict
    progress: dict | None
    result: dict | None
    failure: str | None
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int = 0  # claims so far: 1 for a job run once, more for one taken over


def job_info(row: Job) -> JobInfo:
    return JobInfo(row.id, row.account_id, row.kind, row.status, dict(row.spec), row.progress, row.result,
                   row.failure, row.worker, row.created_at, row.started_at, row.finished_at, row.attempts)


def owned(job_id: int, worker: str):
    """The condition that job `job_id` is still `worker`'s to act on."""
    return (Job.id == job_id) & (Job.worker == worker) & (Job.status == RUNNING)


def finish_in(session: Session, job_id: int, worker: str, **values) -> bool:
    """In the caller's transaction: update the job if `worker` still owns it (the heartbeat too)."""
    statement = (update(Job).where(owned(job_id, worker)).values(heartbeat_at=utcnow(), **values)
                 .execution_options(synchronize_session=False))
    return session.execute(statement).rowcount == 1


def cancel_in(session: Session, reason: str, *where) -> int:
    """In the caller's transaction: cancel the unfinished jobs matching `where`; how many."""
    statement = (update(Job).where(Job.status.in_(ACTIVE), *where)
                 .values(status=CANCELLED, failure=reason, finished_at=utcnow())
                 .execution_options(synchronize_session=False))
    return session.execute(statement).rowcount


def _take(session: Session, job, worker: str) -> JobInfo | None:
    """In the caller's transaction: `job` (a candidate row as read) becomes `worker`'s if its status
    and worker are still what was read; None if another claimant got there first."""
    claim = (update(Job)
             .where(Job.id == job.id, Job.status == job.status,
                    (Job.worker == job.worker) if job.worker else Job.worker.is_(None))
             .values(status=RUNNING, worker=worker, heartbeat_at=utcnow(), failure=None,
                     attempts=Job.attempts + 1, started_at=func.coalesce(Job.started_at, utcnow()))
             .execution_options(synchronize_session=False))
    if session.execute(claim).rowcount != 1:
        return None
    return job_info(session.get(Job, job.id))


class JobRepo:
    def __init__(self, sessions: sessionmaker[Session], lock_rows: bool = False):
        """`lock_rows`: claim under FOR UPDATE SKIP LOCKED (PostgreSQL; SQLite has no row locks)."""
        self._sessions, self._lock_rows = sessions, lock_rows

    # ---- the account's side ----
    def create(self, account_id: int, kind: str, spec: dict, session: Session | None = None) -> JobInfo:
        """A QUEUED job; with `session`, inside the caller's transaction (and committed with it)."""
        record = Job(account_id=account_id, kind=kind, status=QUEUED, spec=spec)
        if session is not None:
            session.add(record)
            session.flush()
        else:
            with self._sessions.begin() as own:
                own.add(record)
                own.flush()
        return job_info(record)

    def get(self, account_id: int, job_id: int) -> JobInfo | None:
        with self._sessions() as session:
            row = session.get(Job, job_id)
            return None if row is None or row.account_id != account_id else job_info(row)

    def get_any(self, job_id: int) -> JobInfo | None:
        """Whoever owns it: for the worker, which acts for every account."""
        with self._sessions() as session:
            row = session.get(Job, job_id)
            return None if row is None else job_info(row)

    def list(self, account_id: int, kind: str | None = None) -> list[JobInfo]:
        query = select(Job).where(Job.account_id == account_id, *([Job.kind == kind] if kind else []))
        with self._sessions() as session:
            return [job_info(row) for row in session.scalars(query.order_by(Job.id))]

    def cancel(self, account_id: int, job_id: int, reason: str = "cancelled") -> JobInfo | None:
        """QUEUED or RUNNING -> CANCELLED; a finished job comes back unchanged. A worker running it
        finds out at its next report."""
        with self._sessions.begin() as session:
            cancel_in(session, reason, Job.id == job_id, Job.account_id == account_id)
        return self.get(account_id, job_id)

    # ---- the worker's side ----
    def claim(self, worker: str, alive: Callable[[str], bool], stale_after: timedelta,
              kinds: Collection[str] | None = None) -> JobInfo | None:
        """Take the oldest job that is queued, or running under a worker that is gone (dead on this
        host, or silent for `stale_after`); of `kinds` only, if given. Atomic: the UPDATE applies
        only if status and worker are still what was read, so of two claimants one gets it."""
        stale = utcnow() - stale_after
        query = (select(Job.id, Job.status, Job.worker, Job.heartbeat_at)
                 .where(Job.status.in_(ACTIVE), *([Job.kind.in_(kinds)] if kinds is not None else []))
                 .order_by(Job.id))
        takeable = lambda job: not (job.status == RUNNING and job.worker != worker and alive(job.worker)
                                    and job.heartbeat_at is not None and job.heartbeat_at > stale)
        if self._lock_rows:
            # one transaction: rows another claimant has locked are skipped, not waited on
            with self._sessions.begin() as session:
                for job in session.execute(query.with_for_update(skip_locked=True)).all():
                    if takeable(job) and (taken := _take(session, job, worker)) is not None:
                        return taken
            return None
        # SQLite serializes writers; a read turned write mid-transaction could fail, so read first
        with self._sessions() as session:
            candidates = session.execute(query).all()
        for job in filter(takeable, candidates):
            with self._sessions.begin() as session:
                if (taken := _take(session, job, worker)) is not None:
                    return taken
        return None

    def heartbeat(self, job_id: int, worker: str) -> bool:
        """The job's heartbeat alone (the worker beats while a job runs, whatever it is doing)."""
        return self._owned_update(job_id, worker)

    def _owned_update(self, job_id: int, worker: str, **values) -> bool:
        with self._sessions.begin() as session:
            return finish_in(session, job_id, worker, **values)

    def report_progress(self, job_id: int, worker: str, progress: dict) -> bool:
        """Also the heartbeat. False: the job is no longer this worker's; stop working on it."""
        return self._owned_update(job_id, worker, progress=progress)

    def complete(self, job_id: int, worker: str, result: dict) -> bool:
        return self._owned_update(job_id, worker, status=COMPLETED, result=result, progress=None,
                                  finished_at=utcnow())

    def fail(self, job_id: int, worker: str, reason: str) -> bool:
        return self._owned_update(job_id, worker, status=FAILED, failure=reason, finished_at=utcnow())
