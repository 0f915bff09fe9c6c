"""Sending objects to a recipient's DICOMweb STOW-RS endpoint: the "stow" transport of egress.

Objects go in batches of `BATCH` per ``POST {url}/studies`` as multipart/related parts, streamed
with chunked transfer encoding (one object in memory at a time). The answer's
ReferencedSOPSequence and FailedSOPSequence (PS3.18 10.5.3) say which objects the recipient
kept; each is reported by its stored SOP Instance UID, even when it left de-identified.
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from io import BytesIO
from pathlib import Path

from dicomnode.dicomweb.multipart import new_boundary, stream_multipart
from dicomnode.egress import SendItem, SendReport, Target

log = logging.getLogger("dicomnode.stow")

BATCH = 50
TIMEOUT = 120.0
REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE = "00081199", "00081198"
REFERENCED_SOP_INSTANCE_UID, FAILURE_REASON = "00081155", "00081197"


class StowSender:
    """POSTs objects to STOW-RS endpoints, with a bearer token per recipient when configured."""

    def __init__(self, token_files: Mapping[str, Path] | None = None) -> None:
        self.token_files = dict(token_files or {})

    def _headers(self, target: Target, boundary: str) -> dict[str, str]:
        headers = {
            "Content-Type": (f'multipart/related; type="application/dicom"; boundary={boundary}'),
            "Accept": "application/dicom+json",
        }
        token_file = self.token_files.get(target.name)
        if token_file is not None:
            headers["Authorization"] = f"Bearer {token_file.read_text().strip()}"
        return headers

    def send(self, target: Target, items: Sequence[SendItem]) -> SendReport:
        sent: list[str] = []
        failed: dict[str, str] = {}
        for start in range(0, len(items), BATCH):
            batch = items[start : start + BATCH]
            try:
                batch_sent, batch_failed = self._post(target, batch)
            except (OSError, http.client.HTTPException, ValueError) as e:
                batch_sent, batch_failed = [], {i.sop_instance_uid: str(e) for i in batch}
            sent += batch_sent
            failed |= batch_failed
        log.info(
            "stored %d of %d objects at %s",
            len(sent),
            len(items),
            target.url,
            extra={"event": "send", "recipient": target.name, "sent": len(sent)},
        )
        return SendReport(sent, failed)

    def _post(self, target: Target, batch: Sequence[SendItem]) -> tuple[list[str], dict[str, str]]:
        url = urllib.parse.urlsplit(target.url.rstrip("/") + "/studies")
        if url.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                url.hostname, url.port, timeout=TIMEOUT, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
        stored_uid_of: dict[str, str] = {}  # the UID the object left with -> the stored one
        unprepared: dict[str, str] = {}
        bodies: list[bytes] = []  # one batch in memory (BATCH objects), each prepared apart
        for item in batch:
            try:
                ds = item.load()
                buffer = BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
            except Exception as e:  # one object that cannot be prepared must not lose the rest
                unprepared[item.sop_instance_uid] = f"cannot be prepared: {type(e).__name__}: {e}"
                continue
            stored_uid_of[str(ds.SOPInstanceUID)] = item.sop_instance_uid
            bodies.append(buffer.getvalue())
        if not bodies:
            return [], unprepared

        def parts() -> Iterator[tuple[dict[str, str], list[bytes]]]:
            for body in bodies:
                yield {"Content-Type": "application/dicom"}, [body]

        boundary = new_boundary()
        try:
            conn.request(
                "POST",
                url.path + (f"?{url.query}" if url.query else ""),
                body=stream_multipart(parts(), boundary),
                headers=self._headers(target, boundary),
                encode_chunked=True,
            )
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status not in (200, 202, 409):
            reason = f"STOW-RS answered HTTP {response.status}: {body[:200]!r}"
            return [], {uid: reason for uid in stored_uid_of.values()} | unprepared
        answer = json.loads(body) if body.strip() else {}
        sent = [
            stored_uid_of.get(uid, uid)
            for uid in _uids(answer, REFERENCED_SOP_SEQUENCE)
            if uid in stored_uid_of
        ]
        failed = {
            stored_uid_of.get(uid, uid): f"FailureReason {reason}"
            for uid, reason in _failures(answer)
        }
        for item in batch:  # an object the answer does not name did not arrive
            if item.sop_instance_uid not in sent and item.sop_instance_uid not in failed:
                failed[item.sop_instance_uid] = (
                    f"not in the STOW-RS answer (HTTP {response.status})"
                )
        return sent, failed


def _items(answer: dict, sequence: str) -> list[dict]:
    return answer.get(sequence, {}).get("Value", []) if isinstance(answer, dict) else []


def _uids(answer: dict, sequence: str) -> list[str]:
    return [
        str(item[REFERENCED_SOP_INSTANCE_UID]["Value"][0])
        for item in _items(answer, sequence)
        if item.get(REFERENCED_SOP_INSTANCE_UID, {}).get("Value")
    ]


def _failures(answer: dict) -> list[tuple[str, str]]:
    failures = []
    for item in _items(answer, FAILED_SOP_SEQUENCE):
        uid = item.get(REFERENCED_SOP_INSTANCE_UID, {}).get("Value", [""])[0]
        reason = item.get(FAILURE_REASON, {}).get("Value", ["?"])[0]
        failures.append((str(uid), str(reason)))
    return failures
