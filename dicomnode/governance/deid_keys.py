"""Keyed derivations of de-identification: replacement UIDs, patient pseudonyms, date shifts.

Each is an HMAC-SHA256 under the node secret and a scope (one per recipient).
"""

from __future__ import annotations

import hashlib
import hmac

MIN_KEY_BYTES = 16


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
        raise ValueError(f"key: must be a node secret of at least {MIN_KEY_BYTES} bytes")


def _mac(key: bytes, purpose: str, scope: str, value: str) -> bytes:
    message = "\0".join((purpose, scope, value)).encode("utf-8")
    return hmac.new(bytes(key), message, hashlib.sha256).digest()


def remap_uid(uid: str, key: bytes, scope: str = "") -> str:
    """The replacement for `uid`: "2.25." + a 128-bit keyed HMAC-SHA256 value (UUID version 8).

    The same uid, key and scope always give the same replacement; without the key nobody can
    tell which original a replacement stands for.
    """
    _check_key(key)
    if not isinstance(uid, str):
        raise ValueError("uid: must be a string")
    raw = bytearray(_mac(key, "uid", scope, uid.strip("\0 "))[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8: custom (RFC 9562)
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC variant
    return f"2.25.{int.from_bytes(raw, 'big')}"


def patient_pseudonym(patient_id: str, key: bytes, scope: str = "") -> str:
    """The Patient ID written out for `patient_id`: keyed, so stable per key and scope."""
    _check_key(key)
    return "P" + _mac(key, "patient", scope, patient_id.strip()).hex()[:20].upper()


def date_shift_days(patient_id: str, key: bytes, scope: str = "") -> int:
    """Days (between -3650 and -1) that one patient's dates move under modified dates."""
    _check_key(key)
    digest = _mac(key, "date-shift", scope, patient_id.strip())
    return -(1 + int.from_bytes(digest[:8], "big") % 3650)
