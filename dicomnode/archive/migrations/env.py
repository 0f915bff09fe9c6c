"""Alembic environment: runs migrations on the engine the archive hands over."""

from alembic import context

from dicomnode.archive.schema import metadata

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
