"""Media types: one parser for every Accept and Content-Type, and the negotiation of what the
node sends for each kind of resource (PS3.18 8.7).

A parameter value may be a token or a quoted string and both mean the same (PS3.18 8.7, RFC
9110 5.6.6); a `/` inside an unquoted value is kept, as viewers send
``type=application/octet-stream`` unquoted. Media ranges are ordered by their q-weight (q=0
means "not acceptable"), then by their place; the ``accept`` query parameter's ranges come
before the Accept header's (PS3.18 8.3.3.1, 8.7.3.7). Ranges the node cannot serve are
ignored (PS3.18 8.7.7); when none remain the answer is 406 naming what the node can send.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.uid import UID

from dicomnode.dicomweb.errors import NotAcceptable, UnsupportedMediaType

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
AS_STORED = "*"

# Stored transfer syntax -> the single-frame media type of its compressed frames (PS3.18 8.7.4).
FRAME_MEDIA_TYPE = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
# Earlier names of these media types that clients still send.
FRAME_MEDIA_TYPE_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}
# Syntaxes whose bitstream may have lost information (the image is lossy whatever its flag).
LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.203",
}
# Video: served as stored only, as a whole stream (its frames are not cut out here).
VIDEO_MEDIA_TYPE = {
    **{f"1.2.840.10008.1.2.4.{n}": "video/mpeg" for n in (100, 101)},
    **{f"1.2.840.10008.1.2.4.{n}": "video/mp4" for n in range(102, 107)},
    **{f"1.2.840.10008.1.2.4.{n}": "video/H265" for n in (107, 108)},
}

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
OCTET_STREAM = "application/octet-stream"
MULTIPART = "multipart/related"
RENDERED_TYPES = ("image/jpeg", "image/png")


@dataclass(frozen=True)
class MediaRange:
    """One media type or range: ``type/subtype`` lower-cased, parameter names lower-cased and
    their values unquoted, and its q-weight."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def related_type(self) -> str:
        """The ``type`` parameter of a multipart range ("" when absent), lower-cased."""
        return self.params.get("type", "").lower()

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")

    def __str__(self) -> str:
        params = "".join(
            f'; {k}="{v}"' if "/" in v else f"; {k}={v}" for k, v in self.params.items()
        )
        return self.media_type + params


def _split(text: str, separator: str) -> list[str]:
    """`text` cut at `separator`, except inside double quotes (a backslash escapes)."""
    pieces, current, quoted, escaped = [], [], False, False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\" and quoted:
            current.append(char)
            escaped = True
        elif char == '"':
            current.append(char)
            quoted = not quoted
        elif char == separator and not quoted:
            pieces.append("".join(current))
            current = []
        else:
            current.append(char)
    pieces.append("".join(current))
    return pieces


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner, out, escaped = value[1:-1], [], False
        for char in inner:
            if escaped or char != "\\":
                out.append(char)
                escaped = False
            else:
                escaped = True
        return "".join(out)
    return value


def parse_media_type(text: str) -> MediaRange:
    """One media type with its parameters; `q` is taken out as the weight (1 when absent or
    not a number in 0-1). A parameter without ``=`` is dropped."""
    first, *rest = _split(text, ";")
    params: dict[str, str] = {}
    q = 1.0
    for item in rest:
        name, equals, raw = item.partition("=")
        name = name.strip().lower()
        if not equals or not name:
            continue
        value = _unquote(raw)
        if name == "q":
            try:
                q = min(max(float(value), 0.0), 1.0)
            except ValueError:
                q = 1.0
            continue
        params.setdefault(name, value)
    return MediaRange(first.strip().lower(), params, q)


def parse_accept(*sources: str | None) -> list[MediaRange]:
    """The acceptable media ranges of the given Accept values (the ``accept`` query parameter
    first, then the header), best first: by q, then by place; q=0 ranges are left out. With no
    value at all the answer is ``*/*``."""
    ranked = []
    place = 0
    for source in sources:
        for item in _split(source or "", ","):
            if not item.strip():
                continue
            media = parse_media_type(item)
            if "/" not in media.media_type:
                continue  # not a media range: ignored (PS3.18 8.7.7)
            ranked.append((-media.q, place, media))
            place += 1
    if not ranked and not any((s or "").strip() for s in sources):
        return [MediaRange("*/*")]
    return [media for q, _, media in sorted(ranked, key=lambda t: (t[0], t[1])) if q < 0]


def _matches(pattern: str, media_type: str) -> bool:
    """Whether the range `pattern` (maybe ``*/*`` or ``type/*``) covers `media_type`."""
    if pattern in ("*", "*/*"):
        return True
    kind, _, sub = pattern.partition("/")
    return sub == "*" and media_type.startswith(kind + "/") or pattern == media_type


def not_acceptable(what: str, offers: list[str], reasons: list[str], asked: str) -> NotAcceptable:
    """A 406 that names what the node can send for `what`, and why the asked ranges failed."""
    text = f"{what} can be sent as: {'; or '.join(offers)}. The request accepts {asked!r}"
    if reasons:
        text += " (" + "; ".join(dict.fromkeys(reasons)) + ")"
    return NotAcceptable(text)


def described(ranges: list[MediaRange]) -> str:
    return ", ".join(str(r) + (f";q={r.q:g}" if r.q != 1 else "") for r in ranges) or "nothing"


def check_charset(ranges: list[MediaRange], charset_query: str | None) -> None:
    """JSON and XML are always UTF-8: a request that accepts only other character sets is
    refused (the ``charset`` query parameter, or charset parameters on every range)."""
    wanted = [c.strip().strip('"').lower() for c in (charset_query or "").split(",") if c.strip()]
    wanted += [r.params["charset"].lower() for r in ranges if "charset" in r.params]
    if wanted and not any(c in ("utf-8", "utf8", "*", "iso_ir 192") for c in wanted):
        raise NotAcceptable(
            f"metadata is sent in UTF-8 only; the request accepts the character sets {wanted}"
        )


# --- instances (PS3.18 10.4.1.1.1) --------------------------------------------------------


@dataclass(frozen=True)
class InstanceChoice:
    single_part: bool
    transfer_syntax: str  # a UID or "*"


def choose_instances(
    ranges: list[MediaRange], single_instance: bool, producible: Callable[[str], str | None]
) -> InstanceChoice:
    """How to send DICOM instances: multipart/related; type="application/dicom" (default), or a
    single part application/dicom for one instance only (PS3.18 10.4.4: single part types are
    ignored for a study or series). `producible(ts)` gives the reason `ts` cannot be sent, or
    None when it can; the first acceptable range that can be produced wins."""
    reasons: list[str] = []
    for media in ranges:
        single = media.media_type == DICOM or (
            media.media_type == "application/*" and single_instance
        )
        multi = media.media_type in ("*/*", "multipart/*") or (
            media.media_type == MULTIPART and media.related_type in ("", "*", "*/*", DICOM)
        )
        if media.media_type == DICOM and not single_instance:
            reasons.append("a single part application/dicom is only for one instance")
            continue
        if not (single or multi):
            continue
        ts = media.transfer_syntax or EXPLICIT_VR_LE
        reason = producible(ts)
        if reason is None:
            return InstanceChoice(single and single_instance, ts)
        reasons.append(reason)
    offers = [f'multipart/related; type="{DICOM}"; transfer-syntax=* or {EXPLICIT_VR_LE}']
    if single_instance:
        offers.append(f"{DICOM} (this one instance)")
    raise not_acceptable("instances", offers, reasons, described(ranges))


def served_syntax(stored: str, wanted: str) -> str:
    """The transfer syntax an instance stored as `stored` is sent in when `wanted` is asked
    (implicit VR little endian is never sent to a web client: explicit VR instead)."""
    if wanted == AS_STORED:
        return EXPLICIT_VR_LE if stored == IMPLICIT_VR_LE else stored
    return wanted


def is_lossy(transfer_syntax: str) -> bool:
    return transfer_syntax in LOSSY_SYNTAXES


# --- frames and pixel bulk data (PS3.18 8.7.3.3-8.7.3.4, 10.4.1.1.4) ---------------------


@dataclass(frozen=True)
class FrameChoice:
    """How to send frames: decoded (native little endian pixels in the instance's own
    photometric interpretation), or the stored bitstream of each frame, under `part_type`."""

    decoded: bool
    part_type: str
    transfer_syntax: str
    single_part: bool


def _frame_part_type(media: MediaRange) -> str | None:
    """The media type a range asks for each frame (None when the range is not for frames)."""
    if media.media_type in ("*/*", "multipart/*"):
        return OCTET_STREAM
    if media.media_type == MULTIPART:
        kind = media.related_type
        return OCTET_STREAM if kind in ("", "*", "*/*") else kind
    return media.media_type


def choose_frames(
    ranges: list[MediaRange],
    stored: str,
    lossy: bool,
    single_frame: bool,
    can_decode: Callable[[], str | None],
) -> FrameChoice:
    """How to send the frames of an instance stored as `stored` (`lossy`: its pixels may have
    lost information). ``application/octet-stream`` gives decoded frames, or the stored bitstream
    with ``transfer-syntax=*``; a compressed media type gives the stored bitstream when it is of
    that type and the asked transfer syntax (if any) is the stored one or ``*``. A lossless
    syntax is never answered with a lossy bitstream. `can_decode()` says why the frames cannot
    be decoded (None when they can)."""
    if stored in VIDEO_MEDIA_TYPE:
        raise NotAcceptable(
            f"frames of a video ({UID(stored).name}) are not sent one by one; its Pixel Data "
            f"bulk data gives the whole stream as stored ({VIDEO_MEDIA_TYPE[stored]}), and the "
            "instance is sent as stored with transfer-syntax=*"
        )
    compressed = UID(stored).is_compressed
    stored_type = FRAME_MEDIA_TYPE.get(stored)
    reasons: list[str] = []
    for media in ranges:
        part_type = _frame_part_type(media)
        if part_type is None:
            continue
        part_type = FRAME_MEDIA_TYPE_ALIASES.get(part_type, part_type)
        single = media.media_type != MULTIPART and media.media_type not in ("*/*", "multipart/*")
        if single and not single_frame:
            reasons.append(f"a single part {media.media_type} is only for one frame")
            continue
        ts = media.transfer_syntax
        if part_type == OCTET_STREAM or part_type == "application/*":
            if ts == AS_STORED and compressed:
                return FrameChoice(False, OCTET_STREAM, stored, single)
            if ts in (None, AS_STORED, EXPLICIT_VR_LE):
                if compressed:
                    reason = can_decode()
                    if reason:
                        reasons.append(reason)
                        continue
                return FrameChoice(compressed, OCTET_STREAM, EXPLICIT_VR_LE, single)
            reasons.append(f"application/octet-stream frames are not sent as {ts}")
            continue
        if not compressed or stored_type is None:
            if _matches(part_type, OCTET_STREAM):
                return FrameChoice(False, OCTET_STREAM, EXPLICIT_VR_LE, single)
            reasons.append(f"the frames are stored uncompressed, not as {part_type}")
            continue
        if not _matches(part_type, stored_type):
            reasons.append(f"the frames are stored as {stored_type} ({stored}), not {part_type}")
            continue
        if ts in (None, AS_STORED, stored):
            return FrameChoice(False, stored_type, stored, single)
        if lossy and not is_lossy(ts):
            reasons.append(f"lossless {ts} was asked; the frames are stored lossy as {stored}")
        else:
            reasons.append(f"the frames are stored as {stored}; {ts} cannot be made from them")
    offers = [f'multipart/related; type="{OCTET_STREAM}" (decoded; transfer-syntax=* as stored)']
    if compressed and stored_type:
        offers.append(f'multipart/related; type="{stored_type}"; transfer-syntax={stored}')
    raise not_acceptable("these frames", offers, reasons, described(ranges))


# --- metadata (PS3.18 10.4.1.1.2) ---------------------------------------------------------


def choose_metadata(ranges: list[MediaRange], xml_available: bool) -> str:
    """application/dicom+json (the default) or multipart/related; type="application/dicom+xml";
    never JSON under a request that accepts only XML."""
    for media in ranges:
        if media.media_type in ("*/*", "application/*", DICOM_JSON, "application/json"):
            return DICOM_JSON
        is_xml = media.media_type == DICOM_XML or (
            media.media_type == MULTIPART and media.related_type == DICOM_XML
        )
        if is_xml and xml_available:
            return DICOM_XML
    offers = [DICOM_JSON] + ([f'multipart/related; type="{DICOM_XML}"'] if xml_available else [])
    raise not_acceptable("metadata", offers, [], described(ranges))


# --- rendered images (PS3.18 8.7.4, 10.4.1.1.3) -------------------------------------------


def choose_rendered(ranges: list[MediaRange], single_item: bool) -> tuple[str, bool]:
    """The rendered media type (image/jpeg by default, or image/png) and whether it is sent as a
    single part. A study or series is rendered as multipart/related (single part ranges are
    ignored there, PS3.18 10.4.4)."""
    for media in ranges:
        if media.media_type == MULTIPART:
            kind = media.related_type or "image/jpeg"
            if kind in ("*", "*/*", "image/*"):
                return "image/jpeg", False
            if kind in RENDERED_TYPES:
                return kind, False
            continue
        if media.media_type in ("*/*", "image/*", *RENDERED_TYPES) and single_item:
            kind = "image/jpeg" if "*" in media.media_type else media.media_type
            return kind, True
        if media.media_type in ("*/*", "multipart/*") and not single_item:
            return "image/jpeg", False
    where = "this image" if single_item else "a study or series"
    offers = (
        ["image/jpeg", "image/png"]
        if single_item
        else ['multipart/related; type="image/jpeg"', 'multipart/related; type="image/png"']
    )
    raise not_acceptable(f"rendered {where}", offers, [], described(ranges))


# --- STOW-RS request bodies (PS3.18 10.5) -------------------------------------------------


def stow_content_type(header: str | None) -> tuple[str, str]:
    """The boundary and part type of a STOW-RS body's Content-Type (quoted or unquoted
    parameters alike); UnsupportedMediaType unless it is multipart/related with parts of
    application/dicom (the default when ``type`` is absent)."""
    media = parse_media_type(header or "")
    if media.media_type != MULTIPART:
        raise UnsupportedMediaType(
            f'STOW-RS takes multipart/related; type="{DICOM}", '
            f"not {media.media_type or 'nothing'!r}"
        )
    part_type = media.related_type or DICOM
    if part_type != DICOM:
        raise UnsupportedMediaType(
            f"parts of type {part_type!r} are not accepted; send {DICOM} instances"
        )
    return media.params.get("boundary", ""), part_type


def options_header(text: str | None) -> tuple[str, dict[str, str]]:
    """A Content-Type as (media type, parameters), parameters unquoted: a drop-in for
    werkzeug's parse_options_header, which cuts an unquoted ``type=application/dicom`` at
    the ``/``."""
    media = parse_media_type(text or "")
    return media.media_type, dict(media.params)


def choose_video(ranges: list[MediaRange], video_type: str) -> bool | None:
    """Whether a video stream of `video_type` goes as a single part (True) or in
    multipart/related (False); None when the request accepts neither."""
    for media in ranges:
        if media.media_type == MULTIPART and _matches(media.related_type or "*/*", video_type):
            return False
        if media.media_type == "multipart/*":
            return False
        if media.media_type != MULTIPART and _matches(media.media_type, video_type.lower()):
            return True
    return None
