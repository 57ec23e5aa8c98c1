"""Jobs: `GET /studio/v1/jobs?kind=`, `GET /studio/v1/jobs/{id}`, `POST /studio/v1/jobs/{id}/cancel`.

Every kind of background work (training a custom model, generating a training set) is a job with
one status vocabulary: QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED. Cancelling is recorded in the
store; the worker running the job stops at its next progress report. Another account's job is 404.
"""
from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter

from amber.api import docs
from amber.api.deps import Account, Store
from amber.api.errors import not_found
from amber.api.routing import TextRoute
from amber.store.jobs import JobInfo

router = APIRouter(prefix="/studio/v1", route_class=TextRoute, responses=docs.ai21(401))


def _time(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def job_json(job: JobInfo) -> dict:
    return {"id": str(job.id), "kind": job.kind, "status": job.status, "progress": job.progress,
            "result": job.result, "failure": job.failure, "createdAt": _time(job.created_at),
            "startedAt": _time(job.started_at), "finishedAt": _time(job.finished_at)}


def _job_id(job_id: str) -> int:
    if not job_id.isdigit():
        raise not_found(f"job {job_id!r} does not exist")
    return int(job_id)


@router.get("/jobs")
async def list_jobs(account: Account, store: Store, kind: str | None = None) -> list[dict]:
    return [job_json(j) for j in store.jobs.list(account.id, kind)]


@router.get("/jobs/{job_id}", responses=docs.ai21(404))
async def get_job(job_id: str, account: Account, store: Store) -> dict:
    job = store.jobs.get(account.id, _job_id(job_id))
    if job is None:
        raise not_found(f"job {job_id!r} does not exist")
    return job_json(job)


@router.post("/jobs/{job_id}/cancel", responses=docs.ai21(404))
async def cancel_job(job_id: str, account: Account, store: Store) -> dict:
    """A queued or running job becomes CANCELLED; a finished one is returned as it is."""
    job = store.jobs.cancel(account.id, _job_id(job_id))
    if job is None:
        raise not_found(f"job {job_id!r} does not exist")
    return job_json(job)
