"""One handler per DIMSE service, registered in one table (`HANDLERS`).

Each handler checks that the caller may use the service, hands the work to intake (data in)
or egress (data out), and turns errors into statuses through `status.failure`.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import build_context, evt
from pynetdicom.presentation import PresentationContext

from dicomnode.config import Settings
from dicomnode.core.errors import DicomnodeError, NotPermitted, UnknownDestination
from dicomnode.core.metrics import Metrics
from dicomnode.core.model import Source, StoredInstance
from dicomnode.egress import Egress
from dicomnode.governance import Party, audit, audit_events
from dicomnode.intake import Intake
from dicomnode.scp import status
from dicomnode.scp.admission import NO_REASON_GIVEN, Admission, ClientCertificate, Refusal
from dicomnode.scp.connection import StoreRequest, prepare
from dicomnode.scp.identifiers import identifier_from_row, query_from_identifier

log = logging.getLogger("dicomnode.scp")

UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
SUB_OPERATION_ATTEMPTS = 3  # tries of a C-MOVE sub-operation whose response is lost
MAX_CONTEXTS = 128


@dataclass
class DimseContext:
    """What the handlers work with; built by the app from the settings."""

    settings: Settings
    intake: Intake
    egress: Egress
    metrics: Metrics
    associations: dict[int, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.settings.dimse, self.settings.peers)


def client_ssl_context(settings: Settings) -> ssl.SSLContext:
    """TLS for associations the node opens: trusts dimse.tls.ca_file (else the system's CAs)
    and presents the node's own certificate when it has one."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False  # peers are known by AE title and address, not host name
    tls = settings.dimse.tls
    if tls is not None:
        if tls.ca_file:
            context.load_verify_locations(tls.ca_file)
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def _source(assoc: Any, ctx: DimseContext, service: str) -> Source:
    """The caller as a Source, or NotPermitted when it may not use `service`."""
    calling = assoc.requestor.ae_title.strip()
    peer = ctx.settings.peer_by_ae_title(calling)
    if peer is not None:
        allowed = service in peer.allow
    else:
        allowed = service in ("echo", "store") and not ctx.settings.dimse.require_known_peers
    if not allowed:
        raise NotPermitted(f"{calling} may not use {service.upper()}")
    return Source("dimse", calling, assoc.requestor.address, peer.name if peer else None)


def _count(assoc: Any, ctx: DimseContext, service: str, code: int) -> None:
    ctx.metrics.add("dicomnode_dimse_requests_total", service=service, status=f"0x{code:04X}")
    with ctx.lock:
        stats = ctx.associations.get(id(assoc))
        if stats is not None:
            key = service if code in (status.SUCCESS, status.PENDING) else f"{service}_failed"
            stats[key] = stats.get(key, 0) + 1


def handle_echo(event: evt.Event, ctx: DimseContext) -> int | Dataset:
    try:
        _source(event.assoc, ctx, "echo")
    except DicomnodeError as e:
        _count(event.assoc, ctx, "echo", status.status_for(e))
        return status.failure(e)
    _count(event.assoc, ctx, "echo", status.SUCCESS)
    return status.SUCCESS


def _audit(ctx: DimseContext, build: Any) -> None:
    audit_log = ctx.egress.audit
    if audit_log is not None and audit_log.source is not None:
        audit_log.submit(lambda: build(audit_log.source))


def handle_store(event: evt.Event, ctx: DimseContext) -> int | Dataset:
    """C-STOREs that pynetdicom decoded (the store lane of `connection` serves the others)."""
    request = StoreRequest(
        context_id=event.context.context_id,
        transfer_syntax=event.context.transfer_syntax,
        message_id=event.request.MessageID,
        sop_class_uid=event.request.AffectedSOPClassUID,
        sop_instance_uid=event.request.AffectedSOPInstanceUID,
        dataset=event.encoded_dataset(include_meta=False),
    )
    answer = store(event.assoc, request, ctx)
    for report in request.after:
        report()
    return answer


def store(assoc: Any, request: StoreRequest, ctx: DimseContext) -> int | Dataset:
    """File a C-STORE request's data set through intake; the status to answer."""
    try:
        source = _source(assoc, ctx, "store")
        result = ctx.intake.receive_dimse(
            request.dataset,
            request.transfer_syntax,
            request.sop_class_uid,
            request.sop_instance_uid,
            source,
            later=request.after,
        )
    except Exception as e:
        if not isinstance(e, DicomnodeError):
            log.exception("C-STORE failed unexpectedly")
        _count(assoc, ctx, "store", status.status_for(e))
        return status.failure(e)
    _count(assoc, ctx, "store", status.SUCCESS)
    if result.outcome in ("stored", "replaced"):
        with ctx.lock:
            stats = ctx.associations.get(id(assoc))
            if stats is not None:
                stats.setdefault("_received", []).append(result.instance)
    return status.SUCCESS


def handle_find(
    event: evt.Event, ctx: DimseContext
) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    try:
        source = _source(event.assoc, ctx, "find")
        request = event.identifier
        query = query_from_identifier(request, event.request.AffectedSOPClassUID)
        sop_class = event.request.AffectedSOPClassUID
        rows = ctx.egress.find(query, source, lambda: audit.dicom_query(sop_class, request))
    except Exception as e:
        if not isinstance(e, DicomnodeError):
            log.exception("C-FIND failed unexpectedly")
        _count(event.assoc, ctx, "find", status.status_for(e))
        yield status.failure(e), None
        return
    for row in rows:
        if event.is_cancelled:
            _count(event.assoc, ctx, "find", status.CANCEL)
            yield status.CANCEL, None
            return
        yield status.PENDING, identifier_from_row(row, request, ctx.settings.node.ae_title)
    _count(event.assoc, ctx, "find", status.SUCCESS)


def dataset_to_send(
    stream: BinaryIO, instance: StoredInstance, accepted: list[PresentationContext]
) -> Dataset:
    """Load `instance` from its blob's `stream` in a transfer syntax the peer accepted (see
    `fit_transfer_syntax`)."""
    return fit_transfer_syntax(pydicom.dcmread(stream), instance.sop_class_uid, accepted)


def fit_transfer_syntax(
    ds: Dataset, sop_class_uid: str, accepted: list[PresentationContext]
) -> Dataset:
    """`ds` as stored when the peer accepted its transfer syntax, else decompressed to explicit
    VR little endian (needs the codecs extra for compressed data)."""
    stored_ts = ds.file_meta.TransferSyntaxUID
    offered = {cx.transfer_syntax[0] for cx in accepted if cx.abstract_syntax == sop_class_uid}
    if stored_ts in offered or not UID(stored_ts).is_compressed:
        return ds
    if offered & set(UNCOMPRESSED):
        # The same instance in another transfer syntax: it keeps its SOP Instance UID.
        ds.decompress(generate_instance_uid=False)
    return ds


def retrieve_contexts(instances: list[StoredInstance]) -> list[PresentationContext]:
    """Contexts to propose for sending `instances` (see `contexts_for`)."""
    return contexts_for({(i.sop_class_uid, i.transfer_syntax_uid) for i in instances})


def contexts_for(kinds: set[tuple[str, str]]) -> list[PresentationContext]:
    """Contexts to propose for sending objects of these (SOP class, transfer syntax) kinds:
    each SOP class in its stored transfer syntax, plus the uncompressed ones so that a peer
    without codecs still gets the images."""
    pairs = sorted(kinds)
    classes = sorted({c for c, _ in pairs})
    contexts = [build_context(c, list(UNCOMPRESSED)) for c in classes]
    contexts += [build_context(c, ts) for c, ts in pairs if ts not in UNCOMPRESSED]
    if len(contexts) > MAX_CONTEXTS:
        by_class: dict[str, list[str]] = {c: list(UNCOMPRESSED) for c in classes}
        for c, ts in pairs:
            if ts not in by_class[c]:
                by_class[c].insert(0, ts)
        contexts = [build_context(c, ts) for c, ts in by_class.items()][:MAX_CONTEXTS]
    return contexts


def _retrieve(
    event: evt.Event, ctx: DimseContext, service: str
) -> tuple[Source, list[StoredInstance], Any]:
    source = _source(event.assoc, ctx, service)
    query = query_from_identifier(event.identifier, event.request.AffectedSOPClassUID)
    destination = None
    if service == "move":
        destination = ctx.settings.peer_by_ae_title(event.move_destination)
        if destination is None:
            raise UnknownDestination(
                f"move destination {event.move_destination!r} is not a known peer"
            )
    instances = ctx.egress.retrieve(
        query.level,
        query.filters,
        source,
        service,
        Party("dimse", peer=destination.name) if destination else None,
    )
    return source, instances, destination


def handle_move(event: evt.Event, ctx: DimseContext) -> Iterator[Any]:
    try:
        _source_, instances, peer = _retrieve(event, ctx, "move")
    except UnknownDestination as e:
        log.warning("C-MOVE refused: %s", e)
        _count(event.assoc, ctx, "move", status.MOVE_DESTINATION_UNKNOWN)
        yield None, None
        return
    except Exception as e:
        # pynetdicom takes no status before the destination: a raise here answers 0xC514.
        log.warning("C-MOVE refused: %s", e)
        _count(event.assoc, ctx, "move", 0xC514)
        raise
    store_association: list[Any] = []
    options: dict[str, Any] = {
        "contexts": retrieve_contexts(instances) or [build_context("1.2.840.10008.1.1")],
        "evt_handlers": [(evt.EVT_CONN_OPEN, prepare)],
    }
    if peer.tls:
        options["tls_args"] = (client_ssl_context(ctx.settings), None)

    def reconnect() -> Any:
        again = event.assoc.ae.associate(peer.host, peer.port, ae_title=peer.ae_title, **options)
        return again if again.is_established else None

    def remember(store_event: evt.Event) -> None:
        store_association.append(store_event.assoc)
        _resend_lost_sub_operations(store_event.assoc, reconnect, ctx.metrics)

    yield (
        peer.host,
        peer.port,
        {**options, "evt_handlers": [*options["evt_handlers"], (evt.EVT_ACCEPTED, remember)]},
    )
    yield len(instances)
    yield from _send(event, ctx, "move", instances, lambda: store_association[0].accepted_contexts)


def _resend_lost_sub_operations(
    store_assoc: Any, reconnect: Callable[[], Any], metrics: Metrics
) -> None:
    """Make the association pynetdicom's C-MOVE loop sends its sub-operations on resend an
    object whose C-STORE response did not come within ``dimse.store_timeout`` (or whose
    association dropped) on a new association to the destination, up to
    `SUB_OPERATION_ATTEMPTS` tries; a status the destination answers, failure or not, is final.
    The loop's own release ends whichever association is current."""
    send_on_first, release_first = store_assoc.send_c_store, store_assoc.release
    current: list[Any] = [store_assoc]

    def send_c_store(dataset: Dataset, *args: Any, **kwargs: Any) -> Dataset:
        answer = Dataset()
        for attempt in range(SUB_OPERATION_ATTEMPTS):
            assoc = current[0]
            if assoc is None or not assoc.is_established:
                assoc = current[0] = reconnect()
                if assoc is None:
                    log.warning("the move destination refused a new association")
                    continue
            send = send_on_first if assoc is store_assoc else assoc.send_c_store
            try:
                answer = send(dataset, *args, **kwargs)
            except RuntimeError:  # the association ended under us
                answer = Dataset()
            if "Status" in answer:
                return answer
            log.warning(
                "no response to the C-STORE sub-operation for %s (try %d of %d)",
                dataset.get("SOPInstanceUID", "?"),
                attempt + 1,
                SUB_OPERATION_ATTEMPTS,
            )
            if attempt + 1 < SUB_OPERATION_ATTEMPTS:
                metrics.add("dicomnode_suboperations_retried_total", service="move")
            assoc.abort()
            current[0] = None
        return answer  # no status: pynetdicom counts the sub-operation as failed

    def release() -> None:
        assoc = current[0]
        if assoc is not None and assoc is not store_assoc:
            assoc.release()
        release_first()

    store_assoc.send_c_store = send_c_store
    store_assoc.release = release


def handle_get(event: evt.Event, ctx: DimseContext) -> Iterator[Any]:
    try:
        _source_, instances, _ = _retrieve(event, ctx, "get")
    except Exception as e:
        if not isinstance(e, DicomnodeError):
            log.exception("C-GET failed unexpectedly")
        _count(event.assoc, ctx, "get", status.status_for(e))
        # pynetdicom answers Success at once to a C-GET that announces no sub-operations, so
        # announce one: the refusal then reaches the caller as the final status.
        yield 1
        yield status.failure(e), None
        return
    yield len(instances)
    yield from _send(event, ctx, "get", instances, lambda: event.assoc.accepted_contexts)


def _send(
    event: evt.Event,
    ctx: DimseContext,
    service: str,
    instances: list[StoredInstance],
    accepted: Any,
) -> Iterator[tuple[int, Dataset | None]]:
    for instance in instances:
        if event.is_cancelled:
            _count(event.assoc, ctx, service, status.CANCEL)
            yield status.CANCEL, None
            return
        try:
            with ctx.egress.open_blob(instance) as stream:
                ds = dataset_to_send(stream, instance, accepted())
        except Exception as e:
            log.warning("cannot prepare %s for sending: %s", instance.sop_instance_uid, e)
            ctx.metrics.add("dicomnode_instances_sent_total", service=service, result="failed")
            failed = Dataset()
            failed.SOPInstanceUID = instance.sop_instance_uid
            yield status.PENDING, failed  # counted as a failed sub-operation by pynetdicom
            continue
        ctx.metrics.add("dicomnode_instances_sent_total", service=service, result="sent")
        yield status.PENDING, ds
    _count(event.assoc, ctx, service, status.SUCCESS)


def on_established(event: evt.Event, ctx: DimseContext) -> None:
    ctx.metrics.add("dicomnode_associations_total", outcome="accepted")
    ctx.metrics.add("dicomnode_associations_active", 1)
    with ctx.lock:
        ctx.associations[id(event.assoc)] = {"started": time.monotonic()}


def _closed(event: evt.Event, ctx: DimseContext, outcome: str) -> None:
    with ctx.lock:
        stats = ctx.associations.pop(id(event.assoc), None)
    if stats is None:
        return
    ctx.metrics.add("dicomnode_associations_closed_total", how=outcome)
    ctx.metrics.add("dicomnode_associations_active", -1)
    started = stats.pop("started")
    received = stats.pop("_received", [])
    if received:
        sender = Source(
            "dimse", event.assoc.requestor.ae_title.strip(), event.assoc.requestor.address
        )
        now = datetime.now(UTC)
        _audit(ctx, lambda by: audit_events.received(sender, received, now, by))
    log.info(
        "association %s",
        outcome,
        extra={
            "event": "association",
            "outcome": outcome,
            "caller": event.assoc.requestor.ae_title.strip(),
            "address": f"{event.assoc.requestor.address}:{event.assoc.requestor.port}",
            "seconds": round(time.monotonic() - started, 3),
            "pid": os.getpid(),  # which of the node's DIMSE processes served it
            **stats,
        },
    )


def on_released(event: evt.Event, ctx: DimseContext) -> None:
    _closed(event, ctx, "released")


def on_aborted(event: evt.Event, ctx: DimseContext) -> None:
    _closed(event, ctx, "aborted")


def on_requested(event: evt.Event, ctx: DimseContext) -> None:
    """An A-ASSOCIATE-RQ arrived: reject it (A-ASSOCIATE-RJ, then `on_rejected`) when its
    transport or client certificate does not fit the caller (`admission`). A check that fails
    unexpectedly rejects too."""
    assoc = event.assoc
    calling = assoc.requestor.primitive.calling_ae_title.strip()
    connection = assoc.dul.socket.socket if assoc.dul.socket else None
    try:
        refusal = ctx.admission.check(
            calling,
            str(assoc.requestor.address),
            isinstance(connection, ssl.SSLSocket),
            ClientCertificate.of(connection),
        )
    except Exception:
        log.exception("checking an association's transport failed")
        refusal = Refusal("check-failed", "its transport could not be checked", NO_REASON_GIVEN)
    if refusal is None:
        return
    assoc.requestor.ae_title = assoc.requestor.primitive.calling_ae_title
    assoc.refusal = refusal
    assoc.acse.send_reject(0x01, 0x01, refusal.diagnostic)  # permanent, by the service user
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def on_rejected(event: evt.Event, ctx: DimseContext) -> None:
    ctx.metrics.add("dicomnode_associations_total", outcome="rejected")
    caller = event.assoc.requestor.ae_title.strip() or "unknown"
    address = event.assoc.requestor.address or "unknown"
    refusal: Refusal | None = getattr(event.assoc, "refusal", None)  # set by `on_requested`
    reason = refusal.reason if refusal else "association rejected"
    now = datetime.now(UTC)
    audit_log = ctx.egress.audit
    if audit_log is not None and audit_log.source is not None:
        # 110113 Node Authentication, one message per caller and minute (with the count)
        caller_source = Source("dimse", caller, address)
        audit_log.submit_alert(
            ("association-rejected", address, caller, refusal.kind if refusal else ""),
            lambda count: audit_events.refused(
                caller_source,
                "association",
                reason,
                now,
                audit_log.source,
                count=count,
                alert_type=audit.NODE_AUTHENTICATION,
            ),
            now,
        )
    log.log(
        logging.WARNING if refusal else logging.INFO,
        "association rejected%s",
        f": {refusal.reason}" if refusal else "",
        extra={
            "event": "association",
            "outcome": "rejected",
            "caller": event.assoc.requestor.ae_title.strip(),
            "address": event.assoc.requestor.address,
            "reason": reason,
        },
    )


HANDLERS = (
    (evt.EVT_C_ECHO, handle_echo),
    (evt.EVT_C_STORE, handle_store),
    (evt.EVT_C_FIND, handle_find),
    (evt.EVT_C_MOVE, handle_move),
    (evt.EVT_C_GET, handle_get),
    (evt.EVT_ESTABLISHED, on_established),
    (evt.EVT_RELEASED, on_released),
    (evt.EVT_ABORTED, on_aborted),
    (evt.EVT_REQUESTED, on_requested),
    (evt.EVT_REJECTED, on_rejected),
)
