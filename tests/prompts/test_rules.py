"""Prompts stage rules: tenant configuration and what each checkout asks."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from typing import Any

import pytest

from workers.envelope import PROMPTS, dumps, loads, make_event
from workers.prompts.rules import (
    ConfigState,
    apply_config,
    event_optin_set_entry,
    on_checkout_started,
    prompt_for,
    remove_config,
)
from workers.schemas import problem

NOW = datetime(2026, 11, 23, 18, 0, tzinfo=timezone.utc)


def config_record(kind: str, data: dict[str, Any], tenant: str = "t1") -> dict[str, Any]:
    return make_event(f"config.{kind}", tenant, data, source="/shop/admin")


def optin(optin_id: str, kind: str = "optional", **extra: Any) -> dict[str, Any]:
    return {
        "id": optin_id,
        "kind": kind,
        "purpose": "email",
        "text": {"en": f"{optin_id} (en)", "nl": f"{optin_id} (nl)"},
        "version": 1,
        "channels": ["web", "box-office"],
        "active": True,
        **extra,
    }


def optin_set(set_id: str, optins: list[str], default: bool = False) -> dict[str, Any]:
    return {"id": set_id, "optins": optins, "default": default}


def custom_field(field_id: str, type_: str = "text", **extra: Any) -> dict[str, Any]:
    return {
        "id": field_id,
        "type": type_,
        "label": {"en": f"{field_id} (en)", "de": f"{field_id} (de)"},
        **extra,
    }


def configure(*records: tuple[str, dict[str, Any]], state: ConfigState | None = None) -> ConfigState:
    """Apply valid configuration records in order."""
    for kind, data in records:
        state, error = apply_config(state, config_record(kind, data))
        assert error is None, error
    assert state is not None
    return state


VENUE = (
    ("settings", {"default_language": "en", "languages": ["en", "nl"], "login_required_for_purchase": False}),
    ("optin", optin("newsletter", "mandatory")),
    ("optin", optin("partners")),
    ("optin", optin("brochure", "optional", channels=["box-office"])),
    ("optin", optin("summer-news")),
    ("optin-set", optin_set("main", ["newsletter", "partners", "brochure"], default=True)),
    ("optin-set", optin_set("summer", ["summer-news", "newsletter"])),
    (
        "custom-field",
        custom_field(
            "diet",
            "dropdown",
            choices=["vegan", "halal"],
            select={"mode": "single"},
            required=True,
            show_in=["checkout", "profile"],
        ),
    ),
    ("custom-field", custom_field("student", "yes_no", show_in=["registration"])),
    ("custom-field", custom_field("remark", "text", show_in=["checkout", "registration"])),
    ("custom-field", custom_field("vip_note", "text")),
)


@pytest.fixture
def venue() -> ConfigState:
    return configure(*VENUE)


def prompt(state: ConfigState | None, **overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "event": "ev-1",
        "event_optin_set": None,
        "channel": "web",
        "language": "en",
        "contact": "c-42",
        "contact_statuses": {},
        "contact_fields": {},
    } | overrides
    return prompt_for(state, **arguments)


def asked(state: ConfigState | None, **overrides: Any) -> list[str]:
    return [entry["optin"] for entry in prompt(state, **overrides)["optins"]]


def statuses(**by_optin: str) -> dict[str, dict[str, Any]]:
    return {optin_id: {"status": status, "channel": "web"} for optin_id, status in by_optin.items()}


# --- sets, channels, statuses ---------------------------------------------------------------------


def test_the_default_set_applies_when_the_event_has_none(venue: ConfigState) -> None:
    assert asked(venue) == ["newsletter", "partners"]


def test_the_events_set_overrides_the_default(venue: ConfigState) -> None:
    assert asked(venue, event_optin_set="summer") == ["summer-news", "newsletter"]


def test_an_event_naming_an_unknown_set_gets_the_default(venue: ConfigState) -> None:
    assert asked(venue, event_optin_set="winter") == ["newsletter", "partners"]


def test_without_a_default_set_an_event_without_set_asks_nothing() -> None:
    state = configure(("optin", optin("newsletter")), ("optin-set", optin_set("summer", ["newsletter"])))
    assert asked(state) == []
    assert asked(state, event_optin_set="summer") == ["newsletter"]


def test_only_opt_ins_enabled_for_the_channel_are_asked(venue: ConfigState) -> None:
    assert asked(venue, channel="box-office") == ["newsletter", "partners", "brochure"]
    assert asked(venue, channel="kiosk") == []


def test_an_opt_in_without_channels_is_asked_on_every_channel(venue: ConfigState) -> None:
    anywhere = {key: value for key, value in optin("partners").items() if key != "channels"}
    state = configure(("optin", anywhere), state=venue)
    assert asked(state, channel="kiosk") == ["partners"]
    assert asked(state, channel="box-office") == ["newsletter", "partners", "brochure"]


def test_inactive_opt_ins_are_not_asked_until_active_again(venue: ConfigState) -> None:
    inactive = configure(("optin", optin("partners", active=False)), state=venue)
    assert asked(inactive) == ["newsletter"]
    assert asked(configure(("optin", optin("partners")), state=inactive)) == ["newsletter", "partners"]


@pytest.mark.parametrize(
    ("status", "is_asked"),
    [
        ("unknown", True),
        ("expired", True),
        ("pending", False),
        ("opted_in", False),
        ("opted_out", False),
    ],
)
def test_only_unknown_or_expired_statuses_are_asked(venue: ConfigState, status: str, is_asked: bool) -> None:
    expected = ["newsletter", "partners"] if is_asked else ["partners"]
    assert asked(venue, contact_statuses=statuses(newsletter=status)) == expected


def test_a_contact_without_consent_records_is_asked_everything(venue: ConfigState) -> None:
    assert asked(venue, contact_statuses=statuses(brochure="opted_in")) == ["newsletter", "partners"]


def test_an_anonymous_checkout_is_asked_everything(venue: ConfigState) -> None:
    assert asked(venue, contact=None, contact_statuses=None) == ["newsletter", "partners"]


def test_an_opt_in_without_a_version_is_shown_as_version_0(venue: ConfigState) -> None:
    unversioned = {key: value for key, value in optin("partners").items() if key != "version"}
    state = configure(("optin", unversioned), state=venue)
    assert [entry["version"] for entry in prompt(state)["optins"]] == [1, 0]


def test_optional_opt_ins_are_prechecked_and_mandatory_ones_not(venue: ConfigState) -> None:
    assert prompt(venue)["optins"] == [
        {
            "optin": "newsletter",
            "kind": "mandatory",
            "text": "newsletter (en)",
            "version": 1,
            "prechecked": False,
        },
        {"optin": "partners", "kind": "optional", "text": "partners (en)", "version": 1, "prechecked": True},
    ]


# --- languages -----------------------------------------------------------------------------------


def test_texts_come_in_the_checkouts_language(venue: ConfigState) -> None:
    result = prompt(venue, language="nl")
    assert [entry["text"] for entry in result["optins"]] == ["newsletter (nl)", "partners (nl)"]


def test_texts_fall_back_to_the_tenants_default_language_then_any_text(venue: ConfigState) -> None:
    german_default = configure(("settings", {"default_language": "de"}), state=venue)
    result = prompt(german_default, language="fr")
    # The opt-ins have no German: any text; the field labels have German, the tenant's default.
    assert [entry["text"] for entry in result["optins"]] == ["newsletter (en)", "partners (en)"]
    assert [entry["label"] for entry in result["fields"]] == ["diet (de)", "remark (de)"]
    assert [entry["text"] for entry in prompt(venue, language="fr")["optins"]] == [
        "newsletter (en)",
        "partners (en)",
    ]


def test_a_regional_language_finds_its_language(venue: ConfigState) -> None:
    assert [entry["text"] for entry in prompt(venue, language="nl-BE")["optins"]] == [
        "newsletter (nl)",
        "partners (nl)",
    ]


# --- fields and login ----------------------------------------------------------------------------


def test_fields_are_shown_in_their_forms_and_internal_ones_never(venue: ConfigState) -> None:
    shown = {
        form: [entry["field"] for entry in prompt(venue, form=form)["fields"]]
        for form in ("checkout", "registration", "profile")
    }
    assert shown == {
        "checkout": ["diet", "remark"],
        "registration": ["student", "remark"],
        "profile": ["diet"],
    }


def test_fields_are_prefilled_with_the_contacts_answers(venue: ConfigState) -> None:
    result = prompt(venue, language="de", contact_fields={"diet": ["halal"], "vip_note": "gold"})
    assert result["fields"] == [
        {
            "field": "diet",
            "type": "dropdown",
            "label": "diet (de)",
            "choices": ["vegan", "halal"],
            "select": {"mode": "single", "min": 1, "max": 1},
            "required": True,
            "value": ["halal"],
        },
        {
            "field": "remark",
            "type": "text",
            "label": "remark (de)",
            "choices": [],
            "select": None,
            "required": False,
            "value": None,
        },
    ]


def test_a_dropdowns_select_says_how_many_choices_to_pick() -> None:
    state = configure(
        (
            "custom-field",
            custom_field(
                "topics",
                "dropdown",
                choices=["a", "b", "c"],
                select={"mode": "unlimited"},
                show_in=["profile"],
            ),
        ),
        (
            "custom-field",
            custom_field(
                "pair",
                "dropdown",
                choices=["a", "b", "c"],
                select={"mode": "exact", "count": 2},
                show_in=["profile"],
            ),
        ),
        (
            "custom-field",
            custom_field(
                "some",
                "dropdown",
                choices=["a", "b", "c"],
                select={"mode": "range", "min": 2, "max": 3},
                show_in=["profile"],
            ),
        ),
    )
    assert [entry["select"] for entry in prompt(state, form="profile")["fields"]] == [
        {"mode": "unlimited", "min": 1, "max": 3},
        {"mode": "exact", "min": 2, "max": 2},
        {"mode": "range", "min": 2, "max": 3},
    ]


def test_login_requirement_follows_the_settings(venue: ConfigState) -> None:
    assert prompt(venue)["login_required"] is False
    assert (
        prompt(configure(("settings", {"login_required_for_purchase": True}), state=venue))["login_required"]
        is True
    )


def test_a_tenant_without_configuration_asks_nothing() -> None:
    assert prompt(None) == {
        "contact": "c-42",
        "event": "ev-1",
        "channel": "web",
        "login_required": False,
        "optins": [],
        "fields": [],
    }


# --- invalid configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "data", "reason"),
    [
        (
            "custom-field",
            custom_field("diet", "dropdown", choices=[f"c{i}" for i in range(21)], show_in=["checkout"]),
            "custom field 'diet': a dropdown has at most 20 choices, this one has 21",
        ),
        (
            "custom-field",
            custom_field(
                "diet",
                "dropdown",
                choices=["vegan", "halal"],
                select={"mode": "exact", "count": 3},
                show_in=["checkout"],
            ),
            "custom field 'diet': select asks for exactly 3 choices but the dropdown has only 2",
        ),
        (
            "custom-field",
            custom_field(
                "diet",
                "dropdown",
                choices=["vegan", "halal"],
                select={"mode": "range", "min": 2, "max": 1},
                show_in=["checkout"],
            ),
            "custom field 'diet': select.min (2) is larger than select.max (1)",
        ),
        (
            "custom-field",
            custom_field("remark", "text", select={"mode": "single"}, show_in=["checkout"]),
            "custom field 'remark': only a dropdown has a select mode",
        ),
        (
            "optin-set",
            optin_set("summer", ["newsletter"], default=True),
            "opt-in set 'summer' cannot be the default: opt-in set 'main' already is; save 'main' with default false first",
        ),
        (
            "optin-set",
            optin_set("main", ["newsletter", "sms-news"], default=True),
            "opt-in set 'main': names opt-ins that are not defined (sms-news); define them first or leave them out",
        ),
        (
            "optin-set",
            optin_set("main", ["newsletter", "newsletter"], default=True),
            "opt-in set 'main': lists opt-in 'newsletter' more than once",
        ),
        ("optin", optin("partners", kind="maybe"), "opt-in 'partners': kind must be mandatory or optional"),
        (
            "optin",
            optin("partners", text={}),
            "opt-in 'partners': text needs the question in at least one language",
        ),
        ("optin", optin("partners", version="3"), "opt-in 'partners': version must be a whole number"),
        ("optin", optin("partners", channels="web"), "opt-in 'partners': channels must be a list"),
        ("optin", {k: v for k, v in optin("partners").items() if k != "id"}, "config.optin without an id"),
        (
            "settings",
            {"login_required_for_purchase": "yes"},
            "settings: login_required_for_purchase must be true or false",
        ),
    ],
)
def test_invalid_configuration_is_rejected_and_the_last_valid_version_stays(
    venue: ConfigState, kind: str, data: dict[str, Any], reason: str
) -> None:
    before = copy.deepcopy(venue)
    state, error = apply_config(venue, config_record(kind, data))
    assert error is not None and error.startswith(reason)
    assert state == before == venue
    assert asked(state) == ["newsletter", "partners"]
    assert [entry["field"] for entry in prompt(state)["fields"]] == ["diet", "remark"]


def test_the_default_set_moves_once_the_old_default_is_cleared(venue: ConfigState) -> None:
    state = configure(
        ("optin-set", optin_set("main", ["newsletter", "partners"], default=True)),
        ("optin-set", optin_set("main", ["newsletter", "partners"])),
        ("optin-set", optin_set("summer", ["summer-news"], default=True)),
        state=venue,
    )
    assert asked(state) == ["summer-news"]


def test_configuration_of_other_stages_is_left_alone(venue: ConfigState) -> None:
    layout = make_event(
        "config.layout", "t1", {"id": "event-info", "channel": "sms", "languages": {}}, source="/shop"
    )
    assert apply_config(venue, layout) == (venue, None)


# --- deletions -----------------------------------------------------------------------------------


def test_a_deleted_opt_in_leaves_its_sets_and_comes_back_when_defined_again(venue: ConfigState) -> None:
    without = remove_config(venue, "optin", "partners")
    assert asked(without) == ["newsletter"]
    assert without["sets"]["main"]["optins"] == ["newsletter", "partners", "brochure"]
    _, error = apply_config(
        without, config_record("optin-set", optin_set("main", ["newsletter", "partners"], default=True))
    )
    assert error is not None and "partners" in error
    assert asked(configure(("optin", optin("partners")), state=without)) == ["newsletter", "partners"]


def test_deleting_the_default_set_leaves_events_without_set_unasked(venue: ConfigState) -> None:
    state = remove_config(venue, "optin-set", "main")
    assert asked(state) == []
    assert asked(state, event_optin_set="summer") == ["summer-news", "newsletter"]
    assert (
        configure(("optin-set", optin_set("summer", ["summer-news"], default=True)), state=state)[
            "default_set"
        ]
        == "summer"
    )


def test_deleting_a_field_or_the_settings(venue: ConfigState) -> None:
    login = configure(("settings", {"login_required_for_purchase": True}), state=venue)
    assert prompt(remove_config(login, "settings", "default"))["login_required"] is False
    assert [entry["field"] for entry in prompt(remove_config(venue, "custom-field", "diet"))["fields"]] == [
        "remark"
    ]
    assert remove_config(venue, "custom-field", "unknown") == venue


# --- state, tenants and records ------------------------------------------------------------------


def test_config_state_survives_json_storage_unchanged(venue: ConfigState) -> None:
    stored = loads(dumps(venue))
    assert stored == venue
    assert prompt(stored, channel="box-office") == prompt(venue, channel="box-office")


def test_applying_configuration_leaves_the_previous_state_untouched(venue: ConfigState) -> None:
    before = copy.deepcopy(venue)
    configure(
        ("optin", optin("partners", active=False)),
        ("optin-set", optin_set("main", ["partners"], default=True)),
        state=venue,
    )
    remove_config(venue, "optin", "newsletter")
    assert venue == before


def test_tenants_are_kept_apart() -> None:
    tenants: dict[str, ConfigState] = {}
    for tenant, optin_id in (("t1", "newsletter"), ("t2", "nieuwsbrief")):
        for kind, data in (
            ("optin", optin(optin_id)),
            ("optin-set", optin_set("main", [optin_id], default=True)),
        ):
            tenants[tenant], error = apply_config(tenants.get(tenant), config_record(kind, data, tenant))
            assert error is None
    assert asked(tenants["t1"]) == ["newsletter"]
    assert asked(tenants["t2"]) == ["nieuwsbrief"]
    checkouts = [
        make_event(
            "checkout.started",
            tenant,
            {"checkout": "co-1", "event": "ev-1", "channel": "web", "contact": "c-1", "language": "en"},
            source="/shop",
            id_="e1",
        )
        for tenant in ("t1", "t2")
    ]
    keys = [on_checkout_started(tenants[c["tenant"]], c, None, None, None, NOW).key for c in checkouts]
    assert keys == ["t1/c-1", "t2/c-1"]


def checkout_started(contact: str | None) -> dict[str, Any]:
    data = {"checkout": "co-9", "event": "ev-1", "channel": "web", "contact": contact, "language": "nl"}
    return make_event(
        "checkout.started", "t1", data, source="/shop/web", id_="evt-7", time="2026-11-23T17:59:59Z"
    )


def test_a_checkout_gets_its_prompt_record(venue: ConfigState) -> None:
    out = on_checkout_started(
        venue, checkout_started("c-42"), "summer", statuses(newsletter="opted_in"), {"diet": ["vegan"]}, NOW
    )
    assert (out.topic, out.key) == (PROMPTS, "t1/c-42")
    assert out.event is not None
    assert (out.event["type"], out.event["tenant"], out.event["time"]) == (
        "checkout.prompted",
        "t1",
        "2026-11-23T18:00:00.000Z",
    )
    data = out.event["data"]
    assert (data["checkout"], data["contact"], data["event"], data["channel"]) == (
        "co-9",
        "c-42",
        "ev-1",
        "web",
    )
    assert [entry["text"] for entry in data["optins"]] == ["summer-news (nl)"]
    assert data["fields"][0]["value"] == ["vegan"]


def test_a_redelivered_checkout_yields_the_same_prompt_record(venue: ConfigState) -> None:
    first = on_checkout_started(venue, checkout_started("c-42"), None, {}, {}, NOW)
    again = on_checkout_started(venue, checkout_started("c-42"), None, {}, {}, NOW)
    assert first == again


def test_an_anonymous_checkouts_prompt_is_keyed_by_the_checkout_and_asks_everything(
    venue: ConfigState,
) -> None:
    out = on_checkout_started(
        venue, checkout_started(None), None, statuses(newsletter="opted_in"), {"diet": ["vegan"]}, NOW
    )
    assert out.key == "t1/~co-9"
    assert out.event is not None
    assert [entry["optin"] for entry in out.event["data"]["optins"]] == ["newsletter", "partners"]
    assert out.event["data"]["fields"][0]["value"] is None


def test_prompt_records_and_the_sample_configuration_meet_the_contracts_schemas(venue: ConfigState) -> None:
    assert [problem(config_record(kind, data)) for kind, data in VENUE] == [None] * len(VENUE)
    records = [
        on_checkout_started(venue, checkout_started(contact), None, {}, {"diet": ["halal"]}, NOW).event
        for contact in ("c-42", None)
    ]
    assert [problem(record) for record in records] == [None, None]


def test_events_name_their_opt_in_set() -> None:
    scheduled = make_event(
        "event.scheduled", "t1", {"event": "ev-1", "name": "Hamlet", "optin_set": "summer"}, source="/shop"
    )
    cancelled = make_event("event.cancelled", "t1", {"event": "ev-1"}, source="/shop")
    assert event_optin_set_entry(scheduled) == ("t1/ev-1", "summer")
    assert event_optin_set_entry(cancelled) == ("t1/ev-1", None)
