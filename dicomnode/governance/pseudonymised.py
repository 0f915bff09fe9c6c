"""The pseudonymised-data register's rules (checklist items 27 and 36): what a record of a
pseudonymised disclosure says (PIPA Enforcement Decree Art. 29-5(2): purpose, the items
pseudonymised, the recipient, the processing period, the method, who processed it), when the
pseudonymised data count as destroyed, and how long the record is kept after that (PIPA Art.
28-4(3): at least 3 years). Pure: decided from the facts handed in.

The re-identification linkage (PIPA Art. 28-4(1), Decree Art. 29-5(1)) is not part of a record:
the keyed derivations of `deid_keys` need the node's de-identification secret (the key store,
``node_secrets``), which no register, ledger entry or DPO view holds.
"""

from __future__ import annotations

from datetime import datetime

from dicomnode.governance.policy import Period

KEEP_AFTER_DESTRUCTION = Period.parse("P3Y")  # PIPA Art. 28-4(3)


def keep_until(destroyed_at: datetime) -> datetime:
    """The moment a record may go: its pseudonymised data's destruction + 3 calendar years."""
    return KEEP_AFTER_DESTRUCTION.after(destroyed_at)


def may_purge(kept_until: datetime | None, now: datetime) -> bool:
    """A record may be purged only once its keep-until has come (never while its data are not
    known to be destroyed)."""
    return kept_until is not None and now >= kept_until


def period_end(processed_at: datetime, promised: str) -> datetime | None:
    """The end of the processing period: the recipient's promised retention (ISO 8601, the
    policy's ``recipients[].retention``) from the disclosure; None when it promised none."""
    return Period.parse(promised).after(processed_at) if promised else None


def pseudonymised_items(options: frozenset[str] | set[str]) -> list[tuple[str, str]]:
    """The items a profile pseudonymises, and how, for the register: (item, treatment) pairs
    with stable keys (the pages translate them). `options` are the profile's PS3.15 options."""
    items = [
        ("patient-id", "keyed-pseudonym"),
        ("uids", "kept" if "retain-uids" in options else "keyed-replacement"),
    ]
    if "retain-longitudinal-full-dates" in options:
        items.append(("dates", "kept"))
    elif "retain-longitudinal-modified-dates" in options:
        items.append(("dates", "shifted-per-patient"))
    else:
        items.append(("dates", "removed"))
    items.append(("direct-identifiers", "removed"))  # names, birth date, accession... (E.1-1)
    items.append(
        ("private-attributes", "safe-kept" if "retain-safe-private" in options else "removed")
    )
    for option, item in (
        ("retain-device-identity", "device-identity"),
        ("retain-institution-identity", "institution-identity"),
        ("retain-patient-characteristics", "patient-characteristics"),
    ):
        items.append((item, "kept" if option in options else "removed"))
    return items
