"""Contact profiles: what the segments stage knows of one contact, and the CSV export of many.

State per `{tenant}/{contact}` (a `ContactState`): `{"profile": <contact.profile data>, "details_at":
<time of the record whose details are in the profile, or None>}`. Every change to the profile is
published on `contacts.state` (compacted); a record that changes nothing publishes nothing.

Choices where the contract is silent:
- Details (e-mail, names, phone, language): the latest non-empty value wins, "latest" by the
  records' own `time`. An older record (a replay, a late backfill) only fills details still empty.
- `contact.update` may carry details next to `fields` (a profile page edits both); it creates the
  profile of a contact not seen before (an account registered before any purchase). Its optional
  `form` says where the answers were given (`registration`, `checkout`, `profile`); none is a
  back-office change, which may set internal fields.
- Custom-field answers are judged by `workers.fields.validate_answers`; only the answers given are
  judged (an answer left out keeps the stored one; a null answer clears it). Each invalid answer is
  left out and becomes a rejection reason naming the field; the valid ones are stored.
- `contact.filter` names a filter and item that must exist in `config.filter`; a bulk naming an
  unknown one is rejected whole. A contact without a profile is skipped with a rejection reason.
- The e-mail index (see `family`) is kept from here: whenever a profile's e-mail or names change,
  the profile's partition sends claim/release records to the index's partition.
- Export: several `filter` values must all hold, several `consent` values too; `ids` selects any
  of the ids listed. List answers are joined with ", ", yes/no as "yes"/"no". A cell that a
  spreadsheet would run as a formula is prefixed with `'` (a phone number such as +32... is left).
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.envelope import CONTACTS_REPLIES, CONTACTS_STATE, Out, contact_key, derived_id, key, make_event, parse_time
from workers.fields import normalise_answers, validate_answers
from workers.topics import SEGMENTS_BY_EMAIL as BY_EMAIL
from workers.topics import SEGMENTS_FANOUT as FANOUT

SOURCE = "/usher/segments"
# Internal record types on those topics.
EMAIL_CLAIMED = "segments.email-claimed"
EMAIL_RELEASED = "segments.email-released"
FILTER_CONTACT = "segments.filter-contact"

DETAILS = ("email", "first_name", "last_name", "phone", "language")
EXPORT_COLUMNS = ("contact", *DETAILS)
ERROR_MESSAGES = {
    "email_in_use_name_mismatch": "This e-mail address is already in use and does not match the name entered.",
    "friends_family_disabled": "Friends and family is not available on this sales channel.",
    "already_linked": "This contact is already linked to you.",
    "self_link": "You cannot link yourself.",
    "unknown_contact": "This contact is not known here.",
    "invalid": "Some answers are not valid.",
}
# Cells a spreadsheet would evaluate; "+" or "-" followed only by digits and spaces is a number.
_FORMULA_START = re.compile(r"^(?:[=@\t\r]|[+-](?![\d ]*$))")

ContactState = dict[str, Any]
Config = Mapping[str, Mapping[str, Any]]


@dataclass(slots=True)
class Outcome:
    """What one rule decided: the new state (None: nothing to keep), the records to produce, and
    reasons for `record.rejected` records the agent builds with `workers.edge.rejection` (it
    knows the input's topic, partition and offset)."""

    state: Any
    outs: list[Out] = field(default_factory=list)
    rejections: list[str] = field(default_factory=list)


def new_profile(contact: str) -> dict[str, Any]:
    return {
        "contact": contact,
        **dict.fromkeys(DETAILS),
        "fields": {},
        "filters": [],
        "links": {"children": [], "parents": []},
        "orders": [],
    }


def profile_of(state: ContactState | None) -> dict[str, Any] | None:
    return state["profile"] if state else None


def fold(text: str | None) -> str:
    """A name compared case- and accent-insensitively, spaces collapsed ("Zoë  Éluard" = "zoe eluard")."""
    decomposed = unicodedata.normalize("NFKD", text or "")
    return " ".join("".join(c for c in decomposed if not unicodedata.combining(c)).casefold().split())


def email_key(email: str) -> str:
    """The e-mail as the index keys it: mailbox names are case-insensitive in practice."""
    return email.strip().lower()


def caused(type_: str, cause: Mapping[str, Any], data: dict[str, Any], suffix: str) -> dict[str, Any]:
    """A record of this stage caused by `cause`: its tenant and time, an id derived from it (a
    repeat of the cause repeats the record, which the next stage's dedupe then drops)."""
    return make_event(type_, cause["tenant"], data, source=SOURCE, id_=derived_id(cause, suffix), time=cause["time"])


def reply(contact: str, request: str, cause: Mapping[str, Any], error: str | None = None, **details: Any) -> Out:
    """The `contact.replied` answering command `request`, to the requester `contact`."""
    data: dict[str, Any] = {"request": request, "ok": error is None, **details}
    if error is not None:
        data |= {"error": error, "message": ERROR_MESSAGES[error]}
    return Out(CONTACTS_REPLIES, contact_key(cause["tenant"], contact), caused("contact.replied", cause, data, "reply"))


def commit(
    before: ContactState | None, profile: dict[str, Any], cause: Mapping[str, Any], details_at: str | None = None
) -> Outcome:
    """The state holding `profile` and, when the profile changed, its `contact.profile` record and
    the e-mail index updates."""
    old = profile_of(before)
    state = {"profile": profile, "details_at": details_at or (before or {}).get("details_at")}
    if profile == old:
        return Outcome(state)
    contact = profile["contact"]
    published = Out(
        CONTACTS_STATE,
        contact_key(cause["tenant"], contact),
        caused("contact.profile", cause, profile, f"profile/{contact}"),
    )
    return Outcome(state, [published, *_index_updates(old, profile, cause)])


def _index_updates(old: Mapping[str, Any] | None, new: Mapping[str, Any], cause: Mapping[str, Any]) -> list[Out]:
    old_email = email_key(old["email"]) if old and old["email"] else None
    new_email = email_key(new["email"]) if new["email"] else None
    names_changed = old is None or (old["first_name"], old["last_name"]) != (new["first_name"], new["last_name"])
    contact = new["contact"]
    outs = []
    if old_email and old_email != new_email:
        outs.append(_index_record(EMAIL_RELEASED, {"email": old_email, "contact": contact}, cause))
    if new_email and (old_email != new_email or names_changed):
        claim = {"email": new_email, "contact": contact, "first_name": new["first_name"], "last_name": new["last_name"]}
        outs.append(_index_record(EMAIL_CLAIMED, claim, cause))
    return outs


def _index_record(type_: str, data: dict[str, Any], cause: Mapping[str, Any]) -> Out:
    return Out(BY_EMAIL, key(cause["tenant"], data["email"]), caused(type_, cause, data, f"{type_}/{data['email']}"))


def _merge_details(
    profile: dict[str, Any], details: Mapping[str, Any], at: str, details_at: str | None
) -> tuple[dict[str, Any], str | None]:
    """Non-empty details of a record at time `at` merged in: they win unless the profile holds
    details of a newer record, in which case they only fill gaps."""
    given = {name: details[name] for name in DETAILS if details.get(name)}
    if not given:
        return profile, details_at
    if details_at is None or parse_time(at) >= parse_time(details_at):
        return profile | given, at
    return profile | {name: value for name, value in given.items() if not profile[name]}, details_at


def _apply_answers(
    profile: dict[str, Any], answers: Mapping[str, Any], fields_config: Config, form: str | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The profile with the valid answers stored, and field -> reason for each invalid one."""
    problems = validate_answers(fields_config, answers, form, profile["language"])
    errors = {field_id: problems[field_id] for field_id in answers if field_id in problems}
    valid = normalise_answers(fields_config, {f: v for f, v in answers.items() if f not in errors})
    fields = {**profile["fields"], **valid}
    return profile | {"fields": {f: v for f, v in fields.items() if v is not None}}, errors


def _field_rejections(errors: Mapping[str, str]) -> list[str]:
    return [f"custom field {field_id!r}: {reason}" for field_id, reason in errors.items()]


def apply_order_placed(state: ContactState | None, event: Mapping[str, Any], fields_config: Config) -> Outcome:
    """`order.placed`: the buyer gets (or updates) a profile holding the order and its answers."""
    data = event["data"]
    buyer = data["contact"]
    profile = profile_of(state) or new_profile(buyer["id"])
    profile, details_at = _merge_details(profile, buyer, event["time"], (state or {}).get("details_at"))
    profile, errors = _apply_answers(profile, data.get("fields") or {}, fields_config, "checkout")
    if all(order["order"] != data["order"] for order in profile["orders"]):
        order = {
            "order": data["order"],
            "event": data["event"],
            "channel": data["channel"],
            "tickets": data.get("tickets") or [],
            "products": data.get("products") or [],
            "cancelled": False,
        }
        profile = profile | {"orders": [*profile["orders"], order]}
    outcome = commit(state, profile, event, details_at)
    outcome.rejections = _field_rejections(errors)
    return outcome


def apply_order_cancelled(state: ContactState | None, event: Mapping[str, Any]) -> Outcome:
    """`order.cancelled` (keyed by its buyer): the order stays in the profile, marked cancelled."""
    order_id = event["data"]["order"]
    profile = profile_of(state)
    if profile is None or all(order["order"] != order_id for order in profile["orders"]):
        return Outcome(state, rejections=[f"order {order_id!r} is not known for this contact"])
    orders = [order | {"cancelled": True} if order["order"] == order_id else order for order in profile["orders"]]
    return commit(state, profile | {"orders": orders}, event)


def apply_contact_update(state: ContactState | None, event: Mapping[str, Any], fields_config: Config) -> Outcome:
    """`contact.update`: details and custom-field answers; replies ok, or `invalid` naming the
    fields whose answers were not stored."""
    data = event["data"]
    profile = profile_of(state) or new_profile(data["contact"])
    profile, details_at = _merge_details(profile, data, event["time"], (state or {}).get("details_at"))
    profile, errors = _apply_answers(profile, data.get("fields") or {}, fields_config, data.get("form"))
    outcome = commit(state, profile, event, details_at)
    if errors:
        answer = reply(data["contact"], event["id"], event, "invalid", errors=errors)
        outcome.rejections = _field_rejections(errors)
    else:
        answer = reply(data["contact"], event["id"], event)
    outcome.outs.append(answer)
    return outcome


def fan_out_filter(event: Mapping[str, Any], filters_config: Config) -> Outcome:
    """`contact.filter` (keyed `{tenant}/~bulk/{id}`): one `segments.filter-contact` per contact,
    keyed by that contact on the fan-out topic. Stateless (the outcome's state is None)."""
    data = event["data"]
    filter_config = filters_config.get(data["filter"])
    if filter_config is None or all(item["id"] != data["item"] for item in filter_config.get("items", [])):
        return Outcome(None, rejections=[f"filter item {data['filter']}:{data['item']} is not configured"])
    tenant = event["tenant"]
    outs = []
    for contact in dict.fromkeys(data["contacts"]):
        step = {
            "contact": contact,
            "filter": data["filter"],
            "item": data["item"],
            "op": data["op"],
            "bulk": event["id"],
        }
        outs.append(Out(FANOUT, contact_key(tenant, contact), caused(FILTER_CONTACT, event, step, f"filter/{contact}")))
    return Outcome(None, outs)


def apply_filter(state: ContactState | None, event: Mapping[str, Any]) -> Outcome:
    """`segments.filter-contact`: add or remove one `filter:item` on the contact's profile."""
    data = event["data"]
    profile = profile_of(state)
    if profile is None:
        return Outcome(state, rejections=[f"contact {data['contact']!r} is not known; filter not applied"])
    tag = f"{data['filter']}:{data['item']}"
    others = [existing for existing in profile["filters"] if existing != tag]
    filters = [*others, tag] if data["op"] == "add" else others
    return commit(state, profile | {"filters": filters}, event)


def _consent_status(consents: Mapping[str, Any] | None, optin: str) -> str:
    record = ((consents or {}).get("optins") or {}).get(optin)
    return record["status"] if record else "unknown"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return "'" + text if _FORMULA_START.match(text) else text


def export_rows(
    contacts: Iterable[tuple[Mapping[str, Any], Mapping[str, Any] | None]],
    *,
    field_columns: Sequence[str],
    filter_columns: Sequence[str],
    filters: Sequence[str] = (),
    consents: Sequence[str] = (),
    ids: Sequence[str] = (),
) -> str:
    """CSV of (profile, consent.status data or None) pairs: a header row, then one row per
    selected contact. Columns: `contact,email,first_name,last_name,phone,language`, then
    `field:<id>` per custom field, then `filter:<id>` (its items on the contact) per filter.
    Selection, as the export endpoint's query: `filters` like "audience:vip" (all must be on the
    contact), `consents` like "newsletter:opted_in" (all must hold; a bare "newsletter" means
    opted in), `ids` (any of them)."""
    wanted_ids = set(ids)
    wanted_consents = [(optin, status or "opted_in") for optin, _, status in (item.partition(":") for item in consents)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*EXPORT_COLUMNS, *(f"field:{f}" for f in field_columns), *(f"filter:{f}" for f in filter_columns)])
    for profile, consent in contacts:
        if wanted_ids and profile["contact"] not in wanted_ids:
            continue
        if not set(filters) <= set(profile["filters"]):
            continue
        if any(_consent_status(consent, optin) != status for optin, status in wanted_consents):
            continue
        items = [tag.split(":", 1) for tag in profile["filters"]]
        writer.writerow(
            [
                *(_cell(profile[column]) for column in EXPORT_COLUMNS),
                *(_cell(profile["fields"].get(f)) for f in field_columns),
                *(_cell([item for name, item in items if name == f] or None) for f in filter_columns),
            ]
        )
    return buffer.getvalue()
