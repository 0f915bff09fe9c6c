"""The prose of the de-identification conformance statement (PS3.15 E.1.3)."""

from __future__ import annotations

from dicomnode.governance.deid_keys import MIN_KEY_BYTES


def statement_texts(
    options: frozenset[str], private: str, by_type: list[dict[str, str]], implementation_uid: str
) -> dict:
    """The statement's entries from "cleaning" to "pixel_data", under `options`."""
    modified = "retain-longitudinal-modified-dates" in options
    return {
        "cleaning": (
            "Sequences are cleaned by applying these rules to every item. Dates are moved by "
            "the patient's date shift (modified dates); AE titles become keyed pseudonyms; text "
            "is kept with every name, ID, address, institution and birth date found in the "
            "object blanked out; binary data (overlay bitmaps, curve data) cannot be cleaned "
            "and is removed."
        ),
        "resolved_by_type": by_type,
        "type_resolution": (
            "Compound actions use the attribute's Type in the object's IOD (PS3.3, CT, MR, XA, "
            "SC, US, DX/CR, MG, PET, NM, SEG, SR and KOS): Type 3 removed, Type 2 zero length, "
            "Type 1 dummy (X/Z/U*: Types 1 and 2 keep the items with their UIDs replaced). For "
            "other IODs the strictest Type over all IODs is used; for an attribute of unknown "
            "Type the dummy."
        ),
        "private_attributes": (
            "kept only if listed in PS3.15 Table E.3.10-1 (by private creator, group and "
            "element); every other private attribute and every unknown creator is removed"
            if private == "C"
            else "all removed"
        ),
        "uid_scope": (
            "UIDs are replaced by 2.25 UIDs derived with HMAC-SHA256 under the node secret and "
            "the recipient scope: consistent across objects, studies and re-runs for one scope, "
            "different between scopes; every UID attribute that names an instance, series, "
            "study, frame of reference or other entity is replaced, at any depth."
            if "retain-uids" not in options
            else "UIDs are kept (Retain UIDs Option)."
        ),
        "key": (
            f"HMAC-SHA256 with the node secret (at least {MIN_KEY_BYTES} bytes); replacement "
            "UIDs carry 122 bits of the MAC. No unkeyed hash is used."
        ),
        "patient_identity": (
            "Patient ID is replaced by a keyed pseudonym of the original Patient ID (stable per "
            "scope); Patient's Name, Birth Date and the other identity attributes follow the table."
        ),
        "dates": (
            "Dates are moved into the past by a per-patient shift of 1-3650 days derived from "
            "the node secret and scope; times of day are kept, so intervals are preserved."
            if modified
            else "Dates and times are kept."
            if "retain-longitudinal-full-dates" in options
            else "Dates and times are removed or replaced by dummies per the table."
        ),
        "inserted_attributes": [
            "PatientIdentityRemoved",
            "DeidentificationMethod",
            "DeidentificationMethodCodeSequence",
            "LongitudinalTemporalInformationModified",
            "PatientID",
            *(["BurnedInAnnotation"] if "clean-pixel-data" in options else []),
            *(
                ["RecognizableVisualFeatures"]
                if "clean-recognizable-visual-features" in options
                else []
            ),
        ],
        "file_meta": (
            "The File Meta Information is rebuilt (new Media Storage SOP Instance UID, dicomnode "
            f"implementation UID {implementation_uid}); the preamble is not carried over."
        ),
        "encrypted_attributes": "none: no Encrypted Attributes Sequence is written",
        "pixel_data": (
            "This engine does not clean pixel data. Images likely to carry burned-in text "
            "(Burned In Annotation YES; US, secondary capture, OT and other captures whatever "
            "the flag; CR, DX, MG, XA, RF without the flag NO) are held unless the Clean Pixel "
            "Data Option states that a separate step cleaned them."
        ),
    }
