"""Queries for datasets and custom models: frozen dataclasses out.

A custom model's training is a job of kind "train" (`jobs.py`) whose spec is {"custom_model_id": id},
created in the same transaction as the model. A model reads its status, progress and failure from
its job, in AI21's vocabulary: QUEUED, TRAINING (the job RUNNING), COMPLETED, FAILED (a cancelled
job too, failure "cancelled"). Every read and delete takes the caller's account id and treats
another account's row as missing, so privacy is decided here once rather than in each route. The
worker's methods (`report_epoch`, `complete`) take the job and the worker's name and do nothing
once the job is no longer that worker's.
A dataset and the custom models trained on it are matched on (account, dataset id), and ids are
never reused, so a deleted dataset's id never comes to name someone else's.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Sequence

from sqlalchemy import delete, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from amber.store import jobs
from amber.store.jobs import JobInfo, JobRepo
from amber.store.tables import Account, CustomModel, Dataset, DatasetRow, Job, utcnow

QUEUED, TRAINING, COMPLETED, FAILED = "QUEUED", "TRAINING", "COMPLETED", "FAILED"  # AI21's words
TRAIN = "train"  # the job kind
INSERT_BATCH = 5_000  # dataset rows per INSERT statement


class NameTaken(ValueError):
    """The account already has a dataset or custom model of that name."""


@dataclass(frozen=True)
class DatasetInfo:
    id: int
    account_id: int
    name: str
    file_name: str
    size_bytes: int
    format: str
    num_examples: int
    train_examples: int
    validation_examples: int
    report: dict
    created_at: datetime
    num_models_used: int = 0


@dataclass(frozen=True)
class ExampleRow:
    source_row: int
    split: str
    prompt: str
    completion: str
    messages: list | None = None


@dataclass(frozen=True)
class CustomModelInfo:
    id: int
    account_id: int
    name: str
    base_model: str
    model_type: str
    dataset_id: int
    dataset_name: str
    status: str
    learning_rate: float
    num_epochs: int
    settings: dict
    default_epoch: int | None
    current_epoch: int | None
    progress: dict | None
    epochs: list
    evaluation: dict | None
    failure: str | None
    size_bytes: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    job_id: int | None
    dataset_deleted: bool = False  # the account's dataset `dataset_id` is gone (the model still works)


def _dataset(row: Dataset, used: int = 0) -> DatasetInfo:
    return DatasetInfo(row.id, row.account_id, row.name, row.file_name, row.size_bytes, row.format,
                       row.num_examples, row.train_examples, row.validation_examples, dict(row.report),
                       row.created_at, used)


_OWN = ("id", "account_id", "name", "base_model", "model_type", "dataset_id", "dataset_name", "learning_rate",
        "num_epochs", "settings", "default_epoch", "current_epoch", "epochs", "evaluation", "size_bytes",
        "created_at")


def ai21_status(job: JobInfo | Job | None) -> tuple[str, str | None]:
    """(status, failure) in AI21's vocabulary from the training job's."""
    if job is None:  # not made by Amber: every model gets its job when it is created
        return FAILED, "its training job is missing"
    if job.status == jobs.CANCELLED:
        return FAILED, job.failure or "cancelled"
    return {jobs.RUNNING: TRAINING}.get(job.status, job.status), job.failure


def _model(row: CustomModel, job: Job | None, dataset_deleted: bool = False) -> CustomModelInfo:
    status, failure = ai21_status(job)
    return CustomModelInfo(
        **{f: getattr(row, f) for f in _OWN}, status=status, failure=failure,
        progress=job and job.progress, started_at=job and job.started_at, finished_at=job and job.finished_at,
        job_id=job and job.id, dataset_deleted=bool(dataset_deleted))


def _train_job_of(model_id):
    """Train jobs whose spec names custom model `model_id` (a column or a value)."""
    return (Job.kind == TRAIN) & (Job.spec["custom_model_id"].as_integer() == model_id)


def _with_job(*columns):
    """select(CustomModel, its latest train job, *columns), the job outer-joined."""
    latest = select(func.max(Job.id)).where(_train_job_of(CustomModel.id)).correlate(CustomModel).scalar_subquery()
    return select(CustomModel, Job, *columns).outerjoin(Job, Job.id == latest)


def _same_account():
    """Custom models and datasets of one account that share a dataset id."""
    return (CustomModel.dataset_id == Dataset.id) & (CustomModel.account_id == Dataset.account_id)


def _rows_of(dataset_id: int, split: str | None) -> list:
    return [DatasetRow.dataset_id == dataset_id, *([DatasetRow.split == split] if split is not None else [])]


class DatasetRepo:
    def __init__(self, sessions: sessionmaker[Session]):
        self._sessions = sessions

    def create(self, account_id: int, name: str, file_name: str, size_bytes: int, format: str,
               rows: Sequence[ExampleRow], report: dict, then: Callable[[int], None] | None = None) -> DatasetInfo:
        """One transaction: the dataset, its rows (in batches), then `then(new id)`; if that raises,
        nothing is kept (the caller puts the dataset's files in place there)."""
        train = sum(r.split == "train" for r in rows)
        record = Dataset(account_id=account_id, name=name, file_name=file_name, size_bytes=size_bytes,
                         format=format, num_examples=len(rows), train_examples=train,
                         validation_examples=len(rows) - train, report=report)
        try:
            with self._sessions.begin() as session:
                session.add(record)
                session.flush()
                for start in range(0, len(rows), INSERT_BATCH):
                    session.execute(insert(DatasetRow.__table__), [  # Core: a third faster than the ORM's
                        {"dataset_id": record.id, "source_row": r.source_row, "split": r.split, "prompt": r.prompt,
                         "completion": r.completion, "messages": r.messages} for r in rows[start:start + INSERT_BATCH]])
                if then is not None:
                    then(record.id)
        except IntegrityError as exc:
            raise NameTaken(f"a dataset named {name!r} already exists") from exc
        return _dataset(record)

    def _query(self, account_id: int):
        used = select(func.count(CustomModel.id)).where(_same_account()).scalar_subquery()
        return select(Dataset, used).where(Dataset.account_id == account_id)

    def list(self, account_id: int) -> list[DatasetInfo]:
        with self._sessions() as session:
            return [_dataset(d, used) for d, used in session.execute(self._query(account_id).order_by(Dataset.id))]

    def get(self, account_id: int, dataset_id: int) -> DatasetInfo | None:
        with self._sessions() as session:
            row = session.execute(self._query(account_id).where(Dataset.id == dataset_id)).first()
        return None if row is None else _dataset(*row)

    def find(self, account_id: int, id_or_name: str) -> DatasetInfo | None:
        """By id when it is all digits, else by name."""
        if id_or_name.isdigit():
            return self.get(account_id, int(id_or_name))
        with self._sessions() as session:
            row = session.execute(self._query(account_id).where(Dataset.name == id_or_name)).first()
        return None if row is None else _dataset(*row)

    def rows(self, dataset_id: int, split: str | None = None, offset: int = 0,
             limit: int | None = None) -> list[ExampleRow]:
        """The dataset's rows in upload order (of one split if given); `offset`/`limit` page in SQL."""
        query = (select(DatasetRow).where(*_rows_of(dataset_id, split)).order_by(DatasetRow.id)
                 .offset(offset).limit(limit))
        with self._sessions() as session:
            return [ExampleRow(r.source_row, r.split, r.prompt, r.completion, r.messages)
                    for r in session.scalars(query)]

    def count_rows(self, dataset_id: int, split: str | None = None) -> int:
        with self._sessions() as session:
            return session.scalar(select(func.count(DatasetRow.id)).where(*_rows_of(dataset_id, split)))

    def delete(self, account_id: int, dataset_id: int) -> bool:
        with self._sessions.begin() as session:
            return session.execute(delete(Dataset).where(Dataset.id == dataset_id,
                                                         Dataset.account_id == account_id)).rowcount == 1


def worker_name(pid: int) -> str:
    return f"{socket.gethostname()}:{pid}"


class CustomModelRepo:
    def __init__(self, sessions: sessionmaker[Session], jobs: JobRepo):
        self._sessions, self._jobs = sessions, jobs

    # ---- the account's side ----
    def create(self, account_id: int, name: str, base_model: str, model_type: str, dataset: DatasetInfo,
               learning_rate: float, num_epochs: int, settings: dict) -> CustomModelInfo:
        """The model and its queued train job, in one transaction."""
        record = CustomModel(account_id=account_id, name=name, base_model=base_model, model_type=model_type,
                             dataset_id=dataset.id, dataset_name=dataset.name,
                             learning_rate=learning_rate, num_epochs=num_epochs, settings=settings, epochs=[])
        try:
            with self._sessions.begin() as session:
                session.add(record)
                session.flush()
                job = self._jobs.create(account_id, TRAIN, {"custom_model_id": record.id}, session=session)
        except IntegrityError as exc:
            raise NameTaken(f"a custom model named {name!r} already exists") from exc
        return _model(record, job)

    @staticmethod
    def _query(account_id: int, *where):
        """The account's custom models, each with its job and whether its dataset is gone."""
        return (_with_job(~exists().where(_same_account()))
                .where(CustomModel.account_id == account_id, *where).order_by(CustomModel.id))

    def _first(self, account_id: int, *where) -> CustomModelInfo | None:
        with self._sessions() as session:
            row = session.execute(self._query(account_id, *where)).first()
        return None if row is None else _model(*row)

    def list(self, account_id: int) -> list[CustomModelInfo]:
        with self._sessions() as session:
            return [_model(*row) for row in session.execute(self._query(account_id))]

    def get(self, account_id: int, model_id: int) -> CustomModelInfo | None:
        return self._first(account_id, CustomModel.id == model_id)

    def find(self, account_id: int, id_or_name: str) -> CustomModelInfo | None:
        """By name first (names are what completions use), then by id when it is all digits."""
        found = self._first(account_id, CustomModel.name == id_or_name)
        if found is None and id_or_name.isdigit():
            return self.get(account_id, int(id_or_name))
        return found

    def set_default_epoch(self, account_id: int, model_id: int, epoch: int) -> CustomModelInfo | None:
        statement = (update(CustomModel).where(CustomModel.id == model_id, CustomModel.account_id == account_id)
                     .values(default_epoch=epoch).execution_options(synchronize_session=False))
        with self._sessions.begin() as session:
            if session.execute(statement).rowcount != 1:
                return None
        return self.get(account_id, model_id)

    def delete(self, account_id: int, model_id: int) -> bool:
        """The model goes and its unfinished train job is cancelled: a worker training it stops at its
        next report. (The job stays, so that the account's job list keeps what happened.)"""
        with self._sessions.begin() as session:
            gone = session.execute(delete(CustomModel).where(CustomModel.id == model_id,
                                                             CustomModel.account_id == account_id)).rowcount == 1
            if gone:
                jobs.cancel_in(session, "custom model deleted", _train_job_of(model_id), Job.account_id == account_id)
            return gone

    # ---- the worker's side: `job_id` is the model's train job, which `worker` must still own ----
    def report_epoch(self, model_id: int, job_id: int, worker: str, epochs: list[dict]) -> bool:
        return self._update_owned(model_id, job_id, worker, {}, epochs=epochs, current_epoch=epochs[-1]["epoch"])

    def complete(self, model_id: int, job_id: int, worker: str, default_epoch: int, evaluation: dict | None,
                 size_bytes: int) -> bool:
        """The model's results and its job COMPLETED, in one transaction."""
        done = {"status": jobs.COMPLETED, "progress": None, "finished_at": utcnow(),
                "result": {"custom_model_id": model_id, "default_epoch": default_epoch}}
        return self._update_owned(model_id, job_id, worker, done, default_epoch=default_epoch,
                                  evaluation=evaluation, size_bytes=size_bytes)

    def _update_owned(self, model_id: int, job_id: int, worker: str, job_values: dict, **values) -> bool:
        """Apply `values` to the model and `job_values` to its job (and beat its heartbeat) if
        `worker` still owns the job; False when it was cancelled, deleted or taken over."""
        statement = (update(CustomModel).where(CustomModel.id == model_id, exists().where(jobs.owned(job_id, worker)))
                     .values(**values).execution_options(synchronize_session=False))
        with self._sessions.begin() as session:  # the first UPDATE holds SQLite's write lock till commit
            return session.execute(statement).rowcount == 1 and jobs.finish_in(session, job_id, worker, **job_values)

    # ---- across accounts (the worker; `amber models remove`) ----
    def on_base(self, base_model: str) -> list[tuple[str, CustomModelInfo]]:
        """Every account's custom models trained on registry model `base_model`, whatever their
        status, each with its account's name: what removing that model would strand."""
        query = (_with_job(Account.name, ~exists().where(_same_account()))
                 .join(Account, Account.id == CustomModel.account_id)
                 .where(CustomModel.base_model == base_model).order_by(CustomModel.id))
        with self._sessions() as session:
            return [(account, _model(row, job, gone)) for row, job, account, gone in session.execute(query)]

    def get_any(self, model_id: int) -> CustomModelInfo | None:
        """Whoever owns it: for the worker, which acts for every account."""
        with self._sessions() as session:
            row = session.execute(_with_job().where(CustomModel.id == model_id)).first()
            return None if row is None else _model(*row)
