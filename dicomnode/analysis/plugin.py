"""The analyzer interface: what a plugin declares and what it is handed.

An analyzer is a class with a name, a version, a declarative `Selector` of what it wants, the
`ClinicalFit` a unit must show before it is processed (minimum data: a head CT is no lung
analysis' business; site-tunable), the unit it works on (one instance, a series or a study),
and the SOP classes it may output. It
implements ``analyze(unit, context) -> AnalysisResult``. The node decides when a unit is
complete, runs the analyzer in a job, checks every output (same study, an allowed SOP class,
UIDs that are not its inputs') and files it through intake like any received object.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydicom.dataset import Dataset

from dicomnode.config import ANALYZER_FIT_KEYS
from dicomnode.core.elements import reader_for

ENTRY_POINT_GROUP = "dicomnode.analyzers"
UID_ROOT = "2.25."  # UUID-derived UIDs (PS3.5 B.2): no registered root needed

Unit = Literal["instance", "series", "study"]


class NotApplicable(Exception):  # noqa: N818 (a decision, not a failure)
    """Raised by an analyzer whose unit turns out not to suit it (too few slices, no vessel
    visible...): the job ends "skipped" with this reason and is not retried."""


@dataclass(frozen=True)
class Selector:
    """Which received objects an analyzer wants: SOP classes and modalities (empty = any), and
    attribute rules keyword -> accepted values."""

    sop_class_uids: frozenset[str] = frozenset()
    modalities: frozenset[str] = frozenset()
    attributes: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def matches(self, header: Dataset) -> bool:
        """Whether `header` is wanted; asked of every arriving object, so the values are
        read from its raw elements (several values compare as one text, joined by "\\")."""
        if self.sop_class_uids and _text(header, "SOPClassUID") not in self.sop_class_uids:
            return False
        if self.modalities and _text(header, "Modality") not in self.modalities:
            return False
        return all(_text(header, k) in values for k, values in self.attributes.items())


def _text(header: Dataset, keyword: str) -> str:
    """The attribute's text ("" when absent or empty)."""
    return reader_for(keyword).text(header) or ""


# The settings keys of a clinical fit ([analysis.analyzers."<name>"] body_parts = [...], ...).
FIT_KEYS = ANALYZER_FIT_KEYS


def _body_part(value: str) -> str:
    """BodyPartExamined compared without case, spaces or underscores ("Coronary artery")."""
    return "".join(c for c in value.upper() if c not in " _")


@dataclass(frozen=True)
class ClinicalFit:
    """Whether a unit clinically suits an analyzer (minimum data: only what the purpose needs).

    A unit fits when none of its ImageType values is excluded and at least one of: its
    BodyPartExamined is one of `body_parts`; a code of its Anatomic Region Sequence
    ("SCHEME:VALUE", e.g. "SCT:51185008") is one of `anatomic_regions`; its ProtocolName
    matches one of the `protocols` glob patterns (case-insensitive). With no body parts, regions
    or protocols at all, every unit fits."""

    purpose: str  # what fits, for the reason given when a unit does not ("a chest CT")
    body_parts: frozenset[str] = frozenset()
    anatomic_regions: frozenset[str] = frozenset()
    protocols: tuple[str, ...] = ()
    excluded_image_types: frozenset[str] = frozenset()

    def tuned(self, settings: Mapping[str, Sequence[str]]) -> ClinicalFit:
        """This fit with the site's settings (FIT_KEYS present there replace the defaults)."""
        values: dict[str, Any] = {}
        for key in FIT_KEYS:
            if key in settings:
                given = [str(v) for v in settings[key]]
                values[key] = tuple(given) if key == "protocols" else frozenset(given)
        return replace(self, **values)

    def misfit(self, header: Dataset) -> str:
        """ "" when `header`'s unit fits, else why not."""
        image_types = {str(v).strip().upper() for v in _values(header, "ImageType")}
        excluded = image_types & {t.upper() for t in self.excluded_image_types}
        if excluded:
            return f"ImageType {', '.join(sorted(excluded))} is never analysed as {self.purpose}"
        if not (self.body_parts or self.anatomic_regions or self.protocols):
            return ""
        body_part = _body_part(str(header.get("BodyPartExamined", "") or ""))
        regions = [
            f"{item.get('CodingSchemeDesignator', '')}:{item.get('CodeValue', '')}"
            for item in header.get("AnatomicRegionSequence", None) or ()
        ]
        protocol = str(header.get("ProtocolName", "") or "").strip()
        if body_part and body_part in {_body_part(b) for b in self.body_parts}:
            return ""
        if set(regions) & set(self.anatomic_regions):
            return ""
        if protocol and any(fnmatch.fnmatch(protocol.upper(), p.upper()) for p in self.protocols):
            return ""
        seen = [
            f"BodyPartExamined {body_part}" if body_part else "",
            f"anatomic region {', '.join(regions)}" if regions else "",
            f"ProtocolName {protocol!r}" if protocol else "",
        ]
        said = ", ".join(s for s in seen if s) or "no body part, anatomic region or protocol"
        return f"not {self.purpose}: {said} ({self.describe()})"

    def describe(self) -> str:
        """What fits, in a line."""
        parts = [
            f"body parts {', '.join(sorted(self.body_parts))}" if self.body_parts else "",
            f"anatomic regions {', '.join(sorted(self.anatomic_regions))}"
            if self.anatomic_regions
            else "",
            f"protocols {', '.join(self.protocols)}" if self.protocols else "",
        ]
        return "fits: " + "; ".join(p for p in parts if p)


def _values(header: Dataset, keyword: str) -> list[str]:
    """A multi-valued attribute's values ([] when absent)."""
    value = header.get(keyword, None)
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


@dataclass(frozen=True)
class InputUnit:
    """What an analyzer is handed: the unit's key and its stored files, in instance order."""

    key: str
    study_instance_uid: str
    patient_id: str
    paths: Sequence[Path]
    sop_instance_uids: Sequence[str]


@dataclass(frozen=True)
class AnalysisContext:
    """Settings and services for one run."""

    params: Mapping[str, Any]
    uid: Callable[[str], str]  # deterministic UID for an output role, e.g. uid("seg")
    deadline: datetime
    workdir: Path


# What every automated result is, whatever the analyzer (PIPA 37-2: not a decision by itself).
CLINICIAN_REVIEW = (
    "This is an automated result, produced without human involvement. It is not a diagnosis "
    "and no decision about the patient is taken on it alone: a clinician reviews it before it "
    "is used. The patient may ask for an explanation of it or refuse automated processing "
    "(PIPA 37-2); the request is recorded and answered by a person."
)


@dataclass(frozen=True)
class OutputCriteria:
    """The criteria and procedure of an analyzer's output, as disclosed to patients and staff
    (PIPA 37-2(4); GDPR 13(2)(f)): what the output is and measures, how, and its limits."""

    output: str  # the objects written, e.g. "a DICOM SEG and a TID 1500 measurement report"
    measures: str  # what is measured or found
    method: str  # how: the procedure, thresholds, models
    limits: str  # where it is not valid, its validation, its intended use
    review: str = CLINICIAN_REVIEW

    def text(self) -> str:
        """The whole disclosure as one text."""
        return "\n".join(
            f"{label}: {value}"
            for label, value in (
                ("Output", self.output),
                ("Measures", self.measures),
                ("Method", self.method),
                ("Limits", self.limits),
                ("Review", self.review),
            )
        )


@dataclass(frozen=True)
class AnalysisResult:
    datasets: list[Dataset]
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Analyzer:
    """Base class of analyzers. Subclasses set the class attributes and implement `analyze`."""

    name: ClassVar[str]
    version: ClassVar[str]
    selector: ClassVar[Selector]
    # What a unit must show to be processed (None: whatever the selector takes fits); the
    # site tunes it in the analyzer's settings (FIT_KEYS).
    fit: ClassVar[ClinicalFit | None] = None
    unit: ClassVar[Unit] = "series"
    # "on-receipt" runs a unit as soon as it arrives (self-contained multi-frame instances);
    # "quiet-period" waits until nothing more arrived for the configured time, unless the
    # headers announce how many instances to expect and they are all in.
    completion: ClassVar[str] = "quiet-period"
    output_sop_classes: ClassVar[frozenset[str]] = frozenset()
    # What its output is, measures and how (disclosed at /automated-decisions; the site may
    # replace the text: [analysis.analyzers."<name>"] criteria).
    criteria: ClassVar[OutputCriteria | None] = None

    def expected_instances(self, header: Dataset) -> int | None:
        """How many instances the unit will hold, when the headers say so."""
        return reader_for("ImagesInAcquisition").integer(header)

    def unit_uid(self, header: Dataset) -> str:
        keyword = {
            "instance": "SOPInstanceUID",
            "series": "SeriesInstanceUID",
            "study": "StudyInstanceUID",
        }
        return _text(header, keyword[self.unit])

    def clinical_fit(self, settings: Mapping[str, Sequence[str]]) -> ClinicalFit | None:
        """The analyzer's fit as the site tuned it."""
        return self.fit.tuned(settings) if self.fit is not None else None

    def analyze(self, unit: InputUnit, context: AnalysisContext) -> AnalysisResult:
        raise NotImplementedError


def deterministic_uid(*parts: str) -> str:
    """A UID derived from `parts` (analyzer, version, unit, role): a re-run of the same analysis
    gives the same UIDs, so its results replace the earlier ones instead of duplicating them."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()[:16]
    return UID_ROOT + str(int.from_bytes(digest, "big"))


def discover() -> dict[str, type[Analyzer]]:
    """Every analyzer registered under the ``dicomnode.analyzers`` entry-point group."""
    found: dict[str, type[Analyzer]] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        analyzer = entry.load()
        if isinstance(analyzer, type) and issubclass(analyzer, Analyzer):
            found[analyzer.name] = analyzer
    return found
