"""The code lists a policy may use: lawful bases, purposes of use, the node's activities.

A policy naming a code that is not here is refused at load, with the rule's name. Lawful-basis
codes follow the governance brief (section 5.5): ``PIPA-<article>-<paragraph>-<item>`` for the
Korean Personal Information Protection Act, ``MSA-21-3-<n>`` for the Medical Service Act's
exceptions, ``GDPR-6-1-<x>`` / ``GDPR-9-2-<x>`` for the GDPR, ``HIPAA-164.<section>``.
Purposes are HL7 v3 ActReason purpose-of-use codes.
"""

from __future__ import annotations

# --- lawful bases ---------------------------------------------------------------------------

_PIPA = {
    "PIPA-15-1-1": "PIPA 15(1)1: the data subject's consent",
    "PIPA-15-1-2": "PIPA 15(1)2: a special provision of law or a legal obligation",
    "PIPA-15-1-3": "PIPA 15(1)3: a public institution's duties under law",
    "PIPA-15-1-4": "PIPA 15(1)4: a contract with the data subject",
    "PIPA-15-1-5": "PIPA 15(1)5: urgent protection of life, body or property",
    "PIPA-15-1-6": "PIPA 15(1)6: the controller's legitimate interest",
    "PIPA-15-1-7": "PIPA 15(1)7: urgent public safety",
    "PIPA-17-1-1": "PIPA 17(1)1: provision to a third party with the data subject's consent",
    "PIPA-17-1-2": "PIPA 17(1)2: provision within the purpose of collection (15(1)2,3,5-7)",
    "PIPA-17-4": "PIPA 17(4): provision reasonably related to the original purpose",
    "PIPA-18-2-1": "PIPA 18(2)1: separate consent to use beyond the purpose",
    "PIPA-18-2-2": "PIPA 18(2)2: a special provision of another law",
    "PIPA-18-2-3": "PIPA 18(2)3: urgent protection of life, body or property",
    "PIPA-18-2-10": "PIPA 18(2)10: urgent public safety",
    "PIPA-23-1-1": "PIPA 23(1)1: separate consent to process sensitive (health) information",
    "PIPA-23-1-2": "PIPA 23(1)2: a law requires or permits processing sensitive information",
    "PIPA-26": "PIPA 26: processing entrusted by the controller (the hospital)",
    "PIPA-28-2": "PIPA 28-2: pseudonymised information for statistics or scientific research",
    "PIPA-28-8-1-1": "PIPA 28-8(1)1: separate consent to transfer abroad",
    "PIPA-28-8-1-2": "PIPA 28-8(1)2: a law or treaty permits the transfer abroad",
    "PIPA-28-8-1-3": "PIPA 28-8(1)3: transfer abroad needed for a contract, disclosed",
    "PIPA-28-8-1-4": "PIPA 28-8(1)4: the recipient holds a certification",
    "PIPA-28-8-1-5": "PIPA 28-8(1)5: the recipient's country is recognised as adequate",
    "PIPA-21-1": "PIPA 21(1) proviso: another law requires the data to be kept",
    "PIPA-35": "PIPA 35: the data subject's right of access",
    "PIPA-36": "PIPA 36: the data subject's right to correction or deletion",
    "PIPA-37": "PIPA 37: the data subject's right to suspension",
}
_MSA = {
    "MSA-21-2": "Medical Service Act 21-2: transfer to another medical provider with consent",
    "MSA-22-2": "Medical Service Act 22(2): medical records kept for the periods of its "
    "Enforcement Rule Art. 15 (radiology images and reports: 5 years)",
    **{
        f"MSA-21-3-{n}": f"Medical Service Act 21(3){n}: a listed exception to record secrecy"
        for n in range(1, 21)
    },
}
_GDPR = {
    "GDPR-6-1-a": "GDPR 6(1)(a): consent",
    "GDPR-6-1-b": "GDPR 6(1)(b): performance of a contract",
    "GDPR-6-1-c": "GDPR 6(1)(c): a legal obligation",
    "GDPR-6-1-d": "GDPR 6(1)(d): vital interests",
    "GDPR-6-1-e": "GDPR 6(1)(e): a task in the public interest",
    "GDPR-6-1-f": "GDPR 6(1)(f): legitimate interests",
    "GDPR-9-2-a": "GDPR 9(2)(a): explicit consent to process health data",
    "GDPR-9-2-c": "GDPR 9(2)(c): vital interests of a person unable to consent",
    "GDPR-9-2-h": "GDPR 9(2)(h): medical diagnosis and the provision of care",
    "GDPR-9-2-i": "GDPR 9(2)(i): public health",
    "GDPR-9-2-j": "GDPR 9(2)(j): scientific research under Art. 89(1)",
    "GDPR-28": "GDPR 28: processing on behalf of the controller (processor)",
    "GDPR-15": "GDPR 15: the data subject's right of access",
    "GDPR-17": "GDPR 17: the right to erasure",
    "GDPR-17-3-b": "GDPR 17(3)(b): kept to comply with a legal obligation (no erasure)",
    "GDPR-17-3-e": "GDPR 17(3)(e): kept for legal claims (no erasure)",
    "GDPR-18": "GDPR 18: the right to restriction of processing",
    "GDPR-20": "GDPR 20: the right to data portability",
}
_HIPAA = {
    "HIPAA-164.506": "HIPAA 164.506: treatment, payment and health care operations",
    "HIPAA-164.508": "HIPAA 164.508: a valid authorization",
    "HIPAA-164.512": "HIPAA 164.512: required by law or a listed public purpose",
    "HIPAA-164.514": "HIPAA 164.514: de-identified data or a limited data set",
    "HIPAA-164.524": "HIPAA 164.524: the individual's access",
}
LAWFUL_BASES: dict[str, str] = {**_PIPA, **_MSA, **_GDPR, **_HIPAA}

# Bases that rest on the data subject's consent: a rule relying on one needs a granted consent.
CONSENT_BASES = frozenset(
    {
        "PIPA-15-1-1",
        "PIPA-17-1-1",
        "PIPA-18-2-1",
        "PIPA-23-1-1",
        "PIPA-28-8-1-1",
        "MSA-21-2",
        "GDPR-6-1-a",
        "GDPR-9-2-a",
        "HIPAA-164.508",
    }
)
# Bases under which data may go to a third party without consent (PIPA 17(1)2, 17(4), 18(2)2-10,
# a legal obligation, pseudonymised research) or with it.
THIRD_PARTY_BASES = frozenset(
    {
        "PIPA-17-1-1",
        "PIPA-17-1-2",
        "PIPA-17-4",
        "PIPA-18-2-1",
        "PIPA-18-2-2",
        "PIPA-18-2-3",
        "PIPA-18-2-10",
        "PIPA-28-2",
        "MSA-21-2",
        "GDPR-6-1-a",
        "GDPR-6-1-c",
        "GDPR-9-2-a",
        "GDPR-9-2-i",
        "GDPR-9-2-j",
        "HIPAA-164.508",
        "HIPAA-164.512",
        "HIPAA-164.514",
    }
) | frozenset(k for k in _MSA if k.startswith("MSA-21-3-"))
CROSS_BORDER_BASES = frozenset(k for k in _PIPA if k.startswith("PIPA-28-8-"))

# What an allow rule relying on a basis must state for the basis to hold, as the law words it;
# `parse_policy` refuses a rule that lacks any of it, naming the rule and the article. Keys:
#   deid_profile: the rule de-identifies what it gives (a [[deid_profiles]] id);
#   purposes: the purposes of use the basis can serve;
#   legal_provision: the rule names the other law and article relied on;
#   collection_bases: the rule's collection_basis, the 15(1) ground the data was collected on;
#   within_collection_purposes: the purposes are among the intake activity's (collection's);
#   compatibility: the rule records its judgement on each Decree 14-2(1) factor;
#   published_in: where the privacy policy publishes those criteria (Decree 14-2(2)).
BASIS_CONDITIONS: dict[str, dict[str, object]] = {
    "PIPA-28-2": {
        "law": "PIPA 28-2: pseudonymised information may be processed without consent for "
        "statistics, scientific research and public-interest archiving; given to a third party "
        "it must not include information that could identify a specific person (28-2(2))",
        "deid_profile": True,
        # scientific research (industrial research and development included), statistics
        # (population health), public-interest archiving (records management)
        "purposes": (
            "HRESCH",
            "CLINTRCH",
            "CLINTRCHNPC",
            "BIORCH",
            "SYSDEV",
            "TRAIN",
            "POPHLTH",
            "RECORDMGT",
        ),
    },
    "PIPA-17-1-2": {
        "law": "PIPA 17(1)2: provision within the purposes the data was collected for under "
        "Article 15(1)2, 3 and 5 to 7",
        "collection_bases": (
            "PIPA-15-1-2",
            "PIPA-15-1-3",
            "PIPA-15-1-5",
            "PIPA-15-1-6",
            "PIPA-15-1-7",
        ),
        "within_collection_purposes": True,
    },
    "PIPA-17-4": {
        "law": "PIPA 17(4) and Decree 14-2: provision without consent within a scope reasonably "
        "related to the original purpose, judged on relevance to it, predictability, no undue "
        "infringement and safeguards such as pseudonymisation or encryption; when ongoing, the "
        "criteria are published in the privacy policy and the privacy officer checks them",
        "compatibility": ("relevance", "predictability", "no_undue_infringement", "safeguards"),
        "published_in": True,
    },
    "PIPA-18-2-2": {
        "law": "PIPA 18(2)2: use or provision beyond the purpose where another law has a special "
        "provision for it",
        "legal_provision": True,
    },
    "PIPA-23-1-2": {
        "law": "PIPA 23(1)2: a law requires or permits processing the sensitive information",
        "legal_provision": True,
    },
}

# --- purposes of use (HL7 v3 ActReason) --------------------------------------------------------

PURPOSES: dict[str, str] = {
    "TREAT": "treatment",
    "ETREAT": "emergency treatment",
    "COC": "coordination of care",
    "HPAYMT": "healthcare payment",
    "HOPERAT": "healthcare operations",
    "HQUALIMP": "health quality improvement",
    "HRESCH": "healthcare research",
    "CLINTRCH": "clinical trial research",
    "CLINTRCHNPC": "clinical trial research without patient care",
    "BIORCH": "biomedical research",
    "PUBHLTH": "public health",
    "POPHLTH": "population health",
    "HCOMPL": "health compliance",
    "HLEGAL": "legal proceedings",
    "PATRQT": "patient requested",
    "HSYSADMIN": "health system administration",
    "SYSDEV": "system development",
    "HTEST": "test health data",
    "TRAIN": "training",
    "HMARKT": "healthcare marketing",
    "RECORDMGT": "records management",
    "METAMGT": "metadata management",
}
RESEARCH_PURPOSES = frozenset({"HRESCH", "CLINTRCH", "CLINTRCHNPC", "BIORCH", "SYSDEV", "TRAIN"})

# --- what the node does with data ---------------------------------------------------------------

ACTIVITIES: dict[str, str] = {
    "intake": "receiving and filing images sent by the hospital's modalities and peers",
    "analysis": "running the image analyses on received studies",
    "return-results": "sending analysis results back to the hospital's systems",
    "hospital-access": "answering the hospital's queries and retrievals (DIMSE, DICOMweb)",
    "research-sharing": "giving (pseudonymised) data to a research recipient",
    "third-party-provision": "giving data to a third party outside the hospital",
    "subject-access": "giving data subjects their own data (access, portability)",
}
# Activities that hand data to someone other than the hospital: a rule allowing one needs a
# third-party basis.
THIRD_PARTY_ACTIVITIES = frozenset({"research-sharing", "third-party-provision"})

# The operations an egress request can name; a rule lists the ones it covers (or "*").
OPERATIONS: dict[str, str] = {
    "find": "DIMSE C-FIND answer",
    "move": "DIMSE C-MOVE",
    "get": "DIMSE C-GET",
    "qido": "DICOMweb QIDO-RS answer",
    "wado": "DICOMweb WADO-RS retrieval",
    "job-info": "analysis job records (name patients and studies)",
    "forward": "analysis results sent to a configured destination",
    "share": "a share to a recipient (DIMSE C-STORE or DICOMweb STOW-RS)",
    "export": "a data-subject export",
    "analyze": "running an analysis (processing, not disclosure)",
    "admit": "filing a received object (processing, not disclosure)",
}

RECIPIENT_KINDS: dict[str, str] = {
    "controller": "the hospital itself (its PACS, workstations, viewers)",
    "processor": "a processor acting for the hospital under contract",
    "third-party": "anyone else: a research institute, another company, another hospital",
}

# Data categories a retention rule or activity can name.
DATA_CATEGORIES: dict[str, str] = {
    "received-images": "the DICOM objects received from the hospital",
    "analysis-results": "the SEG and SR objects the node's analyses produced",
    "logs": "job records, audit spool and other operational records naming patients",
    "identifiers": "patient identifiers and demographics in the headers",
}
RETENTION_STARTS: dict[str, str] = {
    "received": "when the object was received",
    "study-date": "the study's StudyDate",
    "analysis-done": "when the analysis that produced a result finished",
    "consent-withdrawn": "when the patient withdrew the consent the data was kept under",
}
