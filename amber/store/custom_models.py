"""Queries for datasets and custom models (with their training jobs): frozen dataclasses out.

Every read and delete takes the caller's account id and treats another account's row as missing,
so privacy is decided here once rather than in each route. The worker's methods (`claim`,
`report_progress`, ...) take the worker's name instead and do nothing to a job another worker owns.
A dataset and the custom models trained on it are matched on (account, dataset id), and ids are
never reused, so a deleted dataset's id never comes to name someone else's.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Sequence

from sqlalchemy import delete, exists, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from amber.store.tables import Account, CustomModel, Dataset, DatasetRow, utcnow

QUEUED, TRAINING, COMPLETED, FAILED = "QUEUED", "TRAINING", "COMPLETED", "FAILED"
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
    worker: str | None
    heartbeat_at: datetime | None
    size_bytes: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    dataset_deleted: bool = False  # the account's dataset `dataset_id` is gone (the model still works)


def _dataset(row: Dataset, used: int = 0) -> DatasetInfo:
    return DatasetInfo(row.id, row.account_id, row.name, row.file_name, row.size_bytes, row.format,
                       row.num_examples, row.train_examples, row.validation_examples, dict(row.report),
                       row.created_at, used)


def _model(row: CustomModel, dataset_deleted: bool = False) -> CustomModelInfo:
    fields = {f: getattr(row, f) for f in CustomModelInfo.__dataclass_fields__ if f != "dataset_deleted"}
    return CustomModelInfo(**fields, dataset_deleted=bool(dataset_deleted))


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
    def __init__(self, sessions: sessionmaker[Session]):
        self._sessions = sessions

    # ---- the account's side ----
    def create(self, account_id: int, name: str, base_model: str, model_type: str, dataset: DatasetInfo,
               learning_rate: float, num_epochs: int, settings: dict) -> CustomModelInfo:
        record = CustomModel(account_id=account_id, name=name, base_model=base_model, model_type=model_type,
                             dataset_id=dataset.id, dataset_name=dataset.name, status=QUEUED,
                             learning_rate=learning_rate, num_epochs=num_epochs, settings=settings, epochs=[])
        try:
            with self._sessions.begin() as session:
                session.add(record)
        except IntegrityError as exc:
            raise NameTaken(f"a custom model named {name!r} already exists") from exc
        return _model(record)

    @staticmethod
    def _query(account_id: int, *where):
        """The account's custom models, each with whether its dataset is gone."""
        return (select(CustomModel, ~exists().where(_same_account()))
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
        with self._sessions.begin() as session:
            return session.execute(delete(CustomModel).where(CustomModel.id == model_id,
                                                             CustomModel.account_id == account_id)).rowcount == 1

    # ---- the worker's side ----
    def claim(self, worker: str, alive: Callable[[str], bool], stale_after: timedelta) -> CustomModelInfo | None:
        """Take the oldest job that is queued, or training under a worker that is gone (dead on
        this host, or silent for `stale_after`). Atomic: two workers never get the same job."""
        stale = utcnow() - stale_after
        query = (select(CustomModel.id, CustomModel.status, CustomModel.worker, CustomModel.heartbeat_at)
                 .where(or_(CustomModel.status == QUEUED, CustomModel.status == TRAINING))
                 .order_by(CustomModel.id))
        with self._sessions() as session:
            candidates = session.execute(query).all()
        for job in candidates:
            if job.status == TRAINING and job.worker != worker and alive(job.worker) and \
                    job.heartbeat_at is not None and job.heartbeat_at > stale:
                continue
            claim = (update(CustomModel)
                     .where(CustomModel.id == job.id, CustomModel.status == job.status,
                            (CustomModel.worker == job.worker) if job.worker else CustomModel.worker.is_(None))
                     .values(status=TRAINING, worker=worker, heartbeat_at=utcnow(), failure=None,
                             started_at=func.coalesce(CustomModel.started_at, utcnow()))
                     .execution_options(synchronize_session=False))
            with self._sessions.begin() as session:
                if session.execute(claim).rowcount == 1:
                    return _model(session.get(CustomModel, job.id))
        return None

    def _update_owned(self, model_id: int, worker: str, **values) -> bool:
        """Apply `values` if `worker` still owns the job; False when it was deleted or taken over."""
        statement = (update(CustomModel).where(CustomModel.id == model_id, CustomModel.worker == worker,
                                               CustomModel.status == TRAINING)
                     .values(heartbeat_at=utcnow(), **values).execution_options(synchronize_session=False))
        with self._sessions.begin() as session:
            return session.execute(statement).rowcount == 1

    def report_progress(self, model_id: int, worker: str, progress: dict) -> bool:
        return self._update_owned(model_id, worker, progress=progress)

    def report_epoch(self, model_id: int, worker: str, epochs: list[dict]) -> bool:
        return self._update_owned(model_id, worker, epochs=epochs, current_epoch=epochs[-1]["epoch"])

    def complete(self, model_id: int, worker: str, default_epoch: int, evaluation: dict | None,
                 size_bytes: int) -> bool:
        return self._update_owned(model_id, worker, status=COMPLETED, default_epoch=default_epoch,
                                  evaluation=evaluation, size_bytes=size_bytes, finished_at=utcnow(),
                                  progress=None)

    def fail(self, model_id: int, worker: str, reason: str) -> bool:
        return self._update_owned(model_id, worker, status=FAILED, failure=reason, finished_at=utcnow())

    # ---- across accounts (the worker; `amber models remove`) ----
    def on_base(self, base_model: str) -> list[tuple[str, CustomModelInfo]]:
        """Every account's custom models trained on registry model `base_model`, whatever their
        status, each with its account's name: what removing that model would strand."""
        query = (select(Account.name, CustomModel, ~exists().where(_same_account()))
                 .join(Account, Account.id == CustomModel.account_id)
                 .where(CustomModel.base_model == base_model).order_by(CustomModel.id))
        with self._sessions() as session:
            return [(account, _model(row, gone)) for account, row, gone in session.execute(query)]

    def get_any(self, model_id: int) -> CustomModelInfo | None:
        """Whoever owns it: for the worker, which acts for every account."""
        with self._sessions() as session:
            row = session.get(CustomModel, model_id)
            return None if row is None else _model(row)
