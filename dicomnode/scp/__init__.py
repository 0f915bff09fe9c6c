"""The DIMSE service: a pynetdicom AE with one handler per service (see `handlers`)."""

from dicomnode.scp.handlers import DimseContext
from dicomnode.scp.server import DimseServer

__all__ = ["DimseContext", "DimseServer"]
