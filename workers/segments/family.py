"""Friends and family: directional links between contacts, made and removed by the contact.

The requester of `contact.link` is the parent, the contact found or created by e-mail the child.
Finding a contact by e-mail crosses keys (the requester's state lives under `{tenant}/{requester}`,
the e-mail's owner under another key), so a link takes steps through the two internal topics,
each step a pure function of the state under its own key:

1. `request_link` on the requester's partition (`contact.link` on `ticketing.commands`): checks
   the sales channel (`friends_family_channels` in `config.settings`, else
   `friends_family_disabled`), that the requester is known (`unknown_contact`) and is not linking
   their own e-mail (`self_link`); then sends `segments.link-lookup` to `usher.segments.by-email`,
   keyed `{tenant}/{email}`.
2. `apply_email_index` on the e-mail's partition. The index (`EmailIndex` per `{tenant}/{email}`:
   `{"holders": [{"contact", "first_name", "last_name", "created_by"}]}`) is kept by claim and
   release records that every profile change sends (see `profiles`). A look-up links the first
   holder whose first and last name both match, compared case-, accent- and spacing-insensitively
   (a shop form is no place to insist on "Zoë" over "Zoe"); holders but no match replies
   `email_in_use_name_mismatch`; no holder creates the contact: its id is derived from tenant and
   e-mail (`new_contact_id`), and it becomes a holder at once so a second look-up finds it.
   Either way it sends `segments.link-resolved` to `usher.segments.fanout`, keyed by the requester.
3. `apply_link_resolved` on the requester's partition: `self_link` or `already_linked`, else the
   requester's profile gets the child, the requester gets `contact.replied` ok with `linked` and
   `created`, and `segments.link-parent` goes to the fan-out topic keyed by the child.
4. `apply_link_parent` on the child's partition: the child's profile gets the parent (a created
   child gets its profile here, with the e-mail and names given and the requester's language), and
   a created child gets a `message.requested` of kind `account-created` (in the requester's
   language, else the tenant's default language, else English: family members mostly share one).

`contact.unlink` takes two steps: `request_unlink` removes the link on the requester's side (either
direction: a contact may drop a parent as well as a child; `unknown_contact` when there is no link)
and replies; `apply_link_removed` removes it on the other contact's side.

Every output id is derived from its cause, and a created contact remembers the request that
created it, so a repeated step repeats its outputs exactly.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from workers.envelope import OUTBOX, Out, contact_key, derived_id, key, make_event
from workers.segments.profiles import (
    BY_EMAIL,
    EMAIL_CLAIMED,
    EMAIL_RELEASED,
    FANOUT,
    SOURCE,
    ContactState,
    Outcome,
    caused,
    commit,
    email_key,
    fold,
    new_profile,
    profile_of,
    reply,
)

LINK_LOOKUP = "segments.link-lookup"
LINK_RESOLVED = "segments.link-resolved"
LINK_PARENT = "segments.link-parent"
LINK_REMOVED = "segments.link-removed"
ACCOUNT_CREATED_LAYOUT = "account-created"

EmailIndex = dict[str, Any]


def new_contact_id(tenant: str, email: str) -> str:
    """The id of a contact created for an e-mail: the same e-mail always gives the same id."""
    return "c-" + uuid.uuid5(uuid.NAMESPACE_URL, f"usher:contact:{tenant}/{email_key(email)}").hex


def _step(cause: Mapping[str, Any], type_: str, topic: str, record_key: str, data: dict[str, Any]) -> Out:
    return Out(topic, record_key, caused(type_, cause, data, type_))


def request_link(state: ContactState | None, event: Mapping[str, Any], settings: Mapping[str, Any] | None) -> Outcome:
    """Step 1, `contact.link` on the requester's partition."""
    data = event["data"]
    tenant, requester = event["tenant"], data["contact"]
    profile = profile_of(state)
    email = email_key(data["email"])
    if data["channel"] not in (settings or {}).get("friends_family_channels", []):
        error = "friends_family_disabled"
    elif profile is None:
        error = "unknown_contact"
    elif profile["email"] and email_key(profile["email"]) == email:
        error = "self_link"
    else:
        lookup = {
            "request": event["id"],
            "requester": requester,
            "email": email,
            "first_name": data["first_name"],
            "last_name": data["last_name"],
            "language": profile["language"] or (settings or {}).get("default_language") or "en",
        }
        return Outcome(state, [_step(event, LINK_LOOKUP, BY_EMAIL, key(tenant, email), lookup)])
    return Outcome(state, [reply(requester, event["id"], event, error)])


def _names_match(holder: Mapping[str, Any], first_name: str, last_name: str) -> bool:
    return bool(holder["first_name"] and holder["last_name"]) and (
        (fold(holder["first_name"]), fold(holder["last_name"])) == (fold(first_name), fold(last_name))
    )


def apply_email_index(state: EmailIndex | None, event: Mapping[str, Any]) -> Outcome:
    """Step 2, and the index's upkeep: every record on `usher.segments.by-email`. A None state
    in the outcome means the e-mail has no holder left (delete the key)."""
    if event["type"] not in (EMAIL_CLAIMED, EMAIL_RELEASED):
        return _resolve(state, event)
    data = event["data"]
    holders = (state or {}).get("holders", [])
    previous = next((holder for holder in holders if holder["contact"] == data["contact"]), None)
    if event["type"] == EMAIL_RELEASED:
        others = [holder for holder in holders if holder is not previous]
        return Outcome({"holders": others} if others else None)
    claim = {
        "contact": data["contact"],
        "first_name": data["first_name"],
        "last_name": data["last_name"],
        "created_by": previous["created_by"] if previous else None,
    }
    # Holders stay in the order they first claimed the e-mail: the earliest matching one is linked.
    return Outcome(
        {"holders": [claim if holder is previous else holder for holder in holders] if previous else [*holders, claim]}
    )


def _resolve(state: EmailIndex | None, event: Mapping[str, Any]) -> Outcome:
    data = event["data"]
    tenant, requester = event["tenant"], data["requester"]
    holders = (state or {}).get("holders", [])
    match = next((h for h in holders if _names_match(h, data["first_name"], data["last_name"])), None)
    if holders and match is None:
        return Outcome(state, [reply(requester, data["request"], event, "email_in_use_name_mismatch")])
    if match is None:
        match = {
            "contact": new_contact_id(tenant, data["email"]),
            "first_name": data["first_name"],
            "last_name": data["last_name"],
            "created_by": data["request"],
        }
        state = {"holders": [match]}
    resolved = {
        "request": data["request"],
        "requester": requester,
        "child": match["contact"],
        "created": match["created_by"] == data["request"],
        "email": data["email"],
        "first_name": data["first_name"],
        "last_name": data["last_name"],
        "language": data["language"],
    }
    return Outcome(state, [_step(event, LINK_RESOLVED, FANOUT, contact_key(tenant, requester), resolved)])


def apply_link_resolved(state: ContactState | None, event: Mapping[str, Any]) -> Outcome:
    """Step 3, `segments.link-resolved` on the requester's partition."""
    data = event["data"]
    tenant, requester, child = event["tenant"], data["requester"], data["child"]
    profile = profile_of(state)
    if profile is None:
        return Outcome(state, [reply(requester, data["request"], event, "unknown_contact")])
    links = profile["links"]
    if child == requester:
        return Outcome(state, [reply(requester, data["request"], event, "self_link")])
    if child in links["children"]:
        return Outcome(state, [reply(requester, data["request"], event, "already_linked")])
    outcome = commit(state, profile | {"links": links | {"children": [*links["children"], child]}}, event)
    parent = {**data, "parent_first_name": profile["first_name"], "parent_last_name": profile["last_name"]}
    outcome.outs += [
        reply(requester, data["request"], event, linked=child, created=data["created"]),
        _step(event, LINK_PARENT, FANOUT, contact_key(tenant, child), parent),
    ]
    return outcome


def apply_link_parent(state: ContactState | None, event: Mapping[str, Any]) -> Outcome:
    """Step 4, `segments.link-parent` on the child's partition."""
    data = event["data"]
    child, parent = data["child"], data["requester"]
    profile = profile_of(state)
    details_at = None
    if profile is None:
        details = {name: data[name] for name in ("email", "first_name", "last_name", "language")}
        profile, details_at = new_profile(child) | details, event["time"]
    links = profile["links"]
    if parent not in links["parents"]:
        profile = profile | {"links": links | {"parents": [*links["parents"], parent]}}
    outcome = commit(state, profile, event, details_at)
    if data["created"]:
        outcome.outs.append(_account_created(event, profile))
    return outcome


def _account_created(event: Mapping[str, Any], profile: Mapping[str, Any]) -> Out:
    data = event["data"]
    request = derived_id(event, ACCOUNT_CREATED_LAYOUT)
    message = {
        "request": request,
        "kind": "account-created",
        "message": None,
        "contact": profile["contact"],
        "channel": "email",
        "to": {"email": profile["email"]},
        "layout": ACCOUNT_CREATED_LAYOUT,
        "language": profile["language"] or data["language"],
        "vars": {
            "first_name": profile["first_name"],
            "last_name": profile["last_name"],
            "parent_first_name": data["parent_first_name"],
            "parent_last_name": data["parent_last_name"],
        },
    }
    record = make_event("message.requested", event["tenant"], message, source=SOURCE, id_=request, time=event["time"])
    return Out(OUTBOX, contact_key(event["tenant"], profile["contact"]), record)


def _without(links: Mapping[str, list[str]], contact: str) -> dict[str, list[str]]:
    return {side: [other for other in linked if other != contact] for side, linked in links.items()}


def request_unlink(state: ContactState | None, event: Mapping[str, Any]) -> Outcome:
    """`contact.unlink` on the requester's partition."""
    data = event["data"]
    tenant, requester, other = event["tenant"], data["contact"], data["other"]
    profile = profile_of(state)
    if profile is None or other not in profile["links"]["children"] + profile["links"]["parents"]:
        return Outcome(state, [reply(requester, event["id"], event, "unknown_contact")])
    outcome = commit(state, profile | {"links": _without(profile["links"], other)}, event)
    outcome.outs += [
        reply(requester, event["id"], event, unlinked=other),
        _step(event, LINK_REMOVED, FANOUT, contact_key(tenant, other), {"contact": other, "other": requester}),
    ]
    return outcome


def apply_link_removed(state: ContactState | None, event: Mapping[str, Any]) -> Outcome:
    """`segments.link-removed` on the other contact's partition."""
    profile = profile_of(state)
    if profile is None:
        return Outcome(state)
    return commit(state, profile | {"links": _without(profile["links"], event["data"]["other"])}, event)
