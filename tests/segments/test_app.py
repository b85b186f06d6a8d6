"""The segments stage against the real (embedded) broker: profiles, friends and family, segments,
sending event messages, and its HTTP endpoints."""
from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from typing import Any

from harness import http, unique

from workers import envelope, schemas
from workers.segments.profiles import ERROR_MESSAGES

from .conftest import FIELDS, SegmentsDriver


def eventually(answer: Callable[[], Any], timeout: float = 30) -> Any:
    """`answer()` once it is truthy."""
    deadline = time.monotonic() + timeout
    while not (found := answer()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)
    return found


def csv_rows(text: str) -> dict[str, dict[str, str]]:
    return {row["contact"]: row for row in csv.DictReader(io.StringIO(text))}


def test_orders_make_the_profile_the_api_answers(segments: SegmentsDriver, api_tokens: dict[str, str]) -> None:
    # auth1 is shared with other tests: ids of our own, fields included.
    tenant, contact = "auth1", unique("c")
    diet, notes = unique("diet"), unique("notes")
    segments.configure(tenant, fields={diet: FIELDS["diet"] | {"id": diet}, notes: FIELDS["notes"] | {"id": notes}})
    first = segments.order(tenant, contact, fields={diet: ["vegan"]}, products=["parking"])
    segments.order(tenant, contact, fields={diet: ["fish"]})

    profile = segments.profile(tenant, contact, lambda p: len(p["orders"]) == 2)
    assert (profile["email"], profile["first_name"], profile["last_name"], profile["language"]) == (f"{contact}@example.com", "Ann", "Peeters", "nl")
    assert profile["fields"] == {diet: ["vegan"]}
    assert profile["orders"][0] == {
        "order": first["data"]["order"], "event": "ev-1", "channel": "web", "products": ["parking"], "cancelled": False,
        "tickets": [{"type": "adult", "price_rank": "A", "row": "5", "seat": "12"}],
    }
    # The invalid answer is not stored, and is dead-lettered naming the field.
    [letter] = segments.rejections(tenant, lambda found: [r for r in found if diet in r["reason"]])
    assert letter["topic"] == envelope.ORDERS and letter["key"] == f"{tenant}/{contact}"

    segments.cancel(tenant, contact, first)
    profile = segments.profile(tenant, contact, lambda p: p["orders"][0]["cancelled"])
    assert [order["cancelled"] for order in profile["orders"]] == [True, False]

    # A back-office update (no form) may set an internal field; the profile view does not show it.
    segments.command(tenant, "contact.update", {"contact": contact, "fields": {notes: "wheelchair"}})
    segments.profile(tenant, contact, lambda p: notes in p["fields"])
    url = f"{segments.worker.url}/v1/contacts/{tenant}/{contact}"
    status, full, _ = http("GET", url, token=api_tokens["auth1"])
    assert status == 200 and full["fields"] == {diet: ["vegan"], notes: "wheelchair"} and len(full["orders"]) == 2
    status, shown, _ = http("GET", f"{url}?view=profile", token=api_tokens["auth1"])
    assert status == 200 and shown["fields"] == {diet: ["vegan"]} and shown["email"] == full["email"]

    assert http("GET", url)[0] == 401
    assert http("GET", url, token=api_tokens["auth2"])[0] == 403
    status, body, _ = http("GET", f"{segments.worker.url}/v1/contacts/{tenant}/{unique('c')}", token=api_tokens["auth1"])
    assert (status, body["error"]) == (404, "unknown_contact")


def test_contact_update_stores_valid_answers_and_replies_invalid_naming_the_field(segments: SegmentsDriver, tenant: str) -> None:
    segments.configure(tenant)
    # An update creates the profile of a contact not seen before (an account registered first).
    ok = segments.command(tenant, "contact.update", {"contact": "c-1", "first_name": "Bo", "email": "bo@example.com",
                                                     "form": "profile", "fields": {"diet": ["vegetarian"]}})
    assert segments.reply(tenant, ok) == {"request": ok["id"], "ok": True}
    profile = segments.profile(tenant, "c-1")
    assert (profile["first_name"], profile["email"], profile["fields"]) == ("Bo", "bo@example.com", {"diet": ["vegetarian"]})

    bad = segments.command(tenant, "contact.update", {"contact": "c-1", "last_name": "Boon", "form": "profile",
                                                      "fields": {"diet": ["fish"]}})
    answer = segments.reply(tenant, bad)
    assert (answer["ok"], answer["error"], answer["message"]) == (False, "invalid", ERROR_MESSAGES["invalid"])
    assert list(answer["errors"]) == ["diet"]
    [letter] = segments.rejections(tenant, bool)
    assert "'diet'" in letter["reason"] and letter["topic"] == envelope.COMMANDS
    # The rest of the update is kept; the invalid answer is not.
    profile = segments.profile(tenant, "c-1", lambda p: p["last_name"] == "Boon")
    assert profile["fields"] == {"diet": ["vegetarian"]}


def test_contact_filter_tags_each_listed_known_contact(segments: SegmentsDriver, tenant: str) -> None:
    segments.configure(tenant, filters={"audience": ["vip", "press"]})
    for contact in ("c-1", "c-2"):
        segments.order(tenant, contact)
        segments.profile(tenant, contact)
    bulk = {"contacts": ["c-1", "c-2", "c-3"], "filter": "audience", "item": "vip", "op": "add"}
    segments.command(tenant, "contact.filter", bulk, key=f"{tenant}/~bulk/{unique('b')}")
    for contact in ("c-1", "c-2"):
        assert segments.profile(tenant, contact, lambda p: p["filters"])["filters"] == ["audience:vip"]
    segments.rejections(tenant, lambda found: [r for r in found if "'c-3' is not known" in r["reason"]])

    remove = bulk | {"contacts": ["c-1"], "op": "remove"}
    segments.command(tenant, "contact.filter", remove, key=f"{tenant}/~bulk/{unique('b')}")
    assert segments.profile(tenant, "c-1", lambda p: not p["filters"])["filters"] == []
    unknown = bulk | {"item": "gold"}
    segments.command(tenant, "contact.filter", unknown, key=f"{tenant}/~bulk/{unique('b')}")
    segments.rejections(tenant, lambda found: [r for r in found if "audience:gold is not configured" in r["reason"]])
    assert segments.profile(tenant, "c-2")["filters"] == ["audience:vip"]


def test_linking_a_new_email_creates_the_contact_and_welcomes_it(segments: SegmentsDriver, tenant: str) -> None:
    segments.configure(tenant)
    segments.order(tenant, "c-1")
    segments.profile(tenant, "c-1")
    link = segments.command(tenant, "contact.link", {"contact": "c-1", "channel": "web", "email": "Bob@Example.com",
                                                     "first_name": "Bob", "last_name": "Peeters"})
    answer = segments.reply(tenant, link)
    assert (answer["ok"], answer["created"]) == (True, True)
    child = answer["linked"]

    assert segments.profile(tenant, "c-1", lambda p: p["links"]["children"])["links"] == {"children": [child], "parents": []}
    created = segments.profile(tenant, child)
    assert (created["email"], created["first_name"], created["last_name"], created["language"]) == ("bob@example.com", "Bob", "Peeters", "nl")
    assert created["links"] == {"children": [], "parents": ["c-1"]}
    [welcome] = segments.wait(envelope.OUTBOX, tenant, "message.requested", bool)
    assert (welcome["kind"], welcome["contact"], welcome["to"], welcome["language"]) == ("account-created", child, {"email": "bob@example.com"}, "nl")
    assert (welcome["vars"]["parent_first_name"], welcome["vars"]["first_name"]) == ("Ann", "Bob")


def test_linking_an_existing_email_needs_matching_names_and_unlinking_drops_both_sides(segments: SegmentsDriver, tenant: str) -> None:
    segments.configure(tenant)
    segments.order(tenant, "c-1", email="ann@example.com")
    segments.order(tenant, "c-2", first_name="Zoë", last_name="Éluard", email="zoe@example.com")
    segments.order(tenant, "c-3", first_name="Eve", email="eve@example.com")
    for contact in ("c-1", "c-2", "c-3"):
        segments.profile(tenant, contact)

    def link(requester: str, email: str, first_name: str, last_name: str, channel: str = "web") -> dict[str, Any]:
        data = {"contact": requester, "channel": channel, "email": email, "first_name": first_name, "last_name": last_name}
        return segments.reply(tenant, segments.command(tenant, "contact.link", data))

    # Names match case-, accent- and spacing-insensitively.
    assert link("c-1", "zoe@example.com", "zoe", " ELUARD ") | {"request": None} == {"request": None, "ok": True, "linked": "c-2", "created": False}
    assert segments.profile(tenant, "c-2", lambda p: p["links"]["parents"])["links"]["parents"] == ["c-1"]
    assert link("c-1", "zoe@example.com", "Zoë", "Éluard")["error"] == "already_linked"
    mismatch = link("c-3", "zoe@example.com", "Zoe", "Other")
    assert (mismatch["ok"], mismatch["error"]) == (False, "email_in_use_name_mismatch")
    assert mismatch["message"] == "This e-mail address is already in use and does not match the name entered."
    assert link("c-1", "ann@example.com", "Ann", "Peeters")["error"] == "self_link"
    assert link("c-1", "new@example.com", "New", "One", channel="box-office")["error"] == "friends_family_disabled"
    # Nothing was created or welcomed by any of those.
    assert segments.kafka.events(envelope.OUTBOX, tenant, "message.requested") == []

    unlink = segments.command(tenant, "contact.unlink", {"contact": "c-1", "other": "c-2"})
    assert segments.reply(tenant, unlink)["ok"] is True
    assert segments.profile(tenant, "c-1", lambda p: not p["links"]["children"])["links"] == {"children": [], "parents": []}
    assert segments.profile(tenant, "c-2", lambda p: not p["links"]["parents"])["links"] == {"children": [], "parents": []}
    again = segments.command(tenant, "contact.unlink", {"contact": "c-1", "other": "c-2"})
    assert segments.reply(tenant, again)["error"] == "unknown_contact"


def test_segments_follow_products_selection_and_consent(segments: SegmentsDriver, tenant: str) -> None:
    segments.configure(tenant, optin_set=["newsletter"])
    segments.schedule_event(tenant, "ev-1")
    segments.define_message(tenant, "m-with", "ev-1", audience={"type": "with_product", "products": ["parking"]})
    segments.define_message(tenant, "m-without", "ev-1", audience={"type": "without_product", "products": ["parking"]})
    segments.define_message(tenant, "m-optin", "ev-1", consent={"mode": "select", "include": ["newsletter"], "exclude": []})
    parking = segments.order(tenant, "c-a", products=["parking"])
    segments.order(tenant, "c-b", tickets=[{"type": "vip", "price_rank": "A", "row": "1", "seat": "1"}])

    assert segments.membership(tenant, "m-with", "c-a", bool)[-1] == {
        "message": "m-with", "contact": "c-a", "member": True, "orders": [parking["data"]["order"]], "language": "nl"}
    segments.membership(tenant, "m-without", "c-b", lambda m: m["member"])
    # A message defined after the orders is judged for the event's buyers by the stage's clock.
    segments.define_message(tenant, "m-vip", "ev-1", audience={"type": "selection", "selection": {"ticket_types": ["vip"]}})
    segments.define_message(tenant, "m-all-optins", "ev-1", consent={"mode": "all"})
    segments.membership(tenant, "m-vip", "c-b", lambda m: m["member"])

    # Consent decides once the consent stage has published it.
    segments.command(tenant, "consent.set", {"contact": "c-a", "optin": "newsletter", "status": "opted_in", "channel": "back-office"})
    segments.membership(tenant, "m-optin", "c-a", lambda m: m["member"])
    segments.membership(tenant, "m-all-optins", "c-a", lambda m: m["member"])
    segments.command(tenant, "consent.set", {"contact": "c-a", "optin": "newsletter", "status": "opted_out", "channel": "back-office"})
    segments.membership(tenant, "m-optin", "c-a", lambda m: not m["member"])

    # Leaving: the parking order is cancelled.
    segments.cancel(tenant, "c-a", parking)
    assert segments.membership(tenant, "m-with", "c-a", lambda m: not m["member"])[-1]["orders"] == []
    joined = segments.wait(envelope.SEGMENTS_MEMBERS, tenant, "segment.member", bool)
    members = {(m["message"], m["contact"]) for m in joined if m["member"]}
    assert ("m-with", "c-b") not in members and ("m-vip", "c-a") not in members and ("m-without", "c-a") not in members
    # Nothing is sent a month before the event.
    assert segments.kafka.events(envelope.OUTBOX, tenant, "message.requested") == []


def test_a_message_sent_now_is_requested_once_per_member(segments: SegmentsDriver, api_tokens: dict[str, str]) -> None:
    tenant, message, event_id = "auth2", unique("m"), unique("ev")
    first, late = unique("c"), unique("c")
    segments.configure(tenant)
    segments.schedule_event(tenant, event_id)
    segments.order(tenant, first, event_id=event_id)
    segments.profile(tenant, first)
    defined = segments.define_message(tenant, message, event_id, when="now")

    def requests_of(contact: str) -> list[dict[str, Any]]:
        return [r for r in segments.kafka.events(envelope.OUTBOX, tenant, "message.requested")
                if r["data"]["contact"] == contact and r["data"]["message"] == message]

    [request] = eventually(lambda: requests_of(first))
    assert schemas.problem(request) is None
    assert request["data"] | {"request": None, "vars": None} == {
        "request": None, "vars": None, "kind": "event-message", "message": message, "contact": first, "channel": "email",
        "to": {"email": f"{first}@example.com", "phone": "+32470000000"}, "layout": "event-info", "language": "nl"}
    assert request["data"]["vars"]["custom_text"] == "Doors open at 19:00"

    # A buyer after the message went out gets it too.
    segments.order(tenant, late, event_id=event_id)
    eventually(lambda: requests_of(late))
    # The definition replayed, then updated: judged again (the language changes), sent no more.
    segments.publish_and_wait([(envelope.MESSAGES, f"{tenant}/{message}", defined)])
    segments.define_message(tenant, message, event_id, when="now", send_in="en")
    segments.membership(tenant, message, first, lambda m: m["language"] == "en")
    assert len(requests_of(first)) == 1 and len(requests_of(late)) == 1

    url = f"{segments.worker.url}/v1/messages/{tenant}/{message}/recipients"
    status, body, _ = http("GET", url, token=api_tokens["auth2"])
    assert status == 200
    assert body == {"message": message, "total": 2, "items": sorted([{"contact": first, "orders": 1}, {"contact": late, "orders": 1}], key=lambda i: i["contact"])}
    status, page, _ = http("GET", f"{url}?page=2&size=1", token=api_tokens["auth2"])
    assert (page["total"], page["items"]) == (2, body["items"][1:])
    assert http("GET", url)[0] == 401
    assert http("GET", url, token=api_tokens["auth1"])[0] == 403
    status, missing, _ = http("GET", f"{segments.worker.url}/v1/messages/{tenant}/{unique('m')}/recipients", token=api_tokens["auth2"])
    assert (status, missing["error"]) == (404, "unknown_message")


def test_export_csv_selects_by_filter_consent_and_id(segments: SegmentsDriver, api_tokens: dict[str, str]) -> None:
    tenant, token = "auth3", api_tokens["auth3"]
    tag = unique("f")
    vip, fan, other = unique("c"), unique("c"), unique("c")
    segments.configure(tenant, filters={tag: ["vip"]})
    for contact in (vip, fan, other):
        segments.order(tenant, contact, first_name="=HYPERLINK(1)" if contact == other else "Ann")
        segments.profile(tenant, contact)
    segments.command(tenant, "contact.filter", {"contacts": [vip], "filter": tag, "item": "vip", "op": "add"}, key=f"{tenant}/~bulk/{unique('b')}")
    segments.profile(tenant, vip, lambda p: p["filters"])
    segments.command(tenant, "consent.set", {"contact": fan, "optin": "newsletter", "status": "opted_in", "channel": "back-office"})
    base = f"{segments.worker.url}/v1/contacts/{tenant}/export.csv"

    status, text, headers = http("GET", f"{base}?filter={tag}:vip", token=token)
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    assert text.splitlines()[0].startswith("contact,email,first_name,last_name,phone,language,")
    rows = csv_rows(text)
    assert list(rows) == [vip] and rows[vip][f"filter:{tag}"] == "vip" and rows[vip]["email"] == f"{vip}@example.com"

    opted_in = f"{base}?consent=newsletter:opted_in&id={vip}&id={fan}&id={other}"
    assert list(eventually(lambda: csv_rows(http("GET", opted_in, token=token)[1]))) == [fan]
    rows = csv_rows(http("GET", f"{base}?id={vip}&id={other}", token=token)[1])
    assert sorted(rows) == sorted([vip, other])
    # A spreadsheet would run this as a formula: it is quoted.
    assert rows[other]["first_name"] == "'=HYPERLINK(1)"
    assert http("GET", base)[0] == 401
    assert http("GET", base, token=api_tokens["auth1"])[0] == 403
