"""The archive: blob store, index and the one ingest path (`dicomnode.archive.archive.Archive`).

Importing this package loads nothing else: `Archive` is imported when first named, so that
``import dicomnode.archive.keys`` (and other light modules) does not load SQLAlchemy or Alembic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicomnode.archive.archive import Archive

__all__ = ["Archive"]


def __getattr__(name: str) -> Any:
    if name == "Archive":
        from dicomnode.archive.archive import Archive

        return Archive
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
