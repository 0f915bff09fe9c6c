"""Checklist item 22: the retention sweep's purge of records (the "logs" category: job, unit and
delivery records naming patients; the ledger is never purged) never deletes a record younger
than two years, whatever shorter period the policy's rule names. The clock moves forward over
records written at a fixed time; nothing is back-dated."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dicomnode.archive.registry import DONE
from dicomnode.governance import retention
from dicomnode.governance.policy import Period
from dicomnode.stewardship import Stewardship
from tests.conftest import open_archive
from tests.test_governance_node import policy_text

WRITTEN = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)  # when the records are written and finished
LOGS_RULE = """
[[retention]]
id = "logs-six-months"
category = "logs"
period = "P6M"
start = "received"
"""


def test_a_records_purge_never_deletes_records_younger_than_two_years(tmp_path, database_url):
    archive = open_archive(tmp_path / "data", database_url)
    now = [WRITTEN - timedelta(days=30)]
    stewardship = Stewardship(archive, clock=lambda: now[0])
    stewardship.publish_policy(policy_text() + LOGS_RULE, "dpo")
    registry = archive.registry
    now[0] = WRITTEN
    delivery = registry.queue_delivery(
        "share", "lab", "HRESCH", "P1", "1.2.826.0.1.22", ["1.2.826.0.1.22.1"], "dpo", 3, WRITTEN
    )
    assert registry.finish_delivery(delivery, DONE, WRITTEN, {"sent": ["1.2.826.0.1.22.1"]})

    for age in (timedelta(days=183), timedelta(days=365), timedelta(days=729)):
        now[0] = WRITTEN + age  # past the policy's six months, short of two years
        swept = stewardship.retention_sweep("housekeeping")
        assert not any(swept.records_removed.values()), (age, swept.records_removed)
        assert registry.delivery(delivery).state == DONE, age
    assert not [e for e in archive.ledger.entries() if e.data.get("category") == "logs"]

    now[0] = WRITTEN.replace(year=WRITTEN.year + 2) + timedelta(hours=1)  # two years and an hour
    swept = stewardship.retention_sweep("housekeeping")
    assert swept.records_removed["deliveries"] == 1
    assert registry.deliveries(limit=10) == []
    (purged,) = [e for e in archive.ledger.entries() if e.data.get("category") == "logs"]
    assert purged.data["rule_id"] == "logs-six-months"
    assert datetime.fromisoformat(purged.data["finished_before"]) <= now[0] - timedelta(days=730)
    archive.close()


def test_the_two_year_floor_is_a_minimum_not_a_setting():
    now = datetime(2028, 2, 29, 12, 0, tzinfo=UTC)
    floor = datetime(2026, 2, 28, 12, 0, tzinfo=UTC)  # two calendar years back (no 29th)
    assert retention.LOGS_MINIMUM_YEARS == 2
    for shorter in ("PT1H", "P30D", "P1Y", "P2Y"):
        assert retention.logs_purge_cutoff(Period.parse(shorter), now) <= floor, shorter
    longer = retention.logs_purge_cutoff(Period.parse("P3Y"), now)
    assert longer < floor and longer.year == 2025  # a longer rule keeps records longer
