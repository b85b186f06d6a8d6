"""The prompts stage wired up: configuration read back at start, and (against the shared worker)
checkout prompts on `checkout.prompts`, `GET /v1/prompts` and `POST /v1/fields/validate`."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from harness import event, unique

from workers import envelope
from workers.prompts import rules
from workers.prompts.app import Reference

from .conftest import PromptsDriver, config_record, custom_field, optin, optin_set

# --- configuration read back when a worker starts (no broker) -------------------------------------


def asked(reference: Reference, event_optin_set: str | None = None) -> list[str]:
    prompt = rules.prompt_for(reference.config("t1"), event="ev-1", event_optin_set=event_optin_set, channel="web",
                              language="en", contact=None, contact_statuses=None, contact_fields=None)
    return [entry["optin"] for entry in prompt["optins"]]


def read(reference: Reference, kind: str, data: dict[str, Any], at: str) -> str | None:
    _, key, record = config_record("t1", kind, data)
    record["time"] = f"2026-11-23T10:{at}Z"
    return reference.apply(envelope.CONFIG, key, record)


def test_configuration_read_back_at_start_is_built_in_the_order_it_was_published() -> None:
    caught_up = asyncio.Event()
    reference = Reference(caught_up=caught_up.is_set)
    # As partitions come back: sets before the opt-ins they name, the new default set before the
    # old one stopped being the default, and an opt-in deleted after its set was saved.
    assert read(reference, *optin_set("summer", ["news"], default=True), at="05:00") is None
    assert read(reference, *optin_set("main", ["news", "partners", "gone"], default=True), at="01:00") is None
    assert read(reference, *optin("news"), at="00:00") is None
    assert read(reference, *optin_set("main", ["news", "partners", "gone"]), at="02:00") is None
    assert read(reference, *optin("partners"), at="00:00") is None
    assert read(reference, *optin("gone"), at="00:00") is None
    assert reference.apply(envelope.CONFIG, "t1/optin/gone", None) is None
    caught_up.set()

    assert asked(reference) == ["news"]
    assert asked(reference, "main") == ["news", "partners"]
    # From then on the rules judge each record as it comes.
    assert "not defined (gone)" in read(reference, *optin_set("main", ["gone"]), at="06:00")
    assert "already is" in read(reference, *optin_set("main", ["news"], default=True), at="06:00")
    # The deleted opt-in, defined again, is back in the set that still names it.
    assert read(reference, *optin("gone"), at="07:00") is None
    assert asked(reference, "main") == ["news", "partners", "gone"]


def test_a_record_keyed_as_another_tenant_or_id_is_rejected() -> None:
    caught_up = asyncio.Event()
    caught_up.set()
    reference = Reference(caught_up=caught_up.is_set)
    _, _, record = config_record("t1", *optin("news"))
    assert reference.apply(envelope.CONFIG, "t2/optin/news", record) == "key 't2/optin/news' is not 't1/optin/news'"
    assert reference.apply(envelope.CONFIG, "t1/optin/other", record) == "key 't1/optin/other' is not 't1/optin/news'"
    assert reference.config("t2") is None and reference.config("t1") is None


# --- the shared worker ----------------------------------------------------------------------------

VENUE = (
    ("settings", {"default_language": "nl", "languages": ["en", "nl"], "login_required_for_purchase": True}),
    optin("newsletter", channels=["web", "box-office"], version=3, text={"en": "Send me the newsletter", "nl": "Stuur mij de nieuwsbrief"}),
    optin("terms", "mandatory", channels=["web"], text={"en": "I accept the terms", "nl": "Ik aanvaard de voorwaarden"}),
    optin("partners", channels=["box-office"], text={"en": "Partner offers", "nl": "Aanbiedingen van partners"}),
    optin("retired", channels=["web"], active=False),
    optin("summer-news", text={"en": "Summer news", "nl": "Zomernieuws"}),
    optin_set("main", ["newsletter", "terms", "partners", "retired"], default=True),
    optin_set("summer", ["summer-news", "newsletter"]),
    custom_field("diet", "dropdown", choices=["vegan", "halal"], select={"mode": "single"}, show_in=["checkout", "profile"]),
    custom_field("student", "yes_no", show_in=["registration"]),
    custom_field("vip-note", "text"),
)


def test_a_checkout_is_asked_the_active_optins_of_its_events_set_for_its_channel_in_its_language(
    prompts: PromptsDriver, tenant: str
) -> None:
    prompts.configure(tenant, *VENUE, events={"ev-plain": None, "ev-summer": "summer"})

    anonymous = prompts.checkout(tenant, "ev-plain", "web", "en")
    assert anonymous == {
        "checkout": anonymous["checkout"], "contact": None, "event": "ev-plain", "channel": "web", "login_required": True,
        "optins": [
            {"optin": "newsletter", "kind": "optional", "text": "Send me the newsletter", "version": 3, "prechecked": True},
            {"optin": "terms", "kind": "mandatory", "text": "I accept the terms", "version": 1, "prechecked": False},
        ],
        "fields": [{"field": "diet", "type": "dropdown", "label": "diet label", "choices": ["vegan", "halal"],
                    "select": {"mode": "single", "min": 1, "max": 1}, "required": False, "value": None}],
    }
    # No German texts: the tenant's default language.
    box_office = prompts.checkout(tenant, "ev-plain", "box-office", "de", contact=unique("c"))
    assert [(o["optin"], o["text"]) for o in box_office["optins"]] == [
        ("newsletter", "Stuur mij de nieuwsbrief"), ("partners", "Aanbiedingen van partners")]
    summer = prompts.checkout(tenant, "ev-summer", "web", "en-GB")
    assert [(o["optin"], o["text"]) for o in summer["optins"]] == [("summer-news", "Summer news"), ("newsletter", "Send me the newsletter")]


def test_invalid_configuration_is_dead_lettered_and_the_last_valid_version_stays(prompts: PromptsDriver, tenant: str) -> None:
    diet = custom_field("diet", "dropdown", choices=["vegan", "halal", "kosher"], select={"mode": "exact", "count": 2}, show_in=["checkout"])
    prompts.configure(tenant, optin("newsletter"), optin_set("main", ["newsletter"], default=True), diet)
    invalid = [
        custom_field("diet", "dropdown", choices=[f"choice-{n}" for n in range(21)], show_in=["checkout"]),
        custom_field("diet", "dropdown", choices=["vegan", "halal", "kosher"], select={"mode": "exact", "count": 4}, show_in=["checkout"]),
        optin_set("other", ["newsletter"], default=True),
        optin_set("main", ["newsletter", "ghost"], default=True),
    ]
    prompts.configure(tenant, *invalid)

    reasons = [letter["reason"] for letter in prompts.rejections(tenant, len(invalid))]
    for expected in (
        "data.choices: [...] has more than 20 items",
        "custom field 'diet': select asks for exactly 4 choices but the dropdown has only 3",
        "opt-in set 'other' cannot be the default: opt-in set 'main' already is",
        "opt-in set 'main': names opt-ins that are not defined (ghost)",
    ):
        assert len([reason for reason in reasons if expected in reason]) == 1, (expected, reasons)
    prompt = prompts.checkout(tenant, "ev-1", "web", "en")
    assert [o["optin"] for o in prompt["optins"]] == ["newsletter"]
    assert [(f["choices"], f["select"]) for f in prompt["fields"]] == [(["vegan", "halal", "kosher"], {"mode": "exact", "min": 2, "max": 2})]


def secured_venue(prompts: PromptsDriver, tenant: str) -> dict[str, str]:
    """Opt-ins, a set, an event and fields with ids of their own on a tenant other tests share."""
    ids = {name: unique(name) for name in ("news", "terms", "sms", "set", "event", "diet", "student", "remark")}
    prompts.configure(
        tenant,
        optin(ids["news"], channels=["web"]),
        optin(ids["terms"], "mandatory", channels=["web"]),
        optin(ids["sms"], channels=["web"]),
        optin_set(ids["set"], [ids["news"], ids["terms"], ids["sms"]]),
        custom_field(ids["diet"], "dropdown", choices=["vegan", "halal", "kosher"], select={"mode": "range", "min": 1, "max": 2},
                     required=True, show_in=["checkout", "registration"]),
        custom_field(ids["student"], "yes_no", show_in=["registration", "profile"]),
        custom_field(ids["remark"], "text", show_in=["profile"]),
        events={ids["event"]: ids["set"]},
    )
    return ids


def test_a_consent_change_shows_in_the_next_prompt_within_a_second(prompts: PromptsDriver) -> None:
    tenant, contact = "auth3", unique("c")
    token = prompts.tokens[tenant]
    ids = secured_venue(prompts, tenant)
    query = {"tenant": tenant, "event": ids["event"], "channel": "web", "contact": contact, "language": "en"}

    status, before = prompts.get_prompt(token, **query)
    assert status == 200
    assert [o["optin"] for o in before["optins"]] == [ids["news"], ids["terms"], ids["sms"]]
    assert before["contact"] == contact and "checkout" not in before

    # Opted in and pending are settled; expired is asked again.
    optins = {ids["news"]: {"status": "opted_in"}, ids["terms"]: {"status": "expired"}, ids["sms"]: {"status": "pending"}}
    prompts.kafka.send(envelope.CONSENT_STATE, f"{tenant}/{contact}",
                       event("consent.status", tenant, {"contact": contact, "optins": optins}, source="/usher/consent"))
    sent = time.monotonic()
    while (answer := prompts.get_prompt(token, **query)[1])["optins"] != before["optins"][1:2]:
        assert time.monotonic() - sent < 1.0, f"after a second the prompt still asks {answer['optins']}"
        time.sleep(0.02)

    profile = {"contact": contact, "fields": {ids["diet"]: ["vegan"]}, "filters": [], "links": {"children": [], "parents": []}, "orders": []}
    prompts.kafka.send(envelope.CONTACTS_STATE, f"{tenant}/{contact}", event("contact.profile", tenant, profile, source="/usher/segments"))

    def diet(prompt: dict[str, Any]) -> list[Any]:
        return [f["value"] for f in prompt["fields"] if f["field"] == ids["diet"]]

    sent = time.monotonic()
    while diet(answer := prompts.get_prompt(token, **query)[1]) != [["vegan"]]:
        assert time.monotonic() - sent < 5.0, f"the diet answered is not prefilled: {answer['fields']}"
        time.sleep(0.05)
    prompt = prompts.checkout(tenant, ids["event"], "web", "en", contact=contact)
    assert [o["optin"] for o in prompt["optins"]] == [ids["terms"]] and diet(prompt) == [["vegan"]]

    # A deleted contact's statuses are forgotten: everything is asked again.
    prompts.kafka.send(envelope.CONSENT_STATE, f"{tenant}/{contact}", None)
    deleted = time.monotonic()
    while (answer := prompts.get_prompt(token, **query)[1])["optins"] != before["optins"]:
        assert time.monotonic() - deleted < 5.0, f"the deleted contact is still asked only {answer['optins']}"
        time.sleep(0.05)


def test_the_prompts_endpoint_answers_the_tenants_token_with_the_forms_fields(prompts: PromptsDriver) -> None:
    tenant = "auth3"
    token = prompts.tokens[tenant]
    ids = secured_venue(prompts, tenant)
    query = {"tenant": tenant, "event": ids["event"], "channel": "web"}
    ours = {ids["diet"], ids["student"], ids["remark"]}

    def fields(form: str) -> set[tuple[str, bool]]:
        status, body = prompts.get_prompt(token, **query, form=form)
        assert status == 200, body
        return {(f["field"], f["required"]) for f in body["fields"] if f["field"] in ours}

    assert fields("checkout") == {(ids["diet"], True)}
    assert fields("registration") == {(ids["diet"], True), (ids["student"], False)}
    assert fields("profile") == {(ids["student"], False), (ids["remark"], False)}
    status, anonymous = prompts.get_prompt(token, **query)
    assert status == 200 and anonymous["contact"] is None and len(anonymous["optins"]) == 3

    assert prompts.get_prompt(None, **query)[0] == 401
    assert prompts.get_prompt("not-a-token", **query)[0] == 401
    status, body = prompts.get_prompt(prompts.tokens["auth2"], **query)
    assert (status, body["error"]) == (403, "forbidden")
    status, body = prompts.get_prompt(token, tenant=tenant, channel="web")
    assert (status, body["error"]) == (400, "missing_parameter") and "event" in body["message"]
    status, body = prompts.get_prompt(token, **query, form="invoice")
    assert (status, body["error"]) == (400, "invalid_parameter") and "form" in body["message"]


def test_field_answers_are_validated_with_messages_in_the_requested_language(prompts: PromptsDriver) -> None:
    tenant = "auth3"
    token = prompts.tokens[tenant]
    ids = secured_venue(prompts, tenant)
    request = {"tenant": tenant, "form": "registration", "language": "nl"}

    status, body = prompts.validate(token, request | {"answers": {ids["diet"]: ["vegan", "halal", "kosher"], ids["student"]: "ja", ids["remark"]: "hi"}})
    assert status == 200 and body["ok"] is False
    assert {field: body["errors"][field] for field in ids.values() if field in body["errors"]} == {
        ids["diet"]: "Kies maximaal 2 opties.",
        ids["student"]: "Antwoord met ja of nee.",
        ids["remark"]: "Dit veld kan hier niet worden ingevuld.",
    }
    status, body = prompts.validate(token, request | {"language": "en", "answers": {ids["student"]: True}})
    assert status == 200 and body["errors"][ids["diet"]] == "This field is required."
    status, body = prompts.validate(token, request | {"answers": {ids["diet"]: "halal", ids["student"]: False}})
    assert status == 200 and not set(ids.values()) & set(body["errors"]) and body["ok"] is (not body["errors"])

    assert prompts.validate(None, request | {"answers": {}})[0] == 401
    status, body = prompts.validate(prompts.tokens["auth1"], request | {"answers": {}})
    assert (status, body["error"]) == (403, "forbidden")
    status, body = prompts.validate(token, request | {"form": "invoice", "answers": {}})
    assert (status, body["error"]) == (400, "invalid_body")
