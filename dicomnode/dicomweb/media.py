"""Accept-header negotiation and the transfer syntaxes the node can produce on the way out."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID
from werkzeug.http import parse_options_header

from dicomnode.dicomweb.errors import NotAcceptable

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
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


@dataclass(frozen=True)
class MediaRange:
    media_type: str
    params: dict[str, str]

    @property
    def related_type(self) -> str:
        return self.params.get("type", "").strip('"').lower()


def accepted(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, best first (by q, then order)."""
    ranges = []
    for index, item in enumerate((header or "*/*").split(",")):
        if not item.strip():
            continue
        media_type, params = parse_options_header(item.strip())
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        ranges.append((-q, index, MediaRange(media_type.lower(), params)))
    return [r for _, _, r in sorted(ranges, key=lambda t: (t[0], t[1]))]


def dicom_transfer_syntax(header: str | None) -> str:
    """The transfer syntax asked for by an Accept header for DICOM instances ("*" = as stored).

    Accepts multipart/related; type="application/dicom" (and application/dicom, */*); the
    default is explicit VR little endian, as PS3.18 8.7.3.5.2 says.
    """
    for media in accepted(header):
        if (
            media.media_type in ("*/*", "multipart/*")
            or (
                media.media_type == "multipart/related"
                and media.related_type in ("", "*", "*/*", "application/dicom")
            )
            or media.media_type == "application/dicom"
        ):
            return media.params.get("transfer-syntax", EXPLICIT_VR_LE).strip('"')
    raise NotAcceptable(
        'instances are served as multipart/related; type="application/dicom"; '
        f"the request accepts only {header!r}"
    )


def can_decode(transfer_syntax: str) -> bool:
    """Whether objects stored in `transfer_syntax` can be re-encoded as explicit VR little endian
    (retired big endian is not converted: its binary values would need swapping)."""
    ts = UID(transfer_syntax)
    if not ts.is_little_endian:
        return False
    if not ts.is_compressed:
        return True
    try:
        return get_decoder(ts).is_available
    except (NotImplementedError, ValueError):
        return False


def check_producible(stored_syntaxes: set[str], wanted: str) -> None:
    """NotAcceptable unless every stored syntax can be sent as `wanted`."""
    if wanted == AS_STORED:
        return
    if wanted != EXPLICIT_VR_LE and stored_syntaxes != {wanted}:
        raise NotAcceptable(
            f"transfer syntax {wanted} can be served only for objects stored in it; "
            f"use '*' (as stored) or {EXPLICIT_VR_LE}"
        )
    blocked = sorted(ts for ts in stored_syntaxes if not can_decode(ts))
    if blocked:
        raise NotAcceptable(
            f"objects stored as {', '.join(blocked)} cannot be decompressed here; ask for "
            "transfer-syntax=* to receive them as stored"
        )
