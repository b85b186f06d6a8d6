"""Pure rules of the prompts stage: a tenant's configuration, and what a checkout asks.

Configuration state is one JSON-able dict per tenant (see `empty_config`). Next to the records as
configured it holds what every prompt needs, worked out once per configuration change: the default
set, each set's opt-ins per sales channel, and each form's fields. A prompt then only looks up.

An opt-in set may name an opt-in that is later deleted: the set keeps the name and the prompt
leaves that opt-in out, so defining the opt-in again brings it back. Saving the set again while
the opt-in is still missing is rejected like any set naming an unknown opt-in.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from workers.envelope import PROMPTS, Out, contact_key, derived_id, isotime, key, make_event
from workers.fields import (
    FORMS,
    field_config_error,
    first_repeat,
    pick_text,
    select_bounds,
    shown_in,
    valid_texts,
)

SOURCE = "/usher/prompts"
OPTIN_KINDS = ("mandatory", "optional")
# The version shown for an opt-in whose text carries none.
UNVERSIONED = 0
# Statuses for which a checkout asks the question (again).
ASKED_STATUSES = frozenset({"unknown", "expired"})
# Key, in a set's per-channel lists, of the opt-ins for a channel no opt-in names; ids cannot hold it.
ANY_CHANNEL = "*"
# Config kind (the type's suffix and the key's middle part) -> the state section holding its records.
_SECTIONS = {"optin": "optins", "optin-set": "sets", "custom-field": "fields"}

ConfigState = dict[str, Any]


def empty_config() -> ConfigState:
    """The configuration of a tenant that has configured nothing yet."""
    return _derive({}, {}, {}, {})


def apply_config(
    config_state: ConfigState | None, event: Mapping[str, Any], *, replayed: bool = False
) -> tuple[ConfigState, str | None]:
    """Apply one `ticketing.config` record. Returns the new state and None, or the unchanged state
    and the reason the record was rejected (for the dead letters): the last valid version stays in
    force. Config kinds of other stages (filter, layout) leave the state as it is.

    `replayed` marks a record read back when a worker starts, which was judged when it arrived:
    an opt-in its set names may have been deleted since, which the set survives (see above), so a
    replayed set is not rejected for naming opt-ins that are not defined."""
    state = config_state or empty_config()
    kind = event["type"].removeprefix("config.")
    data = event["data"]
    if kind == "settings":
        problem = _settings_problem(data)
        return (state, problem) if problem else (_replace(state, settings=data), None)
    if kind not in _SECTIONS:
        return state, None
    config_id = data.get("id")
    if not isinstance(config_id, str) or not config_id:
        return state, f"config.{kind} without an id: give data.id, the id in the record key"
    if kind == "optin-set":
        problem = _optin_set_problem(state, data, replayed=replayed)
    else:
        problem = _PROBLEMS[kind](state, data)
    if problem:
        return state, problem
    section = _SECTIONS[kind]
    return _replace(state, **{section: {**state[section], config_id: data}}), None


def remove_config(config_state: ConfigState | None, kind: str, config_id: str) -> ConfigState:
    """Apply a tombstone on `ticketing.config` (key `{tenant}/{kind}/{id}`)."""
    state = config_state or empty_config()
    if kind == "settings":
        return _replace(state, settings={})
    section = _SECTIONS.get(kind)
    if section is None or config_id not in state[section]:
        return state
    remaining = {other_id: data for other_id, data in state[section].items() if other_id != config_id}
    return _replace(state, **{section: remaining})


def _replace(state: ConfigState, **sections: dict[str, Any]) -> ConfigState:
    parts = {name: state[name] for name in ("settings", "optins", "sets", "fields")} | sections
    return _derive(**parts)


def _derive(
    settings: dict[str, Any],
    optins: dict[str, dict[str, Any]],
    sets: dict[str, dict[str, Any]],
    fields: dict[str, dict[str, Any]],
) -> ConfigState:
    return {
        "settings": settings,
        "optins": optins,
        "sets": sets,
        "fields": fields,
        "default_set": next((set_id for set_id, data in sets.items() if data.get("default")), None),
        "set_channels": {set_id: _optins_by_channel(data["optins"], optins) for set_id, data in sets.items()},
        "form_fields": {
            form: [fid for fid, field in fields.items() if shown_in(field, form)] for form in FORMS
        },
    }


def _optins_by_channel(
    set_optins: list[str], optins: Mapping[str, Mapping[str, Any]]
) -> dict[str, list[str]]:
    """The set's active, defined opt-ins per channel, in the set's order; an opt-in without a
    `channels` list is on every channel."""
    active = [
        optins[optin_id]
        for optin_id in set_optins
        if optin_id in optins and optins[optin_id].get("active", True)
    ]
    named = {channel for optin in active for channel in optin.get("channels") or ()}
    by_channel = {
        channel: [
            optin["id"] for optin in active if optin.get("channels") is None or channel in optin["channels"]
        ]
        for channel in named
    }
    by_channel[ANY_CHANNEL] = [optin["id"] for optin in active if optin.get("channels") is None]
    return by_channel


def _settings_problem(data: Mapping[str, Any]) -> str | None:
    if not isinstance(data.get("login_required_for_purchase", False), bool):
        return "settings: login_required_for_purchase must be true or false"
    language = data.get("default_language")
    if language is not None and (not isinstance(language, str) or not language):
        return 'settings: default_language must be a language code such as "en"'
    return None


def _optin_problem(state: ConfigState, data: Mapping[str, Any]) -> str | None:
    name = f"opt-in {data['id']!r}"
    if data.get("kind") not in OPTIN_KINDS:
        return f"{name}: kind must be mandatory or optional, not {data.get('kind')!r}"
    if not valid_texts(data.get("text")):
        return f'{name}: text needs the question in at least one language, e.g. {{"en": "Send me the newsletter"}}'
    version = data.get("version", UNVERSIONED)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        return f"{name}: version must be a whole number (it is kept as evidence of the text shown)"
    channels = data.get("channels")
    if channels is not None and (
        not isinstance(channels, list)
        or not all(isinstance(channel, str) and channel for channel in channels)
    ):
        return f'{name}: channels must be a list of sales channel ids such as ["web"]'
    if not isinstance(data.get("active", True), bool):
        return f"{name}: active must be true or false"
    return None


def _optin_set_problem(state: ConfigState, data: Mapping[str, Any], *, replayed: bool) -> str | None:
    set_id = data["id"]
    name = f"opt-in set {set_id!r}"
    optins = data.get("optins")
    if not isinstance(optins, list) or not all(isinstance(optin_id, str) for optin_id in optins):
        return f"{name}: optins must be a list of opt-in ids"
    repeated = first_repeat(optins)
    if repeated is not None:
        return f"{name}: lists opt-in {repeated!r} more than once"
    unknown = [optin_id for optin_id in optins if optin_id not in state["optins"]]
    if unknown and not replayed:
        return f"{name}: names opt-ins that are not defined ({', '.join(unknown)}); define them first or leave them out"
    if not isinstance(data.get("default", False), bool):
        return f"{name}: default must be true or false"
    current_default = state["default_set"]
    if data.get("default") and current_default not in (None, set_id):
        return (
            f"{name} cannot be the default: opt-in set {current_default!r} already is; "
            f"save {current_default!r} with default false first"
        )
    return None


def _custom_field_problem(state: ConfigState, data: Mapping[str, Any]) -> str | None:
    return field_config_error(data)


_PROBLEMS = {"optin": _optin_problem, "custom-field": _custom_field_problem}


def prompt_for(
    config_state: ConfigState | None,
    *,
    event: str,
    event_optin_set: str | None,
    channel: str,
    language: str | None,
    contact: str | None,
    contact_statuses: Mapping[str, Mapping[str, Any]] | None,
    contact_fields: Mapping[str, Any] | None,
    form: str = "checkout",
) -> dict[str, Any]:
    """The data of `checkout.prompted` without `checkout` (also the answer of `GET /v1/prompts`).

    `event_optin_set` is the event's `optin_set` (see `event_optin_set_entry`); None, or a set that
    does not exist (any more), means the tenant's default set. `contact_statuses` is the `optins`
    map of the contact's `consent.status` (None or {} when nothing is known, and for an anonymous
    checkout: then every opt-in is asked). `contact_fields` is the contact's `fields` answers, used
    to prefill. `form` is one of `workers.fields.FORMS`.
    """
    state = config_state or _UNCONFIGURED
    settings = state["settings"]
    languages = (language, settings.get("default_language"))
    set_id = event_optin_set if event_optin_set in state["sets"] else state["default_set"]
    by_channel = state["set_channels"].get(set_id, {}) if set_id else {}
    optins = state["optins"]
    statuses = contact_statuses or {}
    fields = state["fields"]
    answers = contact_fields or {}
    return {
        "contact": contact,
        "event": event,
        "channel": channel,
        "login_required": settings.get("login_required_for_purchase", False),
        "optins": [
            _prompted_optin(optins[optin_id], languages)
            for optin_id in by_channel.get(channel, by_channel.get(ANY_CHANNEL, ()))
            if statuses.get(optin_id, {}).get("status", "unknown") in ASKED_STATUSES
        ],
        "fields": [
            _prompted_field(fields[field_id], languages, answers.get(field_id))
            for field_id in state["form_fields"].get(form, ())
        ],
    }


_UNCONFIGURED = empty_config()  # only read


def _prompted_optin(optin: Mapping[str, Any], languages: tuple[str | None, ...]) -> dict[str, Any]:
    return {
        "optin": optin["id"],
        "kind": optin["kind"],
        "text": pick_text(optin["text"], *languages),
        "version": optin.get("version", UNVERSIONED),
        # Optional opt-ins count as a yes unless unticked; mandatory ones need an explicit answer.
        "prechecked": optin["kind"] == "optional",
    }


def _prompted_field(
    field: Mapping[str, Any], languages: tuple[str | None, ...], value: Any
) -> dict[str, Any]:
    dropdown = field["type"] == "dropdown"
    select = None
    if dropdown:
        fewest, most = select_bounds(field)
        select = {"mode": (field.get("select") or {}).get("mode", "single"), "min": fewest, "max": most}
    return {
        "field": field["id"],
        "type": field["type"],
        "label": pick_text(field["label"], *languages),
        "choices": field["choices"] if dropdown else [],
        "select": select,
        "required": field.get("required", False),
        "value": value,
    }


def checkout_key(tenant: str, contact: str | None, checkout: str) -> str:
    """The record key of a checkout, and of its prompt: the contact's, or `~checkout` when anonymous."""
    return contact_key(tenant, contact) if contact else key(tenant, f"~{checkout}")


def on_checkout_started(
    config_state: ConfigState | None,
    checkout: dict[str, Any],
    event_optin_set: str | None,
    contact_statuses: Mapping[str, Mapping[str, Any]] | None,
    contact_fields: Mapping[str, Any] | None,
    now: datetime,
) -> Out:
    """The `checkout.prompted` record answering a `checkout.started` record (same id on redelivery)."""
    data = checkout["data"]
    tenant = checkout["tenant"]
    contact = data.get("contact")
    prompt = prompt_for(
        config_state,
        event=data["event"],
        event_optin_set=event_optin_set,
        channel=data["channel"],
        language=data.get("language"),
        contact=contact,
        contact_statuses=contact_statuses if contact else None,
        contact_fields=contact_fields if contact else None,
    )
    record = make_event(
        "checkout.prompted",
        tenant,
        {"checkout": data["checkout"], **prompt},
        source=SOURCE,
        id_=derived_id(checkout, "prompted"),
        time=isotime(now),
    )
    return Out(PROMPTS, checkout_key(tenant, contact, data["checkout"]), record)


def event_optin_set_entry(event: Mapping[str, Any]) -> tuple[str, str | None]:
    """The event -> opt-in set table entry of an `event.scheduled` or `event.cancelled` record: its
    key `{tenant}/{event}` and the set id, None meaning drop the entry (the default set applies)."""
    data = event["data"]
    optin_set = data.get("optin_set") if event["type"] == "event.scheduled" else None
    return key(event["tenant"], data["event"]), optin_set
