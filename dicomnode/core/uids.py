"""UID validation: the only gate between a received UID and a file path.

A UID is accepted when it has 1-64 characters, only digits and dots, and no empty
component (so no leading, trailing or doubled dot). That is enough to make a UID safe in a
path. Components with leading zeros, which PS3.5 9.1 forbids but some modalities still send,
are accepted so that no study is lost for a cosmetic fault.
"""

import re

from dicomnode.core.errors import InvalidUID

_UID_FORM = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_valid_uid(value: object) -> bool:
    """True when `value` is a string in valid UID form."""
    return isinstance(value, str) and len(value) <= 64 and _UID_FORM.fullmatch(value) is not None


def validate_uid(value: object, field: str) -> str:
    """Return `value` as a UID string, or raise InvalidUID naming `field`."""
    text = str(value).rstrip("\x00 ") if value is not None else ""
    if not is_valid_uid(text):
        raise InvalidUID(field, value)
    return text
