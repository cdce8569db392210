"""Alembic environment: migrates the store's database (the connection comes from `Store.migrate`)."""

from alembic import context

from backend.store import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
