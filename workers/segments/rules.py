"""The segments stage's entry points: which rule handles which record, by the key it arrives on.

- Keyed `{tenant}/{contact}` (`ticketing.orders`, `ticketing.commands`, `usher.segments.fanout`):
  `apply_contact_record(state, event, ...)` with the contact's `ContactState`.
- Keyed `{tenant}/~bulk/{id}` (`contact.filter` on `ticketing.commands`): `profiles.fan_out_filter`.
- Keyed `{tenant}/{email}` (`usher.segments.by-email`): `family.apply_email_index` with the
  e-mail's `EmailIndex`.
- Messages and events (`ticketing.messages`, `ticketing.events`), consent (`consent.state`) and
  every profile change feed `audience.update_membership` for each (message, contact) concerned,
  and a timer calls `audience.due_request` for the members of messages whose window is open.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from workers.segments import family, profiles
from workers.segments.profiles import ContactState, Outcome

# Types `apply_contact_record` takes; other types on the same topics belong to other stages.
CONTACT_TYPES = frozenset(
    {
        "order.placed",
        "order.cancelled",
        "contact.update",
        "contact.link",
        "contact.unlink",
        profiles.FILTER_CONTACT,
        family.LINK_RESOLVED,
        family.LINK_PARENT,
        family.LINK_REMOVED,
    }
)


def apply_contact_record(
    state: ContactState | None,
    event: Mapping[str, Any],
    *,
    settings: Mapping[str, Any] | None,
    fields_config: profiles.Config,
) -> Outcome:
    """One record keyed by a contact, given that contact's state. `settings` is the tenant's
    `config.settings` data, `fields_config` maps custom-field id to `config.custom-field` data."""
    match event["type"]:
        case "order.placed":
            return profiles.apply_order_placed(state, event, fields_config)
        case "order.cancelled":
            return profiles.apply_order_cancelled(state, event)
        case "contact.update":
            return profiles.apply_contact_update(state, event, fields_config)
        case "contact.link":
            return family.request_link(state, event, settings)
        case "contact.unlink":
            return family.request_unlink(state, event)
        case profiles.FILTER_CONTACT:
            return profiles.apply_filter(state, event)
        case family.LINK_RESOLVED:
            return family.apply_link_resolved(state, event)
        case family.LINK_PARENT:
            return family.apply_link_parent(state, event)
        case family.LINK_REMOVED:
            return family.apply_link_removed(state, event)
    raise ValueError(f"not a contact record of the segments stage: {event['type']}")
