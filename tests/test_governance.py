"""Governance decisions are pure functions of (request, facts, policy, now): no matching rule
means deny, deny beats allow, a restriction stops everything but the patient's own access, a
consent-based rule needs a consent in force, and a published policy version takes effect only
after its notice period. The properties are checked over generated policies and requests."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomnode.core.model import ConsentRecord, PatientFacts, PublishedPolicy
from dicomnode.governance import (
    AdmissionRequest,
    DisclosureRequest,
    Party,
    Policy,
    PolicyError,
    admit,
    codes,
    decide,
    effective_at,
    embedded_policy,
    parse_policy,
    policy_in_force,
    withdrawal_affects,
)
from dicomnode.governance.decisions import activity_for, resolve_recipient
from dicomnode.governance.policy import (
    ACTIVITY_OPERATIONS,
    ACTIVITY_RECIPIENT_KINDS,
    Activity,
    Period,
    Recipient,
    SharingRule,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

RESEARCH_POLICY = """
[policy]
version = "2026-12-research"
effective_from = 2026-12-10
controller = "Example University Hospital"

[[activities]]
id = "hospital-access"
purposes = ["TREAT"]
lawful_basis = "PIPA-26"

[[activities]]
id = "research-sharing"
purposes = ["HRESCH"]
lawful_basis = "PIPA-17-1-1"

[[activities]]
id = "analysis"
purposes = ["TREAT"]
lawful_basis = "PIPA-26"

[[activities]]
id = "intake"
purposes = ["TREAT"]
lawful_basis = "PIPA-26"

[[recipients]]
id = "hospital"
name = "Example University Hospital PACS"
kind = "controller"
peers = ["*"]
token_subjects = ["*"]

[[recipients]]
id = "lab"
name = "Imaging research institute"
kind = "third-party"
peers = ["research-pacs"]
token_subjects = ["lab-client"]
default_purpose = "HRESCH"

[[deid_profiles]]
id = "research"
options = ["retain-longitudinal-modified-dates", "clean-descriptors"]

[[rules]]
id = "hospital"
effect = "allow"
activity = "hospital-access"
recipients = ["kind:controller"]

[[rules]]
id = "research-with-consent"
effect = "allow"
activity = "research-sharing"
recipients = ["lab"]
lawful_basis = "PIPA-17-1-1"
deid_profile = "research"

[[rules]]
id = "analysis"
effect = "allow"
activity = "analysis"
"""


def consent(patient: str, purpose: str, state: str, version: int = 1, **more) -> ConsentRecord:
    values = {
        "patient_id": patient,
        "issuer_of_patient_id": "",
        "purpose": purpose,
        "version": version,
        "state": state,
        "valid_from": NOW - timedelta(days=30),
        "valid_until": None,
        "evidence_ref": "form-17",
        "recorded_by": "dpo",
        "recorded_at": NOW - timedelta(days=30 - version),
    }
    return ConsentRecord(**(values | more))


def share(patients=("P1",), recipient="lab", operation="share", purpose=None):
    return DisclosureRequest(
        operation, Party("cli", recipient_id=recipient), "dpo", patients, ("1.2.3",), purpose
    )


# --- the embedded policy ----------------------------------------------------------------


def test_the_embedded_policy_lets_the_hospital_in_and_no_third_party():
    policy = embedded_policy()
    pacs_find = DisclosureRequest("find", Party("dimse", peer="pacs"), "PACS", ("P1",))
    viewer = DisclosureRequest("wado", Party("dicomweb", token_subject="ohif"), "ohif", ("P1",))
    analysis = DisclosureRequest("analyze", Party("analysis"), "xa-qca", ("P1",))
    for request in (pacs_find, viewer, analysis):
        decision = decide(request, {}, policy, NOW)
        assert decision.allowed, decision
        assert decision.basis == "PIPA-26" and decision.policy_version == "embedded-1"
    refused = decide(share(recipient="anyone"), {}, policy, NOW)
    assert not refused.allowed and refused.rule_id == "unknown-recipient"
    admitted = admit(
        AdmissionRequest("dimse", "CT1", False, "P1", "1.2.3", "1.2.840.10008.5.1.4.1.1.2"),
        PatientFacts("P1"),
        policy,
        NOW,
    )
    assert admitted.admitted  # studies from any sender are analysed


# --- consent, restriction ---------------------------------------------------------------


def test_research_sharing_needs_a_consent_in_force():
    policy = parse_policy(RESEARCH_POLICY)
    none = decide(share(), {}, policy, NOW)
    assert not none.allowed and "no consent to HRESCH" in none.reason
    granted = {"P1": PatientFacts("P1", (consent("P1", "HRESCH", "granted"),))}
    allowed = decide(share(), granted, policy, NOW)
    assert allowed.allowed and allowed.rule_id == "research-with-consent"
    assert allowed.consent_refs == ("consent:P1:HRESCH:v1",)
    assert allowed.deid_profile == "research" and allowed.activity == "research-sharing"
    withdrawn = {
        "P1": PatientFacts(
            "P1", (consent("P1", "HRESCH", "granted"), consent("P1", "HRESCH", "withdrawn", 2))
        )
    }
    refused = decide(share(), withdrawn, policy, NOW)
    assert not refused.allowed and "withdrawn" in refused.reason and "v2" in refused.reason
    expired = {"P1": PatientFacts("P1", (consent("P1", "HRESCH", "granted", valid_until=NOW),))}
    assert "expired" in decide(share(), expired, policy, NOW).reason


def test_a_restriction_stops_everything_but_the_patients_own_access():
    policy = embedded_policy()
    facts = {"P1": PatientFacts("P1", restricted=True, restriction_ref="restriction:7")}
    for operation in ("move", "wado", "analyze"):
        request = DisclosureRequest(operation, Party("dimse", peer="pacs"), "PACS", ("P1",))
        decision = decide(request, facts, policy, NOW)
        assert not decision.allowed and "restriction:7" in decision.reason, operation
    for operation in ("find", "qido"):  # a search answers without the patient (empty)
        request = DisclosureRequest(operation, Party("dimse", peer="pacs"), "PACS", ("P1",))
        decision = decide(request, facts, policy, NOW)
        assert decision.allowed and decision.denied_patients == ("P1",), operation
    own = DisclosureRequest("export", Party("cli"), "dpo", ("P1",))
    assert decide(own, facts, policy, NOW).allowed


def test_a_search_leaves_out_the_patients_it_may_not_show():
    policy = embedded_policy()
    facts = {"P2": PatientFacts("P2", restricted=True)}
    request = DisclosureRequest("find", Party("dimse", peer="pacs"), "PACS", ("P1", "P2"))
    decision = decide(request, facts, policy, NOW)
    assert decision.allowed and decision.denied_patients == ("P2",)
    retrieve = dataclasses.replace(request, operation="move")
    assert not decide(retrieve, facts, policy, NOW).allowed  # a retrieval is all or nothing


def test_an_explicit_refusal_is_honoured_even_when_the_basis_is_not_consent():
    policy = embedded_policy()
    facts = {"P1": PatientFacts("P1", (consent("P1", "TREAT", "refused"),))}
    analysis = DisclosureRequest("analyze", Party("analysis"), "xa-qca", ("P1",))
    assert not decide(analysis, facts, policy, NOW).allowed
    admission = admit(
        AdmissionRequest("dimse", "CT1", True, "P1", "1.2.3", "1.2.840.10008.5.1.4.1.1.2"),
        facts["P1"],
        policy,
        NOW,
    )
    assert admission.action == "refuse" and "refused" in admission.reason
    assert {"intake", "analysis", "return-results"} <= withdrawal_affects(policy, "TREAT")


def test_intake_holds_or_refuses_by_the_policy():
    policy = dataclasses.replace(
        embedded_policy(),
        intake=dataclasses.replace(embedded_policy().intake, unknown_sender="hold"),
    )
    request = AdmissionRequest("dimse", "STRANGER", False, "P1", "1.2", "1.2.840.10008.5.1.4.1.1.2")
    held = admit(request, PatientFacts("P1"), policy, NOW)
    assert held.action == "hold" and "STRANGER" in held.reason
    restricted = admit(
        dataclasses.replace(request, known_sender=True),
        PatientFacts("P1", restricted=True),
        policy,
        NOW,
    )
    assert restricted.action == "hold" and restricted.rule_id == "intake.restricted_patient"
    own = admit(
        dataclasses.replace(request, protocol="analysis"),
        PatientFacts("P1", restricted=True),
        policy,
        NOW,
    )
    assert own.admitted


def test_who_the_recipient_is():
    policy = parse_policy(RESEARCH_POLICY)
    assert resolve_recipient(policy, Party("dimse", peer="research-pacs")).id == "lab"
    assert resolve_recipient(policy, Party("dimse", peer="pacs")).id == "hospital"
    assert resolve_recipient(policy, Party("dicomweb", token_subject="lab-client")).id == "lab"
    assert resolve_recipient(policy, Party("cli", recipient_id="nobody")) is None
    lab = policy.recipient("lab")
    assert activity_for("move", lab, "HRESCH") == "research-sharing"
    assert activity_for("move", lab, "TREAT") == "third-party-provision"
    # a C-MOVE to the research peer is research sharing, and needs consent like a share
    move = DisclosureRequest("move", Party("dimse", peer="research-pacs"), "WS", ("P1",))
    decision = decide(move, {}, policy, NOW)
    assert not decision.allowed and decision.activity == "research-sharing"


# --- the policy file --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (('lawful_basis = "PIPA-26"', 'lawful_basis = "PIPA-99"', 1), "unknown lawful basis"),
        (('purposes = ["TREAT"]', 'purposes = ["CURIOSITY"]', 1), "unknown purpose"),
        (
            (
                'id = "research-with-consent"\neffect = "allow"\nactivity = "research-sharing"\n'
                'recipients = ["lab"]\nlawful_basis = "PIPA-17-1-1"',
                'id = "research-with-consent"\neffect = "allow"\nactivity = "research-sharing"\n'
                'recipients = ["lab"]',
                1,
            ),
            "rules[research-with-consent]: gives data to a third party without a basis",
        ),
        (
            ('recipients = ["kind:controller"]', 'recipients = ["lab"]', 1),
            "rules[hospital]: can never match",
        ),
        (
            (
                'id = "analysis"\neffect = "allow"\nactivity = "analysis"',
                'id = "analysis"\neffect = "allow"\nactivity = "analysis"\noperations = ["qido"]',
                1,
            ),
            "rules[analysis]: can never match",
        ),
        (('kind = "third-party"', 'kind = "third-party"\ncountry = "US"', 1), "cross_border_basis"),
        (('deid_profile = "research"', 'deid_profile = "nope"', 1), "not a deid_profile"),
        (
            ('options = ["retain', 'options = ["keep-everything", "retain', 1),
            "de-identification option",
        ),
        (('[[rules]]\nid = "hospital"', '[[rules]]\nid = "analysis"', 1), "appears twice"),
        (("effective_from = 2026-12-10", "", 1), "effective_from"),
        (("[policy]", '[policy]\nfavourite_colour = "blue"', 1), "unknown key"),
    ],
    ids=[
        "unknown-basis",
        "unknown-purpose",
        "third-party-without-basis",
        "never-matches-recipient",
        "never-matches-operation",
        "abroad-without-basis",
        "unknown-profile",
        "unknown-option",
        "duplicate-rule",
        "no-effective-date",
        "unknown-key",
    ],
)
def test_an_unusable_policy_is_refused_at_load_naming_the_rule(change, words):
    old, new, count = change
    assert old in RESEARCH_POLICY
    with pytest.raises(PolicyError, match=words.replace("[", r"\[").replace("]", r"\]")):
        parse_policy(RESEARCH_POLICY.replace(old, new, count))


def test_a_version_takes_effect_only_after_its_notice_period():
    policy = parse_policy(RESEARCH_POLICY)  # effective_from 2026-12-10, not material
    published_at = datetime(2026, 12, 5, tzinfo=UTC)  # 5 days' notice only
    start = effective_at(policy, published_at)
    assert start == published_at + timedelta(days=7)  # not 2026-12-10
    material = dataclasses.replace(policy, material=True)
    assert effective_at(material, published_at) == published_at + timedelta(days=30)
    early = datetime(2026, 12, 1, tzinfo=UTC)  # 9 days before its date: the date counts
    assert effective_at(policy, early) == datetime(2026, 12, 10, tzinfo=UTC)

    published = [
        PublishedPolicy("2026-12-research", RESEARCH_POLICY, "x", published_at, start, False)
    ]
    assert policy_in_force(published, datetime(2026, 12, 10, tzinfo=UTC)).version == "embedded-1"
    assert policy_in_force(published, start).version == "2026-12-research"


def test_iso_8601_periods():
    start = datetime(2024, 2, 29, tzinfo=UTC)
    assert Period.parse("P5Y").after(start) == datetime(2029, 2, 28, tzinfo=UTC)
    assert Period.parse("P1M").after(datetime(2026, 1, 31, tzinfo=UTC)).day == 28
    assert Period.parse("P90D").after(start) == start + timedelta(days=90)
    assert Period.parse("PT12H").after(start) == start + timedelta(hours=12)
    assert Period.parse("P1Y2M3DT4H").after(start) == datetime(2025, 5, 2, 4, tzinfo=UTC)
    for bad in ("5 years", "P", "PT", "P1H", ""):
        with pytest.raises(ValueError):
            Period.parse(bad)


# --- properties over generated policies and requests ------------------------------------

ACTIVITY_IDS = sorted(a for a in codes.ACTIVITIES if a != "intake")
RECIPIENTS = (
    Recipient("hospital", "H", "controller", peers=("*",), token_subjects=("*",)),
    Recipient("vendor", "V", "processor", peers=("vendor-pacs",)),
    Recipient(
        "lab",
        "L",
        "third-party",
        peers=("lab-pacs",),
        token_subjects=("lab",),
        default_purpose="HRESCH",
    ),
    Recipient("insurer", "I", "third-party", token_subjects=("insurer",), default_purpose="HPAYMT"),
)
PURPOSES = ("TREAT", "HOPERAT", "HRESCH", "HPAYMT", "PATRQT")


@st.composite
def activities(draw) -> tuple[Activity, ...]:
    chosen = []
    for activity_id in ACTIVITY_IDS:
        purposes = draw(st.lists(st.sampled_from(PURPOSES), min_size=1, max_size=3, unique=True))
        chosen.append(Activity(activity_id, tuple(purposes), "PIPA-26"))
    return tuple(chosen)


@st.composite
def rules(draw, acts: tuple[Activity, ...]) -> SharingRule:
    activity = draw(st.sampled_from(acts))
    kinds = ACTIVITY_RECIPIENT_KINDS[activity.id]
    fitting = [r.id for r in RECIPIENTS if r.kind in kinds] + [f"kind:{k}" for k in kinds]
    recipients = (
        ("*",)
        if not fitting
        else tuple(
            draw(st.lists(st.sampled_from(["*", *fitting]), min_size=1, max_size=2, unique=True))
        )
    )
    operations = draw(
        st.one_of(
            st.just(("*",)),
            st.lists(
                st.sampled_from(sorted(ACTIVITY_OPERATIONS[activity.id])),
                min_size=1,
                max_size=3,
                unique=True,
            ).map(tuple),
        )
    )
    purposes = tuple(draw(st.lists(st.sampled_from(activity.purposes), max_size=2, unique=True)))
    return SharingRule(
        id=f"r{draw(st.integers(0, 10**6))}",
        effect=draw(st.sampled_from(["allow", "allow", "deny"])),
        activity=activity.id,
        recipients=recipients,
        operations=operations,
        purposes=purposes,
        lawful_basis="PIPA-17-1-1",
        consent_required=draw(st.booleans()),
    )


@st.composite
def policies(draw) -> Policy:
    acts = draw(activities())
    return Policy(
        version=f"v{draw(st.integers(1, 99))}",
        effective_from=NOW,
        material=False,
        controller="H",
        operator="O",
        dpo_contact="",
        home_country="KR",
        summary="",
        activities=acts,
        recipients=RECIPIENTS,
        rules=tuple(  # rule ids are unique in a policy (parse_policy refuses duplicates)
            dataclasses.replace(rule, id=f"r{n}")
            for n, rule in enumerate(draw(st.lists(rules(acts), max_size=6)))
        ),
    )


@st.composite
def requests(draw) -> DisclosureRequest:
    operation = draw(st.sampled_from(sorted(set(codes.OPERATIONS) - {"admit"})))
    party = draw(
        st.sampled_from(
            [
                Party("dimse", peer="pacs"),
                Party("dimse", peer="lab-pacs"),
                Party("dimse", peer="vendor-pacs"),
                Party("dicomweb", token_subject="ohif"),
                Party("dicomweb", token_subject="lab"),
                Party("cli", recipient_id="insurer"),
                Party("cli", recipient_id="nobody"),
                Party("analysis"),
            ]
        )
    )
    patients = tuple(draw(st.lists(st.sampled_from(["P1", "P2", "P3"]), max_size=3, unique=True)))
    purpose = draw(st.one_of(st.none(), st.sampled_from(PURPOSES)))
    return DisclosureRequest(operation, party, "someone", patients, (), purpose)


@st.composite
def patient_facts(draw) -> dict[str, PatientFacts]:
    facts = {}
    for patient in ("P1", "P2", "P3"):
        records = tuple(
            consent(patient, purpose, state, version=n + 1)
            for n, (purpose, state) in enumerate(
                draw(
                    st.lists(
                        st.tuples(
                            st.sampled_from(PURPOSES),
                            st.sampled_from(["granted", "refused", "withdrawn"]),
                        ),
                        max_size=3,
                    )
                )
            )
        )
        facts[patient] = PatientFacts(patient, records, draw(st.booleans()))
    return facts


def _matches(rule: SharingRule, decision_activity: str, recipient, operation, purpose) -> bool:
    """The test's own reading of when a rule applies (the property's oracle)."""
    return (
        rule.activity == decision_activity
        and ("*" in rule.operations or operation in rule.operations)
        and (not rule.purposes or purpose in rule.purposes)
        and (
            "*" in rule.recipients
            or (
                recipient is not None
                and (recipient.id in rule.recipients or f"kind:{recipient.kind}" in rule.recipients)
            )
        )
    )


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(policy=policies(), request=requests(), facts=patient_facts())
def test_allowed_means_an_allow_rule_matched_and_no_deny_rule(policy, request, facts):
    decision = decide(request, facts, policy, NOW)
    assert decision.policy_version == policy.version
    assert decision == decide(request, facts, policy, NOW)  # pure: same answer every time
    recipient = policy.recipient(decision.recipient) if decision.recipient else None
    applicable = [
        r
        for r in policy.rules
        if _matches(r, decision.activity, recipient, request.operation, decision.purpose)
    ]
    if any(r.effect == "deny" for r in applicable):
        assert not decision.allowed  # deny beats allow
    if not any(r.effect == "allow" for r in applicable):
        assert not decision.allowed  # no matching rule means deny
    if decision.allowed:
        rule = next(r for r in policy.rules if r.id == decision.rule_id)
        assert rule.effect == "allow" and rule in applicable
        shown = [p for p in request.patient_ids if p not in decision.denied_patients]
        for patient in shown:
            if decision.activity != "subject-access":
                assert not facts[patient].restricted
        if rule.consent_required:
            assert len(decision.consent_refs) == len(shown)


@PROPERTY
@given(policy=policies(), request=requests(), facts=patient_facts(), extra=st.data())
def test_adding_a_deny_rule_never_allows_more(policy, request, facts, extra):
    stricter_rule = dataclasses.replace(
        extra.draw(rules(policy.activities)), id="extra", effect="deny"
    )
    stricter = dataclasses.replace(policy, rules=(*policy.rules, stricter_rule))
    before = decide(request, facts, policy, NOW)
    after = decide(request, facts, stricter, NOW)
    if after.allowed:
        assert before.allowed
        assert set(after.denied_patients) >= set(before.denied_patients)


@PROPERTY
@given(policy=policies(), request=requests(), facts=patient_facts())
def test_withdrawing_consent_or_restricting_never_allows_more(policy, request, facts):
    before = decide(request, facts, policy, NOW)
    worse = {
        p: dataclasses.replace(
            f,
            restricted=True if p == "P1" else f.restricted,
            consents=(
                *f.consents,
                *(consent(p, purpose, "withdrawn", 9) for purpose in PURPOSES),
            ),
        )
        for p, f in facts.items()
    }
    after = decide(request, worse, policy, NOW)
    if after.allowed:
        assert before.allowed


# --- regressions found in review ----------------------------------------------------------


def test_a_later_publication_supersedes_an_earlier_one_with_a_longer_notice():
    material = RESEARCH_POLICY.replace('version = "2026-12-research"', 'version = "v2"').replace(
        "[policy]", "[policy]\nmaterial = true"
    )
    minor = RESEARCH_POLICY.replace('version = "2026-12-research"', 'version = "v3"')
    day0 = datetime(2026, 12, 1, tzinfo=UTC)
    day1 = day0 + timedelta(days=1)
    published = [
        PublishedPolicy(
            "v2", material, "a", day0, effective_at(parse_policy(material), day0), True
        ),
        PublishedPolicy("v3", minor, "b", day1, effective_at(parse_policy(minor), day1), False),
    ]
    assert policy_in_force(published, day0 + timedelta(days=9)).version == "v3"
    assert policy_in_force(published, day0 + timedelta(days=31)).version == "v3"  # not v2


def test_a_renewal_recorded_ahead_does_not_suspend_the_consent_in_force():
    policy = parse_policy(RESEARCH_POLICY)
    renewal = consent(
        "P1", "HRESCH", "granted", 2, valid_from=NOW + timedelta(days=30), recorded_at=NOW
    )
    facts = {"P1": PatientFacts("P1", (consent("P1", "HRESCH", "granted"), renewal))}
    decision = decide(share(), facts, policy, NOW)
    assert decision.allowed and decision.consent_refs == ("consent:P1:HRESCH:v1",)


def test_a_rule_that_de_identifies_lets_no_identified_retrieval_through():
    policy = parse_policy(RESEARCH_POLICY)
    facts = {"P1": PatientFacts("P1", (consent("P1", "HRESCH", "granted"),))}
    assert decide(share(), facts, policy, NOW).allowed
    for operation in ("move", "wado", "qido"):
        refused = decide(share(operation=operation), facts, policy, NOW)
        assert not refused.allowed and "only de-identified" in refused.reason, operation


def test_shares_go_over_https_only_except_to_this_machine():
    def with_url(url: str) -> str:
        return RESEARCH_POLICY.replace(
            'default_purpose = "HRESCH"', f'default_purpose = "HRESCH"\ndicomweb_url = "{url}"'
        )

    with pytest.raises(PolicyError, match="https"):
        parse_policy(with_url("http://research.example/dicomweb"))
    assert parse_policy(with_url("https://research.example/dicomweb"))
    assert parse_policy(with_url("http://127.0.0.1:8042/dicomweb"))


def test_a_legal_retention_period_is_a_minimum_whatever_rule_decides():
    from dicomnode.core.model import StudyFacts
    from dicomnode.governance.retention import KEEP, retention_items

    text = (
        RESEARCH_POLICY
        + """
[[retention]]
id = "short"
category = "received-images"
period = "P30D"
start = "received"
priority = 10

[[retention]]
id = "record"
category = "received-images"
period = "P5Y"
start = "received"
legal_basis = "MSA-22-2"
"""
    )
    received = NOW - timedelta(days=60)
    facts = StudyFacts("1.2.3", "P1", frozenset({"CT"}), 2, 0, received, None, None, None, None)
    (item,) = retention_items(facts, parse_policy(text), NOW)
    assert (item.action, item.rule_id, item.legal_basis) == (KEEP, "record", "MSA-22-2")
