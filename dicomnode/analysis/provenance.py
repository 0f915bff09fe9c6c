"""Provenance of analysis results (issue 4, item 7): what every object an analyzer writes says
about how it was made, and what the job record keeps.

Each output embeds a ContributingEquipmentSequence item naming dicomnode as the Processing
Equipment (DCM 109102, CID 7005: "equipment that has processed composite instances to create
new composite instances"; 109103 Modifying Equipment is for changing existing instances), with
the analyzer as the model and the analyzer's and dicomnode's versions as software versions;
its ContributionDescription says the result is automated, for a clinician to review, and where
its criteria and procedure are disclosed (``/automated-decisions``, PIPA 37-2(4)); its segments
and measurement groups carry an AlgorithmIdentification with the analyzer's name,
version and parameters. The job record stores the inputs, the analyzer, its parameters and the
code version (`job_provenance`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
from pydicom.sr.codedict import codes

from dicomnode import __version__
from dicomnode.analysis.plugin import Analyzer

MANUFACTURER = "dicomnode"
RESEARCH_USE = "RESEARCH USE ONLY - not for diagnostic use"
# Where each output points for the criteria and procedure of the automated result (PIPA 37-2(4)).
CRITERIA_PATH = "/automated-decisions"
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment  # (109102, DCM), CID 7005


def algorithm_name(analyzer: Analyzer) -> str:
    return f"{MANUFACTURER}-{analyzer.name}"


def software_versions(analyzer: Analyzer) -> list[str]:
    """SoftwareVersions values: the analyzer's version and the node's (each at most 64 chars)."""
    return [f"{analyzer.name} {analyzer.version}"[:64], f"{MANUFACTURER} {__version__}"]


def contributing_equipment(analyzer: Analyzer) -> hd.ContributingEquipment:
    """The ContributingEquipmentSequence item of every object `analyzer` writes."""
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=analyzer.name,
        software_versions=software_versions(analyzer),
        contribution_description=(
            f"Derived by the {analyzer.name} {analyzer.version} analyzer of {MANUFACTURER} "
            f"{__version__}; {RESEARCH_USE}; an automated result for a clinician to review, "
            f"its criteria and procedure at the node's {CRITERIA_PATH} (PIPA 37-2)"
        ),
    )


def seg_algorithm(
    analyzer: Analyzer, family: hd.sr.CodedConcept, parameters: Mapping[str, str] | None = None
) -> hd.AlgorithmIdentificationSequence:
    """The AlgorithmIdentificationSequence of a SEG segment made by `analyzer`."""
    return hd.AlgorithmIdentificationSequence(
        name=algorithm_name(analyzer),
        family=family,
        version=analyzer.version,
        parameters=dict(parameters) if parameters else None,
    )


def sr_algorithm(
    analyzer: Analyzer, parameters: Sequence[str] = ()
) -> hd.sr.AlgorithmIdentification:
    """The TID 4019 Algorithm Identification of a measurement group (parameters as TEXT)."""
    return hd.sr.AlgorithmIdentification(
        name=algorithm_name(analyzer),
        version=analyzer.version,
        parameters=list(parameters) or None,
    )


def device_observer(analyzer: Analyzer, uid: str) -> hd.sr.ObserverContext:
    """The SR observation context's observer: `analyzer` as a device (TID 1004)."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid,
            name=f"{MANUFACTURER} {analyzer.name}",
            manufacturer_name=MANUFACTURER,
            model_name=analyzer.name,
        ),
    )


def job_provenance(
    analyzer: Analyzer, parameters: Mapping[str, Any], inputs: Sequence[str]
) -> dict[str, Any]:
    """What the job record keeps about how its outputs were made."""
    return {
        "analyzer": analyzer.name,
        "analyzer_version": analyzer.version,
        "code_version": f"{MANUFACTURER} {__version__}",
        "parameters": dict(parameters),
        "inputs": list(inputs),
    }
