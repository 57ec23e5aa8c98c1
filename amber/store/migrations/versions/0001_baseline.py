"""Baseline: the schema as Amber had it before migrations (accounts, keys, datasets, custom models,
jobs, rate limits, usage, generated rows). A file made by an older Amber is brought to this shape
in place (amber/store/legacy.py) and stamped here.

Revision ID: 0001_baseline
Revises:
Create Date: 2025-01-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), primary_key=True)


def _owner() -> sa.Column:
    return sa.Column("account_id", sa.Integer(), sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False)


def _when(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(), nullable=nullable)  # naive UTC (tables.UtcDateTime)


def upgrade() -> None:
    op.create_table("accounts", _id(),
                    sa.Column("name", sa.String(64), nullable=False, unique=True),
                    _when("created_at", False))
    op.create_table("api_keys", _id(), _owner(),
                    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
                    sa.Column("prefix", sa.String(32), nullable=False),
                    sa.Column("name", sa.String(64)),
                    _when("created_at", False), _when("revoked_at"))
    op.create_index("ix_api_keys_account_id", "api_keys", ["account_id"])
    op.create_index("ix_api_keys_prefix", "api_keys", ["prefix"])
    op.create_table("datasets", _id(), _owner(),
                    sa.Column("name", sa.String(128), nullable=False),
                    sa.Column("file_name", sa.String(256), nullable=False),
                    sa.Column("size_bytes", sa.Integer(), nullable=False),
                    sa.Column("format", sa.String(32), nullable=False),
                    sa.Column("num_examples", sa.Integer(), nullable=False),
                    sa.Column("train_examples", sa.Integer(), nullable=False),
                    sa.Column("validation_examples", sa.Integer(), nullable=False),
                    sa.Column("report", sa.JSON(), nullable=False),
                    _when("created_at", False),
                    sa.UniqueConstraint("account_id", "name"), sqlite_autoincrement=True)
    op.create_index("ix_datasets_account_id", "datasets", ["account_id"])
    op.create_table("dataset_rows", _id(),
                    sa.Column("dataset_id", sa.Integer(), sa.ForeignKey("datasets.id", ondelete="CASCADE"),
                              nullable=False),
                    sa.Column("source_row", sa.Integer(), nullable=False),
                    sa.Column("split", sa.String(16), nullable=False),
                    sa.Column("prompt", sa.Text(), nullable=False),
                    sa.Column("completion", sa.Text(), nullable=False),
                    sa.Column("messages", sa.JSON()))
    op.create_index("ix_dataset_rows_dataset_id", "dataset_rows", ["dataset_id"])
    op.create_table("custom_models", _id(), _owner(),
                    sa.Column("name", sa.String(128), nullable=False),
                    sa.Column("base_model", sa.String(128), nullable=False),
                    sa.Column("model_type", sa.String(128), nullable=False),
                    sa.Column("dataset_id", sa.Integer(), nullable=False),
                    sa.Column("dataset_name", sa.String(128), nullable=False),
                    sa.Column("learning_rate", sa.Double(), nullable=False),
                    sa.Column("num_epochs", sa.Integer(), nullable=False),
                    sa.Column("settings", sa.JSON(), nullable=False),
                    sa.Column("default_epoch", sa.Integer()),
                    sa.Column("current_epoch", sa.Integer()),
                    sa.Column("epochs", sa.JSON(), nullable=False),
                    sa.Column("evaluation", sa.JSON()),
                    sa.Column("size_bytes", sa.Integer()),
                    _when("created_at", False),
                    sa.Column("status", sa.String(16), nullable=False),
                    sa.Column("progress", sa.JSON()),
                    sa.Column("failure", sa.Text()),
                    sa.Column("worker", sa.String(128)),
                    _when("heartbeat_at"), _when("started_at"), _when("finished_at"),
                    sa.UniqueConstraint("account_id", "name"), sqlite_autoincrement=True)
    op.create_index("ix_custom_models_account_id", "custom_models", ["account_id"])
    op.create_index("ix_custom_models_status", "custom_models", ["status"])
    op.create_table("jobs", _id(), _owner(),
                    sa.Column("kind", sa.String(32), nullable=False),
                    sa.Column("status", sa.String(16), nullable=False),
                    sa.Column("spec", sa.JSON(), nullable=False),
                    sa.Column("progress", sa.JSON()),
                    sa.Column("result", sa.JSON()),
                    sa.Column("failure", sa.Text()),
                    sa.Column("worker", sa.String(128)),
                    _when("heartbeat_at"), _when("created_at", False), _when("started_at"), _when("finished_at"),
                    sqlite_autoincrement=True)
    op.create_index("ix_jobs_status_id", "jobs", ["status", "id"])
    op.create_index("ix_jobs_account_id", "jobs", ["account_id"])
    op.create_table("account_limits",
                    sa.Column("account_id", sa.Integer(), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
                              primary_key=True),
                    sa.Column("rpm", sa.Integer()),
                    sa.Column("tpm", sa.Integer()))
    op.create_table("usage_records",
                    sa.Column("id", sa.String(64), primary_key=True), _owner(),
                    sa.Column("key_prefix", sa.String(32), nullable=False),
                    sa.Column("api", sa.String(16), nullable=False),
                    sa.Column("path", sa.String(256), nullable=False),
                    sa.Column("model", sa.String(256)),
                    sa.Column("status", sa.String(16), nullable=False),
                    sa.Column("http_status", sa.Integer()),
                    sa.Column("prompt_tokens", sa.Integer(), nullable=False),
                    sa.Column("completion_tokens", sa.Integer(), nullable=False),
                    sa.Column("latency_ms", sa.Double()),
                    sa.Column("first_token_ms", sa.Double()),
                    _when("started_at", False), _when("finished_at"))
    op.create_index("ix_usage_records_account_id", "usage_records", ["account_id"])
    op.create_index("ix_usage_records_status", "usage_records", ["status"])
    op.create_index("ix_usage_records_started_at", "usage_records", ["started_at"])
    op.create_table("generated_rows", _id(),
                    sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
                    sa.Column("idx", sa.Integer(), nullable=False),
                    sa.Column("input", sa.Text(), nullable=False),
                    sa.Column("output", sa.Text(), nullable=False),
                    sa.Column("finish_reason", sa.String(16), nullable=False),
                    sa.Column("samples", sa.JSON()),
                    sa.Column("confidence", sa.Double()),
                    sa.Column("reasons", sa.JSON(), nullable=False),
                    sa.Column("details", sa.JSON(), nullable=False),
                    sa.Column("decision", sa.String(16)),
                    sa.Column("edited", sa.Boolean(), nullable=False),
                    sa.UniqueConstraint("job_id", "idx"))
    op.create_index("ix_generated_rows_job_id", "generated_rows", ["job_id"])


def downgrade() -> None:
    for table in ("generated_rows", "usage_records", "account_limits", "jobs", "custom_models", "dataset_rows",
                  "datasets", "api_keys", "accounts"):
        op.drop_table(table)
