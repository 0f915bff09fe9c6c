"""Signing ledger checkpoints and verifying the chain against them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from dicomnode.archive.keys import verify_json
from dicomnode.archive.ledger import Checkpoint
from dicomnode.stewardship.base import StewardshipBase

log = logging.getLogger("dicomnode.stewardship")


class CheckpointOps(StewardshipBase):
    """Ledger checkpoints (signing is the caller's: the node signs with its key, see
    checkpoint_signed_by)."""

    def checkpoint(self, sign: Callable[[dict[str, Any]], str]) -> Checkpoint | None:
        """Sign the ledger's head now (None when nothing new was appended since the last)."""
        checkpoint = self.archive.ledger.checkpoint(sign)
        if checkpoint is not None:
            log.info(
                "ledger checkpoint %d signed",
                checkpoint.seq,
                extra={"event": "checkpoint", **checkpoint.payload()},
            )
        return checkpoint

    def verify_ledger(self, by: str, signature_ok: Callable[[Checkpoint], bool]) -> tuple[Any, Any]:
        """Recompute the chain against the signed checkpoints and record the result (a
        checkpoint entry: verified or broken, by whom, up to which entry); returns the
        verification and its ledger entry."""
        result = self.archive.ledger.verify(signature_ok=signature_ok)
        detail = {
            "action": "verify",
            "verified_entries": result.entries,
            "head_hash": result.head_hash,
            "checkpoints": result.checkpoints,
            "first_bad": result.first_bad,
            "problem": result.problem,
        }
        outcome = "verified" if result.ok else "broken"
        entry = self.archive.ledger.record("checkpoint", by, outcome, detail)
        return result, entry


def checkpoint_signed_by(key: Any) -> Callable[[Checkpoint], bool]:
    """A check that a checkpoint's signature is `key`'s and covers its own seq and hash."""

    def signed(checkpoint: Checkpoint) -> bool:
        try:
            payload = verify_json(key, checkpoint.signature)
        except ValueError:
            return False
        return payload.get("seq") == checkpoint.seq and payload.get("hash") == (
            checkpoint.head_hash
        )

    return signed
