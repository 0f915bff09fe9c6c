"""The criteria and procedure of each automated output the node makes, as it discloses them
(PIPA 37-2(4): a controller making automated decisions discloses their criteria and procedure;
GDPR 13(2)(f), 15(1)(h): meaningful information about the logic involved).

Each analyzer declares its `OutputCriteria`; a site replaces the text in the analyzer's
settings (``criteria``). `published_criteria` lists them for the public endpoint
(``GET /automated-decisions``) and the DPO's page.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dicomnode.analysis.plugin import CLINICIAN_REVIEW, Analyzer, discover
from dicomnode.config import AnalysisSettings

# The output SOP classes by the name a reader knows them by.
SOP_CLASS_NAMES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation (SEG)",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR",
}


def undeclared_text(analyzer: type[Analyzer]) -> str:
    """What is disclosed for an analyzer that declares no criteria (a site plugin)."""
    return (
        f"The analyzer {analyzer.name} {analyzer.version} does not describe its criteria; "
        f"ask the data protection officer.\nReview: {CLINICIAN_REVIEW}"
    )


def criteria_entry(analyzer: type[Analyzer], settings: AnalysisSettings) -> dict[str, Any]:
    """One output type's disclosure: the analyzer, what it writes, its criteria (the site's
    text when set, else the analyzer's own) and whether it runs on this node."""
    configured = settings.analyzer(analyzer.name)
    declared = analyzer.criteria
    parts: dict[str, str] = {}
    if declared is not None:
        parts = {
            "output": declared.output,
            "measures": declared.measures,
            "method": declared.method,
            "limits": declared.limits,
            "review": declared.review,
        }
    site_text = configured.criteria.strip()
    if site_text:
        text, source = site_text, "site"
    elif declared is not None:
        text, source = declared.text(), "analyzer"
    else:
        text, source = undeclared_text(analyzer), "none"
    return {
        "analyzer": analyzer.name,
        "version": analyzer.version,
        "enabled": settings.enabled and configured.enabled,
        "output_sop_classes": [
            {"uid": uid, "name": SOP_CLASS_NAMES.get(uid, uid)}
            for uid in sorted(analyzer.output_sop_classes)
        ],
        "automated": True,
        "criteria": parts,
        "text": text,
        "source": source,
    }


def published_criteria(
    settings: AnalysisSettings, analyzers: Mapping[str, type[Analyzer]] | None = None
) -> tuple[dict[str, Any], ...]:
    """Every installed analyzer's disclosure (`criteria_entry`), by name."""
    found = analyzers if analyzers is not None else discover()
    return tuple(criteria_entry(found[name], settings) for name in sorted(found))
