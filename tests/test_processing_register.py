"""Checklist item 2: the processing register (GDPR Art. 30(1)/(2), PIPA 30) the DPO exports as
JSON validates against the shipped JSON schema and lists every purpose of use the policy in
force configures: its activities', its rules' and its recipients' default ones."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

import dicomnode
from dicomnode.archive.accounts import AccountStore
from tests.test_dpo_pages import PASSWORD, RETENTION, signed_in
from tests.test_governance_node import policy_text, publish_days_ago

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

SCHEMA_PATH = Path(dicomnode.__file__).parent / "governance/data/processing-register.schema.json"
# A processor abroad (a transfer), a rule narrowed to one purpose, a recipient whose default
# purpose no activity names, and a second retention rule.
MORE = """
[[recipients]]
id = "reader"
name = "Teleradiology reading service"
kind = "processor"
country = "US"
token_subjects = ["reader-client"]
cross_border_basis = "PIPA-28-8-1-3"
default_purpose = "HOPERAT"

[[rules]]
id = "reading"
effect = "allow"
activity = "hospital-access"
recipients = ["reader"]
purposes = ["TREAT"]

[[retention]]
id = "logs-3y"
category = "logs"
period = "P3Y"
start = "received"
"""


def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture
def record(start_node) -> tuple[dict, object]:
    """The register as the DPO downloads it, and the policy in force it was made from."""
    node = start_node()
    publish_days_ago(node, policy_text() + RETENTION + MORE)
    AccountStore(node.archive.index).add("dpo1", PASSWORD, "dpo")
    response = signed_in(node).get("/governance/processing-record.json")
    assert response.status_code == 200
    assert "record-of-processing-activities.json" in response.headers["Content-Disposition"]
    return response.json(), node.stewardship.policy_status().in_force


def test_the_processing_register_validates_and_lists_every_configured_purpose(record):
    exported, policy = record
    errors = [f"{list(e.path)}: {e.message}" for e in validator().iter_errors(exported)]
    assert errors == []
    assert exported["policy"]["version"] == policy.version

    configured = (
        {p for a in policy.activities for p in a.purposes}
        | {p for r in policy.rules for p in r.purposes}
        | {r.default_purpose for r in policy.recipients}
    )
    assert {"TREAT", "PATRQT", "HRESCH", "HOPERAT"} <= configured
    listed = {p["code"]: p for p in exported["purposes"]}
    assert set(listed) == configured
    assert all(listed[code]["text"] for code in configured)  # each with its meaning
    assert listed["HOPERAT"]["recipients"] == ["reader"] and listed["HOPERAT"]["activities"] == []
    assert set(listed["TREAT"]["activities"]) == {
        a.id for a in policy.activities if "TREAT" in a.purposes
    }
    for activity, shown in zip(policy.activities, exported["activities"], strict=True):
        assert [p["code"] for p in shown["purposes"]] == list(activity.purposes), activity.id
        rules = {r.id: r for r in policy.rules if r.activity == activity.id}
        for rule in shown["rules"]:
            assert [p["code"] for p in rule["purposes"]] == list(rules[rule["id"]].purposes)
    for recipient, shown in zip(policy.recipients, exported["recipients"], strict=True):
        assert shown["default_purpose"]["code"] == recipient.default_purpose, recipient.id
    (abroad,) = exported["transfers_abroad"]
    assert (abroad["id"], abroad["country"], abroad["cross_border_basis"]["code"]) == (
        "reader",
        "US",
        "PIPA-28-8-1-3",
    )
    assert {limit["rule"] for limit in exported["erasure_time_limits"]} == {"images-10y", "logs-3y"}

    # the schema is no formality: registers that are not one are refused
    check = validator()
    broken = []
    no_purposes = copy.deepcopy(exported)
    no_purposes["activities"][0]["purposes"] = []
    broken.append(no_purposes)
    unnamed = copy.deepcopy(exported)
    del unnamed["purposes"][0]["text"]
    broken.append(unnamed)
    stray = copy.deepcopy(exported)
    stray["recipients"][0]["password"] = "x"
    broken.append(stray)
    lowercase = copy.deepcopy(exported)
    lowercase["purposes"][0]["code"] = "treat"
    broken.append(lowercase)
    no_measures = copy.deepcopy(exported)
    no_measures["security_measures"] = []
    broken.append(no_measures)
    for register in broken:
        assert not check.is_valid(register)
