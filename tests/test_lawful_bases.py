"""A lawful basis lets data go only when its conditions hold as the law states them, and the
policy must state them (checked at load, naming the rule and the article; the conditions are data
in `codes.BASIS_CONDITIONS`):

- PIPA 28-2 (pseudonymised data for research): only de-identified (28-2(2)), for research,
  statistics or archiving;
- PIPA 17(1)2: only within the purposes of collection, on a 15(1) 2, 3, 5-7 ground;
- PIPA 17(4) and Decree 14-2: the four compatibility factors judged and the criteria published;
- PIPA 18(2)2: the other law's special provision named;
- PIPA 28-8: a processor abroad needs a cross-border basis like a third party (checklist 28);
- PIPA 17(2)1: a consent naming its recipients lets data go to those only."""

from __future__ import annotations

import pytest

from dicomnode.core.errors import InvalidInput
from dicomnode.core.model import PatientFacts
from dicomnode.governance import PolicyError, codes, decide, parse_policy
from tests.conftest import WORKSTATION, dicomweb_client
from tests.factory import make_ct
from tests.test_governance import NOW, RESEARCH_POLICY, consent, share
from tests.test_governance_node import as_file, governance_api, policy_text, publish_days_ago, wado

RESEARCH_RULE = """[[rules]]
id = "research-with-consent"
effect = "allow"
activity = "research-sharing"
recipients = ["lab"]
lawful_basis = "PIPA-17-1-1"
deid_profile = "research"
"""


def with_rule(rule: str) -> str:
    """RESEARCH_POLICY with its research rule replaced by `rule`."""
    assert RESEARCH_RULE in RESEARCH_POLICY
    return RESEARCH_POLICY.replace(RESEARCH_RULE, rule)


def research_rule(basis: str, *lines: str, deid: bool = True) -> str:
    return "\n".join(
        [
            "[[rules]]",
            'id = "research-without-consent"',
            'effect = "allow"',
            'activity = "research-sharing"',
            'recipients = ["lab"]',
            f'lawful_basis = "{basis}"',
            *(['deid_profile = "research"'] if deid else []),
            *lines,
            "",
        ]
    )


COMPATIBILITY = (
    'published_in = "privacy policy section 7 (2026-11)"',
    "[rules.compatibility]",
    'relevance = "the images were taken for the diagnosis the study examines"',
    'predictability = "patients are told at admission that imaging research is done"',
    'no_undue_infringement = "the recipient may not re-identify; DRB approval 2026-14"',
    'safeguards = "pseudonymised by the research profile, sent over TLS"',
)


# --- PIPA 28-2 ------------------------------------------------------------------------------


def test_a_28_2_rule_without_a_deid_profile_is_refused_at_load_naming_the_rule():
    with pytest.raises(PolicyError, match=r"rules\[research-without-consent\].*PIPA-28-2.*28-2"):
        parse_policy(with_rule(research_rule("PIPA-28-2", deid=False)))
    policy = parse_policy(with_rule(research_rule("PIPA-28-2")))
    allowed = decide(share(), {}, policy, NOW)
    assert allowed.allowed and allowed.deid_profile == "research"
    # the pseudonymised share is the only way out: an identified retrieval is refused
    assert not decide(share(operation="wado"), {}, policy, NOW).allowed


def test_a_28_2_rule_serves_research_statistics_or_archiving_only():
    text = with_rule(research_rule("PIPA-28-2")).replace(
        'purposes = ["HRESCH"]', 'purposes = ["HRESCH", "HMARKT"]'
    )
    with pytest.raises(PolicyError, match="does not cover purpose HMARKT"):
        parse_policy(text)


# --- PIPA 17(1)2, 17(4), 18(2)2 --------------------------------------------------------------


def test_a_17_1_2_rule_holds_only_within_the_purposes_of_collection():
    with pytest.raises(PolicyError, match="collection_basis"):
        parse_policy(with_rule(research_rule("PIPA-17-1-2")))
    grounded = research_rule("PIPA-17-1-2", 'collection_basis = "PIPA-15-1-2"')
    with pytest.raises(PolicyError, match="purposes of collection \\(TREAT\\), not HRESCH"):
        parse_policy(with_rule(grounded))
    # data collected for research too (the intake activity names HRESCH): the basis holds
    collected = with_rule(grounded).replace(
        'id = "intake"\npurposes = ["TREAT"]', 'id = "intake"\npurposes = ["TREAT", "HRESCH"]'
    )
    assert decide(share(), {}, parse_policy(collected), NOW).allowed


def test_a_17_4_rule_needs_the_compatibility_judgement_and_its_publication():
    with pytest.raises(PolicyError, match="compatibility.relevance.*Decree 14-2"):
        parse_policy(with_rule(research_rule("PIPA-17-4")))
    without_publication = research_rule("PIPA-17-4", *COMPATIBILITY[1:])
    with pytest.raises(PolicyError, match="published_in"):
        parse_policy(with_rule(without_publication))
    partial = research_rule("PIPA-17-4", *COMPATIBILITY[:-1])
    with pytest.raises(PolicyError, match="compatibility.safeguards"):
        parse_policy(with_rule(partial))
    policy = parse_policy(with_rule(research_rule("PIPA-17-4", *COMPATIBILITY)))
    rule = next(r for r in policy.rules if r.id == "research-without-consent")
    assert dict(rule.compatibility)["relevance"].startswith("the images")
    assert decide(share(), {}, policy, NOW).allowed


def test_an_18_2_2_rule_must_name_the_other_law():
    with pytest.raises(PolicyError, match=r"research-without-consent.*legal_provision.*18\(2\)2"):
        parse_policy(with_rule(research_rule("PIPA-18-2-2")))
    named = research_rule(
        "PIPA-18-2-2", 'legal_provision = "Infectious Disease Control and Prevention Act Art. 76-2"'
    )
    assert decide(share(), {}, parse_policy(with_rule(named)), NOW).allowed


def test_the_conditions_are_data_in_the_shipped_code_list():
    for basis, conditions in codes.BASIS_CONDITIONS.items():
        assert basis in codes.LAWFUL_BASES and conditions["law"]
    assert codes.BASIS_CONDITIONS["PIPA-28-2"]["deid_profile"] is True


# --- PIPA 28-8 ------------------------------------------------------------------------------

PROCESSOR = """
[[recipients]]
id = "reader"
name = "Teleradiology reading service"
kind = "processor"
country = "{country}"
token_subjects = ["reader-client"]
{basis}

[[rules]]
id = "reading"
effect = "allow"
activity = "hospital-access"
recipients = ["reader"]
"""


def test_a_processor_abroad_needs_a_28_8_basis_like_a_third_party():
    at_home = RESEARCH_POLICY + PROCESSOR.format(country="KR", basis="")
    assert parse_policy(at_home).recipient("reader") is not None
    abroad = RESEARCH_POLICY + PROCESSOR.format(country="US", basis="")
    with pytest.raises(PolicyError, match=r"recipients\[reader\]: a processor in US.*28-8"):
        parse_policy(abroad)
    based = RESEARCH_POLICY + PROCESSOR.format(
        country="US", basis='cross_border_basis = "PIPA-28-8-1-3"'
    )
    policy = parse_policy(based)
    request = share(recipient="reader", operation="wado", purpose="TREAT")
    assert decide(request, {}, policy, NOW).allowed


# --- PIPA 17(2)1: the recipients a consent names -------------------------------------------

UNI = """
[[recipients]]
id = "uni"
name = "University imaging lab"
kind = "third-party"
token_subjects = ["uni-client"]
default_purpose = "HRESCH"
"""


def test_a_consent_naming_its_recipients_lets_data_go_to_those_only():
    policy = parse_policy(
        with_rule(RESEARCH_RULE.replace('recipients = ["lab"]', 'recipients = ["lab", "uni"]'))
        + UNI
    )
    named = consent("P1", "HRESCH", "granted", recipients=("lab",))
    facts = {"P1": PatientFacts("P1", (named,))}
    assert decide(share(recipient="lab"), facts, policy, NOW).allowed
    refused = decide(share(recipient="uni"), facts, policy, NOW)
    assert not refused.allowed and "names its recipients (lab), not uni" in refused.reason
    anyone = {"P1": PatientFacts("P1", (consent("P1", "HRESCH", "granted"),))}
    assert decide(share(recipient="uni"), anyone, policy, NOW).allowed


@pytest.fixture
def node(start_node):
    text = (
        policy_text()
        .replace(
            'recipients = ["lab"]\nlawful_basis = "PIPA-17-1-1"\ndeid_profile = "research"',
            'recipients = ["lab", "uni"]\nlawful_basis = "PIPA-17-1-1"',
        )
        .replace("[[deid_profiles]]", UNI + "\n[[deid_profiles]]")
    )
    node = start_node(peers=[WORKSTATION])
    publish_days_ago(node, text)
    dicomweb_client(node).store_instances([as_file(make_ct(patient_id="P1", study_uid="1.2.61"))])
    return node


def test_a_consent_naming_lab_lets_lab_retrieve_and_not_uni(node):
    answer = governance_api(
        node,
        "POST",
        "/consents",
        json={"patient_id": "P1", "purpose": "HRESCH", "state": "granted", "recipients": ["lab"]},
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["recipients"] == ["lab"]
    assert wado(node, "1.2.61", subject="lab-client").status_code == 200
    refused = wado(node, "1.2.61", subject="uni-client")
    assert refused.status_code == 403
    denial = [e for e in node.archive.ledger.entries() if e.kind == "denial"][-1]
    assert denial.data["recipient"] == "uni" and "not uni" in denial.data["reason"]
    # the consent version keeps its recipients
    (stored,) = node.archive.registry.consents("P1")
    assert stored.recipients == ("lab",)
    with pytest.raises(InvalidInput, match="'nobody' is not a recipient"):
        node.stewardship.record_consent("P1", "HRESCH", "granted", "dpo", recipients=["nobody"])
