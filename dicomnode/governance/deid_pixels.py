"""Burned-in text risk: which objects' pixels must be cleaned before they leave."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

if TYPE_CHECKING:
    from dicomnode.governance.deid import DeidProfile

_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
# Burned-in text risk: these image types are held whatever Burned In Annotation says, ...
_ALWAYS_HELD_MODALITIES = {"US", "IVUS", "OT", "SC", "XC", "ES", "GM", "DOC", "OP"}
_ALWAYS_HELD_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.7",  # secondary capture, single and multi-frame
    "1.2.840.10008.5.1.4.1.1.6.",  # ultrasound
    "1.2.840.10008.5.1.4.1.1.3.1",  # ultrasound multi-frame
    "1.2.840.10008.5.1.4.1.1.77.",  # visible light (endoscopy, photography, microscopy)
)
# ... and these projection images are held unless it says NO.
_HELD_UNLESS_FLAGGED_MODALITIES = {"CR", "DX", "MG", "IO", "PX", "RF", "XA", "RG"}


def _text(value: object) -> str:
    return "" if value is None else str(value)


def burned_in_risk(ds: Dataset, profile: DeidProfile) -> str | None:
    """Why the object's pixels may carry burned-in identity (so it must not leave), or None."""
    if "clean-pixel-data" in profile.options or not any(t in ds for t in _PIXEL_TAGS):
        return None
    flag = _text(ds.get("BurnedInAnnotation", "")).strip().upper()
    modality = _text(ds.get("Modality", "")).strip().upper()
    sop_class = _text(ds.get("SOPClassUID", ""))
    if flag == "YES":
        return "Burned In Annotation is YES: the pixel data must be cleaned first"
    if modality in _ALWAYS_HELD_MODALITIES or sop_class.startswith(_ALWAYS_HELD_SOP_PREFIXES):
        kind = modality or sop_class
        return (
            f"{kind} images often carry burned-in text whatever Burned In Annotation says "
            f"({flag or 'missing'}): the pixel data must be cleaned first"
        )
    if modality in _HELD_UNLESS_FLAGGED_MODALITIES and flag != "NO":
        return f"{modality} image without Burned In Annotation NO: clean the pixel data first"
    return None
