"""multipart/related bodies (RFC 2387): streamed out for WADO-RS, parsed as a stream for STOW-RS."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from dicomnode.core.errors import InvalidInput

CHUNK = 1024 * 1024
SPOOL_IN_MEMORY = 8 * 1024 * 1024


class PartTooLarge(InvalidInput):
    """A part is larger than the configured limit (HTTP 413)."""


def new_boundary() -> str:
    return f"dicomnode-{uuid.uuid4().hex}"


def stream_multipart(
    parts: Iterable[tuple[dict[str, str], Iterable[bytes]]], boundary: str
) -> Iterator[bytes]:
    """The body of a multipart/related message, one chunk at a time."""
    delimiter = f"--{boundary}".encode()
    for headers, chunks in parts:
        head = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
        yield delimiter + b"\r\n" + head + b"\r\n"
        yield from chunks
        yield b"\r\n"
    yield delimiter + b"--\r\n"


def file_chunks(path: str, chunk: int = CHUNK) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(chunk):
            yield data


@dataclass
class Part:
    """One received part: its headers and its body, spooled to disk when large."""

    headers: dict[str, str]
    body: BinaryIO = field(
        default_factory=lambda: tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY)  # noqa: SIM115
    )
    size: int = 0

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def read(self) -> bytes:
        self.body.seek(0)
        return self.body.read()


def read_multipart(stream: BinaryIO, boundary: str, max_part_bytes: int) -> list[Part]:
    """Every part of a multipart/related body read from `stream`.

    Raises InvalidInput when the body does not start with the boundary or ends before the
    closing delimiter (a truncated upload), PartTooLarge when a part exceeds `max_part_bytes`.
    """
    if not boundary or len(boundary) > 200:
        raise InvalidInput("the multipart boundary is missing or too long")
    opening = b"--" + boundary.encode("latin-1")
    separator = b"\r\n" + opening
    buffer = b""
    while len(buffer) < len(opening) + 2:
        chunk = stream.read(CHUNK)
        if not chunk:
            raise InvalidInput("the body ended before the first multipart boundary")
        buffer += chunk
    start = buffer.find(opening)
    if start < 0 or (start > 0 and buffer[start - 2 : start] != b"\r\n"):
        raise InvalidInput("the body does not start with the multipart boundary in Content-Type")
    buffer = buffer[start + len(opening) :]
    parts: list[Part] = []
    ended = False
    while not ended:
        # After a delimiter: "--" closes the body, CRLF opens a part.
        while len(buffer) < 2:
            chunk = stream.read(CHUNK)
            if not chunk:
                raise InvalidInput("the multipart body is truncated after a boundary")
            buffer += chunk
        if buffer.startswith(b"--"):
            break
        if not buffer.startswith(b"\r\n"):
            raise InvalidInput("a multipart boundary is not followed by CRLF")
        buffer = buffer[2:]
        while b"\r\n\r\n" not in buffer:
            chunk = stream.read(CHUNK)
            if not chunk or len(buffer) > 64 * 1024:
                raise InvalidInput(
                    f"the headers of part {len(parts) + 1} are truncated or too long"
                )
            buffer += chunk
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip():
                headers[name.strip().lower()] = value.strip()
        part = Part(headers)
        while True:
            found = buffer.find(separator)
            if found >= 0:
                _write(part, buffer[:found], max_part_bytes, len(parts) + 1)
                buffer = buffer[found + len(separator) :]
                break
            keep = len(separator) - 1
            _write(
                part, buffer[:-keep] if len(buffer) > keep else b"", max_part_bytes, len(parts) + 1
            )
            buffer = buffer[-keep:] if len(buffer) > keep else buffer
            chunk = stream.read(CHUNK)
            if not chunk:
                raise InvalidInput(
                    f"the multipart body is truncated: part {len(parts) + 1} has no closing "
                    "boundary"
                )
            buffer += chunk
        parts.append(part)
    return parts


def _write(part: Part, data: bytes, limit: int, number: int) -> None:
    if not data:
        return
    part.size += len(data)
    if part.size > limit:
        raise PartTooLarge(f"part {number} is larger than the limit of {limit} bytes")
    part.body.write(data)
