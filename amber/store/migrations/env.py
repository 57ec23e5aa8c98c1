"""Alembic's entry point for Amber's migrations. Run through `amber.store.migrate` (and so `amber db
upgrade`), never the alembic command: the caller's connection, already in a transaction, comes in
`config.attributes["connection"]`, and no alembic.ini is needed.
"""
from alembic import context

context.configure(connection=context.config.attributes["connection"])
with context.begin_transaction():  # inside the caller's transaction: begins none of its own
    context.run_migrations()
