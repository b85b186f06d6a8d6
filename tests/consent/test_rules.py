from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from workers.consent.rules import (
    EXPIRED,
    USED,
    DoiPolicy,
    Links,
    apply,
    bulk_for_contact,
    confirm_command,
    confirmation_problem,
    contact_language,
    due,
    next_due_at,
    optin_text,
    public_status,
    unsubscribe_commands,
)
from workers.consent.tokens import ConfirmClaims, UnsubscribeClaims, read_confirm_token
from workers.envelope import COMMANDS, CONSENT_LOG, CONSENT_STATE, OUTBOX, Out, isotime, make_event
from workers.schemas import problem

T0 = datetime(2026, 11, 23, 18, 0, tzinfo=UTC)
LINKS = Links(secret="test-secret", base_url="http://127.0.0.1:6067")
DOI = {
    "double_opt_in": True,
    "doi_optins": ["newsletter"],
    "doi_reminder_every_days": 3,
    "doi_max_reminders": 2,
    "doi_expire_after_days": 14,
    "default_language": "en",
    "public_url": "https://usher.venue.example",
}
SINGLE = {"double_opt_in": False, "default_language": "en"}
OPTINS = {
    "newsletter": {"id": "newsletter", "kind": "optional", "purpose": "email", "version": 3,
                   "text": {"en": "Send me the newsletter", "nl": "Stuur mij de nieuwsbrief"}},
    "partners": {"id": "partners", "kind": "optional", "purpose": "email", "version": 1,
                 "text": {"en": "Offers from our partners"}},
    "sms-news": {"id": "sms-news", "kind": "optional", "purpose": "sms", "version": 1, "text": {"en": "News by SMS"}},
}


def order(
    answers: dict[str, bool],
    at: datetime = T0,
    *,
    id_: str = "evt-1",
    tenant: str = "t1",
    contact: str = "c-42",
    email: str | None = "ann@example.com",
) -> dict[str, Any]:
    person = {"id": contact, "first_name": "Ann", "last_name": "Peeters", "phone": "+32470000000", "language": "nl"}
    data = {
        "order": f"o-{id_}",
        "event": "ev-1",
        "channel": "web",
        "ip": "203.0.113.7",
        "user_agent": "Shop/1.0",
        "contact": person if email is None else {**person, "email": email},
        "tickets": [],
        "products": [],
        "optins": [
            {"optin": optin, "answer": answer, "prechecked": False, "text_shown": f"text of {optin}", "version": 3}
            for optin, answer in answers.items()
        ],
        "fields": {},
    }
    return make_event("order.placed", tenant, data, source="/shop/web", id_=id_, time=isotime(at))


def command(type_: str, data: dict[str, Any], at: datetime, *, id_: str, tenant: str = "t1") -> dict[str, Any]:
    return make_event(type_, tenant, data, source="/backoffice", id_=id_, time=isotime(at))


def records(outs: list[Out], topic: str) -> list[dict[str, Any]]:
    return [out.event for out in outs if out.topic == topic]


def status(state: dict[str, Any], optin: str = "newsletter") -> str:
    return public_status(state)["optins"].get(optin, {}).get("status", "unknown")


def pending(settings: dict[str, Any] = DOI, at: datetime = T0) -> tuple[dict[str, Any], dict[str, Any]]:
    """A contact whose newsletter yes awaits confirmation, and the confirmation mail."""
    state, outs = apply(order({"newsletter": True}, at), None, settings, OPTINS, at, LINKS)
    [mail] = records(outs, OUTBOX)
    return state, mail


def confirm(state: dict[str, Any], request: str, at: datetime, *, id_: str = "click-1", tenant: str = "t1"):
    data = {"contact": "c-42", "optin": "newsletter", "request": request, "ip": "198.51.100.9",
            "user_agent": "Browser/2"}
    return apply(command("consent.confirm", data, at, id_=id_, tenant=tenant), state, DOI, OPTINS, at, LINKS)


# Single opt-in and plain answers


def test_yes_without_double_opt_in_is_opted_in_with_full_details() -> None:
    state, outs = apply(order({"newsletter": True}), None, SINGLE, OPTINS, T0, LINKS)

    assert status(state) == "opted_in"
    [log] = records(outs, CONSENT_LOG)
    assert log["type"] == "consent.changed" and log["tenant"] == "t1"
    assert log["data"] == {
        "contact": "c-42", "optin": "newsletter", "from": "unknown", "to": "opted_in", "method": "checkout",
        "channel": "web", "ip": "203.0.113.7", "user_agent": "Shop/1.0", "user": None, "note": None,
        "at": isotime(T0),
        "evidence": {"order": "o-evt-1", "text_shown": "text of newsletter", "version": 3, "prechecked": False},
    }
    [published] = records(outs, CONSENT_STATE)
    assert published["type"] == "consent.status"
    assert published["data"] == public_status(state)
    entry = published["data"]["optins"]["newsletter"]
    assert entry["created"] == entry["modified"] == isotime(T0)
    assert set(entry) == {"status", "method", "channel", "ip", "user", "note", "created", "modified", "evidence"}
    assert records(outs, OUTBOX) == []
    assert {out.key for out in outs} == {"t1/c-42"}


def test_no_is_opted_out_even_under_double_opt_in() -> None:
    state, outs = apply(order({"newsletter": False}), None, DOI, OPTINS, T0, LINKS)
    assert status(state) == "opted_out"
    assert [r["data"]["to"] for r in records(outs, CONSENT_LOG)] == ["opted_out"]
    assert records(outs, OUTBOX) == []


def test_yes_on_opted_in_changes_and_sends_nothing() -> None:
    state, _ = apply(order({"newsletter": True}), None, SINGLE, OPTINS, T0, LINKS)
    later = T0 + timedelta(days=5)
    again, outs = apply(order({"newsletter": True}, later, id_="evt-2"), state, DOI, OPTINS, later, LINKS)
    assert outs == []
    assert public_status(again) == public_status(state)


def test_created_stays_and_modified_moves() -> None:
    state, _ = apply(order({"newsletter": True}), None, SINGLE, OPTINS, T0, LINKS)
    later = T0 + timedelta(days=2)
    state, _ = apply(order({"newsletter": False}, later, id_="evt-2"), state, SINGLE, OPTINS, later, LINKS)
    entry = public_status(state)["optins"]["newsletter"]
    assert (entry["created"], entry["modified"]) == (isotime(T0), isotime(later))


def test_apply_does_not_modify_the_state_it_is_given() -> None:
    state, _ = apply(order({"newsletter": True}), None, SINGLE, OPTINS, T0, LINKS)
    before = copy.deepcopy(state)
    later = T0 + timedelta(hours=1)
    apply(order({"newsletter": False}, later, id_="evt-2"), state, SINGLE, OPTINS, later, LINKS)
    assert state == before


def test_no_rule_modifies_the_state_it_is_given() -> None:
    """The rules copy only the parts of a state they change, and share the rest with the new state:
    every step of a double opt-in (resend, reminder, confirmation, a second cycle, its expiry,
    manual and bulk changes, a revocation) leaves the state it started from as it was."""
    state, mail = pending()
    steps = [
        lambda s, at: apply(order({"newsletter": True, "partners": False}, at, id_="evt-2"), s, DOI, OPTINS, at, LINKS),
        lambda s, at: due(s, DOI, OPTINS, at, LINKS),
        lambda s, at: confirm(s, mail["data"]["request"], at),
        lambda s, at: apply(command("consent.revoke", {"contact": "c-42", "optin": "newsletter"}, at, id_="rev-1"),
                            s, DOI, OPTINS, at, LINKS),
        lambda s, at: apply(order({"newsletter": True}, at, id_="evt-3", email="ann@new.example"), s, DOI, OPTINS, at, LINKS),
        lambda s, at: apply(bulk_for_contact(command("consent.bulk-set", {"contacts": ["c-42"], "optin": "partners",
                                                                          "status": "opted_in"}, at, id_="b-1"), "c-42"),
                            s, DOI, OPTINS, at, LINKS),
        lambda s, at: due(s, DOI, OPTINS, at + timedelta(days=15), LINKS),
    ]
    at = T0
    for step in steps:
        at += timedelta(days=3)
        before = copy.deepcopy(state)
        after, outs = step(state, at)
        assert state == before
        assert outs and after != state
        state = after
    assert [status(state, optin) for optin in ("newsletter", "partners")] == ["expired", "opted_in"]


def test_records_the_consent_stage_has_no_rule_for_change_nothing() -> None:
    state, _ = apply(order({"newsletter": True}), None, SINGLE, OPTINS, T0, LINKS)
    cancelled = command("order.cancelled", {"order": "o-evt-1", "contact": "c-42"}, T0, id_="x")
    assert apply(cancelled, state, SINGLE, OPTINS, T0, LINKS) == (state, [])


# Double opt-in


def test_yes_under_double_opt_in_is_pending_with_a_confirmation_mail() -> None:
    state, outs = apply(order({"newsletter": True}), None, DOI, OPTINS, T0, LINKS)

    assert status(state) == "pending"
    assert [r["data"]["to"] for r in records(outs, CONSENT_LOG)] == ["pending"]
    [mail] = records(outs, OUTBOX)
    data = mail["data"]
    assert mail["type"] == "message.requested" and mail["id"] == data["request"]
    assert {k: data[k] for k in ("kind", "layout", "message", "contact", "channel", "language")} == {
        "kind": "doi-confirmation", "layout": "doi-confirmation", "message": None, "contact": "c-42",
        "channel": "email", "language": "nl",
    }
    assert data["to"] == {"email": "ann@example.com", "phone": "+32470000000"}
    assert data["vars"]["optin"] == "newsletter"
    assert data["vars"]["optin_text"] == "Stuur mij de nieuwsbrief"
    url = urlsplit(data["vars"]["confirm_url"])
    assert f"{url.scheme}://{url.netloc}{url.path}" == "https://usher.venue.example/doi/confirm"
    token = parse_qs(url.query)["token"][0]
    claims = read_confirm_token(token, LINKS.secret, DoiPolicy.from_settings(DOI).token_max_age_s, T0)
    assert claims == ConfirmClaims("t1", "c-42", "newsletter", data["request"])


def test_confirm_link_uses_the_stage_address_without_public_url() -> None:
    settings = {k: v for k, v in DOI.items() if k != "public_url"}
    _, mail = pending(settings)
    assert mail["data"]["vars"]["confirm_url"].startswith("http://127.0.0.1:6067/doi/confirm?token=")


def test_double_opt_in_applies_only_to_the_listed_optins() -> None:
    state, outs = apply(order({"newsletter": True, "partners": True}), None, DOI, OPTINS, T0, LINKS)
    assert (status(state, "newsletter"), status(state, "partners")) == ("pending", "opted_in")
    assert [m["data"]["vars"]["optin"] for m in records(outs, OUTBOX)] == ["newsletter"]
    assert len(records(outs, CONSENT_STATE)) == 1


def test_double_opt_in_switched_off_is_single_opt_in_even_when_listed() -> None:
    state, outs = apply(order({"newsletter": True}), None, {**DOI, "double_opt_in": False}, OPTINS, T0, LINKS)
    assert status(state) == "opted_in"
    assert records(outs, OUTBOX) == []


def test_yes_again_while_pending_resends_only_after_a_day() -> None:
    state, first = pending()
    soon = T0 + timedelta(hours=20)
    state, outs = apply(order({"newsletter": True}, soon, id_="evt-2"), state, DOI, OPTINS, soon, LINKS)
    assert outs == []

    later = T0 + timedelta(hours=25)
    state, outs = apply(order({"newsletter": True}, later, id_="evt-3"), state, DOI, OPTINS, later, LINKS)
    [resent] = outs
    assert resent.topic == OUTBOX and resent.event["data"]["kind"] == "doi-confirmation"
    assert resent.event["data"]["request"] != first["data"]["request"]
    assert status(state) == "pending"
    # The resent link confirms the same, still outstanding request.
    token = parse_qs(urlsplit(resent.event["data"]["vars"]["confirm_url"]).query)["token"][0]
    assert read_confirm_token(token, LINKS.secret, 3600, later).request == first["data"]["request"]

    # The same order delivered again a day later does not mail twice.
    next_day = later + timedelta(days=2)
    _, outs = apply(order({"newsletter": True}, later, id_="evt-3"), state, DOI, OPTINS, next_day, LINKS)
    assert outs == []


def test_confirmation_opts_in_with_the_click_details() -> None:
    state, mail = pending()
    click = T0 + timedelta(hours=2)
    state, outs = confirm(state, mail["data"]["request"], click)

    assert status(state) == "opted_in"
    [log] = records(outs, CONSENT_LOG)
    assert {k: log["data"][k] for k in ("from", "to", "method", "ip", "user_agent", "at")} == {
        "from": "pending", "to": "opted_in", "method": "doi-confirmation", "ip": "198.51.100.9",
        "user_agent": "Browser/2", "at": isotime(click),
    }
    assert log["data"]["evidence"]["order"] == "o-evt-1"
    assert log["data"]["evidence"]["request"] == mail["data"]["request"]
    assert public_status(state)["optins"]["newsletter"]["created"] == isotime(T0)
    assert next_due_at(state, DOI) is None


def test_a_used_confirmation_changes_nothing_the_second_time() -> None:
    state, mail = pending()
    request = mail["data"]["request"]
    click = T0 + timedelta(hours=2)
    state, _ = confirm(state, request, click)

    again = click + timedelta(minutes=5)
    claims = ConfirmClaims("t1", "c-42", "newsletter", request)
    assert confirmation_problem(state, DOI, claims, again) == USED
    after, outs = confirm(state, request, again, id_="click-2")
    assert outs == [] and after == state


def test_confirmation_of_another_request_changes_nothing() -> None:
    state, _ = pending()
    click = T0 + timedelta(hours=2)
    claims = ConfirmClaims("t1", "c-42", "newsletter", "not-the-request")
    assert confirmation_problem(state, DOI, claims, click) == EXPIRED
    after, outs = confirm(state, "not-the-request", click)
    assert outs == [] and status(after) == "pending"


def test_confirmation_after_the_expiry_time_changes_nothing_even_before_due_ran() -> None:
    state, mail = pending()
    click = T0 + timedelta(days=14, seconds=1)
    claims = ConfirmClaims("t1", "c-42", "newsletter", mail["data"]["request"])
    assert confirmation_problem(state, DOI, claims, click) == EXPIRED
    after, outs = confirm(state, mail["data"]["request"], click)
    assert outs == [] and status(after) == "pending"


def test_confirmation_of_a_contact_without_state_changes_nothing() -> None:
    claims = ConfirmClaims("t1", "c-42", "newsletter", "req")
    assert confirmation_problem(None, DOI, claims, T0) == EXPIRED


def test_confirm_command_from_the_page_confirms() -> None:
    state, mail = pending()
    click = T0 + timedelta(hours=3)
    claims = ConfirmClaims("t1", "c-42", "newsletter", mail["data"]["request"])
    assert confirmation_problem(state, DOI, claims, click) is None
    out = confirm_command(claims, "198.51.100.9", "Browser/2", click)
    assert (out.topic, out.key, out.event["type"]) == (COMMANDS, "t1/c-42", "consent.confirm")
    assert out.event["data"] == {"contact": "c-42", "optin": "newsletter", "request": mail["data"]["request"],
                                 "ip": "198.51.100.9", "user_agent": "Browser/2"}
    state, _ = apply(out.event, state, DOI, OPTINS, click, LINKS)
    assert status(state) == "opted_in"


# Reminders and expiry


def test_reminders_every_three_days_at_most_two_then_expiry() -> None:
    state, _ = pending()
    assert next_due_at(state, DOI) == T0 + timedelta(days=3)

    state, outs = due(state, DOI, OPTINS, T0 + timedelta(days=2, hours=23), LINKS)
    assert outs == []

    sent = []
    for day in (3, 6):
        moment = T0 + timedelta(days=day)
        state, outs = due(state, DOI, OPTINS, moment, LINKS)
        [reminder] = records(outs, OUTBOX)
        assert reminder["data"]["kind"] == reminder["data"]["layout"] == "doi-reminder"
        assert reminder["data"]["to"]["email"] == "ann@example.com"
        sent.append(reminder["data"]["request"])
        assert status(state) == "pending"
    assert len(set(sent)) == 2

    # Third reminder would be due at day 9, but the maximum is two: next is the expiry.
    assert next_due_at(state, DOI) == T0 + timedelta(days=14)
    state, outs = due(state, DOI, OPTINS, T0 + timedelta(days=10), LINKS)
    assert outs == []

    state, outs = due(state, DOI, OPTINS, T0 + timedelta(days=14), LINKS)
    assert status(state) == "expired"
    [log] = records(outs, CONSENT_LOG)
    assert (log["data"]["from"], log["data"]["to"], log["data"]["method"]) == ("pending", "expired", "doi-expired")
    assert log["data"]["at"] == isotime(T0 + timedelta(days=14))
    assert records(outs, CONSENT_STATE)[0]["data"] == public_status(state)
    assert records(outs, OUTBOX) == []
    assert next_due_at(state, DOI) is None


def test_fractional_days() -> None:
    settings = {**DOI, "doi_reminder_every_days": 0.5, "doi_max_reminders": 5, "doi_expire_after_days": 1.25}
    state, _ = pending(settings)
    assert next_due_at(state, settings) == T0 + timedelta(hours=12)
    state, outs = due(state, settings, OPTINS, T0 + timedelta(hours=12), LINKS)
    assert len(records(outs, OUTBOX)) == 1
    state, _ = due(state, settings, OPTINS, T0 + timedelta(hours=24), LINKS)
    # The next reminder (36 h) would come after the expiry (30 h).
    assert next_due_at(state, settings) == T0 + timedelta(hours=30)
    state, _ = due(state, settings, OPTINS, T0 + timedelta(hours=29, minutes=59), LINKS)
    assert status(state) == "pending"
    state, _ = due(state, settings, OPTINS, T0 + timedelta(hours=30), LINKS)
    assert status(state) == "expired"


def test_reminders_count_from_the_last_mail_including_a_resend() -> None:
    state, _ = pending()
    resend_at = T0 + timedelta(days=2)
    state, outs = apply(order({"newsletter": True}, resend_at, id_="evt-2"), state, DOI, OPTINS, resend_at, LINKS)
    assert len(outs) == 1
    assert next_due_at(state, DOI) == resend_at + timedelta(days=3)


def test_expiry_counts_from_becoming_pending_not_from_the_last_mail() -> None:
    state, _ = pending()
    resend_at = T0 + timedelta(days=12)
    state, _ = apply(order({"newsletter": True}, resend_at, id_="evt-2"), state, DOI, OPTINS, resend_at, LINKS)
    state, _ = due(state, DOI, OPTINS, T0 + timedelta(days=14), LINKS)
    assert status(state) == "expired"


def test_a_stage_down_past_the_expiry_expires_without_late_reminders() -> None:
    state, _ = pending()
    state, outs = due(state, DOI, OPTINS, T0 + timedelta(days=20), LINKS)
    assert status(state) == "expired"
    assert records(outs, OUTBOX) == []


def test_due_run_twice_at_the_same_moment_mails_once() -> None:
    state, _ = pending()
    moment = T0 + timedelta(days=3)
    state, outs = due(state, DOI, OPTINS, moment, LINKS)
    assert len(outs) == 1
    _, outs = due(state, DOI, OPTINS, moment, LINKS)
    assert outs == []


def test_after_expiry_a_new_yes_starts_a_new_request() -> None:
    state, first = pending()
    state, _ = due(state, DOI, OPTINS, T0 + timedelta(days=14), LINKS)
    later = T0 + timedelta(days=30)
    state, outs = apply(order({"newsletter": True}, later, id_="evt-9"), state, DOI, OPTINS, later, LINKS)
    assert status(state) == "pending"
    [mail] = records(outs, OUTBOX)
    assert mail["data"]["request"] != first["data"]["request"]
    old = ConfirmClaims("t1", "c-42", "newsletter", first["data"]["request"])
    assert confirmation_problem(state, DOI, old, later + timedelta(hours=1)) == EXPIRED


def test_reminders_go_to_the_newest_order_address() -> None:
    state, _ = pending()
    newer = T0 + timedelta(hours=1)
    state, _ = apply(order({}, newer, id_="evt-2", email="ann@new.example"), state, DOI, OPTINS, newer, LINKS)
    late_old = T0 - timedelta(days=1)
    state, _ = apply(order({}, late_old, id_="evt-0", email="ann@old.example"), state, DOI, OPTINS, newer, LINKS)
    _, outs = due(state, DOI, OPTINS, T0 + timedelta(days=3), LINKS)
    assert records(outs, OUTBOX)[0]["data"]["to"]["email"] == "ann@new.example"


# Manual, bulk, revoke and unsubscribe


def test_manual_set_records_reason_user_channel_and_ip() -> None:
    state, _ = pending()
    at = T0 + timedelta(hours=1)
    data = {"contact": "c-42", "optin": "newsletter", "status": "opted_in", "reason": "asked by phone",
            "user": "jan", "channel": "back-office", "ip": "198.51.100.4"}
    state, outs = apply(command("consent.set", data, at, id_="cmd-1"), state, DOI, OPTINS, at, LINKS)

    assert status(state) == "opted_in"
    [log] = records(outs, CONSENT_LOG)
    assert {k: log["data"][k] for k in ("from", "to", "method", "note", "user", "channel", "ip")} == {
        "from": "pending", "to": "opted_in", "method": "manual", "note": "asked by phone", "user": "jan",
        "channel": "back-office", "ip": "198.51.100.4",
    }
    entry = public_status(state)["optins"]["newsletter"]
    assert (entry["note"], entry["user"]) == ("asked by phone", "jan")
    # The manual answer ends the double opt-in: no reminders, no expiry.
    assert next_due_at(state, DOI) is None


def test_manual_set_to_the_current_status_logs_nothing() -> None:
    state, _ = apply(order({"newsletter": False}), None, SINGLE, OPTINS, T0, LINKS)
    at = T0 + timedelta(hours=1)
    data = {"contact": "c-42", "optin": "newsletter", "status": "opted_out", "reason": "r", "user": "jan",
            "channel": "back-office", "ip": None}
    assert apply(command("consent.set", data, at, id_="cmd-1"), state, SINGLE, OPTINS, at, LINKS)[1] == []


def test_bulk_set_gives_each_contact_its_own_change_naming_the_bulk_id() -> None:
    at = T0 + timedelta(hours=1)
    bulk = command("consent.bulk-set", {"contacts": ["c-1", "c-2"], "optin": "newsletter", "status": "opted_out",
                                        "reason": "cleanup", "user": "jan", "channel": "back-office", "ip": None},
                   at, id_="bulk-7")
    logs = []
    for contact in ("c-1", "c-2"):
        state, outs = apply(bulk_for_contact(bulk, contact), None, SINGLE, OPTINS, at, LINKS)
        assert status(state) == "opted_out"
        assert {out.key for out in outs} == {f"t1/{contact}"}
        logs += records(outs, CONSENT_LOG)
    assert [log["data"]["contact"] for log in logs] == ["c-1", "c-2"]
    assert all(log["data"]["evidence"]["bulk"] == "bulk-7" for log in logs)
    assert all(log["data"]["method"] == "bulk" and log["data"]["note"] == "cleanup" for log in logs)
    assert logs[0]["id"] != logs[1]["id"]


def test_revoke_opts_out_at_once_and_ends_a_pending_confirmation() -> None:
    state, mail = pending()
    at = T0 + timedelta(hours=1)
    data = {"contact": "c-42", "optin": "newsletter", "channel": "portal", "ip": "203.0.113.9", "user_agent": "B/1"}
    state, outs = apply(command("consent.revoke", data, at, id_="rev-1"), state, DOI, OPTINS, at, LINKS)
    assert status(state) == "opted_out"
    [log] = records(outs, CONSENT_LOG)
    assert (log["data"]["method"], log["data"]["channel"], log["data"]["user_agent"]) == ("revoke", "portal", "B/1")
    assert next_due_at(state, DOI) is None
    _, outs = confirm(state, mail["data"]["request"], at + timedelta(hours=1))
    assert outs == []


def test_one_click_unsubscribe_revokes_every_optin_of_the_channel_purpose() -> None:
    state, _ = apply(order({"newsletter": True, "partners": True, "sms-news": True}), None, SINGLE, OPTINS, T0, LINKS)
    at = T0 + timedelta(days=1)
    claims = UnsubscribeClaims("t1", "c-42", "email", "req-mail-5")
    commands = unsubscribe_commands(claims, OPTINS, "203.0.113.9", "Mail/1", at)
    assert {(out.topic, out.key, out.event["type"]) for out in commands} == {(COMMANDS, "t1/c-42", "consent.revoke")}
    assert sorted(out.event["data"]["optin"] for out in commands) == ["newsletter", "partners"]
    for out in commands:
        state, outs = apply(out.event, state, SINGLE, OPTINS, at, LINKS)
        assert records(outs, CONSENT_LOG)[0]["data"]["evidence"]["request"] == "req-mail-5"
    assert [status(state, o) for o in ("newsletter", "partners", "sms-news")] == ["opted_out", "opted_out", "opted_in"]


def test_sms_unsubscribe_touches_only_sms_optins() -> None:
    claims = UnsubscribeClaims("t1", "c-42", "sms", "req-sms-1")
    commands = unsubscribe_commands(claims, OPTINS, None, None, T0)
    assert [out.event["data"]["optin"] for out in commands] == ["sms-news"]


# Ordering and redelivery


def test_an_older_record_arriving_late_changes_and_logs_nothing() -> None:
    newer = T0 + timedelta(hours=1)
    data = {"contact": "c-42", "optin": "newsletter", "channel": "portal", "ip": None, "user_agent": None}
    state, _ = apply(command("consent.revoke", data, newer, id_="rev-1"), None, SINGLE, OPTINS, newer, LINKS)
    state, outs = apply(order({"newsletter": True}, T0), state, SINGLE, OPTINS, newer, LINKS)
    assert outs == []
    assert status(state) == "opted_out"


def test_the_same_record_twice_changes_nothing_the_second_time() -> None:
    state, _ = apply(order({"newsletter": True}), None, DOI, OPTINS, T0, LINKS)
    again, outs = apply(order({"newsletter": True}), state, DOI, OPTINS, T0 + timedelta(days=2), LINKS)
    assert outs == []
    assert again == state


def test_redelivery_before_the_state_was_saved_yields_the_same_record_ids() -> None:
    first = apply(order({"newsletter": True}), None, DOI, OPTINS, T0, LINKS)[1]
    second = apply(order({"newsletter": True}), None, DOI, OPTINS, T0 + timedelta(seconds=30), LINKS)[1]
    assert [out.event["id"] for out in first] == [out.event["id"] for out in second]
    assert records(first, OUTBOX)[0]["data"]["request"] == records(second, OUTBOX)[0]["data"]["request"]


@pytest.mark.parametrize("first", [0, 1])
def test_records_with_the_same_time_end_the_same_whatever_the_arrival_order(first: int) -> None:
    yes = order({"newsletter": True}, T0, id_="evt-a")
    no = order({"newsletter": False}, T0, id_="evt-b")
    arrivals = [yes, no] if first == 0 else [no, yes]
    state = None
    for record in arrivals:
        state, _ = apply(record, state, SINGLE, OPTINS, T0, LINKS)
    assert status(state) == "opted_out"


def test_a_revocation_made_before_the_expiry_still_counts_when_it_arrives_after() -> None:
    state, _ = pending()
    state, _ = due(state, DOI, OPTINS, T0 + timedelta(days=14), LINKS)
    made = T0 + timedelta(days=13)
    data = {"contact": "c-42", "optin": "newsletter", "channel": "portal", "ip": None, "user_agent": None}
    state, outs = apply(command("consent.revoke", data, made, id_="rev-1"), state, DOI, OPTINS, made, LINKS)
    assert status(state) == "opted_out"
    assert records(outs, CONSENT_LOG)[0]["data"]["from"] == "expired"


def test_a_confirmation_is_not_lost_to_a_later_redundant_yes() -> None:
    state, mail = pending()
    click = T0 + timedelta(hours=5)
    order_after = T0 + timedelta(hours=6)
    state, _ = apply(order({"newsletter": True}, order_after, id_="evt-2"), state, DOI, OPTINS, order_after, LINKS)
    state, outs = confirm(state, mail["data"]["request"], click)
    assert status(state) == "opted_in"


# Tenants


def test_two_tenants_with_the_same_contact_id_are_kept_apart() -> None:
    t1, outs1 = apply(order({"newsletter": True}, tenant="t1"), None, DOI, OPTINS, T0, LINKS)
    t2, outs2 = apply(order({"newsletter": True}, tenant="t2"), None, DOI, OPTINS, T0, LINKS)

    assert {out.key for out in outs1} == {"t1/c-42"} and {out.key for out in outs2} == {"t2/c-42"}
    assert {out.event["tenant"] for out in outs1} == {"t1"} and {out.event["tenant"] for out in outs2} == {"t2"}
    assert not {out.event["id"] for out in outs1} & {out.event["id"] for out in outs2}

    # t1's confirmation request means nothing to t2's contact.
    request1, request2 = (records(outs, OUTBOX)[0]["data"]["request"] for outs in (outs1, outs2))
    click = T0 + timedelta(hours=1)
    _, outs = confirm(t2, request1, click, tenant="t2")
    assert outs == []
    t2, _ = confirm(t2, request2, click, tenant="t2")
    assert (status(t1), status(t2)) == ("pending", "opted_in")

    # A record of one tenant never applies to the other tenant's state.
    with pytest.raises(ValueError):
        apply(order({"newsletter": False}, tenant="t2"), t1, SINGLE, OPTINS, T0, LINKS)


def test_due_outputs_name_the_contacts_tenant() -> None:
    state, _ = apply(order({"newsletter": True}, tenant="t2"), None, DOI, OPTINS, T0, LINKS)
    _, outs = due(state, DOI, OPTINS, T0 + timedelta(days=14), LINKS)
    assert {out.key for out in outs} == {"t2/c-42"}
    assert {out.event["tenant"] for out in outs} == {"t2"}



def test_missing_or_null_settings_take_the_contract_defaults() -> None:
    policy = DoiPolicy.from_settings({"double_opt_in": True, "doi_optins": ["newsletter"],
                                      "doi_reminder_every_days": None, "doi_max_reminders": None})
    assert (policy.remind_every, policy.max_reminders, policy.expire_after) == (
        timedelta(days=3), 2, timedelta(days=14))
    assert policy.applies("newsletter") and not DoiPolicy.from_settings(None).applies("newsletter")


def test_no_reminders_when_the_maximum_is_zero() -> None:
    settings = {**DOI, "doi_max_reminders": 0}
    state, _ = pending(settings)
    assert next_due_at(state, settings) == T0 + timedelta(days=14)


def test_without_an_email_address_nothing_is_mailed_and_the_request_still_expires() -> None:
    state, outs = apply(order({"newsletter": True}, email=None), None, DOI, OPTINS, T0, LINKS)
    assert status(state) == "pending"
    assert records(outs, OUTBOX) == []
    _, outs = due(state, DOI, OPTINS, T0 + timedelta(days=3), LINKS)
    assert records(outs, OUTBOX) == []
    state, _ = due(state, DOI, OPTINS, T0 + timedelta(days=14), LINKS)
    assert status(state) == "expired"


def test_a_bulk_set_for_a_segment_is_narrowed_to_each_member() -> None:
    bulk = command("consent.bulk-set", {"segment": "msg-1", "optin": "newsletter", "status": "opted_in"},
                   T0, id_="bulk-8")
    state, outs = apply(bulk_for_contact(bulk, "c-7"), None, SINGLE, OPTINS, T0, LINKS)
    assert public_status(state)["contact"] == "c-7" and status(state) == "opted_in"
    assert records(outs, CONSENT_LOG)[0]["data"]["evidence"]["bulk"] == "bulk-8"


def test_a_bulk_set_not_fanned_out_is_refused() -> None:
    bulk = command("consent.bulk-set", {"contacts": ["c-1", "c-2"], "optin": "newsletter", "status": "opted_in"},
                   T0, id_="bulk-9")
    with pytest.raises(ValueError):
        apply(bulk, None, SINGLE, OPTINS, T0, LINKS)


def test_every_record_produced_and_every_command_written_meets_the_contract_schemas() -> None:
    produced: list[Out] = []
    state, outs = apply(order({"newsletter": True, "partners": False}), None, DOI, OPTINS, T0, LINKS)
    produced += outs
    request = records(outs, OUTBOX)[0]["data"]["request"]
    state, outs = due(state, DOI, OPTINS, T0 + timedelta(days=3), LINKS)
    produced += outs
    click = T0 + timedelta(days=4)
    claims = ConfirmClaims("t1", "c-42", "newsletter", request)
    produced.append(confirm_command(claims, None, None, click))
    produced.append(confirm_command(claims, "2001:db8::1", "Browser/2", click))
    state, outs = apply(produced[-1].event, state, DOI, OPTINS, click, LINKS)
    produced += outs
    bulk = command("consent.bulk-set", {"contacts": ["c-42", "c-43"], "optin": "partners", "status": "opted_in",
                                        "reason": "r", "user": "jan", "channel": "back-office"}, click, id_="b-1")
    produced.append(Out(COMMANDS, "t1/~bulk/b-1", bulk_for_contact(bulk, "c-42")))
    state, outs = apply(produced[-1].event, state, DOI, OPTINS, click, LINKS)
    produced += outs
    unsubscribe = UnsubscribeClaims("t1", "c-42", "email", "req-5")
    produced += unsubscribe_commands(unsubscribe, OPTINS, None, None, click)
    for out in unsubscribe_commands(unsubscribe, OPTINS, "203.0.113.9", "Mail/1", click):
        produced.append(out)
        state, outs = apply(out.event, state, DOI, OPTINS, click, LINKS)
        produced += outs
    later, _ = pending()
    produced += due(later, DOI, OPTINS, T0 + timedelta(days=14), LINKS)[1]

    types = {out.event["type"] for out in produced}
    assert types == {"consent.changed", "consent.status", "message.requested", "consent.confirm",
                     "consent.bulk-set", "consent.revoke"}
    assert [(out.event["type"], problem(out.event)) for out in produced if problem(out.event)] == []


def test_pages_address_the_contact_in_their_order_language() -> None:
    state, _ = pending()
    assert contact_language(state, DOI) == "nl"
    assert contact_language(None, {**DOI, "default_language": "de"}) == "de"
    assert optin_text(OPTINS["newsletter"], "nl", "en") == "Stuur mij de nieuwsbrief"
    assert optin_text(OPTINS["newsletter"], "no", "de") == "Send me the newsletter"
