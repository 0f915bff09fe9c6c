"""multipart/related bodies (RFC 2387): streamed out for WADO-RS, parsed as a stream for STOW-RS."""

from __future__ import annotations

import io
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from dicomnode.core.errors import InvalidInput

CHUNK = 1024 * 1024
SPOOL_IN_MEMORY = 256 * 1024  # a part up to this size stays in memory ...
REQUEST_IN_MEMORY = 4 * 1024 * 1024  # ... while a request's parts in memory stay under this


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


def stream_chunks(opener: Callable[[], BinaryIO], chunk: int = CHUNK) -> Iterator[bytes]:
    """The bytes of the stream `opener` gives, opened only when iterated (each part of a long
    answer opens its blob when it is sent) and closed at its end."""
    with opener() as f:
        while data := f.read(chunk):
            yield data


class _Spool:
    """Where the parts of one request go: in memory while they are small and few (at most
    REQUEST_IN_MEMORY bytes in all), else one after the other into one temporary file (one file
    descriptor per request, however many parts it has)."""

    def __init__(self) -> None:
        self.memory_left = REQUEST_IN_MEMORY
        self.file: BinaryIO | None = None
        self.end = 0  # bytes written to the file

    def append(self, data: bytes | memoryview) -> int:
        """Write `data` at the file's end; the offset it starts at."""
        if self.file is None:
            self.file = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the parts
        offset = self.end
        self.file.seek(offset)
        self.file.write(data)
        self.end += len(data)
        return offset

    def written(self) -> None:
        """Every part is in: flush the file, so parts read it (from any thread) with pread."""
        if self.file is not None:
            self.file.flush()

    def pread(self, size: int, offset: int) -> bytes:
        assert self.file is not None
        chunks, fd = [], self.file.fileno()
        while size > 0:
            chunk = os.pread(fd, size, offset)
            if not chunk:
                break
            chunks.append(chunk)
            size -= len(chunk)
            offset += len(chunk)
        return b"".join(chunks)


@dataclass
class Part:
    """One received part: its headers and its body, in memory while small (SPOOL_IN_MEMORY,
    within the request's REQUEST_IN_MEMORY), else in the request's temporary file."""

    headers: dict[str, str]
    size: int = 0
    _chunks: list[bytes] = field(default_factory=list)
    _spool: _Spool = field(default_factory=_Spool)
    _file: BinaryIO | None = None  # the spool's file once this part is in it
    _offset: int = 0  # where this part starts in that file

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self._file is None and self.size > min(SPOOL_IN_MEMORY, self._spool.memory_left):
            held = b"".join(self._chunks)
            self._chunks.clear()
            self._offset = self._spool.append(held)
            self._file = self._spool.file
        if self._file is not None:
            self._spool.append(data)
        else:
            self._chunks.append(bytes(data))

    def finish(self) -> None:
        """The part is whole: what it holds in memory counts against the request's share."""
        if self._file is None:
            self._spool.memory_left -= self.size

    def head(self, count: int) -> bytes:
        """The first `count` bytes (fewer when the part is shorter)."""
        count = min(count, self.size)
        if self._file is None:
            return b"".join(self._chunks)[:count]
        return self._spool.pread(count, self._offset)

    def read(self) -> bytes:
        if self._file is None:
            return b"".join(self._chunks)
        return self._spool.pread(self.size, self._offset)

    def open(self) -> BinaryIO:
        """The body as a file, read from its start."""
        return io.BytesIO(self.read())


class _Reader:
    """A read buffer over `stream`: bytes are consumed from the front, more are read on demand."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.start = 0  # the buffer's unconsumed bytes begin here

    def available(self) -> int:
        return len(self.buffer) - self.start

    def fill(self) -> bool:
        """Read one more chunk; False at the end of the stream."""
        chunk = self.stream.read(CHUNK)
        if not chunk:
            return False
        if self.start:
            del self.buffer[: self.start]
            self.start = 0
        self.buffer += chunk
        return True

    def find(self, needle: bytes) -> int:
        """Offset of `needle` from the unconsumed start, or -1."""
        found = self.buffer.find(needle, self.start)
        return found - self.start if found >= 0 else -1

    def startswith(self, prefix: bytes) -> bool:
        return self.buffer.startswith(prefix, self.start)

    def take(self, count: int) -> memoryview:
        """The next `count` bytes, consumed (valid until the next `fill`)."""
        view = memoryview(self.buffer)[self.start : self.start + count]
        self.start += count
        return view

    def skip(self, count: int) -> None:
        self.start += count


def read_multipart(stream: BinaryIO, boundary: str, max_part_bytes: int) -> list[Part]:
    """Every part of a multipart/related body read from `stream`.

    Raises InvalidInput when the body does not start with the boundary or ends before the
    closing delimiter (a truncated upload), PartTooLarge when a part exceeds `max_part_bytes`.
    """
    if not boundary or len(boundary) > 200:
        raise InvalidInput("the multipart boundary is missing or too long")
    try:
        opening = b"--" + boundary.encode("latin-1")
    except UnicodeEncodeError:
        raise InvalidInput("the multipart boundary has characters outside latin-1") from None
    separator = b"\r\n" + opening
    reader = _Reader(stream)
    while (start := reader.find(opening)) < 0:  # after a preamble of at most 64 KiB
        if reader.available() > 64 * 1024:
            break
        if not reader.fill():
            if reader.available():
                break
            raise InvalidInput("the body ended before the first multipart boundary")
    if start < 0 or (start > 0 and bytes(reader.take(start)[-2:]) != b"\r\n"):
        raise InvalidInput("the body does not start with the multipart boundary in Content-Type")
    reader.skip(len(opening))
    parts: list[Part] = []
    spool = _Spool()
    while True:
        # After a delimiter: "--" closes the body, CRLF opens a part.
        while reader.available() < 2:
            if not reader.fill():
                raise InvalidInput("the multipart body is truncated after a boundary")
        if reader.startswith(b"--"):
            break
        if not reader.startswith(b"\r\n"):
            raise InvalidInput("a multipart boundary is not followed by CRLF")
        reader.skip(2)
        number = len(parts) + 1
        while (head_end := reader.find(b"\r\n\r\n")) < 0:
            if reader.available() > 64 * 1024 or not reader.fill():
                raise InvalidInput(f"the headers of part {number} are truncated or too long")
        head = bytes(reader.take(head_end)).decode("latin-1")
        reader.skip(4)
        headers = {}
        for line in head.split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip():
                headers[name.strip().lower()] = value.strip()
        part = Part(headers, _spool=spool)
        keep = len(separator) - 1  # bytes that may be the start of a separator cut by a chunk
        while (found := reader.find(separator)) < 0:
            if reader.available() > keep:
                _write(part, reader.take(reader.available() - keep), max_part_bytes, number)
            if not reader.fill():
                raise InvalidInput(
                    f"the multipart body is truncated: part {number} has no closing boundary"
                )
        _write(part, reader.take(found), max_part_bytes, number)
        part.finish()
        reader.skip(len(separator))
        parts.append(part)
    spool.written()
    return parts


def _write(part: Part, data: memoryview, limit: int, number: int) -> None:
    if not data:
        return
    if part.size + len(data) > limit:
        raise PartTooLarge(f"part {number} is larger than the limit of {limit} bytes")
    part.write(data)
