"""The analyzer interface: what a plugin declares and what it is handed.

An analyzer is a class with a name, a version, a declarative `Selector` of what it wants, the
unit it works on (one instance, a series or a study), and the SOP classes it may output. It
implements ``analyze(unit, context) -> AnalysisResult``. The node decides when a unit is
complete, runs the analyzer in a job, checks every output (same study, an allowed SOP class,
UIDs that are not its inputs') and files it through intake like any received object.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydicom.dataset import Dataset

from dicomnode.archive.elements import reader_for

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
    unit: ClassVar[Unit] = "series"
    # "on-receipt" runs a unit as soon as it arrives (self-contained multi-frame instances);
    # "quiet-period" waits until nothing more arrived for the configured time, unless the
    # headers announce how many instances to expect and they are all in.
    completion: ClassVar[str] = "quiet-period"
    output_sop_classes: ClassVar[frozenset[str]] = frozenset()

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
