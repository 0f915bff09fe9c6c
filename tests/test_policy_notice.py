"""Notice that depends on the change: a narrowing takes effect at once, a widening waits for its
notice, a narrowing published while a widening waits narrows that widening when it comes into
force, and the first version replacing the embedded one takes effect at once for the initial
deployment (a reason the ledger keeps). No publication here is back-dated: moments are moved
with the clocks the services take."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dicomnode.core.model import ConsentRecord, PatientFacts, PublishedPolicy
from dicomnode.governance import decide, parse_policy, policy_in_force
from dicomnode.governance.decisions import DisclosureRequest, Party
from dicomnode.governance.notice import classify_change, schedule_publication
from tests.conftest import WORKSTATION, cli, dicomweb_client
from tests.factory import make_ct
from tests.test_governance_node import as_file, last_entry, policy_text, research_pacs

STUDY = "1.2.826.0.1.1"
T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)

PARTNER = """
[[recipients]]
id = "partner"
name = "Partner Hospital"
kind = "third-party"
token_subjects = ["partner-client"]
default_purpose = "HRESCH"

[[rules]]
id = "partner-research"
effect = "allow"
activity = "research-sharing"
recipients = ["partner"]
lawful_basis = "PIPA-17-1-1"
deid_profile = "research"
"""

RETENTION = """
[[retention]]
id = "images"
category = "received-images"
period = "{period}"
start = "received"
"""


def research_denied(version: str) -> str:
    """The fixture policy with research sharing turned from allow into deny: a narrowing."""
    return policy_text(version).replace(
        'id = "research-with-consent"\neffect = "allow"',
        'id = "research-with-consent"\neffect = "deny"',
    )


def with_partner(version: str) -> str:
    """The fixture policy with a second research recipient: a widening."""
    return policy_text(version) + PARTNER


def published(text: str, at: datetime, before: list[PublishedPolicy], reason: str = ""):
    """`text` published at `at` after `before`, as the node schedules it."""
    policy = parse_policy(text)
    schedule = schedule_publication(before, policy, at, reason)
    entry = PublishedPolicy(
        policy.version, text, policy.sha256, at, schedule.effective_at, policy.material, "dpo"
    )
    return [*before, entry], schedule


def research_share(recipient: str, consent: bool = True) -> tuple[DisclosureRequest, dict]:
    granted = ConsentRecord("P1", "", "HRESCH", 1, "granted", T0, None, "form", "dpo", T0)
    facts = {"P1": PatientFacts("P1", (granted,) if consent else ())}
    request = DisclosureRequest("share", Party("cli", recipient_id=recipient), "dpo", ("P1",))
    return request, facts


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture
def research(storescp):
    return storescp("RESEARCH")


@pytest.fixture
def deployed(start_node, research, tmp_path):
    """A node whose first policy took effect at once, published for the initial deployment."""
    node = start_node(peers=[WORKSTATION, research_pacs(research.port)])
    first = tmp_path / "first.toml"
    first.write_text(policy_text("hospital-2026-1"))
    result = cli(
        node, "policy", "publish", str(first), "--by", "dpo", "--reason", "initial-deployment"
    )
    assert result.returncode == 0, result.stderr
    dicomweb_client(node).store_instances([as_file(make_ct(patient_id="P1", study_uid=STUDY))])
    return node


def test_initial_deployment_takes_effect_at_once_and_its_reason_is_ledgered(deployed, tmp_path):
    status = deployed.stewardship.policy_status()
    assert status.in_force.version == "hospital-2026-1" and status.scheduled == []
    entry = next(e for e in deployed.archive.ledger.entries() if e.kind == "policy")
    assert entry.outcome == "published"
    assert entry.data["reason"] == "initial-deployment" and entry.data["initial_deployment"]
    assert entry.data["compared_with"] == "embedded-1" and entry.data["notice_days"] == 0
    # only the first version replacing the embedded policy may use that reason
    again = tmp_path / "again.toml"
    again.write_text(with_partner("hospital-2026-2"))
    refused = cli(deployed, "policy", "publish", str(again), "--reason", "initial-deployment")
    assert refused.returncode == 1 and "already published" in refused.stderr
    assert [p.version for p in deployed.archive.registry.published_policies()] == [
        "hospital-2026-1"
    ]


def test_without_the_reason_a_first_widening_waits_for_its_notice(start_node, tmp_path):
    node = start_node(peers=[WORKSTATION])
    first = tmp_path / "first.toml"
    first.write_text(policy_text("hospital-2026-1"))
    before = datetime.now(UTC)
    result = cli(node, "policy", "publish", str(first), "--by", "dpo")
    assert result.returncode == 0, result.stderr
    (stored,) = node.archive.registry.published_policies()
    assert stored.effective_at >= before + timedelta(days=7)
    assert node.stewardship.policy_status().in_force.version == "embedded-1"


def test_a_narrowing_takes_effect_at_once_end_to_end(deployed, research, tmp_path):
    deployed.stewardship.record_consent("P1", "HRESCH", "granted", "dpo", evidence_ref="form")
    shared = cli(deployed, "share", "--recipient", "lab", "--study", STUDY, "--by", "dpo")
    assert shared.returncode == 0, shared.stdout + shared.stderr
    assert len(research.received()) == 1

    brake = tmp_path / "brake.toml"
    brake.write_text(research_denied("hospital-2026-2-brake"))
    result = cli(deployed, "policy", "publish", str(brake), "--by", "dpo")
    assert result.returncode == 0, result.stderr
    refused = cli(deployed, "share", "--recipient", "lab", "--study", STUDY, "--by", "dpo")
    assert refused.returncode == 1 and "denied" in refused.stdout
    assert research.received() == []  # nothing more left
    denial = last_entry(deployed, "denial")
    assert denial.data["policy_version"] == "hospital-2026-1 ∩ hospital-2026-2-brake"
    assert denial.data["rule_id"] == "research-with-consent"
    policy_entries = [e for e in deployed.archive.ledger.entries() if e.kind == "policy"]
    publication = [e for e in policy_entries if e.outcome == "published"][-1]
    assert publication.data["change"] == "narrower" and publication.data["notice_days"] == 0
    assert publication.data["published_at"] == publication.data["effective_at"]
    # the brake's coming into force is noted too, as part of the narrowed policy in force
    in_force = [e.data for e in policy_entries if e.outcome == "in-force"]
    assert {
        "version": "hospital-2026-2-brake",
        "in_force_as": denial.data["policy_version"],
    }.items() <= in_force[-1].items()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the CLI: any index
def test_policy_diff_shows_the_classification(deployed, tmp_path):
    narrower = tmp_path / "narrower.toml"
    narrower.write_text(research_denied("v-narrow") + RETENTION.format(period="P30D"))
    shown = cli(deployed, "policy", "diff", str(narrower))
    assert shown.returncode == 0, shown.stderr
    assert "change: narrower (takes effect at once when published)" in shown.stdout

    wider = tmp_path / "wider.toml"
    wider.write_text(with_partner("v-wide"))
    shown = cli(deployed, "policy", "diff", str(wider)).stdout
    assert "change: wider (7 days' notice); widens:" in shown
    assert "rules: allows research-sharing to partner by rule partner-research" in shown

    material = tmp_path / "material.toml"
    material.write_text(with_partner("v-mat").replace("[policy]", "[policy]\nmaterial = true"))
    shown = cli(deployed, "policy", "diff", str(material)).stdout
    assert "change: material (30 days' notice); widens:" in shown


def test_a_widening_waits_and_a_narrowing_does_not_in_a_running_node(deployed):
    deployed.stewardship.record_consent("P1", "HRESCH", "granted", "dpo", evidence_ref="form")
    now = datetime.now(UTC)
    deployed.stewardship.clock = lambda: now
    wide, _ = deployed.stewardship.publish_policy(with_partner("hospital-2026-2"), "dpo")
    assert wide.effective_at == now + timedelta(days=7)
    brake, _ = deployed.stewardship.publish_policy(research_denied("hospital-2026-3"), "dpo")
    assert brake.effective_at == now
    lab, _ = research_share("lab")
    partner, _ = research_share("partner")
    facts = deployed.archive.registry.governed_facts({"P1"})
    for days, version in (
        (6, "hospital-2026-1 ∩ hospital-2026-3"),
        (8, "hospital-2026-2 ∩ hospital-2026-3"),
    ):
        deployed.egress.clock = lambda days=days: now + timedelta(days=days)
        policy = deployed.egress.policy()
        assert policy.version == version
        assert not decide(lab, facts, policy, now).allowed  # the brake holds throughout
        assert not decide(partner, facts, policy, now).allowed  # the brake names no partner


# --- the timeline, pure -----------------------------------------------------------------------


def test_narrowing_during_a_pending_widening_and_after_it_comes_into_force():
    history, first = published(policy_text("v1"), T0, [], reason="initial deployment")
    assert first.initial_deployment and first.effective_at == T0
    history, wide = published(with_partner("v2-wide"), T0 + timedelta(days=1), history)
    assert wide.change.kind == "wider" and wide.effective_at == T0 + timedelta(days=8)
    history, brake = published(research_denied("v3-brake"), T0 + timedelta(days=2), history)
    assert brake.change.kind == "narrower" and brake.effective_at == T0 + timedelta(days=2)

    lab, facts = research_share("lab")
    partner, _ = research_share("partner")
    before_brake = policy_in_force(history, T0 + timedelta(days=1, hours=1))
    assert before_brake.version == "v1" and decide(lab, facts, before_brake, T0).allowed
    braked = policy_in_force(history, T0 + timedelta(days=2))
    assert braked.version == "v1 ∩ v3-brake"
    assert not decide(lab, facts, braked, T0).allowed  # at once
    assert not decide(partner, facts, braked, T0).allowed  # the widening still waits

    widened = policy_in_force(history, T0 + timedelta(days=8))
    assert widened.version == "v2-wide ∩ v3-brake"  # not cancelled, but narrowed
    refused = decide(lab, facts, widened, T0)
    assert not refused.allowed and refused.rule_id == "research-with-consent"
    assert refused.policy_version == "v2-wide ∩ v3-brake"
    assert not decide(partner, facts, widened, T0).allowed

    # republished (a new notice), the widening comes into force unnarrowed
    history, again = published(
        research_denied("v4-wide") + PARTNER, T0 + timedelta(days=9), history
    )
    assert again.change.kind == "wider"
    republished = policy_in_force(history, T0 + timedelta(days=16))
    assert republished.version == "v4-wide" and decide(partner, facts, republished, T0).allowed
    assert not decide(lab, facts, republished, T0).allowed


def test_a_narrowing_keeps_nothing_longer_in_a_narrowed_policy():
    from dicomnode.core.model import StudyFacts
    from dicomnode.governance.retention import retention_items

    history, _ = published(
        policy_text("v1") + RETENTION.format(period="P1Y"), T0, [], "initial-deployment"
    )
    history, _ = published(with_partner("v2") + RETENTION.format(period="P1Y"), T0, history)
    history, brake = published(
        policy_text("v3") + RETENTION.format(period="P30D"), T0 + timedelta(hours=1), history
    )
    assert brake.change.kind == "narrower"
    policy = policy_in_force(history, T0 + timedelta(days=30))
    facts = StudyFacts(STUDY, "P1", frozenset({"CT"}), 1, 0, T0, None, None, None, None)
    (images,) = retention_items(facts, policy, T0)
    assert images.expires_at == T0 + timedelta(days=30) and images.rule_id == "images"


# --- the classification over every field ------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "kind", "finding"),
    [
        (
            lambda t: t.replace(
                'effect = "allow"\nactivity = "research-sharing"',
                'effect = "deny"\nactivity = "research-sharing"',
            ),
            "narrower",
            "",
        ),
        (lambda t: t + PARTNER, "wider", "rules: allows research-sharing to partner"),
        (
            lambda t: t.replace('unknown_sender = "hold"', 'unknown_sender = "refuse"'),
            "narrower",
            "",
        ),
        (
            lambda t: t.replace('unknown_sender = "hold"', 'unknown_sender = "admit"'),
            "wider",
            "intake.unknown_sender: hold -> admit",
        ),
        (
            lambda t: t.replace(
                'data_categories = ["received-images"]',
                'data_categories = ["received-images", "identifiers"]',
            ),
            "wider",
            "activities[research-sharing].data_categories: adds identifiers",
        ),
        (
            lambda t: t.replace(
                'options = ["retain-longitudinal-modified-dates"]',
                'options = ["retain-longitudinal-full-dates"]',
            ),
            "wider",
            "rules: de-identifies less research-sharing to lab",
        ),
        (
            lambda t: t.replace('options = ["retain-longitudinal-modified-dates"]', "options = []"),
            "narrower",
            "",
        ),
        (
            lambda t: t.replace('retention = "P1Y"', 'retention = "P2Y"'),
            "wider",
            "recipients[lab].retention: P1Y -> P2Y",
        ),
        (
            lambda t: t.replace('retention = "P1Y"', 'retention = "P6M"'),
            "narrower",
            "",
        ),
        (lambda t: t + RETENTION.format(period="P60D"), "narrower", ""),
        (
            lambda t: t + RETENTION.format(period="P120D"),
            "wider",
            "retention: keeps received-images of CT studies longer by rule images",
        ),
        (
            lambda t: t.replace("Example University Hospital", "Another Hospital", 1),
            "wider",
            "policy.controller",
        ),
        (lambda t: t.replace("dpo@hospital", "privacy@hospital"), "narrower", ""),
    ],
)
def test_every_field_is_classified(change, kind, finding):
    base = policy_text("v1", unknown_sender="hold").replace(
        'default_purpose = "HRESCH"', 'default_purpose = "HRESCH"\nretention = "P1Y"'
    ) + RETENTION.format(period="P90D").replace('id = "images"', 'id = "base-images"').replace(
        'start = "received"', 'start = "received"\nmodalities = ["CT"]'
    )
    old = parse_policy(base)
    new = parse_policy(change(base).replace('version = "v1"', 'version = "v2"'))
    classified = classify_change(old, new)
    assert classified.kind == kind, classified.widens
    assert (
        any(w.startswith(finding) for w in classified.widens) if finding else not classified.widens
    )


def test_the_governance_api_publishes_the_initial_deployment_at_once(start_node):
    from tests.test_governance_node import governance_api

    node = start_node(peers=[WORKSTATION])
    answer = governance_api(
        node, "POST", "/policy?reason=initial-deployment", data=policy_text("hospital-2026-1")
    )
    assert answer.status_code == 201, answer.text
    assert node.stewardship.policy_status().in_force.version == "hospital-2026-1"
    (stored,) = node.archive.registry.published_policies()
    assert stored.effective_at == stored.published_at
