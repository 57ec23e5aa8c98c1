"""jobs.attempts: how many times a job was claimed (1 for a job run once; more when a worker died or
went silent and another took it over). Jobs a worker already started count one.

Revision ID: 0002_job_attempts
Revises: 0001_baseline
Create Date: 2025-01-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0002_job_attempts"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
    op.execute("UPDATE jobs SET attempts = 1 WHERE started_at IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # SQLite rebuilds the table
        batch.drop_column("attempts")
