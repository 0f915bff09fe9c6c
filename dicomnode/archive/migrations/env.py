"""Alembic environment: runs migrations on the connection (or engine) the archive hands over."""

from alembic import context

from dicomnode.archive.schema import metadata

connection = context.config.attributes.get("connection")
if connection is not None:  # the caller holds it (and a migration lock on it) and commits
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = context.config.attributes["engine"]
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
