"""Running the node: `Node` (DIMSE and HTTP), its housekeeping and its DIMSE worker processes."""

from dicomnode.serve.node import Node

__all__ = ["Node"]
