"""Notice that depends on the change: is a new policy version narrower than the one in force?

A version is narrower when every request it allows, the version in force allows too, and it
keeps nothing longer. `classify_change` checks that over every policy field:

- decisions (rules, activities' purposes, recipients with their peers, token subjects and default
  purpose, de-identification profiles): every request the decision point can be asked, i.e. each
  operation, by each party either version names (every DIMSE peer, token subject and recipient,
  and one that neither names), for each purpose of use (and none), about no patient, a patient
  without consent and a patient whose consent to the purpose is granted, is decided by both; a
  request the new version allows and the old refuses widens, and so does an allowed share the
  new version de-identifies less (fewer Clean options, more Retain options, or no profile);
- intake: the action for an unknown sender, a restricted patient and refused processing, as
  admit < hold < refuse, asked of both versions for each intake purpose;
- activities: an added activity, an added purpose, data category, changed lawful bases or data
  subjects widen; a removed activity narrows;
- recipients: a changed country, cross-border basis or DICOMweb URL, or a longer (or no longer
  stated) retention promised by a recipient widens;
- retention: for each data category and modality either version names, on sample studies, a
  later expiry than the old version's (or none where the old one had one), or a legal basis the
  old one did not claim (erasure refused), widens;
- the head: a changed controller, operator or home country widens; the version name, summary,
  DPO contact, descriptions and declared effective_from are descriptive.

The classification is "narrower" (no widening: in force at once), "wider" (7 days' notice) or
"material" (a widening declared material: 30 days). Pure, like the rest of governance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from dicomnode.core.model import ConsentRecord, PatientFacts, PublishedPolicy, StudyFacts
from dicomnode.governance import codes, retention
from dicomnode.governance.decisions import (
    AdmissionRequest,
    Decision,
    DisclosureRequest,
    Party,
    admit,
    decide,
)
from dicomnode.governance.policy import MATERIAL_NOTICE, NOTICE, Period, Policy
from dicomnode.governance.policy_versions import policy_in_force

NARROWER, WIDER, MATERIAL = "narrower", "wider", "material"
INITIAL_DEPLOYMENT = "initial-deployment"
_OTHER = "\x00unnamed"  # a peer or token subject no policy names
_SEVERITY = {"admit": 0, "hold": 1, "refuse": 2}
# Retaining full dates keeps more than retaining modified ones: {less: more}.
_RETAIN_ORDER = {"retain-longitudinal-modified-dates": "retain-longitudinal-full-dates"}
_SAMPLE_STARTS = (
    datetime(2024, 1, 31, tzinfo=UTC),
    datetime(2024, 2, 29, 12, tzinfo=UTC),
    datetime(2025, 6, 15, tzinfo=UTC),
)


@dataclass(frozen=True)
class Change:
    """How a new version compares with the one in force, and the notice it needs."""

    kind: str  # narrower | wider | material
    widens: tuple[str, ...]  # what the new version allows or keeps beyond the old one

    @property
    def notice(self) -> timedelta:
        """The notice a publication of this change waits for (none for a narrowing)."""
        return {NARROWER: timedelta(0), WIDER: NOTICE, MATERIAL: MATERIAL_NOTICE}[self.kind]

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "notice_days": self.notice.days, "widens": list(self.widens)}


def classify_change(old: Policy, new: Policy) -> Change:
    """Whether `new` is narrower than `old` (the policy in force, possibly narrowed), or
    wider, or materially wider (declared material), with each thing that widens."""
    widens = [
        *_head(old, new),
        *_decisions(old, new),
        *_intake(old, new),
        *_activities(old, new),
        *_recipients(old, new),
        *_retention(old, new),
    ]
    if not widens:
        return Change(NARROWER, ())
    return Change(MATERIAL if new.material else WIDER, tuple(dict.fromkeys(widens)))


@dataclass(frozen=True)
class Schedule:
    """When a publication takes effect, and why."""

    effective_at: datetime
    change: Change
    reason: str  # the publisher's stated reason ("" if none)
    initial_deployment: bool


def schedule_publication(
    published: Sequence[PublishedPolicy], new: Policy, now: datetime, reason: str = ""
) -> Schedule:
    """When `new`, published at `now` after `published`, takes effect. A narrowing of the
    policy in force: at once. The first version replacing the embedded one, published with
    the reason "initial-deployment": at its effective_from, at once if that has passed.
    Otherwise its effective_from, but not before its notice period has run. Raises ValueError
    for an initial deployment when a version was already published."""
    reason = reason.strip()
    initial = reason.lower().replace(" ", "-") == INITIAL_DEPLOYMENT
    in_force = policy_in_force(published, now)
    change = classify_change(in_force, new)
    if initial:
        if published:
            raise ValueError(
                "initial deployment: versions were already published; only the first version "
                "replacing the embedded policy takes effect at once for that reason"
            )
        return Schedule(max(new.effective_from, now), change, reason, True)
    if change.kind == NARROWER:
        return Schedule(now, change, reason, False)
    return Schedule(max(new.effective_from, now + change.notice), change, reason, False)


# --- the comparisons ----------------------------------------------------------------------------


def _head(old: Policy, new: Policy) -> list[str]:
    return [
        f"policy.{name}: {getattr(old, name)!r} -> {getattr(new, name)!r}"
        for name in ("controller", "operator", "home_country")
        if getattr(old, name) != getattr(new, name)
    ]


def _parties(*policies: Policy) -> list[Party]:
    parties = [Party("cli")]
    for policy in policies:
        for part in policy.parts:
            for recipient in part.recipients:
                parties.append(Party("cli", recipient_id=recipient.id))
                parties += [Party("dimse", peer=p) for p in recipient.peers if p != "*"]
                parties += [
                    Party("dicomweb", token_subject=t) for t in recipient.token_subjects if t != "*"
                ]
    parties += [Party("dimse", peer=_OTHER), Party("dicomweb", token_subject=_OTHER)]
    return list(dict.fromkeys(parties))


def _patients(purpose: str | None) -> list[tuple[tuple[str, ...], dict[str, PatientFacts]]]:
    """No patient; a patient without consent; one whose consent to `purpose` is granted."""
    cases: list[tuple[tuple[str, ...], dict[str, PatientFacts]]] = [
        ((), {}),
        (("P",), {"P": PatientFacts("P")}),
    ]
    for code in [purpose] if purpose else list(codes.PURPOSES):
        granted = ConsentRecord(
            "P", "", code, 1, "granted", _SAMPLE_STARTS[0], None, "", "", _SAMPLE_STARTS[0]
        )
        cases.append((("P",), {"P": PatientFacts("P", (granted,))}))
    return cases


def _allows(decision: Decision, patients: tuple[str, ...]) -> bool:
    return decision.allowed and not set(patients) & set(decision.denied_patients)


def _decisions(old: Policy, new: Policy) -> list[str]:
    """Each request `new` allows that `old` refuses, or allows de-identified less."""
    now = _SAMPLE_STARTS[-1]
    found: dict[tuple[str, str, str, str], set[str]] = {}
    for party in _parties(old, new):
        for operation in codes.OPERATIONS:
            if operation == "admit":
                continue  # intake: compared by _intake
            if operation in ("analyze", "export") and party != Party("cli"):
                continue  # no recipient: one party is enough
            for purpose in (None, *codes.PURPOSES):
                for patients, facts in _patients(purpose):
                    request = DisclosureRequest(operation, party, "x", patients, (), purpose)
                    after = decide(request, facts, new, now)
                    if not _allows(after, patients):
                        continue
                    before = decide(request, facts, old, now)
                    why = ""
                    if not _allows(before, patients):
                        why = "allows"
                    elif _weaker_deid(old, before.deid_profile, new, after.deid_profile):
                        why = "de-identifies less"
                    if why:
                        key = (why, after.activity, after.recipient, after.rule_id)
                        found.setdefault(key, set()).add(f"{operation}/{after.purpose}")
    return [
        f"rules: {why} {activity}"
        + (f" to {recipient}" if recipient else "")
        + f" by rule {rule_id} ({', '.join(sorted(what))})"
        for (why, activity, recipient, rule_id), what in sorted(found.items())
    ]


def _options(policy: Policy, profile_id: str) -> frozenset[str] | None:
    if not profile_id:
        return None
    profile = policy.deid_profile(profile_id)
    return frozenset(profile.options) if profile else frozenset()


def _weaker_deid(old: Policy, old_id: str, new: Policy, new_id: str) -> bool:
    """Whether `new`'s profile de-identifies less than `old`'s (None: not de-identified)."""
    before, after = _options(old, old_id), _options(new, new_id)
    if before is None:
        return False
    if after is None:
        return True
    retains = {o for o in after if o.startswith("retain-")}
    old_retains = {o for o in before if o.startswith("retain-")}
    old_retains |= {less for less, more in _RETAIN_ORDER.items() if more in old_retains}
    cleans_lost = {o for o in before if o.startswith("clean-")} - after
    return bool(retains - old_retains or cleans_lost)


def _intake(old: Policy, new: Policy) -> list[str]:
    widens = []
    now = _SAMPLE_STARTS[-1]
    purposes = {p for policy in (old, new) for part in policy.parts for p in _intake_purposes(part)}
    cases: list[tuple[str, bool, PatientFacts]] = [
        ("unknown_sender", False, PatientFacts("P")),
        ("restricted_patient", True, PatientFacts("P", restricted=True)),
    ]
    for purpose in sorted(purposes):
        refused = ConsentRecord("P", "", purpose, 1, "refused", now, None, "", "", now)
        cases.append(("refused_processing", True, PatientFacts("P", (refused,))))
    for name, known, facts in cases:
        request = AdmissionRequest("dimse", "X", known, "P", "1.2.3", "1.2.3")
        before, after = admit(request, facts, old, now), admit(request, facts, new, now)
        if _SEVERITY[after.action] < _SEVERITY[before.action]:
            widens.append(f"intake.{name}: {before.action} -> {after.action}")
    return widens


def _intake_purposes(policy: Policy) -> tuple[str, ...]:
    activity = policy.activity("intake")
    return activity.purposes if activity else ()


def _activities(old: Policy, new: Policy) -> list[str]:
    widens = []
    before = {a.id: a for a in old.activities}
    for activity in new.activities:
        where = f"activities[{activity.id}]"
        was = before.get(activity.id)
        if was is None:
            widens.append(f"{where}: added")
            continue
        for name in ("purposes", "data_categories"):
            if added := sorted(set(getattr(activity, name)) - set(getattr(was, name))):
                widens.append(f"{where}.{name}: adds {', '.join(added)}")
        bases = (activity.lawful_basis, set(activity.additional_bases))
        if bases != (was.lawful_basis, set(was.additional_bases)):
            widens.append(f"{where}.lawful_basis: changed")
        if activity.data_subjects != was.data_subjects:
            widens.append(f"{where}.data_subjects: changed")
    return widens


def _recipients(old: Policy, new: Policy) -> list[str]:
    widens = []
    before = {r.id: r for r in old.recipients}
    for recipient in new.recipients:
        was = before.get(recipient.id)
        if was is None:
            continue  # what it may get is compared by _decisions
        where = f"recipients[{recipient.id}]"
        for name in ("country", "cross_border_basis", "dicomweb_url"):
            if getattr(recipient, name) != getattr(was, name):
                widens.append(
                    f"{where}.{name}: {getattr(was, name)!r} -> {getattr(recipient, name)!r}"
                )
        if was.retention and (
            not recipient.retention or _longer(recipient.retention, was.retention)
        ):
            widens.append(
                f"{where}.retention: {was.retention} -> {recipient.retention or 'unstated'}"
            )
    return widens


def _longer(new: str, old: str) -> bool:
    a, b = Period.parse(new), Period.parse(old)
    return any(a.after(start) > b.after(start) for start in _SAMPLE_STARTS)


def _retention(old: Policy, new: Policy) -> list[str]:
    """Sample studies of each modality either version names: does `new` keep any longer?"""
    widens: dict[tuple[str, str], str] = {}  # the first finding per category and modality
    modalities = {
        m for p in (old, new) for part in p.parts for r in part.retention for m in r.modalities
    }
    categories = {r.category for p in (old, new) for part in p.parts for r in part.retention}
    for category in sorted(categories):
        for modality in [*sorted(modalities), "OT"]:
            for start in _SAMPLE_STARTS:
                for facts in _sample_studies(modality, start):
                    finding = _keeps_longer(category, modality, start, facts, old, new)
                    if finding:
                        widens.setdefault((category, modality), finding)
    return list(dict.fromkeys(widens.values()))


def _keeps_longer(
    category: str, modality: str, start: datetime, facts: StudyFacts, old: Policy, new: Policy
) -> str:
    before, after = _expiry(old, category, facts), _expiry(new, category, facts)
    if after is None:
        if before is None:
            return ""
        return (
            f"retention: keeps {category} of {modality} studies with no end "
            f"(the version in force: rule {before[1]})"
        )
    if before is None:
        return ""  # the version in force keeps it with no end
    if after[0] > before[0]:
        return (
            f"retention: keeps {category} of {modality} studies longer by rule {after[1]} "
            f"(received {start:%Y-%m-%d}: until {after[0]:%Y-%m-%d}, "
            f"not {before[0]:%Y-%m-%d})"
        )
    if after[2] and not before[2]:
        return (
            f"retention: rule {after[1]} claims legal basis {after[2]} for {category} "
            "(erasure refused)"
        )
    return ""


def _sample_studies(modality: str, start: datetime) -> list[StudyFacts]:
    base = dict(
        study_instance_uid="1.2.3",
        patient_id="P",
        modalities=frozenset({modality}),
        images=1,
        results=1,
        images_received_at=start,
        results_received_at=start + timedelta(hours=1),
    )
    return [
        StudyFacts(**base, study_date=None, analysis_done_at=None, consent_withdrawn_at=None),
        StudyFacts(
            **base,
            study_date=start - timedelta(days=400),
            analysis_done_at=start + timedelta(days=2),
            consent_withdrawn_at=start + timedelta(days=30),
        ),
    ]


def _expiry(policy: Policy, category: str, facts: StudyFacts) -> tuple[datetime, str, str] | None:
    """When `policy` destroys `category` of the study (the earliest of a narrowed policy's
    parts), by which rule, with which legal basis; None when no rule applies (kept)."""
    if category in ("received-images", "analysis-results"):
        items = retention.retention_items(facts, policy, _SAMPLE_STARTS[0])
        item = next(i for i in items if i.category == category)
        return (item.expires_at, item.rule_id, item.legal_basis) if item.expires_at else None
    found = [
        retention._applicable(part.retention, category, facts, facts.images_received_at)
        for part in policy.parts
    ]
    known = [(f[1], f[0].id, f[0].legal_basis) for f in found if f is not None]
    return min(known, key=lambda f: f[0]) if known else None
