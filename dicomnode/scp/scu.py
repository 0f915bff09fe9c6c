"""Sending objects to a DICOM peer by C-STORE: the DIMSE transport of egress deliveries.

Every wait is bounded: the association by ``dimse.acse_timeout``, each C-STORE response by
``dimse.store_timeout``. pynetdicom can miss a C-STORE response in a race and wait for the whole
timeout; a lost response or a dropped association is retried on a new association, up to
`ATTEMPTS_PER_OBJECT` times per object, before the object counts as failed (the delivery is
then retried later, with backoff, by egress).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pynetdicom import AE, evt

from dicomnode.config import Settings
from dicomnode.egress import SendItem, SendReport, Target
from dicomnode.scp.connection import install, prepare
from dicomnode.scp.handlers import client_ssl_context, contexts_for, fit_transfer_syntax

log = logging.getLogger("dicomnode.scu")

ATTEMPTS_PER_OBJECT = 3
SUCCESS_OR_WARNING = {0x0000, 0xB000, 0xB006, 0xB007}


class DimseSender:
    """C-STORE to configured peers, with the node's AE title, TLS and timeouts."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _associate(self, target: Target, items: Sequence[SendItem]) -> Any:
        install()  # the node's changes to pynetdicom, once (a command may send without a server)
        dimse = self.settings.dimse
        ae = AE(self.settings.node.ae_title)
        ae.acse_timeout = dimse.acse_timeout
        ae.dimse_timeout = dimse.store_timeout
        ae.network_timeout = dimse.network_timeout
        peer = target.peer
        kinds = {(i.sop_class_uid, i.transfer_syntax_uid) for i in items}
        options: dict[str, Any] = {
            "ae_title": peer.ae_title,
            "contexts": contexts_for(kinds),
            "evt_handlers": [(evt.EVT_CONN_OPEN, prepare)],
        }
        if peer.tls:
            options["tls_args"] = (client_ssl_context(self.settings), None)
        assoc = ae.associate(peer.host, peer.port, **options)
        if not assoc.is_established:
            raise ConnectionError(
                f"{peer.ae_title} at {peer.host}:{peer.port} did not accept an association"
            )
        return assoc

    def send(self, target: Target, items: Sequence[SendItem]) -> SendReport:
        sent: list[str] = []
        failed: dict[str, str] = {}
        assoc = None
        try:
            for item in items:
                problem = "not sent"
                for _attempt in range(ATTEMPTS_PER_OBJECT):
                    if assoc is None or not assoc.is_established:
                        try:
                            assoc = self._associate(target, items)
                        except (ConnectionError, OSError) as e:
                            problem = str(e)
                            assoc = None
                            continue
                    try:  # one object that cannot be prepared must not lose the others
                        ds = fit_transfer_syntax(
                            item.load(), item.sop_class_uid, assoc.accepted_contexts
                        )
                    except Exception as e:
                        problem = f"cannot be prepared: {type(e).__name__}: {e}"
                        break
                    try:
                        status = assoc.send_c_store(ds)
                    except (ValueError, RuntimeError) as e:  # no accepted context, etc.
                        problem = f"cannot be sent: {e}"
                        break
                    code = getattr(status, "Status", None)
                    if code in SUCCESS_OR_WARNING:
                        sent.append(item.sop_instance_uid)
                        problem = ""
                        break
                    if code is not None:  # the peer answered with a failure: do not insist
                        problem = f"{target.peer.ae_title} answered status 0x{code:04X}"
                        break
                    # no response within store_timeout, or the association dropped
                    problem = f"no C-STORE response from {target.peer.ae_title}"
                    assoc.abort()
                    assoc = None
                if problem:
                    failed[item.sop_instance_uid] = problem
        finally:
            if assoc is not None and assoc.is_established:
                assoc.release()
        log.info(
            "sent %d of %d objects to %s",
            len(sent),
            len(items),
            target.name,
            extra={"event": "send", "recipient": target.name, "sent": len(sent)},
        )
        return SendReport(sent, failed)
