"""The database schema: SQLAlchemy declarative tables, one class per table.

Owns column types, keys and indexes; knows no queries (those are in `repo.py`) and no connection
settings (those are in `db.py`). Every resource a user owns (keys now; datasets, custom models and
training jobs later) carries an `account_id` foreign key to `accounts`.
Times are stored as naive UTC (SQLite has no time zones; on PostgreSQL `timestamp without time
zone`) and read back as aware UTC datetimes, the same on both.
Tables whose ids the API shows (datasets, custom models, jobs) never reuse an id (SQLite AUTOINCREMENT;
PostgreSQL's sequences never do): a custom model names its dataset by id, and a directory under
AMBER_HOME is named after one.
The database gets this shape from the migrations (`migrations/versions`), never from create_all: a
change here needs a revision there (tests/store/test_migrations.py compares the two).
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, DateTime, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(TypeDecorator[datetime]):
    """A datetime stored as naive UTC and returned as aware UTC, so comparisons never mix the two."""
    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        assert value.tzinfo is not None, "store aware datetimes only"
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UtcDateTime}


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex; the key is never stored
    prefix: Mapped[str] = mapped_column(String(32), index=True)      # shown in listings, used to revoke
    name: Mapped[str | None] = mapped_column(String(64))             # the owner's label, for listings
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Dataset(Base):
    """An uploaded training set. The file itself, unchanged, lives under AMBER_HOME/datasets/ID."""
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("account_id", "name"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    file_name: Mapped[str] = mapped_column(String(256))        # as the client named it, for display only
    size_bytes: Mapped[int]
    format: Mapped[str] = mapped_column(String(32))            # prompt_completion | chat
    num_examples: Mapped[int]
    train_examples: Mapped[int]
    validation_examples: Mapped[int]
    report: Mapped[dict] = mapped_column(JSON)                 # what parsing removed or corrected
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DatasetRow(Base):
    __tablename__ = "dataset_rows"

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    source_row: Mapped[int]                                    # 1-based row in the uploaded file
    split: Mapped[str] = mapped_column(String(16))             # train | validation
    prompt: Mapped[str] = mapped_column(Text)
    completion: Mapped[str] = mapped_column(Text)
    messages: Mapped[list | None] = mapped_column(JSON)        # chat-style rows


class CustomModel(Base):
    """A LoRA adapter trained on a dataset: the model, not its training. Its training is a `Job` of
    kind "train" whose spec names this row; the job owns status, worker, heartbeat and progress.

    `status` .. `finished_at` marked legacy are the job bookkeeping this row carried before `jobs`:
    no longer read or written (opening an older file copies them into jobs once, `db.py`), kept
    because SQLite cannot drop the NOT NULL `status` in place; a real migration drops them.
    """
    __tablename__ = "custom_models"
    __table_args__ = (UniqueConstraint("account_id", "name"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    base_model: Mapped[str] = mapped_column(String(128))       # registry name of the frozen base
    model_type: Mapped[str] = mapped_column(String(128))       # as the client asked (an alias, say)
    dataset_id: Mapped[int]                                    # no foreign key: the model outlives it
    dataset_name: Mapped[str] = mapped_column(String(128))
    learning_rate: Mapped[float]
    num_epochs: Mapped[int]
    settings: Mapped[dict] = mapped_column(JSON)               # the rest of the training settings
    default_epoch: Mapped[int | None]
    current_epoch: Mapped[int | None]
    epochs: Mapped[list] = mapped_column(JSON, default=list)   # per epoch: losses, seconds
    evaluation: Mapped[dict | None] = mapped_column(JSON)
    size_bytes: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # legacy (see above)
    status: Mapped[str] = mapped_column(String(16), index=True, default="JOB")
    progress: Mapped[dict | None] = mapped_column(JSON)
    failure: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Job(Base):
    """Background work of some `kind` ("train", "generate", ...), one queue for every kind.

    status: QUEUED -> RUNNING -> COMPLETED | FAILED (with `failure`) | CANCELLED. A RUNNING job names
    its worker (host:pid) and heartbeat, so any worker can take over one whose worker died or went
    silent; `attempts` counts the claims (1: run once).
    `spec` says what to do, `progress` how far it got, `result` what came out; their keys are the
    kind's own business.
    """
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_id", "status", "id"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict] = mapped_column(JSON)
    progress: Mapped[dict | None] = mapped_column(JSON)
    result: Mapped[dict | None] = mapped_column(JSON)
    failure: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")


class AccountLimits(Base):
    """An account's own rate limits (per minute); a missing row or a NULL column means the server's
    default, 0 unlimited."""
    __tablename__ = "account_limits"

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    rpm: Mapped[int | None]
    tpm: Mapped[int | None]


class UsageRecord(Base):
    """One metered API request: inserted as `running` when it is admitted, completed by one UPDATE
    when its response (or stream) ends. A row still `running` when a server starts was cut off by a
    crash; start-up marks it `interrupted`. `id` is the request's own id, so it is never counted twice.

    status: running -> ok | error | cancelled (the client closed the request) | interrupted.
    """
    __tablename__ = "usage_records"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    key_prefix: Mapped[str] = mapped_column(String(32))        # the API key's listed prefix
    api: Mapped[str] = mapped_column(String(16))               # ai21 | openai
    path: Mapped[str] = mapped_column(String(256))
    model: Mapped[str | None] = mapped_column(String(256))     # as the request named it (base or custom)
    status: Mapped[str] = mapped_column(String(16), index=True)
    http_status: Mapped[int | None]
    prompt_tokens: Mapped[int] = mapped_column(default=0)
    completion_tokens: Mapped[int] = mapped_column(default=0)
    latency_ms: Mapped[float | None]
    first_token_ms: Mapped[float | None]
    started_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    finished_at: Mapped[datetime | None]


class GeneratedRow(Base):
    """One row a generation job wrote (amber/datagen), what the filters said of it, and the
    reviewer's word. Rows belong to their job until a reviewer saves them as a dataset, so a job cut
    off halfway leaves no half-written dataset anywhere; a resumed job goes on after its last row.

    decision: NULL (the filters decide: kept rows are in, flagged ones out) | approved | rejected.
    """
    __tablename__ = "generated_rows"
    __table_args__ = (UniqueConstraint("job_id", "idx"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    idx: Mapped[int]                                           # 1-based row number in the set
    input: Mapped[str] = mapped_column(Text)
    output: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(16))
    samples: Mapped[list | None] = mapped_column(JSON)         # self-consistency draws
    confidence: Mapped[float | None]
    reasons: Mapped[list] = mapped_column(JSON, default=list)  # filter codes; [] = kept
    details: Mapped[list] = mapped_column(JSON, default=list)
    decision: Mapped[str | None] = mapped_column(String(16))
    edited: Mapped[bool] = mapped_column(default=False)
